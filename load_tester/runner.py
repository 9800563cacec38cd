"""Sends a run's requests and samples the balancer meanwhile.

A thread pool of ``concurrency`` workers takes the requests in the order they
are due; a worker waits for a request's due time before sending it. With a
ramp-up that paces a closed loop (never more than ``concurrency`` in flight);
with Poisson due times it is an open loop whose lateness is recorded, so a
saturated tool shows up in the figures instead of silently lowering the rate.
Bounded in count (the planned requests) and in time: nothing is sent after the
run's duration, and at its time limit (the duration, one HTTP timeout and a
grace) the requests still open are recorded as unanswered. A Ctrl-C stops
sending and waits (one HTTP timeout and a grace) for the answers in flight; a second
one stops waiting. Either way the run's records come back for the report.
"""
from __future__ import annotations

import logging
import secrets
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed, wait
from itertools import zip_longest

import requests
from tqdm import tqdm

from gridcommon.timefmt import format_time, utc_now
from load_tester.api import GridClient, StackError
from load_tester.records import (
    INTERRUPT,
    TIME_LIMIT,
    RequestResult,
    RunData,
    RunTiming,
    StatusSample,
    StopReason,
    classify_response,
    not_sent,
    parse_status,
    transport_failure,
    unanswered,
)
from load_tester.scenarios import LoadPlan, PlannedRequest

# A run never keeps more status samples than this, whatever its length.
MAX_SAMPLES = 100_000
# Extra time, beyond the run's duration and one HTTP timeout, before the run gives up waiting.
GRACE_SECONDS = 5.0

log = logging.getLogger(__name__)


class StatusSampler:
    """Reads the balancer's GET /status every ``interval`` seconds on a daemon thread."""

    def __init__(self, client: GridClient, interval: float, run_start: float) -> None:
        self.client = client
        self.interval = interval
        self.run_start = run_start
        self.samples: list[StatusSample] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="status-sampler", daemon=True)

    def sample(self) -> None:
        try:
            body = self.client.balancer_status()
        except StackError:
            self.errors += 1
            return
        self.samples.append(parse_status(time.monotonic() - self.run_start, body))

    def _loop(self) -> None:
        while len(self.samples) < MAX_SAMPLES and not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> None:
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def finish(self) -> None:
        """Stop sampling periodically and take the last sample: the grid as the run left it."""
        self.stop()
        self._thread.join(timeout=self.interval + sum(self.client.http.timeout))
        self.sample()


class Sender:
    """Sends each planned request at its due time, unless the deadline passed or the run was stopped.

    Stopping and sending take one lock, so once ``stop`` returns nothing more is
    sent, and ``sent_offsets`` names every request that was.
    """

    def __init__(self, client: GridClient, start: float, deadline: float) -> None:
        self.client = client
        self.start = start
        self.deadline = deadline
        self.sent_offsets: dict[str, float] = {}
        self._stopped = threading.Event()
        self._lock = threading.Lock()

    def stop(self) -> None:
        with self._lock:
            self._stopped.set()

    def send(self, planned: PlannedRequest, request_id: str) -> RequestResult:
        due = self.start + planned.offset_seconds
        if due > self.deadline or self._stopped.wait(max(0.0, due - time.monotonic())):
            return not_sent(planned, request_id)
        with self._lock:
            sent = time.monotonic()
            if self._stopped.is_set() or sent > self.deadline:
                return not_sent(planned, request_id)
            self.sent_offsets[request_id] = sent - self.start
        try:
            response = self.client.charge(planned.body(), request_id)
        except requests.Timeout as exc:
            return transport_failure(planned, request_id, sent - self.start, _ms_since(sent), "timeout", str(exc))
        except requests.RequestException as exc:
            return transport_failure(
                planned, request_id, sent - self.start, _ms_since(sent), "connection_error", str(exc)
            )
        latency_ms = _ms_since(sent)
        try:
            body = response.json()
        except ValueError:
            body = None
        return classify_response(planned, request_id, sent - self.start, latency_ms, response.status_code, body)

    def record(self, future: Future[RequestResult] | None, planned: PlannedRequest, request_id: str) -> RequestResult:
        """What became of one request when the run stopped waiting for answers."""
        if future is not None and future.done() and not future.cancelled():
            return future.result()
        if request_id in self.sent_offsets:
            return unanswered(planned, request_id, self.sent_offsets[request_id])
        return not_sent(planned, request_id)


