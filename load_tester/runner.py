"""Sends a run's requests, follows the ones that wait in the queue, and watches the grid meanwhile.

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

With ``wait`` every request asks to wait: a 202 is followed at its ``Location``
until it starts (or expires) or the time limit comes, when it is cancelled.
Meanwhile the balancer's status is sampled, every substation's sessions are
sampled many times a second, and a derate lowers one substation's limit for a
while. Then the run waits for the sessions it started to end (at their
``ends_at``: bounded by one session length), so each one's delivered energy is
final, and reads every substation's records for the capacity checks.
"""
from __future__ import annotations

import logging
import math
import secrets
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass
from itertools import zip_longest

import requests
from tqdm import tqdm

from gridcommon.httpclient import HttpResponse
from gridcommon.timefmt import format_time, parse_time, utc_now
from load_tester.api import GridClient, StackError
from load_tester.energy import CHARGE_API, attach_energy, unfinished_sessions
from load_tester.records import (
    INTERRUPT,
    QUEUED,
    TIME_LIMIT,
    DerateRecord,
    RequestResult,
    RunData,
    RunTiming,
    StatusSample,
    StopReason,
    SubstationAudit,
    cancelled_at_time_limit,
    classify_response,
    follow_queued,
    not_sent,
    parse_status,
    transport_failure,
    unanswered,
    with_energy,
)
from load_tester.scenarios import LoadPlan, PlannedRequest
from load_tester.substations import Derate, SubstationSampler, read_audits

# A run never keeps more status samples than this, whatever its length.
MAX_SAMPLES = 100_000
# Extra time, beyond the run's duration and one HTTP timeout, before the run gives up waiting.
GRACE_SECONDS = 5.0
# A queued request's state is read this often; its queue wait comes from the charge API, so this only
# bounds how late the run learns that it started.
QUEUE_POLL_SECONDS = 0.5
QUEUE_POLL_WORKERS = 8
# Sessions end at their ends_at (the substation's clock); read them this much later, so each has ended.
SETTLE_MARGIN_SECONDS = 0.5
# Served vehicles whose energy the substations do not list are asked of the charge API, at most this many.
MAX_ENERGY_LOOKUPS = 1000

log = logging.getLogger(__name__)


class StatusSampler:
    """Reads the balancer's GET /status every ``interval`` seconds on a daemon thread."""

    def __init__(self, client: GridClient, interval: float, run_start: float) -> None:
        self.client = client
        self.interval = interval
        self.run_start = run_start
        self.samples: list[StatusSample] = []
        self.errors = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="status-sampler", daemon=True)

    def sample(self) -> None:
        try:
            body = self.client.balancer_status()
        except StackError:
            self.errors += 1
            return
        with self._lock:
            self.samples.append(parse_status(time.monotonic() - self.run_start, body))
            self.samples.sort(key=lambda sample: sample.t)

    def sample_now(self) -> float | None:
        """Take a sample now, beside the periodic ones; its time, if it could be read."""
        if len(self.samples) >= MAX_SAMPLES:
            return None
        before = time.monotonic() - self.run_start
        self.sample()
        with self._lock:
            return next((sample.t for sample in reversed(self.samples) if sample.t >= round(before, 3)), None)

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


@dataclass
class _Waiting:
    result: RequestResult
    queued_at: float  # monotonic, when its 202 came


