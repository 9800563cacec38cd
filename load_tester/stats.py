"""The figures of a run, computed from its records: plain Python, no network."""
from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from load_tester.records import ADMITTED, FAILED, NOT_SENT, REJECTED, RequestResult, RunTiming, StatusSample
from load_tester.violations import CapacityViolation


@dataclass(frozen=True)
class Latency:
    """Milliseconds from sending a request to its answer, over every answered request."""

    mean: float
    median: float
    p95: float
    p99: float
    max: float


@dataclass(frozen=True)
class SubstationSummary:
    substation: str
    admitted: int
    admitted_kw: float
    capacity_kw: float | None
    end_load_percentage: float | None
    peak_load_percentage: float | None


@dataclass(frozen=True)
class Summary:
    planned: int
    sent: int
    admitted: int
    rejected: int
    failed: int
    not_sent: int
    failed_by_status: dict[str, int]
    # Shares of planned requests. A capacity rejection is the grid protecting itself, a correct answer:
    # it counts in rejection_rate only. error_rate is what went wrong: failed (any other answer than 201
    # or a capacity rejection, a timeout, a connection error) or never sent.
    error_rate: float
    rejection_rate: float
    latency: Latency | None
    wall_seconds: float
    throughput_rps: float
    substations: tuple[SubstationSummary, ...]
    # max - min load % over the substations: in the last status sample, and the largest in any sample.
    spread_end: float | None
    spread_peak: float | None
    capacity_violations: int
    tool_cpu_seconds: float
    tool_cpu_percent: float
    max_schedule_lag_ms: float | None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def failure_causes(self) -> str:
        """``"502: 3, timeout: 1"``; empty when nothing failed."""
        return ", ".join(f"{cause}: {count}" for cause, count in self.failed_by_status.items())


def summarise(
    results: Sequence[RequestResult],
    samples: Sequence[StatusSample],
    violations: Sequence[CapacityViolation],
    timing: RunTiming,
) -> Summary:
    outcomes = Counter(result.outcome for result in results)
    sent = len(results) - outcomes[NOT_SENT]
    answered = [r.latency_ms for r in results if r.answered and r.latency_ms is not None]
    lags = [lag for lag in (r.schedule_lag_ms for r in results) if lag is not None]
    end_spread, peak_spread = spreads(samples)
    return Summary(
        planned=len(results),
        sent=sent,
        admitted=outcomes[ADMITTED],
        rejected=outcomes[REJECTED],
        failed=outcomes[FAILED],
        not_sent=outcomes[NOT_SENT],
        failed_by_status=dict(sorted(Counter(r.failure for r in results if r.outcome == FAILED).items())),
        error_rate=_share(outcomes[FAILED] + outcomes[NOT_SENT], len(results)),
        rejection_rate=_share(outcomes[REJECTED], len(results)),
        latency=latency(answered),
        wall_seconds=timing.wall_seconds,
        throughput_rps=len(answered) / timing.wall_seconds if timing.wall_seconds > 0 else 0.0,
        substations=substation_summaries(results, samples),
        spread_end=end_spread,
        spread_peak=peak_spread,
        capacity_violations=len(violations),
        tool_cpu_seconds=timing.cpu_seconds,
        tool_cpu_percent=timing.cpu_seconds / timing.wall_seconds * 100.0 if timing.wall_seconds > 0 else 0.0,
        max_schedule_lag_ms=max(lags) if lags else None,
    )


def _share(count: int, total: int) -> float:
    return count / total if total else 0.0


def percentile(values: Sequence[float], percent: int) -> float:
    """Inclusive percentile (linear between the two nearest values), as spreadsheets compute it."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]


def latency(values: Sequence[float]) -> Latency | None:
    if not values:
        return None
    return Latency(
        mean=statistics.fmean(values),
        median=statistics.median(values),
        p95=percentile(values, 95),
        p99=percentile(values, 99),
        max=max(values),
    )


def spreads(samples: Sequence[StatusSample]) -> tuple[float | None, float | None]:
    per_sample = [_spread(sample) for sample in samples if sample.substations]
    if not per_sample:
        return None, None
    return per_sample[-1], max(per_sample)


def _spread(sample: StatusSample) -> float:
    loads = [reading.load_percentage for reading in sample.substations]
    return max(loads) - min(loads)


def substation_summaries(
    results: Sequence[RequestResult], samples: Sequence[StatusSample]
) -> tuple[SubstationSummary, ...]:
    admitted = [r for r in results if r.outcome == ADMITTED and r.substation]
    names = sorted({r.substation for r in admitted} | {x.substation for s in samples for x in s.substations})
    last = {reading.substation: reading for reading in samples[-1].substations} if samples else {}
    summaries = []
    for name in names:
        mine = [r for r in admitted if r.substation == name]
        # Each admission reports the load right after it: exact peaks between two samples.
        peaks = [r.load_percentage for r in mine if r.load_percentage is not None]
        peaks += [x.load_percentage for s in samples for x in s.substations if x.substation == name]
        # The latest known figure: the last status sample, else the last admission.
        capacities = [r.capacity_kw for r in mine if r.capacity_kw is not None]
        capacities += [x.capacity_kw for s in samples for x in s.substations if x.substation == name]
        summaries.append(
            SubstationSummary(
                substation=name,
                admitted=len(mine),
                admitted_kw=round(sum(r.amount_kw for r in mine), 6),
                capacity_kw=capacities[-1] if capacities else None,
                end_load_percentage=last[name].load_percentage if name in last else None,
                peak_load_percentage=max(peaks) if peaks else None,
            )
        )
    return tuple(summaries)
