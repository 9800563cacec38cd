"""Pass or fail, and what the user should know: plain Python, no network."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from load_tester.records import INTERRUPT, TIME_LIMIT, RunData
from load_tester.scenarios import ARRIVAL_MARGIN_SECONDS
from load_tester.stats import Summary
from load_tester.violations import CapacityViolation

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
    violations: Sequence[CapacityViolation],
    data: RunData,
    limits: Limits,
    open_loop: bool,
) -> Verdict:
    problems = [violation.describe() for violation in violations]
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
    return Verdict(problems=tuple(problems), warnings=tuple(_warnings(summary, data, open_loop)))


def _error_rate_problem(summary: Summary, max_error_rate: float) -> str:
    causes = summary.failure_causes()
    failed = f"{summary.failed} failed ({causes})" if causes else f"{summary.failed} failed"
    return (
        f"error rate {summary.error_rate:.1%} is above the allowed {max_error_rate:.1%} "
        f"({failed}, {summary.not_sent} not sent). The requests and their errors are in results.json; "
        "the services' logs tell why they failed."
    )


def _warnings(summary: Summary, data: RunData, open_loop: bool) -> list[str]:
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
    return warnings
