"""The ``stations`` scenario: simulated OCPP stations against the charge point gateway.

It registers its stations through the gateway's operator API (or finds them already
registered from a STATIONS_FILE), runs them, optionally lowers one substation's limit
for a while through its ``PUT /limit``, then reads every substation's own limit history
and allocation histories and audits what the vehicles physically drew
(``station_audit``). The figures: stations connected, transactions started and ended,
energy, draw over the limit caused by message order (the only right number is 0), draw
over the limit within a drop's allowed window, the time from each drop to the draw being
back under the new limit, and the push latency (allocation decrease → profile received).
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from load_tester.api import GridClient
from load_tester.station_audit import StationAudit, StationTrace, SubstationHistory, audit, percentile, summary
from load_tester.stations import RunOptions, StationOutcome, StationPlan, register_stations, run_stations

RESULTS_FILE = "stations-results.json"
# After the last vehicle left, the run waits this long for the last messages before auditing.
SETTLE_SECONDS = 2.0


@dataclass(frozen=True)
class StationsScenario:
    plans: tuple[StationPlan, ...]
    gateway_ws: str  # ws://HOST:PORT
    gateway_http: str  # http://HOST:PORT
    duration_seconds: float
    response_seconds: float = 1.0  # of the slowest vehicle: the design's bound after a limit drop
    meter_interval_seconds: float = 5.0
    sample_hz: float = 20.0
    register: bool = True  # False: the gateway already has them (its STATIONS_FILE)
    # Lower this substation's limit (URL) to ``derate_factor`` of what it is ``derate_at`` s into the run;
    # lift it ``derate_for`` s later.
    derate_url: str | None = None
    derate_at: float = 0.0
    derate_for: float = 0.0
    derate_factor: float = 0.5


@dataclass
class StationsRun:
    scenario: StationsScenario
    run_start: float
    run_end: float
    outcomes: list[StationOutcome]
    audit: StationAudit
    derate: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


async def _derate(client: GridClient, scenario: StationsScenario, run_start: float, stop: asyncio.Event,
                  record: dict[str, Any]) -> None:
    url = scenario.derate_url
    assert url is not None
    if not await _until(run_start + scenario.derate_at, stop):
        return
    before = (await asyncio.to_thread(client.substation_limit, url))["limit_kw"]
    target = round(before * scenario.derate_factor, 3)
    record.update(substation=url, from_kw=before, to_kw=target)
    await asyncio.to_thread(client.set_substation_limit, url, target)
    record["lowered_at"] = time.time() - run_start
    try:
        await _until(run_start + scenario.derate_at + scenario.derate_for, stop)
    finally:
        await asyncio.to_thread(client.lift_substation_limit, url)
        record["lifted_at"] = time.time() - run_start


async def _until(epoch: float, stop: asyncio.Event) -> bool:
    try:
        await asyncio.wait_for(stop.wait(), max(0.0, epoch - time.time()))
    except asyncio.TimeoutError:
        return True
    return False


def read_histories(client: GridClient, urls: list[str]) -> dict[str, SubstationHistory]:
    """Every substation's own limit history and allocation histories (ended sessions too)."""
    return {
        url: SubstationHistory.from_json(url, client.substation_limit(url),
                                         client.substation_sessions(url, history=True, ended=True))
        for url in urls
    }


async def run_scenario(scenario: StationsScenario, client: GridClient, admin_token: str,
                       on_start: Callable[[float], None] | None = None) -> StationsRun:
    """Run the scenario; ``client`` reaches the substations (with the operator token for the derate)."""
    plans = list(scenario.plans)
    if scenario.register:
        await register_stations(scenario.gateway_http, admin_token, plans)
    options = RunOptions(scenario.gateway_ws, scenario.response_seconds, scenario.meter_interval_seconds)
    run_start = time.time()
    if on_start is not None:
        on_start(run_start)
    stop = asyncio.Event()
    derate: dict[str, Any] | None = None
    tasks = [asyncio.create_task(run_stations(plans, options, run_start, stop))]
    if scenario.derate_url:
        derate = {}
        tasks.append(asyncio.create_task(_derate(client, scenario, run_start, stop, derate)))
    last_leave = max(plan.leave_at for plan in plans)
    await _until(run_start + min(scenario.duration_seconds, last_leave + SETTLE_SECONDS), asyncio.Event())
    stop.set()
    outcomes, *_ = await asyncio.gather(*tasks)
    run_end = time.time()
    urls = sorted({plan.substation_url for plan in plans})
    histories = await asyncio.to_thread(read_histories, client, urls)
    traces = [StationTrace(o.plan.station_id, o.plan.substation_url, o.plan.id_tag, o.model) for o in outcomes]
    result = audit(traces, histories, run_start, run_end, scenario.sample_hz, scenario.response_seconds)
    run = StationsRun(scenario, run_start, run_end, outcomes, result, derate)
    run.problems = _problems(run)
    return run


