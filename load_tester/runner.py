"""Sends a run's requests and samples the balancer meanwhile.

A thread pool of ``concurrency`` workers takes the requests in the order they
are due; a worker waits for a request's due time before sending it. With a
ramp-up that paces a closed loop (never more than ``concurrency`` in flight);
with Poisson due times it is an open loop whose lateness is recorded, so a
saturated tool shows up in the figures instead of silently lowering the rate.
Bounded in count (the planned requests) and in time (the run's duration, plus
one HTTP timeout for the requests still in flight).
"""
from __future__ import annotations

import secrets
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from functools import partial

import requests
from tqdm import tqdm

from gridcommon.timefmt import format_time, utc_now
from load_tester.api import GridClient, StackError
from load_tester.records import (
    RequestResult,
    RunData,
    RunTiming,
    StatusSample,
    classify_response,
    not_sent,
    parse_status,
    transport_failure,
)
from load_tester.scenarios import LoadPlan, PlannedRequest

# A run never keeps more status samples than this, whatever its length.
MAX_SAMPLES = 100_000
# Extra time, beyond the run's duration and one HTTP timeout, before the run gives up waiting.
GRACE_SECONDS = 5.0


class StatusSampler:
    """Reads the balancer's GET /status every ``interval`` seconds on a daemon thread."""

    def __init__(self, client: GridClient, interval: float, start: float) -> None:
        self.client = client
        self.interval = interval
        self.start = start
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
        self.samples.append(parse_status(time.monotonic() - self.start, body))

    def _loop(self) -> None:
        while len(self.samples) < MAX_SAMPLES and not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "StatusSampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + sum(self.client.http.timeout))
        # The grid as the run left it: the "end" figures.
        self.sample()


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
    stop = threading.Event()
    send = partial(_send, client, start, start + plan.duration_seconds, stop)
    interrupted = False
    with StatusSampler(client, sample_interval, start) as sampler:
        with ThreadPoolExecutor(max_workers=plan.concurrency, thread_name_prefix="load") as pool:
            futures = [pool.submit(send, p, rid) for p, rid in zip(planned, request_ids)]
            try:
                _collect(futures, plan.duration_seconds + sum(client.http.timeout) + GRACE_SECONDS, label, progress)
            except (KeyboardInterrupt, TimeoutError):
                interrupted = True
                stop.set()
                for future in futures:
                    future.cancel()
        timing = RunTiming(wall_seconds=time.monotonic() - start, cpu_seconds=time.process_time() - cpu_start)
        _observe(observe_seconds)
    results = tuple(
        not_sent(p, rid) if future.cancelled() else future.result()
        for future, p, rid in zip(futures, planned, request_ids)
    )
    return RunData(
        results=results,
        samples=tuple(sampler.samples),
        timing=timing,
        started_at=started_at,
        finished_at=format_time(utc_now()),
        interrupted=interrupted,
        sample_errors=sampler.errors,
    )


def _observe(seconds: float) -> None:
    """Keep sampling after the last answer, to see sessions end; Ctrl-C cuts it short."""
    try:
        time.sleep(seconds)
    except KeyboardInterrupt:
        return


def _collect(futures: list[Future], timeout: float, label: str, progress: bool) -> None:
    counts: Counter[str] = Counter()
    with tqdm(total=len(futures), desc=label, unit="req", disable=not progress, file=sys.stderr) as bar:
        for future in as_completed(futures, timeout=timeout):
            counts[future.result().outcome] += 1
            bar.set_postfix(counts, refresh=False)
            bar.update(1)


def _send(
    client: GridClient,
    start: float,
    deadline: float,
    stop: threading.Event,
    planned: PlannedRequest,
    request_id: str,
) -> RequestResult:
    due = start + planned.offset_seconds
    if due > deadline or stop.wait(max(0.0, due - time.monotonic())) or time.monotonic() > deadline:
        return not_sent(planned, request_id)
    sent = time.monotonic()
    try:
        response = client.charge(planned.body(), request_id)
    except requests.Timeout as exc:
        return transport_failure(planned, request_id, sent - start, _ms_since(sent), "timeout", str(exc))
    except requests.RequestException as exc:
        return transport_failure(planned, request_id, sent - start, _ms_since(sent), "connection_error", str(exc))
    latency_ms = _ms_since(sent)
    try:
        body = response.json()
    except ValueError:
        body = None
    return classify_response(planned, request_id, sent - start, latency_ms, response.status_code, body)


def _ms_since(moment: float) -> float:
    return (time.monotonic() - moment) * 1000.0
