"""What a run records: each request's outcome and the balancer's status over time.

Plain Python (no network): turning HTTP answers into records is unit-tested
with hand-made bodies.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from load_tester.scenarios import PlannedRequest

ADMITTED = "admitted"
REJECTED = "rejected"
FAILED = "failed"
NOT_SENT = "not_sent"

# The failure of a request that was sent but never answered: the run stopped waiting for it.
UNANSWERED = "unanswered"

# Why a run stopped before every request was answered: the user pressed Ctrl-C, or the run's time
# limit (its duration plus one HTTP timeout and a grace) passed with requests still open.
StopReason = Literal["interrupt", "time_limit"]
INTERRUPT: StopReason = "interrupt"
TIME_LIMIT: StopReason = "time_limit"

# The error codes with which the stack says "no room on the grid": a correct answer, not a fault.
CAPACITY_ERRORS = frozenset({"no_capacity", "capacity_exceeded"})


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

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def answered(self) -> bool:
        return self.status is not None

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
) -> RequestResult:
    """201 is an admission, a capacity error a rejection, anything else a failure."""
    body = body if isinstance(body, dict) else {}
    error = body.get("error") if isinstance(body.get("error"), str) else None
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
    )


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

    @property
    def interrupted(self) -> bool:
        return self.stopped_by == INTERRUPT

    @property
    def unanswered(self) -> int:
        return sum(1 for result in self.results if result.failure == UNANSWERED)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)
