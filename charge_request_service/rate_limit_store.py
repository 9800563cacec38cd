"""An in-memory store for the rate limits that costs nothing between requests and has a bound.

limits' own ``memory://`` store runs a timer that walks every key a hundred times a second
to drop what expired: with one key per vehicle that is a busy core at rush hour. This one
forgets lazily instead. Its keys are kept in the order they were last hit, so each hit
first drops the windows at the old end that ran out, and past ``MAX_KEYS`` the key hit
least recently goes (its vehicle's count starts again: the limit errs towards letting a
request through, never towards refusing one wrongly).

``bounded-memory://`` names it for ``limits`` (``RATE_LIMIT_STORAGE_URI``); importing
this module registers the scheme. It supports the moving-window strategy the charge API
uses and the fixed-window one, in one process.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from limits.storage import MovingWindowSupport, Storage

log = logging.getLogger(__name__)

SCHEME = "bounded-memory"
# Two limits per vehicle by default (per second and per minute): room for 50,000 vehicles
# asking within one minute, a few tens of MB at most.
MAX_KEYS = 100_000


@dataclass
class _Window:
    expiry_seconds: float
    # When each hit of the window was taken, oldest first; never longer than the limit.
    hits: deque[float] = field(default_factory=deque)


@dataclass
class _Counter:
    count: int
    expires_at: float


class BoundedMemoryStorage(Storage, MovingWindowSupport):
    STORAGE_SCHEME = [SCHEME]

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, max_keys: int = MAX_KEYS,
                 **options: float | str | bool) -> None:
        self._lock = threading.Lock()
        self._max_keys = max_keys
        # Least recently hit first.
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        self._counters: OrderedDict[str, _Counter] = OrderedDict()
        self.evicted = 0
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return ValueError

    # Moving window ---------------------------------------------------------

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        if amount > limit:
            return False
        now = time.time()
        with self._lock:
            self._forget_expired_windows(now)
            window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = _Window(float(expiry))
            else:
                self._windows.move_to_end(key)
            hits = window.hits
            while hits and hits[0] < now - expiry:
                hits.popleft()
            if len(hits) + amount > limit:
                return False
            hits.extend([now] * amount)
            self._bound(self._windows)
            return True

    def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        """When the oldest hit still in the window was taken, and how many hits it holds."""
        now = time.time()
        with self._lock:
            window = self._windows.get(key)
            live = [hit for hit in window.hits if hit >= now - expiry] if window else []
        return (live[0], len(live)) if live else (now, 0)

    def _forget_expired_windows(self, now: float) -> None:
        while self._windows:
            key, window = next(iter(self._windows.items()))
            if window.hits and window.hits[-1] >= now - window.expiry_seconds:
                return
            del self._windows[key]

    # Fixed window ----------------------------------------------------------

    def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        now = time.time()
        with self._lock:
            self._forget_expired_counters(now)
            counter = self._counters.get(key)
            if counter is None or counter.expires_at <= now:
                counter = self._counters[key] = _Counter(0, now + expiry)
            self._counters.move_to_end(key)
            counter.count += amount
            self._bound(self._counters)
            return counter.count

    def get(self, key: str) -> int:
        with self._lock:
            counter = self._counters.get(key)
            return counter.count if counter is not None and counter.expires_at > time.time() else 0

    def get_expiry(self, key: str) -> float:
        with self._lock:
            counter = self._counters.get(key)
            return counter.expires_at if counter is not None else time.time()

    def _forget_expired_counters(self, now: float) -> None:
        # Counters are renewed in expiry order only per key; the oldest-hit end is where most ran out.
        while self._counters:
            key, counter = next(iter(self._counters.items()))
            if counter.expires_at > now:
                return
            del self._counters[key]

    # Both ------------------------------------------------------------------

    def _bound(self, table: OrderedDict) -> None:
        while len(table) > self._max_keys:
            table.popitem(last=False)
            self.evicted += 1
            if self.evicted == 1 or self.evicted % 10_000 == 0:
                log.warning(
                    "the rate-limit store holds its %d keys and forgets the least recently used ones (%d so far): "
                    "those vehicles' counts start again. A shared store (RATE_LIMIT_STORAGE_URI=redis://...) "
                    "has no such bound", self._max_keys, self.evicted)

    def check(self) -> bool:
        return True

    def reset(self) -> int | None:
        with self._lock:
            count = len(self._windows) + len(self._counters)
            self._windows.clear()
            self._counters.clear()
        return count

    def clear(self, key: str) -> None:
        with self._lock:
            self._windows.pop(key, None)
            self._counters.pop(key, None)

    def __len__(self) -> int:
        return len(self._windows) + len(self._counters)
