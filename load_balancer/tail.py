"""How long a forward may take, and when to hedge it: from what the substations really take.

A substation answers a charge request in milliseconds, so a fixed 5 s read timeout
means a frozen substation stalls every request sent to it for 5 s. Instead, as in
"The Tail at Scale" (Dean and Barroso) and Envoy's hedging:

* the forward timeout follows the recent forwards: ``timeout_factor`` times their
  99th percentile, never below ``min_timeout_seconds`` nor above the configured
  ``FORWARD_TIMEOUT_SECONDS``;
* a forward still unanswered after ``hedge_factor`` times the recent 95th
  percentile (at least ``min_hedge_delay_seconds``) gets a hedge: the same
  request, under the same session id, to the next candidate. Whichever admits
  first is used, and the other admission is stopped.

Hedges for mere slowness are paid from a budget, as Finagle's retry budget: each
answered forward adds ``hedge_budget_ratio`` of a hedge, up to ``hedge_budget_burst``,
and none is sent before the first percentiles are known, so a burst that makes
every substation slow does not double the load on them.

A substation on which forwards have waited for ``unresponsive_seconds`` with no
answer from it meanwhile is suspect: it is put last by the routing,
and a forward waiting on it is hedged whatever the budget. One silent for half
the forward timeout is ejected (``GridView``). A busy substation still answers
something every few milliseconds; only a stuck one goes quiet.

The percentiles come from the last ``window`` answered forwards, recomputed every
``recompute_every`` of them so that no request pays for sorting.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class TailSettings:
    max_timeout_seconds: float = 5.0
    min_timeout_seconds: float = 1.0
    timeout_factor: float = 4.0
    hedging: bool = True
    min_hedge_delay_seconds: float = 0.05
    hedge_factor: float = 2.0
    hedge_budget_ratio: float = 0.05
    hedge_budget_burst: float = 10.0
    min_unresponsive_seconds: float = 0.2
    window: int = 512
    recompute_every: int = 64


class ForwardTiming:
    """Recent forward latencies, and the timeout and hedge delay they suggest. Thread-safe."""

    def __init__(self, settings: TailSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._latencies = [0.0] * settings.window
        self._count = 0
        # Until enough forwards were seen: the configured ceiling and the least hedge delay.
        self._timeout = settings.max_timeout_seconds
        self._hedge_delay = settings.min_hedge_delay_seconds
        self._p95: float | None = None
        self._p99: float | None = None
        self._hedge_tokens = settings.hedge_budget_burst

    def record(self, seconds: float) -> None:
        """An answered forward took ``seconds``; failures and abandoned forwards are not recorded."""
        with self._lock:
            self._hedge_tokens = min(self.settings.hedge_budget_burst,
                                     self._hedge_tokens + self.settings.hedge_budget_ratio)
            self._latencies[self._count % len(self._latencies)] = seconds
            self._count += 1
            if self._count % self.settings.recompute_every == 0:
                self._recompute()

    def _recompute(self) -> None:
        seen = sorted(self._latencies[: min(self._count, len(self._latencies))])
        self._p95 = seen[min(len(seen) - 1, int(0.95 * len(seen)))]
        self._p99 = seen[min(len(seen) - 1, int(0.99 * len(seen)))]
        limits = self.settings
        self._timeout = min(limits.max_timeout_seconds,
                            max(limits.min_timeout_seconds, limits.timeout_factor * self._p99))
        self._hedge_delay = min(self._timeout, max(limits.min_hedge_delay_seconds, limits.hedge_factor * self._p95))

    def take_hedge(self) -> bool:
        """Whether the budget allows one more hedge for slowness now (and spends it)."""
        with self._lock:
            if self._p95 is None or self._hedge_tokens < 1:
                return False
            self._hedge_tokens -= 1
            return True

    @property
    def unresponsive_seconds(self) -> float:
        """Silence, with forwards waiting, after which a substation is put last."""
        return max(self.settings.min_unresponsive_seconds, 2 * self._hedge_delay)

    @property
    def stall_seconds(self) -> float:
        """Silence, with forwards waiting, after which a substation is ejected without waiting for a timeout."""
        return self._timeout / 2

    @property
    def timeout_seconds(self) -> float:
        """The read timeout of the next forward."""
        return self._timeout

    @property
    def hedge_delay_seconds(self) -> float | None:
        """How long a forward goes unanswered before it is hedged; None when hedging is off."""
        return self._hedge_delay if self.settings.hedging else None

    def percentiles(self) -> tuple[float | None, float | None]:
        """The recent (p95, p99) of answered forwards, None before the first recomputation."""
        return self._p95, self._p99