class QueueWatcher:
    """Follows every queued request (a 202) at its ``Location`` until it starts or gives up.

    One thread reads the state of every waiting request each ``QUEUE_POLL_SECONDS``, over a few
    workers so one slow answer does not hold the others. ``close`` cancels the ones still waiting:
    a request the run stopped watching must not start later and load the grid of the next run.
    """

    def __init__(self, client: GridClient, poll_interval: float = QUEUE_POLL_SECONDS) -> None:
        self.client = client
        self.poll_interval = poll_interval
        self.poll_errors = 0
        self._pending: dict[str, _Waiting] = {}
        self._finished: dict[str, RequestResult] = {}
        self._closed = False
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=QUEUE_POLL_WORKERS, thread_name_prefix="queue")
        self._thread = threading.Thread(target=self._loop, name="queue-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, result: RequestResult) -> None:
        with self._changed:
            if not self._closed:
                self._pending[result.request_id] = _Waiting(result, time.monotonic())
                return
        # Answered after the run stopped watching: it is not in the run's records; just cancel it.
        self._cancel(_Waiting(result, time.monotonic()))

    @property
    def waiting(self) -> int:
        with self._changed:
            return len(self._pending)

    def _loop(self) -> None:
        http_timeout = sum(self.client.http.timeout)
        while not self._stop.is_set():
            with self._changed:
                due = list(self._pending.values())
            if due:
                wait([self._pool.submit(self._poll, waiting) for waiting in due], timeout=http_timeout + 1.0)
            self._stop.wait(self.poll_interval)

    def _poll(self, waiting: _Waiting) -> None:
        result = waiting.result
        try:
            response = self.client.follow(result.location or "", f"{result.request_id}-poll", result.session_token)
        except requests.RequestException:
            self.poll_errors += 1
            return
        resolved = follow_queued(result, response.status_code, _json(response), time.monotonic() - waiting.queued_at)
        if resolved is None:
            return
        with self._changed:
            if self._pending.pop(result.request_id, None) is not None:
                self._finished[result.request_id] = resolved
                self._changed.notify_all()

    def wait_until_settled(self, deadline: float) -> bool:
        """Block until no request waits any more, or ``deadline`` (monotonic); whether none waits."""
        with self._changed:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 1.0))
            return True

    def close(self) -> None:
        """Stop following; cancel every request still waiting (recorded as rejected: it never started)."""
        self._stop.set()
        self._thread.join(timeout=sum(self.client.http.timeout) + 2.0)
        with self._changed:
            self._closed = True
            left = list(self._pending.values())
            self._pending.clear()
        # Bounded: one DELETE, with its timeouts, per request still waiting.
        for waiting, final in zip(left, self._pool.map(self._cancel, left)):
            self._finished[waiting.result.request_id] = final
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _cancel(self, waiting: _Waiting) -> RequestResult:
        result = waiting.result
        try:
            response = self.client.cancel(result.location or "", f"{result.request_id}-cancel", result.session_token)
        except requests.RequestException:
            log.warning("Queued request %s could not be cancelled; it leaves the queue when it expires.",
                        result.request_id)  # fmt: skip
            return cancelled_at_time_limit(result, None, None, time.monotonic() - waiting.queued_at)
        return cancelled_at_time_limit(
            result, response.status_code, _json(response), time.monotonic() - waiting.queued_at
        )

    def final(self, result: RequestResult) -> RequestResult:
        """What became of ``result`` if it was queued; else ``result`` itself."""
        if result.outcome != QUEUED:
            return result
        with self._changed:
            return self._finished.get(result.request_id) or cancelled_at_time_limit(result, None, None, 0.0)


class Sender:
    """Sends each planned request at its due time, unless the deadline passed or the run was stopped.

    Stopping and sending take one lock, so once ``stop`` returns nothing more is
    sent, and ``sent_offsets`` names every request that was.
    """

    def __init__(
        self, client: GridClient, start: float, deadline: float, wait: bool = False,
        watcher: QueueWatcher | None = None,
    ) -> None:  # fmt: skip
        self.client = client
        self.start = start
        self.deadline = deadline
        self.wait = wait
        self.watcher = watcher
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
            response = self.client.charge(planned.body(wait=self.wait), request_id)
        except requests.Timeout as exc:
            return transport_failure(planned, request_id, sent - self.start, _ms_since(sent), "timeout", str(exc))
        except requests.RequestException as exc:
            return transport_failure(
                planned, request_id, sent - self.start, _ms_since(sent), "connection_error", str(exc)
            )
        latency_ms = _ms_since(sent)
        result = classify_response(
            planned, request_id, sent - self.start, latency_ms, response.status_code, _json(response),
            response.headers.get("Location"),
        )  # fmt: skip
        if result.outcome == QUEUED and self.watcher is not None:
            self.watcher.add(result)
        return result

    def record(self, future: Future[RequestResult] | None, planned: PlannedRequest, request_id: str) -> RequestResult:
        """What became of one request when the run stopped waiting for answers."""
        if future is not None and future.done() and not future.cancelled():
            return future.result()
        if request_id in self.sent_offsets:
            return unanswered(planned, request_id, self.sent_offsets[request_id])
        return not_sent(planned, request_id)


