"""The figures of a run, computed from its records: plain Python, no network."""
from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from load_tester.records import (
    ADMITTED,
    FAILED,
    NOT_SENT,
    REJECTED,
    RequestResult,
    RunTiming,
    StatusSample,
    SubstationSample,
)
from load_tester.violations import Witnesses

if TYPE_CHECKING:
    from load_tester.energy import EnergyFigures

# The allocation policy under which a session gets its whole amount or nothing.
STRICT = "strict"


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
    # What its vehicles asked for (the sum of its sessions' amounts) over its limit, from its own sample
    # when the last answer came. Under sharing it passes 100 % while the allocations stay within the limit.
    end_requested_percentage: float | None
    # Highest allocated / limit: from the substation's own records when they could be read.
    peak_load_percentage: float | None
    energy_delivered_kwh: float = 0.0
    capacity_violations: int = 0


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
    # Balance under strict only (None under any other policy): max - min load % over the substations, in the
    # balancer's view, when the last answer came and the largest in any sample. Under strict a session gets its
    # whole amount, so this is what the substations carry; under sharing the vehicles' requests outrun the
    # limit and the figure says nothing of balance.
    spread_end: float | None
    spread_peak: float | None
    # Both witnesses together; then each: the allocation histories, and the high-rate samples.
    capacity_violations: int
    tool_cpu_seconds: float
    tool_cpu_percent: float
    max_schedule_lag_ms: float | None
    history_violations: int = 0
    sample_violations: int = 0
    history_instants_checked: int = 0
    substation_samples: int = 0
    # Vehicles: served (a 201, or a 202 that later started) out of requested (every planned one).
    vehicles_requested: int = 0
    vehicles_served: int = 0
    # Energy: requested = amount x session length; delivered = what the sessions' records say they got.
    energy_requested_kwh: float = 0.0
    energy_delivered_kwh: float = 0.0
    energy_delivered_ratio: float | None = None
    vehicles_energy_unknown: int = 0
    # Jain's index of delivered energy per vehicle: over the served ones, and over all (unserved as 0).
    jain_index_served: float | None = None
    jain_index_all: float | None = None
    # Distribution of delivered / requested energy over the served vehicles: min, p5, p50, p95.
    share_of_request: dict[str, float] | None = None
    # Requests that got a 202, and how long the ones that started waited in the queue.
    queued: int = 0
    queue_wait_p50_seconds: float | None = None
    queue_wait_p95_seconds: float | None = None
    # The highest allocated / limit of any substation.
    peak_load_percentage: float | None = None
    # Balance under sharing: max - min over the substations of the power a vehicle gets there (the fair-share
    # level where vehicles are short of their amount), in kW, from the substations' own samples; 0 while no
    # vehicle is short anywhere. At the last answer, and the largest at any instant.
    power_spread_end_kw: float | None = None
    power_spread_peak_kw: float | None = None
    # Vehicles with an energy need (workplace-day): how many, the share whose need was met, and Jain's
    # index of delivered / need over all of them; energy_delivered_ratio is then the share of needs delivered.
    demands: int = 0
    demands_met: int | None = None
    demands_met_ratio: float | None = None
    jain_index_of_shares: float | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def failure_causes(self) -> str:
        """``"502: 3, timeout: 1"``; empty when nothing failed."""
        return ", ".join(f"{cause}: {count}" for cause, count in self.failed_by_status.items())


