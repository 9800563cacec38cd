"""The output files of a run and of a policy comparison, from hand-made records."""
from __future__ import annotations

import json

import pytest

from dataclasses import replace

from load_tester.energy import attach_energy
from load_tester.records import (
    DerateRecord,
    RunData,
    RunTiming,
    classify_response,
    follow_queued,
    transport_failure,
)
from load_tester.report import (
    ALLOCATION_HEADER,
    allocation_rows,
    assemble,
    comparison_header,
    comparison_rows,
    console_text,
    summary_rows,
    write_allocation_comparison,
    write_comparison,
    write_run,
)
from load_tester.scenarios import PlannedRequest
from load_tester.verdict import Limits
from tests.load_tester_support import (
    BASE_EPOCH,
    admitted,
    assert_png,
    assert_report_agrees_with_results,
    audit,
    iso,
    markdown_rows,
    sample,
    session_record,
    substation_sample,
)

SETTINGS = {"scenario": "rush-hour", "target": "http://127.0.0.1:5000", "balancer": "http://127.0.0.1:5002", "seed": 7}
PLANNED = PlannedRequest(index=9, vehicle_id="ev-7-00010", amount_kw=12.0, duration_seconds=60.0, offset_seconds=0.0)


def _data(extra_load: float = 0.0, over_kw: float = 0.0, derate: DerateRecord | None = None) -> RunData:
    """Nine sessions of 6 s on three substations, a rejection, a timeout and one request that waited.

    Each substation's records say what its sessions got; ``over_kw`` plants that much more than the limit
    of substation-1 in its records and samples.
    """
    results = [
        admitted(i, f"substation-{i % 3 + 1}", 5.0 + i, start=i * 0.1, duration=6, capacity=100.0,
                 load=5.0 + i, latency_ms=20.0 + 3 * i)
        for i in range(9)
    ]  # fmt: skip
    results.append(classify_response(PLANNED, "r-9", 0.0, 80.0, 503, {"error": "no_capacity"}))
    results.append(transport_failure(PLANNED, "r-10", 0.0, 2000.0, "timeout", "read timed out"))
    queued = classify_response(
        replace(PLANNED, index=11, duration_seconds=6.0), "r-11", 0.0, 30.0, 202, {"session_id": "session-11"},
        "/sessions/session-11",
    )  # fmt: skip
    started = {"state": "charging", "session_id": "session-11", "substation": "substation-1", "started_at": iso(2),
               "ends_at": iso(8), "queue_wait_seconds": 1.5}  # fmt: skip
    results.append(follow_queued(queued, 200, started, 1.6))
    samples = [
        sample(t / 2, *((f"substation-{n}", (t * (n + 2)) % 70 + extra_load, 100.0) for n in (1, 2, 3)))
        for t in range(8)
    ]
    audits = []
    substation_samples = []
    for n in (1, 2, 3):
        name = f"substation-{n}"
        mine = [r for r in results if r.served and r.substation == name]
        # Each gets 80 % of its amount for its whole session: 0.8 x amount x 6 s of energy.
        sessions = [
            session_record(r.session_id, [(r.index * 0.1, r.amount_kw * 0.8), (r.index * 0.1 + 6, 0.0)],
                           substation=name, amount=r.amount_kw, energy=r.amount_kw * 0.8 * 6 / 3600)
            for r in mine
        ]  # fmt: skip
        if n == 1 and over_kw:
            sessions.append(session_record("other-client", [(1.0, 100.0 + over_kw), (2.0, 0.0)], substation=name))
        audits.append(audit([(-10, 100.0)], *sessions, substation=name, taken_at=10.0))
        for t in range(20):
            amounts = [r.amount_kw for r in mine if r.index * 0.1 <= t / 4 < r.index * 0.1 + 6]
            allocations = [amount * 0.8 for amount in amounts]
            if n == 1 and over_kw and 1.0 <= t / 4 < 2.0:
                allocations.append(100.0 + over_kw)
                amounts.append(100.0 + over_kw)
            substation_samples.append(substation_sample(t / 4, allocations, 100.0, name, amounts))
    # As the runner does once it has read the substations: each served vehicle gets its session's energy.
    results = attach_energy(results, audits)
    return RunData(
        tuple(results), tuple(samples), RunTiming(4.0, 0.4), iso(0), iso(4), None, 1,
        started_epoch=BASE_EPOCH, substation_samples=tuple(substation_samples), audits=tuple(audits),
        derate=derate,
    )  # fmt: skip


