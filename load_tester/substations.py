"""What the load tester asks the substations themselves, at the URLs the balancer lists.

* ``SubstationSampler``: every substation's ``GET /sessions`` many times a second
  during the run, one daemon thread per substation, for the sample witness.
* ``read_audits``: at the end, every session each substation keeps (with its
  allocation history, ended ones too) and its limit's history, for the history
  witness and the energy each vehicle got.
* ``Derate``: the operator's ``PUT /limit`` on one substation during the run,
  and ``DELETE /limit`` after a while; undone whatever happens to the run.

Every call has the client's timeouts; every loop is bounded in count and time.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import replace

from load_tester.api import GridClient, StackError
from load_tester.records import (
    DerateRecord,
    SubstationAudit,
    SubstationSample,
    epoch_text,
    parse_audit,
    parse_sessions_sample,
    unreadable_audit,
)
from load_tester.scenarios import DeratePlan

# Per substation: 20 Hz for well over an hour. Beyond, sampling stops (the history witness goes on).
MAX_SAMPLES_PER_SUBSTATION = 100_000

log = logging.getLogger(__name__)


class SubstationSampler:
    """Reads each substation's ``GET /sessions`` ``hz`` times a second, on one daemon thread per substation."""

    def __init__(self, client: GridClient, substations: Sequence[tuple[str, str]], hz: float, run_start: float) -> None:
        self.client = client
        self.interval = 1.0 / hz
        self.run_start = run_start
        self.samples: list[SubstationSample] = []
        self.errors = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(name, url), name=f"sample-{name}", daemon=True)
            for name, url in substations
        ]

    def sample(self, name: str, url: str) -> None:
        try:
            body = self.client.substation_sessions(url)
        except StackError:
            body = None
        sample = None if body is None else parse_sessions_sample(time.monotonic() - self.run_start, name, body)
        with self._lock:
            if sample is None:
                self.errors += 1
            else:
                self.samples.append(sample)

    def _loop(self, name: str, url: str) -> None:
        due = time.monotonic()
        for _ in range(MAX_SAMPLES_PER_SUBSTATION):
            self.sample(name, url)
            due += self.interval
            # Behind (a slow answer): sample at once and resume the rhythm from now, no burst to catch up.
            due = max(due, time.monotonic())
            if self._stop.wait(due - time.monotonic()):
                return

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def finish(self) -> tuple[SubstationSample, ...]:
        """Stop sampling; the samples in time order."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=sum(self.client.http.timeout) + 1.0)
        with self._lock:
            return tuple(sorted(self.samples, key=lambda s: (s.t, s.substation)))


def read_audits(client: GridClient, substations: Sequence[tuple[str, str]]) -> tuple[SubstationAudit, ...]:
    """Every substation's sessions with their histories (ended ones too), then its limit's history.

    Sessions first: the limit read afterwards covers every instant of the sessions' records.
    """
    audits = []
    for name, url in substations:
        try:
            sessions = client.substation_sessions(url, history=True, ended=True)
            limit = client.substation_limit(url)
        except StackError as exc:
            audits.append(unreadable_audit(name, url, str(exc)))
            continue
        audits.append(parse_audit(name, url, sessions, limit))
    return tuple(audits)


def choose_derated(client: GridClient, substations: Sequence[tuple[str, str]], wanted: str | None) -> tuple[str, str]:
    """The substation to derate: ``wanted``, or the one with the highest limit now (ties: the first by id)."""
    if wanted is not None:
        for name, url in substations:
            if name == wanted:
                return name, url
        known = ", ".join(name for name, _ in substations) or "none"
        raise StackError(f"--derate-substation {wanted}: the balancer lists no such substation (it lists {known}).")
    limits = []
    for name, url in substations:
        limit = client.substation_limit(url).get("limit_kw")
        if isinstance(limit, (int, float)) and not isinstance(limit, bool):
            limits.append((-float(limit), name, url))
    if not limits:
        raise StackError("no substation told its limit (GET /limit): there is none to derate.")
    _, name, url = min(limits)
    return name, url


class Derate:
    """Lowers one substation's limit at ``plan.at_seconds`` into the run and restores it ``plan.for_seconds`` later.

    ``finish`` restores it at once if the run ends first: a load test must never leave a substation derated.
    """

    def __init__(
        self, client: GridClient, plan: DeratePlan, substations: Sequence[tuple[str, str]], run_start: float
    ) -> None:
        self.client = client
        self.plan = plan
        self.substations = substations
        self.run_start = run_start
        self.record = DerateRecord(plan.substation, plan.at_seconds, plan.for_seconds)
        self._url: str | None = None
        # The operator limit the substation had before, to put back (None: it had none, DELETE lifts ours).
        self._previous_operator_kw: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="derate", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        if self._stop.wait(max(0.0, self.run_start + self.plan.at_seconds - time.monotonic())):
            return
        self._apply()
        if self._stop.wait(max(0.0, self.run_start + self.plan.until_seconds - time.monotonic())):
            return
        self._restore()

    def _apply(self) -> None:
        with self._lock:
            try:
                name, url = choose_derated(self.client, self.substations, self.plan.substation)
                before = self.client.substation_limit(url)
                limit = float(before["limit_kw"])
                operator = before.get("operator_limit_kw")
                self._previous_operator_kw = float(operator) if isinstance(operator, (int, float)) else None
                target = round(limit * self.plan.factor, 3)
                self.client.set_substation_limit(url, target)
            except (StackError, KeyError, TypeError, ValueError) as exc:
                self.record = replace(self.record, error=f"the limit could not be lowered: {exc}")
                log.warning("The derate did not happen: %s", exc)
                return
            self._url = url
            now = time.monotonic()
            self.record = replace(
                self.record, substation=name, limit_before_kw=limit, limit_kw=target,
                applied_offset=round(now - self.run_start, 3), applied_at=epoch_text(time.time()),
            )  # fmt: skip
            log.info("derate: %s limited from %.1f kW to %.1f kW", name, limit, target)

    def _restore(self) -> None:
        with self._lock:
            if self._url is None or self.record.restored_offset is not None:
                return
            try:
                if self._previous_operator_kw is None:
                    self.client.lift_substation_limit(self._url)
                else:
                    self.client.set_substation_limit(self._url, self._previous_operator_kw)
            except StackError as exc:
                self.record = replace(
                    self.record,
                    error=f"the limit could NOT be restored ({exc}): lift it by hand with DELETE {self._url}/limit",
                )
                log.error("The derated limit of %s could not be restored: %s", self.record.substation, exc)
                return
            self.record = replace(
                self.record,
                restored_offset=round(time.monotonic() - self.run_start, 3),
                restored_at=epoch_text(time.time()),
            )
            log.info("derate: %s's limit restored", self.record.substation)

    def wait_until_done(self, deadline: float) -> None:
        """Wait (at most until ``deadline``, monotonic) for the derate to be undone on schedule."""
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def finish(self) -> DerateRecord:
        """Stop waiting and restore the limit now if it is still lowered; what the derate did."""
        self._stop.set()
        self._thread.join(timeout=2 * sum(self.client.http.timeout) + 1.0)
        self._restore()
        if self.record.applied_offset is None and self.record.error is None:
            self.record = replace(self.record, error="the run ended before it was due")
        elif self.record.applied_offset is not None and self.record.restored_offset is not None:
            planned_end = self.plan.until_seconds
            if self.record.restored_offset < planned_end - 0.5:
                self.record = replace(
                    self.record,
                    notes=(*self.record.notes,
                           f"restored early, when the run ended (planned at t={planned_end:.1f} s)"),
                )  # fmt: skip
        return self.record
