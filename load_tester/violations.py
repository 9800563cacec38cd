"""Did any substation ever carry more than its capacity? Plain Python, no network.

Two independent witnesses:

* the admitted sessions: at each admission, the sessions of this run still
  charging at that substation (``started_at <= t < ends_at``, the substation's own
  clock) plus the new one, and the load the substation itself reported, must fit
  in the capacity it reported. Load only rises at admissions, so checking those
  instants covers the whole run.
* the balancer's status samples: no substation may show ``load > capacity``.

The only right number of violations is zero.
"""
from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from gridcommon.timefmt import parse_time
from load_tester.records import ADMITTED, RequestResult, StatusSample

# Amounts are sums of floats: forgive rounding noise, nothing more.
TOLERANCE_KW = 1e-6


@dataclass(frozen=True)
class CapacityViolation:
    source: str  # "sessions" or "status"
    substation: str
    at: str  # the admission time, or "t=<seconds>s" for a status sample
    load_kw: float
    capacity_kw: float

    @property
    def excess_kw(self) -> float:
        return self.load_kw - self.capacity_kw

    def describe(self) -> str:
        return (
            f"{self.substation} carried {self.load_kw:.1f} kW of {self.capacity_kw:.1f} kW capacity "
            f"at {self.at} ({self.excess_kw:.1f} kW over, seen in {self.source})"
        )

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "excess_kw": round(self.excess_kw, 6)}


@dataclass(frozen=True)
class _Session:
    started_at: datetime
    ends_at: datetime
    order: tuple[int, int]  # admission order within one millisecond: state_version, then send order
    amount_kw: float
    capacity_kw: float
    reported_load_kw: float | None
    started_text: str


def find_violations(results: Iterable[RequestResult], samples: Iterable[StatusSample]) -> list[CapacityViolation]:
    return [*session_violations(results), *status_violations(samples)]


def session_violations(results: Iterable[RequestResult]) -> list[CapacityViolation]:
    by_substation: dict[str, list[_Session]] = defaultdict(list)
    for result in results:
        session = _as_session(result)
        if session is not None and result.substation is not None:
            by_substation[result.substation].append(session)
    violations = []
    for substation, sessions in sorted(by_substation.items()):
        violations.extend(_sweep(substation, sessions))
    return violations


def status_violations(samples: Iterable[StatusSample]) -> list[CapacityViolation]:
    return [
        CapacityViolation("status", reading.substation, f"t={sample.t:.1f}s", reading.load_kw, reading.capacity_kw)
        for sample in samples
        for reading in sample.substations
        if reading.up and reading.load_kw > reading.capacity_kw + TOLERANCE_KW
    ]


def _as_session(result: RequestResult) -> _Session | None:
    if result.outcome != ADMITTED or not (result.started_at and result.ends_at) or result.capacity_kw is None:
        return None
    return _Session(
        started_at=parse_time(result.started_at),
        ends_at=parse_time(result.ends_at),
        order=(result.state_version if result.state_version is not None else -1, result.index),
        amount_kw=result.amount_kw,
        capacity_kw=result.capacity_kw,
        reported_load_kw=result.load_kw,
        started_text=result.started_at,
    )


def _sweep(substation: str, sessions: list[_Session]) -> list[CapacityViolation]:
    violations = []
    charging: list[tuple[datetime, float]] = []  # heap of (ends_at, amount) of sessions still charging
    load = 0.0
    for session in sorted(sessions, key=lambda s: (s.started_at, s.order)):
        while charging and charging[0][0] <= session.started_at:
            load -= heapq.heappop(charging)[1]
        heapq.heappush(charging, (session.ends_at, session.amount_kw))
        load += session.amount_kw
        # Other clients' sessions are invisible to this run; the substation's own figure includes them.
        worst = max(load, session.reported_load_kw or 0.0)
        if worst > session.capacity_kw + TOLERANCE_KW:
            violations.append(
                CapacityViolation("sessions", substation, session.started_text, round(worst, 6), session.capacity_kw)
            )
    return violations