def run_load(
    client: GridClient,
    plan: LoadPlan,
    planned: Sequence[PlannedRequest],
    *,
    sample_interval: float,
    label: str,
    observe_seconds: float = 0.0,
    progress: bool = True,
) -> RunData:
    # Ids name the run, so log lines of two runs with the same seed stay apart.
    run_token = secrets.token_hex(4)
    request_ids = [f"loadtest-{run_token}-{p.index:05d}" for p in planned]
    started_at = format_time(utc_now())
    start = time.monotonic()
    cpu_start = time.process_time()
    sender = Sender(client, start, start + plan.duration_seconds)
    sampler = StatusSampler(client, sample_interval, start)
    futures: list[Future[RequestResult]] = []
    pool = ThreadPoolExecutor(max_workers=plan.concurrency, thread_name_prefix="load")
    sampler.start()
    try:
        stopped_by = _send_all(pool, sender, planned, request_ids, futures, label, progress)
    except BaseException:
        sampler.stop()
        raise
    finally:
        # Requests still open when the run stops must not hold it: no waiting for the workers.
        pool.shutdown(wait=False, cancel_futures=True)
    timing = RunTiming(wall_seconds=time.monotonic() - start, cpu_seconds=time.process_time() - cpu_start)
    # Fixed now: an answer that comes after the run stopped waiting is not counted.
    results = tuple(
        sender.record(future, p, rid) for p, rid, future in zip_longest(planned, request_ids, futures)
    )
    _finish_sampling(sampler, 0.0 if stopped_by == INTERRUPT else observe_seconds)
    return RunData(
        results=results,
        samples=tuple(sampler.samples),
        timing=timing,
        started_at=started_at,
        finished_at=format_time(utc_now()),
        stopped_by=stopped_by,
        sample_errors=sampler.errors,
    )


def _send_all(
    pool: ThreadPoolExecutor,
    sender: Sender,
    planned: Sequence[PlannedRequest],
    request_ids: Sequence[str],
    futures: list[Future[RequestResult]],
    label: str,
    progress: bool,
) -> StopReason | None:
    """Submit every request and collect the answers; why the run stopped early, if it did."""
    http_timeout = sum(sender.client.http.timeout)
    try:
        for p, rid in zip(planned, request_ids):
            futures.append(pool.submit(sender.send, p, rid))
        _collect(futures, sender.deadline - time.monotonic() + http_timeout + GRACE_SECONDS, label, progress)
        return None
    except KeyboardInterrupt:
        _stop(sender, futures)
        _wait_for_answers_in_flight(sender, futures, request_ids, http_timeout + GRACE_SECONDS)
        return INTERRUPT
    except TimeoutError:
        _stop(sender, futures)
        return TIME_LIMIT


def _stop(sender: Sender, futures: Sequence[Future[RequestResult]]) -> None:
    sender.stop()
    for future in futures:
        future.cancel()


def _wait_for_answers_in_flight(
    sender: Sender, futures: Sequence[Future[RequestResult]], request_ids: Sequence[str], timeout: float
) -> None:
    """Their answers (an admission is a session that now charges) belong in the report; Ctrl-C stops waiting."""
    in_flight = [f for f, rid in zip(futures, request_ids) if rid in sender.sent_offsets and not f.done()]
    if not in_flight:
        return
    try:
        log.warning(
            "Interrupted: nothing more is sent. Waiting up to %.0f s for the answers to the %d request(s) in "
            "flight; press Ctrl-C again to stop waiting and record them as unanswered.",
            timeout,
            len(in_flight),
        )
        wait(in_flight, timeout=timeout)
    except KeyboardInterrupt:
        return


def _finish_sampling(sampler: StatusSampler, observe_seconds: float) -> None:
    """Keep sampling after the last answer, to see sessions end; Ctrl-C cuts it short."""
    try:
        time.sleep(observe_seconds)
        sampler.finish()
    except KeyboardInterrupt:
        sampler.stop()


def _collect(futures: list[Future[RequestResult]], timeout: float, label: str, progress: bool) -> None:
    counts: Counter[str] = Counter()
    with tqdm(total=len(futures), desc=label, unit="req", disable=not progress, file=sys.stderr) as bar:
        for future in as_completed(futures, timeout=timeout):
            counts[future.result().outcome] += 1
            bar.set_postfix(counts, refresh=False)
            bar.update(1)


def _ms_since(moment: float) -> float:
    return (time.monotonic() - moment) * 1000.0
