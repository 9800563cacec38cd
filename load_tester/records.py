"""What a run records: each request's outcome, the balancer's status over time, and what the
substations themselves say (sessions with their allocation histories, limits, samples).

Plain Python (no network): turning HTTP answers into records is unit-tested
with hand-made bodies.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from gridcommon.timefmt import format_time, parse_time
from load_tester.scenarios import PlannedRequest

ADMITTED = "admitted"
REJECTED = "rejected"
FAILED = "failed"
NOT_SENT = "not_sent"
# A 202: the request waits in the charge API's queue. Only while the run watches it: it ends
# admitted (it started charging), rejected (it expired, or was still waiting at the time limit)
# or failed.
QUEUED = "queued"

# The failure of a request that was sent but never answered: the run stopped waiting for it.
UNANSWERED = "unanswered"

# Why a run stopped before every request was answered: the user pressed Ctrl-C, or the run's time
# limit (its duration plus one HTTP timeout and a grace) passed with requests still open.
StopReason = Literal["interrupt", "time_limit"]
INTERRUPT: StopReason = "interrupt"
TIME_LIMIT: StopReason = "time_limit"

# The error codes with which the stack says "no room on the grid": a correct answer, not a fault.
# queue_full: the request asked to wait, and the queue is as long as the charge API allows;
# exceeds_every_limit: it asked for more than any substation's limit. (The stack's other 503s,
# substations_unreachable, substations_too_slow and deadline_too_short, are faults: failures.)
CAPACITY_ERRORS = frozenset({"no_capacity", "capacity_exceeded", "queue_full", "exceeds_every_limit"})

# The charge API's states of a request that waited. Started: it got power (suspended since, maybe).
STARTED_STATES = frozenset({"charging", "suspended", "ended"})
# Errors of a queued request that never started: it waited past the charge API's QUEUE_TIMEOUT_SECONDS,
# or it was still waiting when the run's time limit came (the tool then cancels it).
QUEUE_EXPIRED = "queue_expired"
STILL_QUEUED = "still_queued"
# Failures of a queued request: someone else cancelled it, or the charge API forgot it (404).
QUEUE_CANCELLED = "cancelled"
LOST_IN_QUEUE = "lost_in_queue"


@dataclass(frozen=True)
class RequestResult:
    index: int
    request_id: str
    vehicle_id: str
    amount_kw: float
    duration_seconds: float
    scheduled_offset: float
    outcome: str
    sent_offset: float | None = None
    latency_ms: float | None = None
    status: int | None = None
    # Why a request failed: its HTTP status as text, "timeout" or "connection_error".
    failure: str | None = None
    error: str | None = None
    substation: str | None = None
    session_id: str | None = None
    started_at: str | None = None
    ends_at: str | None = None
    load_kw: float | None = None
    capacity_kw: float | None = None
    load_percentage: float | None = None
    state_version: int | None = None
    # The session's state as last seen ("charging", "suspended", "ended"; "expired", "cancelled" or
    # "queued" for one that waited and never started), and the kW it got when it started.
    state: str | None = None
    allocated_kw: float | None = None
    # A 202: where its state is read, and its place in the queue then.
    location: str | None = None
    queue_position: int | None = None
    # Seconds it waited in the queue before it started (the charge API's figure when it gives one).
    queue_wait_seconds: float | None = None
    # kWh its session delivered, read once the session ended; and who said so ("substation" or "charge_api").
    energy_kwh: float | None = None
    energy_source: str | None = None
    # The charge API's credential for this session (GET/DELETE /sessions/<id>): kept in memory only,
    # never written out, since whoever holds it may stop the session.
    session_token: str | None = field(default=None, repr=False)
    # The vehicle's energy need (kWh by its departure), for a request that stated one.
    need_kwh: float | None = None

    def as_json(self) -> dict[str, Any]:
        body = asdict(self)
        del body["session_token"]
        return {**body, "energy_requested_kwh": round(self.energy_requested_kwh, 6)}

    @property
    def answered(self) -> bool:
        return self.status is not None

    @property
    def served(self) -> bool:
        """The vehicle started charging: a 201, or a 202 that later started."""
        return self.outcome == ADMITTED

    @property
    def queued(self) -> bool:
        return self.status == 202

    @property
    def energy_requested_kwh(self) -> float:
        """Its need, or its amount for its whole session."""
        if self.need_kwh is not None:
            return self.need_kwh
        return self.amount_kw * self.duration_seconds / 3600.0

    @property
    def schedule_lag_ms(self) -> float | None:
        if self.sent_offset is None:
            return None
        return max(0.0, (self.sent_offset - self.scheduled_offset) * 1000.0)


def _planned_fields(planned: PlannedRequest, request_id: str) -> dict[str, Any]:
    return {
        "index": planned.index,
        "request_id": request_id,
        "vehicle_id": planned.vehicle_id,
        "amount_kw": planned.amount_kw,
        "duration_seconds": planned.duration_seconds,
        "scheduled_offset": planned.offset_seconds,
        "need_kwh": planned.need_kwh,
    }


def not_sent(planned: PlannedRequest, request_id: str) -> RequestResult:
    return RequestResult(
        **_planned_fields(planned, request_id),
        outcome=NOT_SENT,
    )


def transport_failure(
    planned: PlannedRequest, request_id: str, sent_offset: float, elapsed_ms: float, failure: str, message: str
) -> RequestResult:
    return RequestResult(
        **_planned_fields(planned, request_id),
        outcome=FAILED,
        sent_offset=sent_offset,
        latency_ms=elapsed_ms,
        failure=failure,
        error=message,
    )


def unanswered(planned: PlannedRequest, request_id: str, sent_offset: float) -> RequestResult:
    return RequestResult(
        **_planned_fields(planned, request_id),
        outcome=FAILED,
        sent_offset=sent_offset,
        failure=UNANSWERED,
        error="no answer before the run stopped waiting",
    )


def classify_response(
    planned: PlannedRequest,
    request_id: str,
    sent_offset: float,
    latency_ms: float,
    status: int,
    body: Any,
    location: str | None = None,
) -> RequestResult:
    """201 is an admission, 202 a place in the queue, a capacity error a rejection, anything else a failure.

    A 202 without a ``Location`` (or a session id to build one from) cannot be followed: a failure.
    """
    body = body if isinstance(body, dict) else {}
    error = body.get("error") if isinstance(body.get("error"), str) else None
    if status == 202:
        return _queued(planned, request_id, sent_offset, latency_ms, body, location)
    if status == 201:
        outcome, failure = ADMITTED, None
    elif error in CAPACITY_ERRORS:
        outcome, failure = REJECTED, None
    else:
        outcome, failure = FAILED, str(status)
    return RequestResult(
        **_planned_fields(planned, request_id),
        outcome=outcome,
        sent_offset=sent_offset,
        latency_ms=latency_ms,
        status=status,
        failure=failure,
        error=error,
        substation=_text(body.get("substation")),
        session_id=_text(body.get("session_id")) if outcome == ADMITTED else None,
        started_at=_text(body.get("started_at")) if outcome == ADMITTED else None,
        ends_at=_text(body.get("ends_at")) if outcome == ADMITTED else None,
        load_kw=_number(body.get("load")),
        capacity_kw=_number(body.get("capacity")),
        load_percentage=_number(body.get("load_percentage")),
        state_version=body.get("state_version") if isinstance(body.get("state_version"), int) else None,
        state=_text(body.get("state")) if outcome == ADMITTED else None,
        allocated_kw=_number(body.get("allocated_kw")) if outcome == ADMITTED else None,
        session_token=_text(body.get("session_token")) if outcome == ADMITTED else None,
    )


def _queued(
    planned: PlannedRequest, request_id: str, sent_offset: float, latency_ms: float, body: dict[str, Any],
    location: str | None,
) -> RequestResult:
    session_id = _text(body.get("session_id"))
    location = location or (f"/sessions/{session_id}" if session_id else None)
    common = {"sent_offset": sent_offset, "latency_ms": latency_ms, "status": 202, "session_id": session_id}
    if location is None:
        return RequestResult(
            **_planned_fields(planned, request_id), outcome=FAILED, failure="202",
            error="a 202 without a Location or a session id: the queued request cannot be followed", **common,
        )  # fmt: skip
    position = body.get("position")
    return RequestResult(
        **_planned_fields(planned, request_id),
        session_token=_text(body.get("session_token")),
        outcome=QUEUED,
        state="queued",
        location=location,
        queue_position=position if isinstance(position, int) and not isinstance(position, bool) else None,
        **common,
    )


def follow_queued(result: RequestResult, status: int, body: Any, waited_seconds: float) -> RequestResult | None:
    """What a queued request became, from its ``GET /sessions/<id>``; None while it still waits.

    ``waited_seconds`` (from its 202 until this answer) stands in for the queue wait when the charge
    API does not give its own figure.
    """
    body = body if isinstance(body, dict) else {}
    if status == 404:
        return replace(result, outcome=FAILED, failure=LOST_IN_QUEUE, state=None,
                       error="the charge API no longer knows the queued request (404)")  # fmt: skip
    if status in (401, 403):
        # Asking again changes nothing: the token that came with the 202 is not accepted.
        return replace(result, outcome=FAILED, failure=str(status), state=None,
                       error=f"the charge API refused to show the queued request (HTTP {status})")  # fmt: skip
    if status != 200:
        return None  # a failed read only delays the answer until the next one
    state = _text(body.get("state"))
    if state == "queued" or state is None:
        return None
    if state in STARTED_STATES:
        wait = _number(body.get("queue_wait_seconds"))
        return replace(
            result,
            outcome=ADMITTED,
            state=state,
            substation=_text(body.get("substation")) or result.substation,
            session_id=_text(body.get("session_id")) or result.session_id,
            started_at=_text(body.get("started_at")),
            ends_at=_text(body.get("ends_at")),
            allocated_kw=_number(body.get("allocated_kw")),
            queue_wait_seconds=round(wait if wait is not None else waited_seconds, 3),
        )
    if state == "expired":
        return replace(result, outcome=REJECTED, state=state, error=QUEUE_EXPIRED)
    if state == "cancelled":
        return replace(result, outcome=FAILED, state=state, failure=QUEUE_CANCELLED,
                       error="cancelled while it waited, not by this run")  # fmt: skip
    return replace(result, outcome=FAILED, state=state, failure=f"state {state}",
                   error=f"the queued request went to the unknown state {state!r}")  # fmt: skip


def cancelled_at_time_limit(
    result: RequestResult, status: int | None, body: Any, waited_seconds: float
) -> RequestResult:
    """A queued request the run cancelled at its time limit: rejected, unless it had just started.

    ``status`` None: the cancellation got no answer (it leaves the queue when it expires).
    """
    if status in (401, 403):
        return replace(
            result, outcome=FAILED, failure=str(status), state="queued",
            error=f"still queued at the time limit, and the charge API refused to cancel it (HTTP {status})",
        )  # fmt: skip
    if status == 200:
        started = follow_queued(result, status, body, waited_seconds)
        if started is not None and started.served:
            return started
    return replace(result, outcome=REJECTED, state="queued", error=STILL_QUEUED)


def with_energy(result: RequestResult, energy_kwh: float, source: str) -> RequestResult:
    return replace(result, energy_kwh=round(energy_kwh, 6), energy_source=source)


@dataclass(frozen=True)
class SubstationReading:
    substation: str
    load_kw: float
    capacity_kw: float
    load_percentage: float
    up: bool


@dataclass(frozen=True)
class StatusSample:
    """The balancer's view of the grid, ``t`` seconds after the run started."""

    t: float
    policy: str | None
    substations: tuple[SubstationReading, ...]

    def as_json(self) -> dict[str, Any]:
        return {"t": self.t, "policy": self.policy, "substations": [asdict(s) for s in self.substations]}


