"""Pass or fail, and what the user should know: plain Python, no network."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from load_tester.records import INTERRUPT, STILL_QUEUED, TIME_LIMIT, RunData
from load_tester.scenarios import ARRIVAL_MARGIN_SECONDS
from load_tester.stats import Summary
from load_tester.violations import CapacityViolation, Witnesses

# The report lists this many violations of each witness by name; the counts cover them all.
VIOLATIONS_NAMED = 3

# Python threads share one core (the GIL): near a full core the tool itself limits the load it makes.
CPU_SATURATION_PERCENT = 90.0
# An open-loop request started this late could not keep up with the arrival rate (and could miss the limit).
LATE_START_MS = ARRIVAL_MARGIN_SECONDS * 1000


@dataclass(frozen=True)
class Limits:
    """The highest shares of requests a passing run may have: failed or not sent, and rejected for capacity.

    By default no request may fail, while any number may be rejected: a rejection is the grid
    refusing power it does not have, which is correct. ``max_rejection_rate=0`` demands that every
    EV is admitted.
    """

    max_error_rate: float = 0.0
    max_rejection_rate: float = 1.0


@dataclass(frozen=True)
class Verdict:
    problems: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.problems


def judge(
    summary: Summary,
    witnesses: Witnesses,
    data: RunData,
    limits: Limits,
    open_loop: bool,
) -> Verdict:
    problems = [
        *_violation_problem(witnesses.history_violations, "in the sessions' allocation histories"),
        *_violation_problem(witnesses.sample_violations, "in the samples of the substations' sessions"),
    ]
    if data.derate is not None and (data.derate.applied_offset is None or data.derate.restored_offset is None):
        problems.append(data.derate.describe())
    if summary.error_rate > limits.max_error_rate:
        problems.append(_error_rate_problem(summary, limits.max_error_rate))
    if summary.rejection_rate > limits.max_rejection_rate:
        problems.append(
            f"rejection rate {summary.rejection_rate:.1%} is above the allowed {limits.max_rejection_rate:.1%} "
            f"({summary.rejected} of {summary.planned} requests rejected for capacity): the grid had no room "
            "for them. Lower the load or add capacity, or allow rejections with --max-rejection-rate."
        )
    if data.stopped_by == INTERRUPT:
        problems.append("the run was interrupted (Ctrl-C): its figures cover only what happened before")
    elif data.stopped_by == TIME_LIMIT:
        problems.append(
            f"{data.unanswered} request(s) still unanswered at the time limit (the duration plus one --timeout "
            "and a grace): the stack kept them open well past --timeout. Their request ids are in results.json "
            "(failure \"unanswered\"); the services' logs tell where they got stuck."
        )
    return Verdict(problems=tuple(problems), warnings=tuple(_warnings(summary, witnesses, data, open_loop)))


def _violation_problem(violations: Sequence[CapacityViolation], where: str) -> list[str]:
    if not violations:
        return []
    worst = max(violations, key=lambda v: v.excess_kw)
    named = "; ".join(v.describe() for v in violations[:VIOLATIONS_NAMED])
    more = f" (and {len(violations) - VIOLATIONS_NAMED} more)" if len(violations) > VIOLATIONS_NAMED else ""
    return [
        f"{len(violations)} capacity violation(s) {where}: {named}{more}. The worst: {worst.excess_kw:.3f} kW "
        f"over at {worst.substation}. Every one is in results.json (capacity_violations)."
    ]


def _error_rate_problem(summary: Summary, max_error_rate: float) -> str:
    causes = summary.failure_causes()
    failed = f"{summary.failed} failed ({causes})" if causes else f"{summary.failed} failed"
    return (
        f"error rate {summary.error_rate:.1%} is above the allowed {max_error_rate:.1%} "
        f"({failed}, {summary.not_sent} not sent). The requests and their errors are in results.json; "
        "the services' logs tell why they failed."
    )


def _warnings(summary: Summary, witnesses: Witnesses, data: RunData, open_loop: bool) -> list[str]:
    warnings = []
    if summary.tool_cpu_percent >= CPU_SATURATION_PERCENT:
        warnings.append(
            f"the load tester used {summary.tool_cpu_percent:.0f}% of a CPU core: it may be the bottleneck. "
            "Lower --concurrency or run it on a machine with spare CPU."
        )
    if open_loop and summary.max_schedule_lag_ms is not None and summary.max_schedule_lag_ms > LATE_START_MS:
        warnings.append(
            f"some requests started up to {summary.max_schedule_lag_ms:.0f} ms late: every worker was busy. "
            "Raise --concurrency or lower --rate to hold the arrival rate."
        )
    if not data.samples:
        warnings.append(
            "no status sample could be read from the balancer: load figures and the load plot are missing. "
            "Check --balancer."
        )
    elif data.sample_errors:
        warnings.append(f"{data.sample_errors} status sample(s) of the balancer could not be read.")
    if summary.not_sent and data.stopped_by != INTERRUPT:
        warnings.append(
            f"{summary.not_sent} request(s) were not sent before the time limit: raise --duration to send them all."
        )
    still_queued = sum(1 for r in data.results if r.error == STILL_QUEUED)
    if still_queued:
        warnings.append(
            f"{still_queued} request(s) were still waiting in the queue at the time limit and were cancelled: "
            "raise --duration to give them time to start."
        )
    warnings += _witness_warnings(witnesses, data)
    if summary.vehicles_energy_unknown:
        warnings.append(
            f"the delivered energy of {summary.vehicles_energy_unknown} served vehicle(s) could not be read: "
            "the energy and fairness figures leave them out."
        )
    warnings += list(data.notes)
    return warnings


def _witness_warnings(witnesses: Witnesses, data: RunData) -> list[str]:
    warnings = []
    unreadable = [audit for audit in data.audits if audit.error is not None]
    for audit in unreadable:
        warnings.append(
            f"the allocation histories of {audit.substation} ({audit.url}) could not be read: {audit.error}. "
            "That witness did not check it."
        )
    if not data.audits:
        warnings.append(
            "no substation's allocation history could be read (the balancer's GET /substations listed none, or "
            "could not be read): the capacity checks did not run. Check --balancer."
        )
    if data.audits and not data.substation_samples:
        warnings.append("no sample of the substations' sessions could be read: that witness did not check them.")
    elif data.substation_sample_errors:
        warnings.append(f"{data.substation_sample_errors} sample(s) of the substations' sessions could not be read.")
    truncated = sum(check.truncated_sessions for check in witnesses.history)
    if truncated:
        warnings.append(
            f"{truncated} session(s) had more allocation changes than their substation keeps: their earliest "
            "allocations were not checked."
        )
    return warnings