def test_a_run_writes_results_plots_and_a_report_that_agree(tmp_path):
    report = assemble("Load test: rush-hour (seed 7)", SETTINGS, _data(), Limits(max_error_rate=0.1), open_loop=False)
    write_run(tmp_path, report)
    results = assert_report_agrees_with_results(tmp_path)
    assert results["passed"] is True and results["summary"]["failed_by_status"] == {"timeout": 1}
    assert results["summary"]["admitted"] == 10 and len(results["status_samples"]) == 8
    assert results["requests"][10]["failure"] == "timeout"
    assert results["status_sample_errors"] == 1
    assert "1 status sample(s) of the balancer could not be read." in results["warnings"]
    # One timeout and one capacity rejection in twelve requests, each in its own rate.
    assert results["summary"]["error_rate"] == results["summary"]["rejection_rate"] == 1 / 12
    text = (tmp_path / "report.md").read_text()
    assert "**Result: PASSED**" in text
    assert "Rejection rate: share refused for lack of capacity" in text


def test_the_report_shows_vehicles_energy_fairness_queue_waits_and_peaks(tmp_path):
    report = assemble("Load test", SETTINGS, _data(), Limits(max_error_rate=0.1), open_loop=False)
    write_run(tmp_path, report)
    summary = assert_report_agrees_with_results(tmp_path)["summary"]
    # Ten served of twelve; each got 80 % of what it asked for, so the shares are all 80 %.
    assert (summary["vehicles_served"], summary["vehicles_requested"], summary["queued"]) == (10, 12, 1)
    assert summary["energy_delivered_ratio"] is not None
    # (energies are kept to the Wh's thousandth: rounding only)
    assert summary["share_of_request"]["min"] == pytest.approx(0.8, abs=1e-3)
    assert summary["share_of_request"]["p95"] == pytest.approx(0.8, abs=1e-3)
    assert summary["queue_wait_p50_seconds"] == summary["queue_wait_p95_seconds"] == 1.5
    assert 0 < summary["jain_index_all"] < summary["jain_index_served"] < 1
    assert summary["history_violations"] == summary["sample_violations"] == 0
    assert summary["history_instants_checked"] > 0 and summary["substation_samples"] == 60
    rows = dict(markdown_rows((tmp_path / "report.md").read_text(), "Figure"))
    assert rows["Vehicles served"] == "10 of 12"
    assert rows["Share of request delivered, min / p5 / p50 / p95 (%)"] == "80.0 / 80.0 / 80.0 / 80.0"
    assert rows["Queue wait p95 (s)"] == "1.50"
    assert rows["Capacity violations in allocation histories"] == "0"
    assert rows["Capacity violations in substation samples"] == "0"
    assert rows["Peak load % (allocated / limit, any substation)"] == summary_rows(report.summary)[-7][1]
    text = (tmp_path / "report.md").read_text()
    assert "In the allocation histories (" in text and "In the substation samples (60 samples checked): none." in text


def test_a_violation_shows_in_the_report_and_fails_the_run(tmp_path):
    report = assemble("overloaded", SETTINGS, _data(over_kw=5.0), Limits(max_error_rate=1.0), open_loop=False)
    write_run(tmp_path, report)
    results = assert_report_agrees_with_results(tmp_path)
    assert results["passed"] is False
    summary = results["summary"]
    assert summary["history_violations"] >= 1 and summary["sample_violations"] == 4
    assert {v["source"] for v in results["capacity_violations"]} == {"history", "samples"}
    assert all(v["substation"] == "substation-1" for v in results["capacity_violations"])
    text = (tmp_path / "report.md").read_text()
    assert "**Result: FAILED**" in text and "seen in its sessions' allocation histories" in text
    assert "seen in a sample of its sessions" in text
    # The balancer's load above capacity (an estimate between polls) is not judged.
    over_balancer = assemble("x", SETTINGS, _data(extra_load=70.0), Limits(max_error_rate=1.0), open_loop=False)
    assert over_balancer.verdict.passed


def test_the_derate_is_in_the_report_the_console_and_results(tmp_path):
    derate = DerateRecord("substation-2", 1.0, 2.0, 100.0, 50.0, 1.01, iso(1.01), 3.02, iso(3.02))
    report = assemble("derated", SETTINGS, _data(derate=derate), Limits(max_error_rate=1.0), open_loop=False)
    write_run(tmp_path, report)
    results = assert_report_agrees_with_results(tmp_path)
    assert results["derate"]["substation"] == "substation-2" and results["derate"]["restored_offset"] == 3.02
    expected = (f"substation-2's limit was lowered from 100.0 kW to 50.0 kW at t=1.0 s ({iso(1.01)}) and "
                f"restored at t=3.0 s ({iso(3.02)}).")  # fmt: skip
    assert expected in (tmp_path / "report.md").read_text()
    assert f"Derate: {expected}" in console_text(report)