def summarise(
    results: Sequence[RequestResult],
    samples: Sequence[StatusSample],
    witnesses: Witnesses,
    timing: RunTiming,
    energy: EnergyFigures | None = None,
    substation_samples: Sequence[SubstationSample] = (),
    end_t: float | None = None,
    allocation_policy: str | None = None,
) -> Summary:
    """The figures of a run; ``end_t`` is when its last answer came (None: the end is the last sample).

    ``allocation_policy`` is the substations' policy: the load % spread is given under ``strict`` only.
    """
    outcomes = Counter(result.outcome for result in results)
    sent = len(results) - outcomes[NOT_SENT]
    answered = [r.latency_ms for r in results if r.answered and r.latency_ms is not None]
    lags = [lag for lag in (r.schedule_lag_ms for r in results) if lag is not None]
    end_spread, peak_spread = spreads(samples, end_t) if allocation_policy == STRICT else (None, None)
    power_end, power_peak = power_spreads(substation_samples, end_t)
    substations = substation_summaries(results, samples, witnesses, substation_samples, end_t)
    peaks = [s.peak_load_percentage for s in substations if s.peak_load_percentage is not None]
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
        substations=substations,
        spread_end=end_spread,
        spread_peak=peak_spread,
        capacity_violations=len(witnesses.violations),
        tool_cpu_seconds=timing.cpu_seconds,
        tool_cpu_percent=timing.cpu_seconds / timing.wall_seconds * 100.0 if timing.wall_seconds > 0 else 0.0,
        max_schedule_lag_ms=max(lags) if lags else None,
        history_violations=len(witnesses.history_violations),
        sample_violations=len(witnesses.sample_violations),
        history_instants_checked=sum(check.instants for check in witnesses.history),
        substation_samples=sum(check.samples for check in witnesses.samples),
        peak_load_percentage=max(peaks) if peaks else None,
        power_spread_end_kw=power_end,
        power_spread_peak_kw=power_peak,
        **(_energy_fields(energy) if energy is not None else {"vehicles_requested": len(results)}),
    )


def _energy_fields(energy: EnergyFigures) -> dict[str, Any]:
    return {
        "vehicles_requested": energy.vehicles_requested,
        "vehicles_served": energy.vehicles_served,
        "energy_requested_kwh": energy.energy_requested_kwh,
        "energy_delivered_kwh": energy.energy_delivered_kwh,
        "energy_delivered_ratio": energy.energy_delivered_ratio,
        "vehicles_energy_unknown": energy.vehicles_energy_unknown,
        "jain_index_served": energy.jain_index_served,
        "jain_index_all": energy.jain_index_all,
        "share_of_request": None if energy.share_of_request is None else asdict(energy.share_of_request),
        "queued": energy.queued,
        "queue_wait_p50_seconds": energy.queue_wait_p50_seconds,
        "queue_wait_p95_seconds": energy.queue_wait_p95_seconds,
        "demands": energy.demands,
        "demands_met": energy.demands_met,
        "demands_met_ratio": energy.demands_met_ratio,
        "jain_index_of_shares": energy.jain_index_of_shares,
    }


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


def end_sample(samples: Sequence[StatusSample], end_t: float | None) -> StatusSample | None:
    """The last sample with substations at or before ``end_t`` (or the last one of all)."""
    candidates = [s for s in samples if s.substations and (end_t is None or s.t <= end_t)]
    return candidates[-1] if candidates else None


def spreads(samples: Sequence[StatusSample], end_t: float | None = None) -> tuple[float | None, float | None]:
    """max - min load % over the substations: at the end (``end_t``), and the largest in any sample."""
    per_sample = [_spread(sample) for sample in samples if sample.substations]
    if not per_sample:
        return None, None
    last = end_sample(samples, end_t)
    return (_spread(last) if last is not None else None), max(per_sample)


def _spread(sample: StatusSample) -> float:
    loads = [reading.load_percentage for reading in sample.substations]
    return max(loads) - min(loads)


def end_samples(samples: Sequence[SubstationSample], end_t: float | None) -> dict[str, SubstationSample]:
    """Each substation's first own sample at or after ``end_t`` (None: its last one)."""
    ends: dict[str, SubstationSample] = {}
    for sample in sorted(samples, key=lambda s: s.t):
        if end_t is None or (sample.t >= end_t and sample.substation not in ends):
            ends[sample.substation] = sample
    return ends