@dataclass(frozen=True)
class Watching:
    """What the run watches besides its own requests; every part is optional."""

    # (id, url) of the substations, as the balancer lists them: sampled, and read at the end.
    substations: Sequence[tuple[str, str]] = ()
    substation_hz: float = 20.0


def run_load(
    client: GridClient,
    plan: LoadPlan,
    planned: Sequence[PlannedRequest],
    *,
    sample_interval: float,
    label: str,
    observe_seconds: float = 0.0,
    progress: bool = True,
    watching: Watching | None = None,
) -> RunData:
    watching = watching or Watching()
    # Ids name the run, so log lines of two runs with the same seed stay apart.
    run_token = secrets.token_hex(4)
    request_ids = [f"loadtest-{run_token}-{p.index:05d}" for p in planned]
    started_at = format_time(utc_now())
    started_epoch = time.time()
    start = time.monotonic()
    cpu_start = time.process_time()
    watcher = QueueWatcher(client) if plan.wait else None
    sender = Sender(client, start, start + plan.duration_seconds, plan.wait, watcher)
    sampler = StatusSampler(client, sample_interval, start)
    substation_sampler = SubstationSampler(client, watching.substations, watching.substation_hz, start)
    derate = None if plan.derate is None else Derate(client, plan.derate, watching.substations, start)
    futures: list[Future[RequestResult]] = []
    pool = ThreadPoolExecutor(max_workers=plan.concurrency, thread_name_prefix="load")
    notes: list[str] = []
    derate_record: DerateRecord | None = None
    # The first sample of each substation marks the run's start by its clock.
    substation_sampler.start()
    sampler.start()
    if watcher is not None:
        watcher.start()
    if derate is not None:
        derate.start()
    try:
        try:
            stopped_by = _send_all(pool, sender, planned, request_ids, futures, label, progress)
        finally:
            # Requests still open when the run stops must not hold it: no waiting for the workers.
            pool.shutdown(wait=False, cancel_futures=True)
        timing = RunTiming(wall_seconds=time.monotonic() - start, cpu_seconds=time.process_time() - cpu_start)
        # The grid as the answers left it, before the sessions end: the "at end" figures.
        answers_end_t = sampler.sample_now()
        # Fixed now: an answer that comes after the run stopped waiting is not counted.
        results = tuple(
            sender.record(future, p, rid) for p, rid, future in zip_longest(planned, request_ids, futures)
        )
        if watcher is not None:
            if stopped_by is None and _interrupted(lambda: _wait_for_queue(watcher, sender, progress)):
                stopped_by = INTERRUPT
            watcher.close()
            results = tuple(watcher.final(result) for result in results)
            if watcher.poll_errors:
                notes.append(f"{watcher.poll_errors} read(s) of queued requests' state failed (retried).")
        for step in (
            lambda: _wait_for_sessions_to_end(results, plan, derate, progress),
            lambda: time.sleep(observe_seconds),
        ):
            if stopped_by != INTERRUPT and _interrupted(step):
                stopped_by = INTERRUPT
    finally:
        sampler.stop()
        if derate is not None:
            derate_record = derate.finish()
        substation_samples = substation_sampler.finish()
    if stopped_by != INTERRUPT:
        _interrupted(sampler.finish)  # the grid as the run left it
    audits: tuple[SubstationAudit, ...] = ()
    try:
        audits = read_audits(client, watching.substations)
    except KeyboardInterrupt:
        notes.append("interrupted while the substations' records were read: the capacity checks did not run.")
    results = attach_energy(results, audits)
    if unfinished := unfinished_sessions(results, audits):
        notes.append(
            f"{unfinished} session(s) of this run were still charging when the substations were read: their "
            "delivered energy is what they got so far."
        )
    try:
        results = _energy_from_charge_api(client, results)
    except KeyboardInterrupt:
        pass  # the energies the substations gave are enough for the report
    return RunData(
        results=results,
        samples=tuple(sampler.samples),
        timing=timing,
        started_at=started_at,
        finished_at=format_time(utc_now()),
        stopped_by=stopped_by,
        sample_errors=sampler.errors,
        started_epoch=started_epoch,
        substation_samples=substation_samples,
        substation_sample_errors=substation_sampler.errors,
        audits=audits,
        derate=derate_record,
        notes=tuple(notes),
        answers_end_t=answers_end_t,
    )