def parse_status(t: float, body: Any) -> StatusSample:
    """Read the balancer's ``GET /status``; entries without numbers are skipped."""
    body = body if isinstance(body, dict) else {}
    entries = body.get("substations")
    readings = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        substation = _text(entry.get("id"))
        load = _number(entry.get("load"))
        capacity = _number(entry.get("capacity"))
        if substation is None or load is None or capacity is None:
            continue
        percentage = _number(entry.get("load_percentage"))
        if percentage is None:
            percentage = load / capacity * 100.0 if capacity > 0 else 0.0
        readings.append(SubstationReading(substation, load, capacity, percentage, entry.get("up") is not False))
    return StatusSample(t=round(t, 3), policy=_text(body.get("policy")), substations=tuple(readings))


@dataclass(frozen=True)
class RunTiming:
    # From the start of the run until the last answer; CPU of this process over the same span.
    wall_seconds: float
    cpu_seconds: float


@dataclass(frozen=True)
class RunData:
    """Everything one run observed, before any figure is computed."""

    results: tuple[RequestResult, ...]
    samples: tuple[StatusSample, ...]
    timing: RunTiming
    started_at: str
    finished_at: str
    # None when every request was answered (or never due before the time limit).
    stopped_by: StopReason | None
    sample_errors: int
    # Seconds since the epoch when the run started: where the substations' records of this run begin.
    started_epoch: float | None = None
    # The substations' own view: their sessions sampled at a high rate during the run, and at its end
    # every session (ended ones too) with its allocation history, and the limit's history.
    substation_samples: tuple[SubstationSample, ...] = ()
    substation_sample_errors: int = 0
    audits: tuple[SubstationAudit, ...] = ()
    derate: DerateRecord | None = None
    # What the tool could not do (read a substation, wait for every session to end): said in the report.
    notes: tuple[str, ...] = ()
    # When the last answer came (seconds since the start): the balancer's sample then is the grid "at end",
    # as the requests left it, before their sessions ended. None: the last sample.
    answers_end_t: float | None = None

    @property
    def interrupted(self) -> bool:
        return self.stopped_by == INTERRUPT

    @property
    def unanswered(self) -> int:
        return sum(1 for result in self.results if result.failure == UNANSWERED)


