"""The output files of a run and of a policy comparison, from hand-made records."""
from __future__ import annotations

import json

from load_tester.records import RunData, RunTiming, classify_response, transport_failure
from load_tester.report import (
    COMPARISON_HEADER,
    assemble,
    comparison_rows,
    console_text,
    summary_rows,
    write_comparison,
    write_run,
)
from load_tester.scenarios import PlannedRequest
from load_tester.verdict import Limits
from tests.load_tester_support import (
    admitted,
    assert_png,
    assert_report_agrees_with_results,
    iso,
    markdown_rows,
    sample,
)

SETTINGS = {"scenario": "rush-hour", "target": "http://127.0.0.1:5000", "balancer": "http://127.0.0.1:5002", "seed": 7}
PLANNED = PlannedRequest(index=9, vehicle_id="ev-7-00010", amount_kw=12.0, duration_seconds=60.0, offset_seconds=0.0)


def _data(extra_load: float = 0.0) -> RunData:
    results = [
        admitted(i, f"substation-{i % 3 + 1}", 5.0 + i, start=i * 0.1, duration=60, capacity=100.0,
                 load=5.0 + i, latency_ms=20.0 + 3 * i)
        for i in range(9)
    ]  # fmt: skip
    results.append(classify_response(PLANNED, "r-9", 0.0, 80.0, 503, {"error": "no_capacity"}))
    results.append(transport_failure(PLANNED, "r-10", 0.0, 2000.0, "timeout", "read timed out"))
    samples = [
        sample(t / 2, *((f"substation-{n}", (t * (n + 2)) % 70 + extra_load, 100.0) for n in (1, 2, 3)))
        for t in range(8)
    ]
    return RunData(tuple(results), tuple(samples), RunTiming(4.0, 0.4), iso(0), iso(4), None, 1)


def test_a_run_writes_results_plots_and_a_report_that_agree(tmp_path):
    report = assemble("Load test: rush-hour (seed 7)", SETTINGS, _data(), Limits(max_error_rate=0.1), open_loop=False)
    write_run(tmp_path, report)
    results = assert_report_agrees_with_results(tmp_path)
    assert results["passed"] is True and results["summary"]["failed_by_status"] == {"timeout": 1}
    assert results["summary"]["admitted"] == 9 and len(results["status_samples"]) == 8
    assert results["requests"][10]["failure"] == "timeout"
    assert results["status_sample_errors"] == 1
    assert "1 status sample(s) of the balancer could not be read." in results["warnings"]
    # One timeout and one capacity rejection in eleven requests, each in its own rate.
    assert results["summary"]["error_rate"] == results["summary"]["rejection_rate"] == 1 / 11
    text = (tmp_path / "report.md").read_text()
    assert "**Result: PASSED**" in text
    assert "Rejection rate: share refused for lack of capacity" in text


def test_a_violation_shows_in_the_report_and_fails_the_run(tmp_path):
    report = assemble("overloaded", SETTINGS, _data(extra_load=70.0), Limits(max_error_rate=1.0), open_loop=False)
    write_run(tmp_path, report)
    results = assert_report_agrees_with_results(tmp_path)
    assert results["passed"] is False
    assert results["capacity_violations"] and all(v["source"] == "status" for v in results["capacity_violations"])
    text = (tmp_path / "report.md").read_text()
    assert "**Result: FAILED**" in text and "kW over, seen in status" in text


def test_a_run_without_samples_or_answers_still_writes_readable_plots(tmp_path):
    data = RunData(
        (transport_failure(PLANNED, "r", 0.0, 5.0, "connection_error", "refused"),), (), RunTiming(1.0, 0.1),
        iso(0), iso(1), None, 3,
    )  # fmt: skip
    write_run(tmp_path, assemble("nothing answered", SETTINGS, data, Limits(), False))
    assert_report_agrees_with_results(tmp_path)
    assert dict(summary_rows(assemble("x", SETTINGS, data, Limits(), False).summary))["Latency p95 (ms)"] == "-"


def test_the_console_text_shows_the_same_rows_and_the_verdict():
    # One timeout and one capacity rejection in eleven: the timeout alone is above the default limits.
    report = assemble("Load test", SETTINGS, _data(), Limits(), open_loop=False)
    text = console_text(report)
    for label, value in summary_rows(report.summary):
        assert any(line.startswith(label) and line.rstrip().endswith(value) for line in text.splitlines()), label
    rows = dict(summary_rows(report.summary))
    assert (rows["Error rate (%)"], rows["Rejection rate (%)"]) == ("9.1", "9.1")
    [problem] = [line for line in text.splitlines() if line.startswith("PROBLEM")]
    assert problem.startswith("PROBLEM: error rate 9.1% is above the allowed 0.0% (1 failed (timeout: 1), 0 not sent)")
    assert text.rstrip().endswith("FAILED")


def test_a_comparison_has_one_row_per_policy_and_one_figure(tmp_path):
    reports = [
        assemble(f"under {policy}", {**SETTINGS, "policy": policy}, _data(extra_load=shift), Limits(1.0), False)
        for policy, shift in (("least_loaded", 0.0), ("round_robin", 10.0), ("random", 20.0))
    ]
    write_comparison(tmp_path, "Routing policies compared", reports)
    document = json.loads((tmp_path / "comparison.json").read_text())
    assert [row["policy"] for row in document["policies"]] == ["least_loaded", "round_robin", "random"]
    table = markdown_rows((tmp_path / "comparison.md").read_text(), COMPARISON_HEADER[0])
    assert [row[0] for row in table] == ["least_loaded", "round_robin", "random"]
    assert table == [list(row) for row in comparison_rows(reports)]
    peak_column = COMPARISON_HEADER.index("Peak load %")
    assert [float(row[peak_column]) for row in table] == [
        round(row["peak_load_percentage"], 1) for row in document["policies"]
    ]
    assert_png(tmp_path / "comparison.png")