def _interrupted(step: Callable[[], object]) -> bool:
    """Run one waiting step of the run's end; Ctrl-C cuts it short (True) and the run goes on to its report."""
    try:
        step()
    except KeyboardInterrupt:
        log.warning("Interrupted: nothing more is waited for; the results so far are written.")
        return True
    return False


def _wait_for_queue(watcher: QueueWatcher, sender: Sender, progress: bool) -> None:
    """Until every queued request started or gave up, at most until the run's time limit.

    Those still waiting then are cancelled by ``QueueWatcher.close`` and recorded as never started.
    """
    limit = sender.deadline + sum(sender.client.http.timeout) + GRACE_SECONDS
    waiting = watcher.waiting
    if not waiting:
        return
    with tqdm(total=waiting, desc="queued, waiting", unit="req", disable=not progress, file=sys.stderr) as bar:
        while not watcher.wait_until_settled(min(limit, time.monotonic() + 1.0)) and time.monotonic() < limit:
            bar.n = waiting - watcher.waiting
            bar.refresh()
        bar.n = waiting - watcher.waiting
        bar.refresh()


def _wait_for_sessions_to_end(
    results: Sequence[RequestResult], plan: LoadPlan, derate: Derate | None, progress: bool
) -> None:
    """Until the last session of the run ended (its energy is final) and the derate was undone.

    Bounded: a session ends at most one session length after it started, which was before now.
    """
    ends = [_ends_at(r) for r in results if r.served]
    seconds = 0.0
    if ends:
        seconds = min(max(ends) - time.time(), plan.session_seconds) + SETTLE_MARGIN_SECONDS
    deadline = time.monotonic() + max(0.0, seconds)
    if derate is not None and plan.derate is not None:
        deadline = max(deadline, derate.run_start + plan.derate.until_seconds + SETTLE_MARGIN_SECONDS)
    total = deadline - time.monotonic()
    if total <= 0:
        return
    with tqdm(total=math.ceil(total), desc="sessions charging", unit="s", disable=not progress, file=sys.stderr) as bar:
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.5))
            bar.n = min(bar.total, math.floor(total - max(0.0, deadline - time.monotonic())))
            bar.refresh()
    if derate is not None:
        derate.wait_until_done(time.monotonic() + sum(derate.client.http.timeout) + 1.0)


def _ends_at(result: RequestResult) -> float:
    """When a served session ends (seconds since the epoch); without its ends_at, a session length from its
    start, or from now when that is unknown too."""
    if result.ends_at:
        return parse_time(result.ends_at).timestamp()
    started = parse_time(result.started_at).timestamp() if result.started_at else time.time()
    return started + result.duration_seconds


def _energy_from_charge_api(client: GridClient, results: Sequence[RequestResult]) -> tuple[RequestResult, ...]:
    """Served vehicles the substations did not list: their energy as the charge API's GET /sessions/<id> says."""
    missing = [r for r in results if r.served and r.energy_kwh is None and r.session_id][:MAX_ENERGY_LOOKUPS]
    found: dict[str, RequestResult] = {}
    for result in missing:
        try:
            response = client.follow(
                f"/sessions/{result.session_id}", f"{result.request_id}-energy", result.session_token
            )
        except requests.RequestException:
            continue
        body = _json(response)
        # For a session with a need, energy_kwh is the need and delivered_kwh what it got.
        energy = (body.get("delivered_kwh", body.get("energy_kwh"))
                  if isinstance(body, dict) and response.status_code == 200 else None)
        if isinstance(energy, (int, float)) and not isinstance(energy, bool):
            found[result.request_id] = with_energy(result, float(energy), CHARGE_API)
    return tuple(found.get(r.request_id, r) for r in results)


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


def _collect(futures: list[Future[RequestResult]], timeout: float, label: str, progress: bool) -> None:
    counts: Counter[str] = Counter()
    with tqdm(total=len(futures), desc=label, unit="req", disable=not progress, file=sys.stderr) as bar:
        for future in as_completed(futures, timeout=timeout):
            counts[future.result().outcome] += 1
            bar.set_postfix(counts, refresh=False)
            bar.update(1)


def _ms_since(moment: float) -> float:
    return (time.monotonic() - moment) * 1000.0


def _json(response: HttpResponse) -> object:
    try:
        return response.json()
    except ValueError:
        return None