@dataclass(frozen=True)
class SubstationSample:
    """One ``GET /sessions`` of a substation: its limit and the sum of its sessions' allocations at one instant."""

    t: float  # seconds since the run started, by this tool's clock
    substation: str
    taken_at: float  # the substation's clock, seconds since the epoch
    limit_kw: float
    allocated_kw: float  # the sum of the sessions' allocated_kw, added up here
    sessions: int
    # The sum of the sessions' amounts: what the vehicles ask for (None when an amount is missing).
    requested_kw: float | None = None
    # The fair-share level: the least any session short of its amount gets (suspended ones: 0 kW).
    # None when every session gets its whole amount.
    fair_share_kw: float | None = None
    # The most any session gets (None without sessions).
    largest_kw: float | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


# An allocation this close to its amount is the whole amount: the substation's sums are exact to the milliwatt.
SHORT_TOLERANCE_KW = 1e-6


def parse_sessions_sample(t: float, substation: str, body: Any) -> SubstationSample | None:
    """Read a substation's ``GET /sessions``; None when the answer lacks the figures (counted as an error)."""
    body = body if isinstance(body, dict) else {}
    limit = _number(body.get("limit_kw"))
    taken_at = _number(body.get("taken_at"))
    sessions = body.get("sessions")
    if limit is None or taken_at is None or not isinstance(sessions, list):
        return None
    entries = [s for s in sessions if isinstance(s, dict)]
    allocations = [_number(s.get("allocated_kw")) for s in entries]
    if any(kw is None for kw in allocations):
        return None
    amounts = [_number(s.get("amount")) for s in entries]
    known = [kw for kw in allocations if kw is not None]
    short = [
        kw for kw, amount in zip(allocations, amounts)
        if kw is not None and amount is not None and kw < amount - SHORT_TOLERANCE_KW
    ]  # fmt: skip
    return SubstationSample(
        t=round(t, 3),
        substation=_text(body.get("substation")) or substation,
        taken_at=taken_at,
        limit_kw=limit,
        # The sum is made here, not taken from the substation's "load": this witness trusts no total.
        allocated_kw=sum(known),
        sessions=len(allocations),
        requested_kw=None if any(amount is None for amount in amounts) else sum(a for a in amounts if a is not None),
        fair_share_kw=min(short) if short else None,
        largest_kw=max(known) if known else None,
    )


