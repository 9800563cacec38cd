"""Keeping the view fresh: a background poll of every substation's /metrics, and
an on-demand refresh for the routing path.

The background poll runs every POLL_INTERVAL_SECONDS, and at least every
UNROUTABLE_POLL_INTERVAL_SECONDS while no substation is routable: a balancer that
started before its substations listened (or saw all of them go down) routes
again moments after they answer, not a whole interval later.

The refresh is single-flight and rate-limited: when a request finds no room in
the view, the view may just be old (sessions ended since the last poll, or the
balancer has only just started). One refresh serves every request waiting at
that moment, and at most one runs per REFRESH_MIN_INTERVAL_SECONDS while some
substation is routable, so a burst of rejected requests cannot turn into a burst
of polls of a working grid.

A poll trusts nothing it reads: the whole of it (connecting, headers, body) ends
within CONNECT_TIMEOUT_SECONDS + POLL_TIMEOUT_SECONDS however slowly the other
end sends, its body stops being read past MAX_METRICS_BYTES, and a failure is
described in our words, never by quoting the answer. A URL that trickles or
floods therefore costs one poll thread for a bounded time, like a dead one.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable

import requests

from gridcommon.httpclient import BoundedGetError, HttpClient
from gridcommon.promtext import families_query, parse_metrics
from gridcommon.validation import is_substation_id
from load_balancer.view import GridView, Observation, SubstationConflict

log = logging.getLogger(__name__)

MAX_PARALLEL_POLLS = 32
# While no substation is routable (at start, or all of them down), polls repeat this often at
# least: a balancer whose first poll came before the substations listened routes as soon as they
# do, not a whole poll interval later.
UNROUTABLE_POLL_INTERVAL_SECONDS = 1.0
# A substation's page is about 10 KB; a thousand times that is not a substation's.
DEFAULT_MAX_METRICS_BYTES = 1024 * 1024


class PollError(Exception):
    """A substation's /metrics could not be read; the message says why."""


def describe_request_error(exc: requests.RequestException) -> str:
    """A short human reason for a failed outgoing call (requests' own text is a wall of repr)."""
    if isinstance(exc, requests.Timeout):
        return "no answer within the timeout"
    if isinstance(exc, requests.ConnectionError):
        return "connection refused or broken (is it running?)"
    return f"request failed ({type(exc).__name__})"


def record_failure(view: GridView, url: str, reason: str, eject: bool = False) -> None:
    """Count a failed poll or forward in the view; say so once when it marks the substation down."""
    if view.record_failure(url, reason, eject=eject):
        until = "it is ejected for a while, then a poll must succeed" if eject else "until a poll succeeds"
        log.warning("substation at %s marked down; no requests go there %s: %s", url, until, reason)


# What read_substation_metrics reads of a substation's page.
SUBSTATION_FAMILIES = frozenset({
    "current_load", "substation_state_version", "admission_capacity", "total_capacity", "active_chargers",
    "minimum_load_kw", "charging_sessions", "curtailed_sessions", "fair_share_kw", "min_charge_kw",
})
SUBSTATION_QUERY = families_query(SUBSTATION_FAMILIES)


def read_substation_metrics(text: str) -> tuple[str, Observation]:
    """The substation id and its state from a substation's /metrics page.

    Raises ``ValueError`` when the page is not a substation's metrics page; its
    message is ours and never quotes the page, which may be anything.
    """
    try:
        scrape = parse_metrics(text, only=SUBSTATION_FAMILIES)
    except Exception:  # the parser's errors quote the offending line, and are not all ValueErrors
        raise ValueError("it is not in the Prometheus text format") from None
    labels = scrape.labels_of("current_load") or {}
    substation_id = labels.get("substation")
    if not substation_id:
        raise ValueError("it has no current_load{substation=...} sample")
    if not is_substation_id(substation_id):
        # The id goes into URLs, metric labels and log lines.
        raise ValueError("its substation label is not a substation id (1 to 64 of A-Z, a-z, 0-9, '.', '_', '-')")

    def checked(name: str, value: float | None) -> float | None:
        # Every figure here is a count or a power: NaN, infinity or below zero would poison routing
        # (an infinite capacity would draw every request).
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"its {name} sample is not a finite number of at least 0")
        return value

    def required(name: str) -> float:
        value = checked(name, scrape.value(name, substation=substation_id))
        if value is None:
            raise ValueError(f"it has no {name} sample")
        return value

    def optional(name: str, **labels: str) -> float | None:
        return checked(name, scrape.value(name, substation=substation_id, **labels))

    curtailed = int(optional("curtailed_sessions") or 0)
    min_charge = optional("min_charge_kw")
    return substation_id, Observation(
        state_version=int(required("substation_state_version")),
        load_kw=required("current_load"),
        capacity_kw=required("admission_capacity"),
        total_capacity_kw=required("total_capacity"),
        active_chargers=int(required("active_chargers")),
        minimum_load_kw=optional("minimum_load_kw"),
        suspended=int(optional("charging_sessions", state="suspended") or 0),
        curtailed=curtailed,
        fair_share_kw=optional("fair_share_kw") if curtailed else None,
        # 0 means strict: a session gets its whole amount or nothing.
        min_charge_kw=min_charge or None,
    )


