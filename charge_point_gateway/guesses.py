"""Wrong station passwords per client address: a token bucket each, so guessing costs the guesser time.

Every password check that misses the gateway's cache runs scrypt (~50 ms of a core, on
purpose). Unbounded, one address sending wrong passwords back to back keeps a core busy
that the connected stations need. An address gets ``burst`` wrong passwords, then one
more every ``60 / per_minute`` seconds; past that its handshakes are refused (HTTP 429
with Retry-After) before any scrypt runs. Right passwords never spend the budget, so a
site of many stations behind one address reconnecting after a restart is not slowed.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

# Addresses tracked at once; past it the longest-tracked entries go first (the budget is memory too).
MAX_ADDRESSES = 10_000


class GuessBudget:
    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 max_addresses: int = MAX_ADDRESSES) -> None:
        self.rate = per_minute / 60.0
        self.burst = burst
        self._clock = clock
        self._max_addresses = max_addresses
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, at)

    def _tokens(self, address: str, now: float) -> float:
        tokens, at = self._buckets.get(address, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - at) * self.rate)

    def retry_after(self, address: str) -> int:
        """Whole seconds until ``address`` may try a password again; 0 when it may now."""
        tokens = self._tokens(address, self._clock())
        return 0 if tokens >= 1 else max(1, math.ceil((1 - tokens) / self.rate))

    def failed(self, address: str) -> None:
        """``address`` sent a wrong password: one token less."""
        now = self._clock()
        tokens = self._tokens(address, now) - 1
        self._buckets.pop(address, None)  # re-inserted last: the dict's order is oldest failure first
        if len(self._buckets) >= self._max_addresses:
            del self._buckets[next(iter(self._buckets))]
        self._buckets[address] = (tokens, now)
