"""Did any substation ever allocate more than its limit? Plain Python, no network.

Two witnesses, neither of which takes the substation's word for its own total:

* the allocation histories: every session a substation keeps (ended ones too,
  other clients' too) with its allocation at every change, and the history of
  its limit. Allocations and the limit are step functions of time, so checking
  at every change point covers every instant: the points are swept in time
  order, every change at one timestamp is applied before that instant is
  checked (a substation re-allocates atomically when its limit moves, so a cut
  and the allocations it forces share one timestamp), and the sum of the
  allocations then in force must not pass the limit then in force.
* the samples: the substation's ``GET /sessions``, read many times a second,
  gives its limit and every session's allocation at one instant; the sum of
  the allocations, added up here, must not pass that limit.

The only right number of violations is zero.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from load_tester.records import SubstationAudit, SubstationSample, epoch_text

# Allocations are sums of floats (kW rounded from whole milliwatts): forgive rounding noise, nothing more.
TOLERANCE_KW = 1e-6
HISTORY = "history"
SAMPLES = "samples"


@dataclass(frozen=True)
class CapacityViolation:
    source: str  # HISTORY or SAMPLES
    substation: str
    at: str  # the instant, by the substation's clock
    t: float | None  # seconds since the run started, when known
    load_kw: float  # the sum of the allocations
    capacity_kw: float  # the limit in force
    sessions: int

    @property
    def excess_kw(self) -> float:
        return self.load_kw - self.capacity_kw

    def describe(self) -> str:
        when = self.at if self.t is None else f"{self.at} (t={self.t:.2f} s)"
        seen = "its sessions' allocation histories" if self.source == HISTORY else "a sample of its sessions"
        return (
            f"{self.substation} allocated {self.load_kw:.3f} kW to {self.sessions} session(s) under a limit of "
            f"{self.capacity_kw:.3f} kW at {when} ({self.excess_kw:.3f} kW over, seen in {seen})"
        )

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "excess_kw": round(self.excess_kw, 6)}


@dataclass(frozen=True)
class HistoryCheck:
    """The sweep of one substation's histories over the run."""

    substation: str
    instants: int  # instants checked
    # Highest sum of allocations / limit at any instant checked (None if none was).
    peak_load_percentage: float | None
    violations: tuple[CapacityViolation, ...]
    # Sessions whose history starts after they did (the substation keeps the last points only):
    # their allocation before their first point is unknown and counted as 0.
    truncated_sessions: int = 0


@dataclass(frozen=True)
class SampleCheck:
    substation: str
    samples: int
    peak_load_percentage: float | None
    violations: tuple[CapacityViolation, ...]


def sweep_history(audit: SubstationAudit, since: float | None = None, run_start: float | None = None) -> HistoryCheck:
    """Check every instant from ``since`` (the run's start, substation clock) until the audit was taken.

    Only instants up to the audit's ``taken_at`` are judged: the limit was read after the sessions, and
    a change of it later than that has its matching allocation changes missing from the sessions read.
    Instants before the first point of the limit's history are not judged either (limit unknown).
    ``run_start`` (seconds since the epoch) turns instants into seconds since the run started.
    """
    end = audit.taken_at
    if end is None or not audit.limit_history:
        return HistoryCheck(audit.substation, 0, None, ())
    # One event list: (time, order, key, value); at one time the order does not matter, all apply first.
    changes: dict[float, list[tuple[str | None, float]]] = defaultdict(list)
    for at, kw in audit.limit_history:
        changes[at].append((None, kw))
    truncated = 0
    for session in audit.sessions:
        if session.history and session.history[0][0] > session.started_at + 1e-3:
            truncated += 1
        for at, kw in session.history:
            changes[at].append((session.session_id, kw))
    start = since if since is not None else -math.inf
    if since is not None and since <= end:
        changes.setdefault(since, [])  # the state the run starts in is judged too
    allocations: dict[str, float] = {}
    limit: float | None = None
    instants = 0
    peak: float | None = None
    violations = []
    for at in sorted(changes):
        if at > end:
            break
        for key, kw in changes[at]:
            if key is None:
                limit = kw
            elif kw == 0.0:
                allocations.pop(key, None)
            else:
                allocations[key] = kw
        if at < start or limit is None:
            continue
        instants += 1
        total = math.fsum(allocations.values())
        if limit > 0:
            percentage = total / limit * 100.0
            peak = percentage if peak is None else max(peak, percentage)
        if total > limit + TOLERANCE_KW:
            violations.append(
                CapacityViolation(
                    HISTORY, audit.substation, epoch_text(at), _offset(at, run_start), round(total, 6), limit,
                    len(allocations),
                )
            )
    return HistoryCheck(audit.substation, instants, peak, tuple(violations), truncated)