class Poller:
    """Polls every substation in the view, on a timer and on demand."""

    def __init__(
        self,
        view: GridView,
        client: HttpClient,
        interval_seconds: float,
        refresh_min_interval_seconds: float,
        observe_duration: Callable[[float], None],
        after_successful_poll: Callable[[str], None] = lambda url: None,
        clock: Callable[[], float] = time.monotonic,
        max_metrics_bytes: int = DEFAULT_MAX_METRICS_BYTES,
        parallel_polls: int = MAX_PARALLEL_POLLS,
    ) -> None:
        self._view = view
        self._after_successful_poll = after_successful_poll
        self._client = client
        self._interval = interval_seconds
        self._refresh_min_interval = refresh_min_interval_seconds
        self._observe_duration = observe_duration
        self._clock = clock
        self._max_metrics_bytes = max_metrics_bytes
        connect_timeout, read_timeout = client.timeout
        # The most one poll takes, from connecting to its last byte (a total, not per socket read).
        self._poll_limit = connect_timeout + read_timeout
        # A round waits that long for its polls, and a moment more for the threads to report.
        self._round_timeout = self._poll_limit + 0.5
        # Threads start only when needed; enough of them that every substation's poll starts at once.
        self._executor = ThreadPoolExecutor(max(MAX_PARALLEL_POLLS, parallel_polls), thread_name_prefix="poll")
        self._cond = threading.Condition()
        self._polling = False
        self._rounds_done = 0
        self._last_round_end: float | None = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def round_timeout(self) -> float:
        """The longest one poll of every substation, and so one refresh, takes."""
        return self._round_timeout

    # One substation ---------------------------------------------------------

    @property
    def poll_limit(self) -> float:
        """The most one poll of one substation takes, however slowly it answers."""
        return self._poll_limit

    def fetch(self, url: str) -> tuple[str, Observation]:
        """Read one substation's id and state, within :attr:`poll_limit`; raises :class:`PollError`.

        The message says what was wrong (no answer, an HTTP status, too slow, too
        large, not a substation's page) and never quotes what the URL sent.
        """
        try:
            answer = self._client.get_bounded(
                f"{url}/metrics?{SUBSTATION_QUERY}", max_bytes=self._max_metrics_bytes, total_seconds=self._poll_limit
            )
        except BoundedGetError as exc:
            raise PollError(f"polling {url}/metrics failed: {exc}") from None
        if answer.status != 200:
            raise PollError(f"polling {url}/metrics failed: it answered HTTP {answer.status}")
        try:
            return read_substation_metrics(answer.body.decode("utf-8"))
        except UnicodeDecodeError:
            raise PollError(f"{url}/metrics is not a substation's metrics page: it is not UTF-8 text") from None
        except ValueError as exc:
            raise PollError(f"{url}/metrics is not a substation's metrics page: {exc}") from None

    def _poll_one(self, url: str, marker: int) -> None:
        try:
            substation_id, observation = self.fetch(url)
            came_up = self._view.record_poll(url, substation_id, observation, marker)
        except (PollError, SubstationConflict) as exc:
            record_failure(self._view, url, str(exc))
            return
        except Exception:
            # A bug here must still count as a failed poll, not vanish inside the executor's future.
            log.exception("polling %s/metrics failed unexpectedly", url)
            record_failure(self._view, url, f"polling {url}/metrics failed: unexpected error in the balancer")
            return
        if came_up:
            log.info("substation %s at %s is up and routable", substation_id, url)
        # Outside this round, which must stay bounded by the poll timeout.
        self._executor.submit(self._after_successful_poll, url)

    # Every substation -------------------------------------------------------

    def poll_all(self) -> None:
        """Poll every substation at once and wait (bounded) for the answers."""
        started = time.perf_counter()
        targets = self._view.poll_targets()
        futures = {self._executor.submit(self._poll_one, url, marker): url for url, marker in targets}
        _, late = wait(futures, timeout=self._round_timeout)
        for future in late:
            url = futures[future]
            record_failure(self._view, url, f"polling {url}/metrics took longer than {self._round_timeout:g}s")
        self._observe_duration(time.perf_counter() - started)

    def refresh(self) -> None:
        """Bring the view up to date for a request that found no room in it.

        Joins a poll already under way instead of starting another; does nothing
        when the last poll ended less than REFRESH_MIN_INTERVAL_SECONDS ago, unless
        that poll left no substation routable: then the grid may have come up since
        (a balancer started before its substations), and a refused poll costs little.
        """
        self._single_flight(rate_limited=self._any_routable())

    def _single_flight(self, rate_limited: bool) -> None:
        with self._cond:
            if self._polling:
                round_in_progress = self._rounds_done
                self._cond.wait_for(lambda: self._rounds_done != round_in_progress, timeout=self._round_timeout)
                return
            if rate_limited and self._polled_recently():
                return
            self._polling = True
        try:
            self.poll_all()
        finally:
            with self._cond:
                self._polling = False
                self._rounds_done += 1
                self._last_round_end = self._clock()
                self._cond.notify_all()

    def _polled_recently(self) -> bool:
        return self._last_round_end is not None and self._clock() - self._last_round_end < self._refresh_min_interval

    # Background thread ------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="substation-poller", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self._single_flight(rate_limited=False)
            except Exception:  # a bug in one round must not end polling for good
                log.exception("polling round failed; trying again in %gs", self._interval)
            self._stopped.wait(self._pause())

    def _pause(self) -> float:
        """The time until the next round: shorter while no substation can be routed to."""
        if self._any_routable():
            return self._interval
        return min(self._interval, UNROUTABLE_POLL_INTERVAL_SECONDS)

    def _any_routable(self) -> bool:
        return any(substation.up for substation in self._view.snapshots())

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=self._round_timeout + 1)
        self._executor.shutdown(wait=False, cancel_futures=True)