def power_spreads(
    samples: Sequence[SubstationSample], end_t: float | None = None
) -> tuple[float | None, float | None]:
    """max - min kW per vehicle over the substations: at the end (``end_t``), and the largest at any instant.

    Every sample is an instant; each other substation counts with its latest sample then.
    """
    names = {sample.substation for sample in samples}
    latest: dict[str, SubstationSample] = {}
    largest: float | None = None
    for sample in sorted(samples, key=lambda s: s.t):
        latest[sample.substation] = sample
        spread = power_spread(latest.values()) if len(latest) == len(names) else None
        if spread is not None:
            largest = spread if largest is None else max(largest, spread)
    ends = end_samples(samples, end_t)
    return (power_spread(ends.values()) if names and ends.keys() == names else None), largest


def power_spread(samples: Iterable[SubstationSample]) -> float | None:
    """max - min over the substations of the power a vehicle gets there, at one instant, in kW.

    Where some vehicle is short of its amount, that is the substation's fair-share level; where every
    vehicle gets its whole amount, the level is at least the largest allocation, which stands for it.
    0 when no vehicle is short anywhere (each gets what it asks); None when no substation has a session.
    """
    charging = [s for s in samples if s.sessions and s.largest_kw is not None]
    if not charging:
        return None
    if all(s.fair_share_kw is None for s in charging):
        return 0.0
    levels = [s.largest_kw if s.fair_share_kw is None else s.fair_share_kw for s in charging]
    return max(levels) - min(levels)  # type: ignore[type-var]


def substation_summaries(
    results: Sequence[RequestResult],
    samples: Sequence[StatusSample],
    witnesses: Witnesses | None = None,
    substation_samples: Sequence[SubstationSample] = (),
    end_t: float | None = None,
) -> tuple[SubstationSummary, ...]:
    witnesses = witnesses or Witnesses((), ())
    admitted = [r for r in results if r.outcome == ADMITTED and r.substation]
    names = sorted(
        {r.substation for r in admitted}
        | {x.substation for s in samples for x in s.substations}
        | {check.substation for check in (*witnesses.history, *witnesses.samples)}
    )
    own_end = end_samples(substation_samples, end_t)
    violations = Counter(v.substation for v in witnesses.violations)
    summaries = []
    for name in names:
        mine = [r for r in admitted if r.substation == name]
        # The substation's own records (every allocation change, or its sessions sampled many times a
        # second) give the exact peak. Without them: the admissions' reports and the balancer's samples,
        # whose load is an estimate between its polls.
        peak = witnesses.peak_load_percentage(name)
        if peak is None:
            peaks = [r.load_percentage for r in mine if r.load_percentage is not None]
            peaks += [x.load_percentage for s in samples for x in s.substations if x.substation == name]
            peak = max(peaks) if peaks else None
        # The latest known figure: the substation's last sample, else the balancer's, else the last admission.
        capacities = [r.capacity_kw for r in mine if r.capacity_kw is not None]
        capacities += [x.capacity_kw for s in samples for x in s.substations if x.substation == name]
        capacities += [s.limit_kw for s in substation_samples if s.substation == name]
        summaries.append(
            SubstationSummary(
                substation=name,
                admitted=len(mine),
                admitted_kw=round(sum(r.amount_kw for r in mine), 6),
                capacity_kw=capacities[-1] if capacities else None,
                end_requested_percentage=_requested_percentage(own_end.get(name)),
                peak_load_percentage=peak,
                energy_delivered_kwh=round(sum(r.energy_kwh or 0.0 for r in mine), 6),
                capacity_violations=violations[name],
            )
        )
    return tuple(summaries)


def _requested_percentage(sample: SubstationSample | None) -> float | None:
    if sample is None or sample.requested_kw is None or sample.limit_kw <= 0:
        return None
    return sample.requested_kw / sample.limit_kw * 100.0