def check_samples(samples: Iterable[SubstationSample]) -> list[SampleCheck]:
    """Per substation: every sample whose allocations add up to more than its limit is a violation.

    The tolerance grows with the number of sessions added up: 1e-6 kW of rounding for each.
    """
    by_substation: dict[str, list[SubstationSample]] = defaultdict(list)
    for sample in samples:
        by_substation[sample.substation].append(sample)
    checks = []
    for substation, mine in sorted(by_substation.items()):
        violations = tuple(
            CapacityViolation(
                SAMPLES, substation, epoch_text(s.taken_at), s.t, round(s.allocated_kw, 6), s.limit_kw, s.sessions
            )
            for s in mine
            if s.allocated_kw > s.limit_kw + TOLERANCE_KW * s.sessions
        )
        percentages = [s.allocated_kw / s.limit_kw * 100.0 for s in mine if s.limit_kw > 0]
        checks.append(SampleCheck(substation, len(mine), max(percentages) if percentages else None, violations))
    return checks


@dataclass(frozen=True)
class Witnesses:
    """Both checks of a run, substation by substation."""

    history: tuple[HistoryCheck, ...]
    samples: tuple[SampleCheck, ...]

    @property
    def history_violations(self) -> tuple[CapacityViolation, ...]:
        return tuple(v for check in self.history for v in check.violations)

    @property
    def sample_violations(self) -> tuple[CapacityViolation, ...]:
        return tuple(v for check in self.samples for v in check.violations)

    @property
    def violations(self) -> tuple[CapacityViolation, ...]:
        return (*self.history_violations, *self.sample_violations)

    def peak_load_percentage(self, substation: str) -> float | None:
        """The highest allocated/limit either witness saw at ``substation``."""
        peaks = [c.peak_load_percentage for c in (*self.history, *self.samples) if c.substation == substation]
        known = [peak for peak in peaks if peak is not None]
        return max(known) if known else None


def find_violations(
    audits: Sequence[SubstationAudit],
    samples: Iterable[SubstationSample],
    since: dict[str, float] | None = None,
    run_start: float | None = None,
) -> Witnesses:
    """Both witnesses; ``since`` gives per substation the first instant to judge (its clock)."""
    since = since or {}
    # Seconds since the run started are counted from the run's start by the substation's own clock.
    history = tuple(
        sweep_history(audit, since.get(audit.substation, run_start), since.get(audit.substation, run_start))
        for audit in audits
        if audit.error is None
    )
    return Witnesses(history=history, samples=tuple(check_samples(samples)))


def run_start_by_substation(samples: Iterable[SubstationSample]) -> dict[str, float]:
    """Where each substation's records of the run begin, by its own clock.

    The first sample of a substation was taken as the run started: its ``taken_at`` is the start by the
    substation's clock, whatever the offset between its clock and this tool's. Without samples, the
    tool's own start is used.
    """
    first: dict[str, float] = {}
    for sample in samples:
        if sample.substation not in first:
            first[sample.substation] = sample.taken_at - sample.t
    return first


def _offset(at: float, run_start: float | None) -> float | None:
    return None if run_start is None else round(at - run_start, 3)