@dataclass(frozen=True)
class SessionRecord:
    """A session as its substation keeps it, with its allocation at every change."""

    substation: str
    session_id: str
    vehicle_id: str
    amount_kw: float
    state: str
    # Energy delivered (a substation's ``delivered_kwh``, or its ``energy_kwh`` for a session without a need).
    energy_kwh: float
    started_at: float  # seconds since the epoch
    ends_at: float
    # (seconds since the epoch, kW): the allocation from each point on; an ended session's last point is 0 kW.
    history: tuple[tuple[float, float], ...]
    # For a session with an energy need: the need (kWh), and once ended whether the substation counts it met.
    need_kwh: float | None = None
    need_met: bool | None = None

    @property
    def ended(self) -> bool:
        return self.state == "ended"


@dataclass(frozen=True)
class SubstationAudit:
    """What one substation said of itself at the end of the run: every session it keeps, and its limits."""

    substation: str
    url: str
    taken_at: float | None = None  # the instant of its GET /sessions (its clock); None if unreadable
    # (seconds since the epoch, limit kW) at every change of the limit.
    limit_history: tuple[tuple[float, float], ...] = ()
    sessions: tuple[SessionRecord, ...] = ()
    # Why it could not be read, when it could not.
    error: str | None = None
    # Session entries dropped for lacking figures.
    unreadable_sessions: int = 0