def _problems(run: StationsRun) -> list[str]:
    problems = []
    failed = [o for o in run.outcomes if o.error_count]
    if failed:
        first = failed[0]
        problems.append(f"{len(failed)} station(s) had errors, e.g. {first.plan.station_id}: {first.errors[0]}")
    if run.audit.excess_by_order:
        first = next(e for s in run.audit.substations for e in s.excesses if not e.after_drop)
        problems.append(f"{run.audit.excess_by_order} instant(s) of draw over the limit outside any limit drop "
                        f"(message order), e.g. {first.describe(run.run_start)}")
    for drop in run.audit.drops:
        if drop.recovery_seconds is None:
            problems.append(f"{drop.substation}: the draw never got back under {drop.to_kw:g} kW after the drop at "
                            f"t={drop.at - run.run_start:.2f} s")
    return problems


def figures(run: StationsRun) -> dict[str, Any]:
    """The run's figures as JSON."""
    outcomes = run.outcomes
    energy = sum(o.model.energy_wh(run.run_end) for o in outcomes) / 1000.0
    by_protocol: dict[str, int] = {}
    for o in outcomes:
        by_protocol[o.plan.protocol] = by_protocol.get(o.plan.protocol, 0) + 1
    return {
        "stations": len(outcomes),
        "by_protocol": by_protocol,
        "connected": sum(o.connected for o in outcomes),
        "transactions_started": sum(o.started for o in outcomes),
        "transactions_ended": sum(o.stopped for o in outcomes),
        "meter_values_sent": sum(o.meter_values for o in outcomes),
        "stations_with_errors": sum(1 for o in outcomes if o.error_count),
        "errors": [f"{o.plan.station_id}: {e}" for o in outcomes for e in o.errors][:20],
        "energy_kwh": round(energy, 4),
        "duration_seconds": round(run.run_end - run.run_start, 3),
        "derate": run.derate,
        "audit": summary(run.audit, run.run_start),
        "passed": run.passed,
        "problems": run.problems,
    }


def console_text(run: StationsRun) -> str:
    data, result = figures(run), run.audit
    push = result.push_seconds
    lines = [
        f"Stations: {data['stations']} ({', '.join(f'{n} on {p}' for p, n in sorted(data['by_protocol'].items()))}), "
        f"{data['connected']} connected, {data['transactions_started']} transactions started, "
        f"{data['transactions_ended']} ended, {data['energy_kwh']:.3f} kWh drawn",
        f"Draw over the limit at {result.hz:g} Hz: {result.excess_by_order} instant(s) by message order, "
        f"{result.excess_after_drop} within limit drops' allowed windows",
        "Push latency (allocation decrease -> profile received): "
        + (f"p50 {percentile(push, 0.5):.3f} s, p99 {percentile(push, 0.99):.3f} s, max {max(push):.3f} s "
           f"over {len(push)} decreases" if push else "no decrease was pushed"),
    ]
    if result.slowest_pushes:
        lines.append("  slowest: " + ", ".join(f"{station} at t={at - run.run_start:.2f} s: {seconds:.3f} s"
                                               for seconds, station, at in result.slowest_pushes))
    for s in result.substations:
        peak = "-" if s.peak_percentage is None else f"{s.peak_percentage:.1f}%"
        lines.append(f"  {s.substation}: peak draw {s.peak_draw_kw:.2f} kW ({peak} of the limit), "
                     f"{s.samples} samples")
    for d in result.drops:
        recovery = "never" if d.recovery_seconds is None else f"{d.recovery_seconds:.3f} s"
        pushed = "-" if d.push_seconds is None else f"{d.push_seconds:.3f} s"
        lines.append(f"  limit drop at {d.substation} t={d.at - run.run_start:.2f} s {d.from_kw:g} -> {d.to_kw:g} kW: "
                     f"back under in {recovery} (push {pushed} + response {result.response_seconds:g} s allowed, "
                     f"{d.affected} sessions cut)")
    for problem in run.problems:
        lines.append(f"PROBLEM: {problem}")
    return "\n".join(lines)


def write_results(folder: Path, run: StationsRun) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RESULTS_FILE
    path.write_text(json.dumps(figures(run), indent=2) + "\n")
    return path