def test_a_run_without_samples_or_answers_still_writes_readable_plots(tmp_path):
    data = RunData(
        (transport_failure(PLANNED, "r", 0.0, 5.0, "connection_error", "refused"),), (), RunTiming(1.0, 0.1),
        iso(0), iso(1), None, 3,
    )  # fmt: skip
    write_run(tmp_path, assemble("nothing answered", SETTINGS, data, Limits(), False))
    assert_report_agrees_with_results(tmp_path)
    assert dict(summary_rows(assemble("x", SETTINGS, data, Limits(), False).summary))["Latency p95 (ms)"] == "-"


def test_the_console_text_shows_the_same_rows_and_the_verdict():
    # One timeout and one capacity rejection in twelve: the timeout alone is above the default limits.
    report = assemble("Load test", SETTINGS, _data(), Limits(), open_loop=False)
    text = console_text(report)
    for label, value in summary_rows(report.summary):
        assert any(line.startswith(label) and line.rstrip().endswith(value) for line in text.splitlines()), label
    rows = dict(summary_rows(report.summary))
    assert (rows["Error rate (%)"], rows["Rejection rate (%)"]) == ("8.3", "8.3")
    assert rows["Vehicles served"] == "10 of 12"
    [problem] = [line for line in text.splitlines() if line.startswith("PROBLEM")]
    assert problem.startswith("PROBLEM: error rate 8.3% is above the allowed 0.0% (1 failed (timeout: 1), 0 not sent)")
    assert text.rstrip().endswith("FAILED")


def test_a_comparison_has_one_row_per_policy_and_one_figure(tmp_path):
    reports = [
        assemble(f"under {policy}", {**SETTINGS, "policy": policy}, _data(extra_load=shift), Limits(1.0), False)
        for policy, shift in (("least_loaded", 0.0), ("round_robin", 10.0), ("random", 20.0))
    ]
    write_comparison(tmp_path, "Routing policies compared", reports)
    document = json.loads((tmp_path / "comparison.json").read_text())
    assert [row["policy"] for row in document["policies"]] == ["least_loaded", "round_robin", "random"]
    header = comparison_header(reports)
    text = (tmp_path / "comparison.md").read_text()
    table = markdown_rows(text, header[0])
    assert [row[0] for row in table] == ["least_loaded", "round_robin", "random"]
    assert table == [list(row) for row in comparison_rows(reports)]
    # Not strict: balance is the spread of power per vehicle, in kW, as each run's summary has it.
    assert "| Largest spread (kW per vehicle) | Spread at end (kW per vehicle) |" in text
    largest = header.index("Largest spread (kW per vehicle)")
    assert [row[largest] for row in table] == [f"{row['power_spread_peak_kw']:.2f}" for row in document["policies"]]
    assert all(row["spread_peak"] is None for row in document["policies"])
    peak_column = header.index("Peak load %")
    assert [float(row[peak_column]) for row in table] == [
        round(row["peak_load_percentage"], 1) for row in document["policies"]
    ]
    assert_png(tmp_path / "comparison.png")


def test_an_allocation_comparison_has_one_row_per_policy_and_plots_power_and_energy_per_vehicle(tmp_path):
    reports = [
        assemble(f"under {policy}", {**SETTINGS, "allocation_policy": policy}, _data(), Limits(1.0), False)
        for policy in ("strict", "fair_share")
    ]
    write_allocation_comparison(tmp_path, "Allocation policies compared", reports)
    document = json.loads((tmp_path / "comparison.json").read_text())["allocation_policies"]
    assert [row["policy"] for row in document] == ["strict", "fair_share"]
    assert document[0]["vehicles_served"] == 10
    assert document[0]["share_of_request"]["p50"] == pytest.approx(0.8, abs=1e-3)
    assert {"jain_index_served", "jain_index_all", "energy_delivered_ratio", "queue_wait_p95_seconds",
            "history_violations", "sample_violations"} <= set(document[0])  # fmt: skip
    text = (tmp_path / "comparison.md").read_text()
    table = markdown_rows(text, ALLOCATION_HEADER[0])
    assert table == [list(row) for row in allocation_rows(reports)]
    assert [row[0] for row in table] == ["strict", "fair_share"]
    assert table[0][ALLOCATION_HEADER.index("Served")] == "10 of 12"
    assert "![Power and energy per vehicle](vehicles.png)" in text and "- [strict](strict/report.md)" in text
    assert_png(tmp_path / "comparison.png")
    assert_png(tmp_path / "vehicles.png")