def parse_audit(substation: str, url: str, sessions_body: Any, limit_body: Any) -> SubstationAudit:
    """Read ``GET /sessions?history=1&ended=1`` and ``GET /limit``; entries without their figures are dropped."""
    sessions_body = sessions_body if isinstance(sessions_body, dict) else {}
    limit_body = limit_body if isinstance(limit_body, dict) else {}
    taken_at = _number(sessions_body.get("taken_at"))
    entries = sessions_body.get("sessions")
    history = limit_body.get("history")
    if taken_at is None or not isinstance(entries, list) or not isinstance(history, list):
        return SubstationAudit(
            substation, url, error="its GET /sessions or GET /limit answer lacks taken_at, sessions or history"
        )
    records = [_session_record(substation, entry) for entry in entries]
    limits = [_point(point) for point in history]
    return SubstationAudit(
        substation=_text(sessions_body.get("substation")) or substation,
        url=url,
        taken_at=taken_at,
        limit_history=tuple(sorted(point for point in limits if point is not None)),
        sessions=tuple(record for record in records if record is not None),
        unreadable_sessions=sum(1 for record in records if record is None)
        + sum(1 for point in limits if point is None),
    )


def unreadable_audit(substation: str, url: str, error: str) -> SubstationAudit:
    return SubstationAudit(substation, url, error=error)


def _session_record(substation: str, entry: Any) -> SessionRecord | None:
    if not isinstance(entry, dict):
        return None
    session_id = _text(entry.get("session_id"))
    amount = _number(entry.get("amount"))
    # With a need, energy_kwh is the need and delivered_kwh what was delivered (the records' contract with the charge API).
    delivered = _number(entry.get("delivered_kwh"))
    energy = delivered if delivered is not None else _number(entry.get("energy_kwh"))
    need = _number(entry.get("energy_kwh")) if delivered is not None and "feasible" in entry else None
    started = _epoch(entry.get("started_at"))
    # A session with a need may end at its departure rather than at a fixed end.
    ends = _epoch(entry.get("ends_at")) or _epoch(entry.get("departure"))
    history = entry.get("history")
    if session_id is None or amount is None or energy is None or started is None or ends is None:
        return None
    if not isinstance(history, list):
        return None
    points = [_point(point) for point in history]
    if any(point is None for point in points):
        return None
    return SessionRecord(
        substation=substation,
        session_id=session_id,
        vehicle_id=_text(entry.get("vehicle_id")) or "",
        amount_kw=amount,
        state=_text(entry.get("state")) or "",
        energy_kwh=energy,
        started_at=started,
        ends_at=ends,
        history=tuple(point for point in points if point is not None),
        need_kwh=need,
        need_met=entry["need_met"] if isinstance(entry.get("need_met"), bool) else None,
    )


def _point(value: Any) -> tuple[float, float] | None:
    """``[time, kW, ...]`` as (time, kW)."""
    if not isinstance(value, list) or len(value) < 2:
        return None
    at, kw = _number(value[0]), _number(value[1])
    return None if at is None or kw is None else (at, kw)


def _epoch(value: Any) -> float | None:
    text = _text(value)
    if text is None:
        return None
    try:
        return parse_time(text).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class DerateRecord:
    """What the derate did: which substation, from and to which limit, when (seconds since the run started)."""

    substation: str | None
    planned_at_seconds: float
    planned_for_seconds: float
    limit_before_kw: float | None = None
    limit_kw: float | None = None
    applied_offset: float | None = None
    applied_at: str | None = None
    restored_offset: float | None = None
    restored_at: str | None = None
    # Why it did not happen, or was not undone; None when all went as planned.
    error: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.applied_offset is None:
            return f"The derate did not happen: {self.error or 'the run ended before it was due'}."
        text = (
            f"{self.substation}'s limit was lowered from {self.limit_before_kw:.1f} kW to {self.limit_kw:.1f} kW "
            f"at t={self.applied_offset:.1f} s ({self.applied_at})"
        )
        if self.restored_offset is not None:
            text += f" and restored at t={self.restored_offset:.1f} s ({self.restored_at})"
        else:
            text += ", and NOT restored"
        return text + (f"; {self.error}" if self.error else "") + "."


def epoch_text(epoch: float) -> str:
    return format_time(epoch)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)
