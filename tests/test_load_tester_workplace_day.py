"""The ``workplace-day`` scenario: the seeded day's vehicles, each with an energy need, over HTTP.

Unit: the planned requests are the seeded day compressed (checked against the generator
directly), and the demand figures follow ACN-Sim's definitions (recomputed here by hand).
Against the real stack: a small day runs end to end, and its figures agree with the
substations' own finished records and with a recount from the request records.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from load_tester.energy import energy_figures
from load_tester.records import ADMITTED, REJECTED, RequestResult
from load_tester.scenarios import LoadPlan, generate_requests
from load_tester.workplace_day import compress, workplace_day
from tests.harness import REPO_ROOT, Stack
from tests.load_tester_support import assert_report_agrees_with_results

COMPRESSION = 2880.0  # a day in 30 s
ADMIN_TOKEN = "workplace-day-test-token"


def plan(seed: int = 7, vehicles: int = 40, duration: float = 86400 / COMPRESSION) -> LoadPlan:
    return LoadPlan(scenario="workplace-day", requests=vehicles, concurrency=40, ramp_up_seconds=0.0,
                    duration_seconds=duration, amount_min_kw=5.0, amount_max_kw=20.0,
                    session_seconds=86400 / COMPRESSION, seed=seed, compression=COMPRESSION)


def test_the_requests_are_the_seeded_day_compressed_from_its_first_arrival() -> None:
    planned = generate_requests(plan())
    day = compress(workplace_day(7, 40), COMPRESSION)
    assert len(planned) == len(day) == 40
    assert planned[0].offset_seconds == 0.0
    for request, session in zip(planned, day):
        assert request.offset_seconds == pytest.approx(session.arrival - day[0].arrival, abs=1e-6)
        assert request.duration_seconds == pytest.approx(session.departure - session.arrival, abs=1e-3)
        assert request.need_kwh == pytest.approx(session.energy_kwh, abs=1e-6)
        assert request.amount_kw == pytest.approx(session.max_kw, abs=1e-3)
        body = request.body(wait=True)
        # A need by a departure, in seconds from when it is sent; no fixed duration.
        assert body == {"vehicle_id": request.vehicle_id, "amount": request.amount_kw,
                        "energy_kwh": request.need_kwh, "departure": request.duration_seconds, "wait": True}
    assert generate_requests(plan()) == planned
    assert generate_requests(plan(seed=8)) != planned


def test_arrivals_after_the_time_limit_are_not_planned() -> None:
    planned = generate_requests(plan(duration=5.0))
    assert planned and all(request.offset_seconds < 5.0 for request in planned)
    assert len(planned) < 40


def vehicle(index: int, need: float, delivered: float | None, served: bool = True) -> RequestResult:
    return RequestResult(index=index, request_id=f"r-{index}", vehicle_id=f"ev-{index}", amount_kw=7.0,
                         duration_seconds=3600.0, scheduled_offset=0.0, outcome=ADMITTED if served else REJECTED,
                         energy_kwh=delivered, need_kwh=need)


def test_demands_met_energy_share_and_jain_of_shares_follow_acn_sims_definitions() -> None:
    results = [
        vehicle(0, 10.0, 10.0),     # met
        vehicle(1, 10.0, 9.95),     # 0.05 kWh missing: met
        vehicle(2, 10.0, 9.85),     # 0.15 kWh missing: not met
        vehicle(3, 4.0, 1.0),       # a quarter
        vehicle(4, 6.0, None, served=False),  # never served: nothing delivered, not met
    ]
    figures = energy_figures(results, need_met_within_kwh=0.1)
    assert (figures.demands, figures.demands_met) == (5, 2)
    assert figures.demands_met_ratio == pytest.approx(2 / 5)
    assert figures.energy_delivered_ratio == pytest.approx((10 + 9.95 + 9.85 + 1.0) / 40.0)
    shares = [1.0, 0.995, 0.985, 0.25, 0.0]
    assert figures.jain_index_of_shares == pytest.approx(sum(shares) ** 2 / (5 * sum(s * s for s in shares)))
    # The same vehicles judged in a day played 100 times faster: 0.001 kWh is all that may be missing.
    assert energy_figures(results, need_met_within_kwh=0.001).demands_met == 1


def test_a_served_vehicle_whose_energy_is_unknown_leaves_the_demand_figures_unknown() -> None:
    figures = energy_figures([vehicle(0, 10.0, 10.0), vehicle(1, 10.0, None)])
    assert (figures.demands, figures.demands_met, figures.jain_index_of_shares) == (2, None, None)


def test_runs_without_needs_have_no_demand_figures() -> None:
    plain = RequestResult(index=0, request_id="r", vehicle_id="ev", amount_kw=7.0, duration_seconds=60.0,
                          scheduled_offset=0.0, outcome=ADMITTED, energy_kwh=0.1)
    assert (energy_figures([plain]).demands, energy_figures([plain]).demands_met) == (0, None)


@pytest.mark.integration
def test_a_small_workplace_day_against_the_stack_reports_acn_figures_from_the_finished_records(
    stack_factory, tmp_path: Path
) -> None:
    # 12 vehicles of 3.3 to 6.7 kW under 2 x 6 kW: the morning peak is tight, and one limit is halved
    # for 8 s of the 30 s day (4 hours of it), from 2.4 hours after the first arrival.
    stack: Stack = stack_factory(capacities=(6.0, 6.0), substation_env={"ADMIN_TOKEN": ADMIN_TOKEN})
    run = subprocess.run(
        [sys.executable, "-m", "load_tester", "--target", stack.charge.url, "--balancer", stack.balancer.url,
         "--output", str(tmp_path), "--sample-interval", "0.2", "--scenario", "workplace-day", "--requests", "12",
         "--compression", f"{COMPRESSION:g}", "--wait", "--seed", "5", "--no-progress",
         "--derate-at", "3", "--derate-for", "8", "--derate-substation", "substation-2"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "ADMIN_TOKEN": ADMIN_TOKEN},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    results = assert_report_agrees_with_results(tmp_path)
    summary, vehicles = results["summary"], results["requests"]
    assert results["settings"]["compression"] == COMPRESSION
    assert (summary["demands"], summary["vehicles_requested"]) == (12, 12)
    assert (summary["capacity_violations"], summary["history_violations"], summary["sample_violations"]) == (0, 0, 0)
    assert summary["history_instants_checked"] > 0 and summary["substation_samples"] > 0
    derate = results["derate"]
    assert (derate["substation"], derate["limit_kw"], derate["error"]) == ("substation-2", 3.0, None)
    assert derate["restored_offset"] is not None
    halved = [s for s in results["substation_samples"] if s["substation"] == "substation-2" and s["limit_kw"] == 3.0]
    assert halved and all(s["allocated_kw"] <= 3.0 + 1e-6 * s["sessions"] for s in halved)
    # Every served vehicle's delivered energy is the one its substation's finished record gives.
    finished = {}
    for substation in stack.substations:
        for record in requests.get(f"{substation.url}/sessions?ended=1", timeout=10).json()["sessions"]:
            finished[record["session_id"]] = record
    served = [v for v in vehicles if v["outcome"] == "admitted"]
    assert served, "no vehicle was served"
    for v in served:
        record = finished[v["session_id"]]
        assert v["energy_source"] == "substation"
        assert v["energy_kwh"] == pytest.approx(record["delivered_kwh"], abs=1e-6)
        assert record["energy_kwh"] == pytest.approx(v["need_kwh"], abs=1e-6)
        assert v["energy_kwh"] <= v["need_kwh"] + 1e-6, v  # a session ends once its need is delivered
    # The three figures, recounted from the request records (unserved vehicles got nothing).
    got = [(v["energy_kwh"] if v["outcome"] == "admitted" else 0.0, v["need_kwh"]) for v in vehicles]
    assert summary["energy_delivered_ratio"] == pytest.approx(sum(g for g, _ in got) / sum(n for _, n in got))
    within = 0.1 / COMPRESSION
    assert summary["demands_met"] == sum(1 for g, n in got if n - g < within)
    shares = [g / n for g, n in got]
    assert summary["jain_index_of_shares"] == pytest.approx(
        sum(shares) ** 2 / (len(shares) * sum(s * s for s in shares)))
    assert 0 < summary["energy_delivered_ratio"] <= 1 and not math.isnan(summary["jain_index_of_shares"])
    assert re.search(r"^Demands met \(less than 0\.1 kWh missing\) +\d+ of 12$", run.stdout, re.MULTILINE)
    assert "Jain's index of delivered / requested" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["need_met_within_kwh"] == within
