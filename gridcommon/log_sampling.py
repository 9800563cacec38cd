"""Which requests have their log lines written: every one when traffic is light, a sample when heavy.

Each service writes an access line and a line or two of what it did per request;
at hundreds of requests a second that is a large share of its CPU. As in zap's
sampler, the first ``burst`` requests of every second are logged in full and
after that one in ``every``. A request whose caller named it (its own
``X-Request-ID``) is always logged: whoever named it means to look for it.
Warnings, errors, failed answers (4xx, 5xx) and slow requests are always logged.

The choice is made once, where a request enters, and travels with it
(``X-Request-Logged``), so a request is logged in every service or in none.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

REQUEST_LOGGED_HEADER = "X-Request-Logged"
DEFAULT_BURST_PER_SECOND = 20
DEFAULT_SAMPLE_EVERY = 100


@dataclass(frozen=True)
class LogSampling:
    """``ACCESS_LOG_BURST`` requests a second logged in full, then one in ``ACCESS_LOG_SAMPLE``.

    ``every`` 1 logs every request; 0 logs none past the burst.
    """

    burst_per_second: int = DEFAULT_BURST_PER_SECOND
    every: int = DEFAULT_SAMPLE_EVERY


class LogSampler:
    def __init__(self, sampling: LogSampling, clock: Callable[[], float] = time.monotonic) -> None:
        self._sampling = sampling
        self._clock = clock
        self._lock = threading.Lock()
        self._second = -1
        self._in_second = 0
        self._past_burst = 0

    def decide(self, passed_on: str | None, named_by_caller: bool) -> bool:
        """Whether this request's lines are logged; ``passed_on`` is an upstream service's choice."""
        if passed_on in ("0", "1"):
            return passed_on == "1"
        if named_by_caller or self._sampling.every == 1:
            return True
        second = int(self._clock())
        with self._lock:
            if second != self._second:
                self._second, self._in_second = second, 0
            self._in_second += 1
            if self._in_second <= self._sampling.burst_per_second:
                return True
            if self._sampling.every == 0:
                return False
            self._past_burst += 1
            return self._past_burst % self._sampling.every == 0
