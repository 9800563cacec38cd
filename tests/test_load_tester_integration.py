"""The load tester against the real stack (gunicorn processes on 127.0.0.1), run as users run it."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from gridcommon.timefmt import parse_time
from load_tester import runner
from load_tester.api import USER_AGENT, GridClient
from load_tester.cli import EXIT_INTERRUPTED, build_parser, main, resolve_plan
from load_tester.config import Defaults
from load_tester.scenarios import MAX_REQUESTS, generate_requests
from tests.harness import REPO_ROOT, Stack, wait_for
from tests.load_tester_support import (
    HoldingStack,
    assert_png,
    assert_report_agrees_with_results,
    markdown_rows,
    start_interruptible,
)

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "load-tester-test-token"
TIMEOUT = 10
# Each run is a few seconds at most; this only stops a hung run from hanging the suite.
RUN_TIMEOUT = 90


def command_line(stack: Stack, output: Path, *options: str) -> list[str]:
    return [
        sys.executable, "-m", "load_tester",
        "--target", stack.charge.url, "--balancer", stack.balancer.url, "--output", str(output),
        "--sample-interval", "0.1", *options,
    ]  # fmt: skip


def load_tester(
    stack: Stack, output: Path, *options: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        command_line(stack, output, *options), cwd=REPO_ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT,
        env={**_base_env(), **(env or {})},
    )  # fmt: skip


def _base_env() -> dict[str, str]:
    # The token is given only to the tests that mean to use it.
    return {key: value for key, value in os.environ.items() if key != "ADMIN_TOKEN"}


def balancer_status(stack: Stack) -> dict:
    return requests.get(f"{stack.balancer.url}/status", timeout=TIMEOUT).json()


def active_sessions(stack: Stack) -> dict[str, list]:
    return {
        substation.name: requests.get(f"{substation.url}/sessions", timeout=TIMEOUT).json()["sessions"]
        for substation in stack.substations
    }


def assert_no_violation_and_both_witnesses_looked(summary: dict) -> None:
    assert (summary["capacity_violations"], summary["history_violations"], summary["sample_violations"]) == (0, 0, 0)
    assert summary["history_instants_checked"] > 0 and summary["substation_samples"] > 0


def test_rush_hour_admits_every_request_when_the_grid_has_room(stack_factory, tmp_path):
    # 100 EVs of up to 20 kW need up to 2000 kW: 3 x 700 kW always has room, so each gets its whole amount.
    stack = stack_factory(capacities=(700, 700, 700))
    run = load_tester(stack, tmp_path, "--scenario", "rush-hour", "--session-duration", "2", "--seed", "11")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "100/100" in run.stderr  # the progress bar reached the end
    assert re.search(r"^Admitted +100$", run.stdout, re.MULTILINE) and run.stdout.rstrip().splitlines()[-3] == "PASSED"
    assert re.search(r"^Vehicles served +100 of 100$", run.stdout, re.MULTILINE)

    results = assert_report_agrees_with_results(tmp_path)
    summary = results["summary"]
    assert (summary["admitted"], summary["rejected"], summary["failed"]) == (100, 0, 0)
    assert_no_violation_and_both_witnesses_looked(summary)
    # Room for everyone: each session got its whole amount for its whole length, as its substation recorded.
    assert summary["vehicles_energy_unknown"] == 0
    assert summary["energy_delivered_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert summary["share_of_request"]["min"] == pytest.approx(1.0, abs=1e-3)
    assert all(r["energy_source"] == "substation" for r in results["requests"])
    assert summary["queued"] == 0 and summary["queue_wait_p50_seconds"] is None
    by_substation = {s["substation"]: s for s in summary["substations"]}
    assert sorted(by_substation) == ["substation-1", "substation-2", "substation-3"]
    # Routing shares the rush hour out: roughly a third each, as in the design documents.
    assert all(25 <= s["admitted"] <= 42 for s in by_substation.values()), by_substation
    # One run, one id prefix: "loadtest-<run>-<index>".
    assert len({r["request_id"].rsplit("-", 1)[0] for r in results["requests"]}) == 1

    # "At end" is the grid as the answers left it: what the sessions the run opened there ask for, in the
    # substation's own sample after the last answer. That sample, and the peak, may also hold the unused
    # copies of hedged forwards (admitted there, stopped once the other answered), as the substation's own
    # records show them.
    held_by = {r["session_id"]: r["substation"] for r in results["requests"]}
    last_answer = max(r["sent_offset"] + r["latency_ms"] / 1000 for r in results["requests"])
    for name, figures in by_substation.items():
        substation = next(s for s in stack.substations if s.env["SUBSTATION_ID"] == name)
        ended = requests.get(f"{substation.url}/sessions?ended=1", timeout=5).json()["sessions"]
        copies_kw = sum(s["amount"] for s in ended if held_by.get(s["session_id"]) not in (None, name)
                        and s["end_reason"] == "stopped")
        after = [s for s in results["substation_samples"]
                 if s["substation"] == name and last_answer <= s["t"] <= last_answer + 1.0]  # fmt: skip
        assert any(figures["end_requested_percentage"] == pytest.approx(s["requested_kw"] / 7.0) for s in after)
        mine = [r for r in results["requests"] if r["substation"] == name and r["outcome"] == "admitted"]
        for sampled in after:  # each sums the amounts of the sessions running at its instant (50 ms either way)
            at = sampled["taken_at"]
            surely, maybe = running_kw(mine, at - 0.05, at + 0.05), running_kw(mine, at + 0.05, at - 0.05)
            assert surely - 1e-6 <= sampled["requested_kw"] <= maybe + copies_kw + 1e-6, (name, sampled)
        assert figures["admitted_kw"] / 7.0 - 0.01 <= figures["peak_load_percentage"]
        assert figures["peak_load_percentage"] <= (figures["admitted_kw"] + copies_kw) / 7.0 + 0.01
        assert figures["capacity_kw"] == 700.0
    # The run ended once its sessions had: nothing charges any more.
    assert active_sessions(stack) == {name: [] for name in by_substation}
    # Every allocation history of the run is in results.json: from its start to 0 kW at its end.
    histories = results["allocation_histories"]
    assert len(histories) == 100 and all(points[-1][1] == 0.0 for points in histories.values())

    # Every request carried its id through the stack.
    some_id = results["requests"][57]["request_id"]
    assert f"[{some_id}]" in stack.charge.log_text()
    assert f"[{some_id}]" in stack.balancer.log_text()


def running_kw(sessions: list[dict], started_by: float, ends_after: float) -> float:
    """What the sessions ask for that had started by ``started_by`` and end after ``ends_after`` (epoch s)."""
    return sum(
        r["amount_kw"] for r in sessions
        if parse_time(r["started_at"]).timestamp() <= started_by and parse_time(r["ends_at"]).timestamp() > ends_after
    )  # fmt: skip


def test_capacity_rejections_pass_by_default_and_fail_above_the_allowed_rejection_rate(stack_factory, tmp_path):
    # A tiny grid: each 10 kW substation shares its limit among at most 7 sessions (their 1.4 kW minimums),
    # so of 30 requests about 21 are admitted, each curtailed, and the rest refused.
    stack = stack_factory(capacities=(10, 10, 10))
    common = ("--scenario", "burst", "--requests", "30", "--amount-range", "5", "8", "--session-duration", "1.5",
              "--seed", "2", "--no-progress")  # fmt: skip
    crowd = load_tester(stack, tmp_path / "crowd", *common)
    assert crowd.returncode == 0, crowd.stdout + crowd.stderr
    results = assert_report_agrees_with_results(tmp_path / "crowd")
    summary = results["summary"]
    assert 15 <= summary["admitted"] <= 21 and summary["rejected"] == 30 - summary["admitted"]
    assert (summary["failed"], summary["error_rate"]) == (0, 0.0)
    assert_no_violation_and_both_witnesses_looked(summary)
    assert summary["rejection_rate"] == summary["rejected"] / 30
    assert results["passed"] is True and results["problems"] == []
    assert results["settings"]["max_rejection_rate"] == 1.0
    assert re.search(r"^Rejection rate \(%\) +\d+\.\d$", crowd.stdout, re.MULTILINE)
    # Curtailed: the sessions shared 30 kW, far less than they asked for; every substation was full.
    assert summary["energy_delivered_ratio"] < 0.5
    assert all(s["peak_load_percentage"] == pytest.approx(100.0) for s in summary["substations"])

    # The same crowd again (the grid is empty once more), allowed at most 10 % rejected: it fails.
    strict = load_tester(stack, tmp_path / "strict", *common, "--max-rejection-rate", "0.1")
    assert strict.returncode == 1, strict.stdout + strict.stderr
    results = json.loads((tmp_path / "strict" / "results.json").read_text())
    rejected = results["summary"]["rejected"]
    [problem] = results["problems"]
    assert problem.startswith(
        f"rejection rate {rejected / 30:.1%} is above the allowed 10.0% ({rejected} of 30 requests rejected"
    )
    assert f"PROBLEM: {problem}" in strict.stdout


def test_failed_requests_fail_the_run_by_default_and_pass_at_the_allowed_error_rate(stack_factory, tmp_path):
    stack = stack_factory(capacities=(100,))
    # The charge API stays up but cannot reach the balancer: every request gets a 502, a real error.
    stack.balancer.stop()
    common = ("--scenario", "burst", "--requests", "4", "--no-progress")
    default = load_tester(stack, tmp_path / "default", *common)
    assert default.returncode == 1, default.stdout + default.stderr
    results = assert_report_agrees_with_results(tmp_path / "default")
    summary = results["summary"]
    assert (summary["failed"], summary["failed_by_status"], summary["rejected"]) == (4, {"502": 4}, 0)
    assert (summary["error_rate"], summary["rejection_rate"]) == (1.0, 0.0)
    [problem] = results["problems"]
    assert problem.startswith("error rate 100.0% is above the allowed 0.0% (4 failed (502: 4), 0 not sent)")
    assert f"PROBLEM: {problem}" in default.stdout
    assert "cannot reach the balancer" in default.stderr  # no load samples, said once up front

    lenient = load_tester(stack, tmp_path / "lenient", *common, "--max-error-rate", "1")
    assert lenient.returncode == 0, lenient.stdout + lenient.stderr
    assert json.loads((tmp_path / "lenient" / "results.json").read_text())["summary"]["failed"] == 4


def test_nothing_is_sent_after_the_time_limit(stack_factory, tmp_path):
    stack = stack_factory(capacities=(100, 100, 100))
    # Ten requests due every 2 s, but a 1 s limit: only the first is due in time.
    run = load_tester(
        stack, tmp_path, "--scenario", "normal", "--requests", "10", "--ramp-up", "20", "--duration", "1",
        "--session-duration", "1", "--max-error-rate", "1", "--no-progress",
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    summary = assert_report_agrees_with_results(tmp_path)["summary"]
    assert (summary["sent"], summary["admitted"], summary["not_sent"]) == (1, 1, 9)
    assert summary["wall_seconds"] < 3
    assert "9 request(s) were not sent before the time limit" in run.stdout


def test_sustained_sends_poisson_arrivals_at_the_rate_and_none_after_the_time_limit(stack_factory, tmp_path):
    stack = stack_factory(capacities=(700, 700, 700))
    options = ("--scenario", "sustained", "--rate", "20", "--duration", "2", "--seed", "5", "--session-duration", "1")
    run = load_tester(stack, tmp_path, *options, "--no-progress")
    assert run.returncode == 0, run.stdout + run.stderr
    results = assert_report_agrees_with_results(tmp_path)
    summary, settings, requests_ = results["summary"], results["settings"], results["requests"]

    # The seeded arrivals, all of them sent: about 20/s for 2 s (Poisson: 40 on average).
    parser = build_parser(Defaults())
    expected = generate_requests(resolve_plan(parser, parser.parse_args(list(options))))
    assert [r["scheduled_offset"] for r in requests_] == [p.offset_seconds for p in expected]
    assert 20 <= summary["sent"] <= 65 and summary["sent"] == summary["planned"] == len(expected)
    assert summary["admitted"] == summary["sent"]
    assert (settings["requests"], settings["max_requests"], settings["arrival_rate"]) == (
        len(expected), MAX_REQUESTS, 20.0
    )
    # Nothing after the time limit, and exactly those requests reached the stack.
    assert max(r["sent_offset"] for r in requests_) <= 2.0
    seen = set(re.findall(r"\[(loadtest-[0-9a-f]+-\d{5})\]", stack.charge.log_text()))
    assert seen == {r["request_id"] for r in requests_}
    assert summary["wall_seconds"] < 4

    # Lateness: each request left at or after its due time, and the worst delay is in the summary.
    lags_ms = [(r["sent_offset"] - r["scheduled_offset"]) * 1000 for r in requests_]
    assert min(lags_ms) > -5
    assert summary["max_schedule_lag_ms"] == pytest.approx(max(0.0, *lags_ms))
    assert summary["max_schedule_lag_ms"] < 250  # 50 workers keep up with 20/s: no lateness warning
    assert not any("late" in warning for warning in results["warnings"])


def test_compare_policies_runs_each_policy_from_an_empty_grid_and_restores_the_policy(stack_factory, tmp_path):
    stack = stack_factory(
        capacities=(80, 100, 120), balancer_env={"ADMIN_TOKEN": ADMIN_TOKEN, "POLL_INTERVAL_SECONDS": "1"}
    )
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    policy_url = f"{stack.balancer.url}/admin/policy"
    put = requests.put(policy_url, json={"policy": "round_robin"}, headers=admin, timeout=TIMEOUT)
    assert put.status_code == 200, put.text
    compared = ["least_loaded", "fair_share"]
    assert set(compared) <= set(put.json()["available"])
    # The grid is still full from an earlier run: the comparison waits for it to empty rather than
    # let the first policy admit nothing and look worst.
    for capacity in (120, 100, 80):
        # Long enough to outlast the tester's own start-up (imports, plots) on a busy machine.
        body = {"vehicle_id": f"ev-earlier-{capacity}", "amount": capacity, "duration_seconds": 6}
        earlier = requests.post(f"{stack.charge.url}/charge", json=body, timeout=TIMEOUT)
        assert earlier.status_code == 201, earlier.text

    # 20 requests of 5-10 kW: at most 200 kW, which fits the 300 kW grid whole.
    run = load_tester(
        stack, tmp_path, "--compare-policies", "--policies", ",".join(compared), "--scenario", "burst",
        "--requests", "20", "--concurrency", "10", "--amount-range", "5", "10", "--session-duration", "1.5",
        "--seed", "3", "--no-progress", env={"ADMIN_TOKEN": ADMIN_TOKEN},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"The grid already carries \d+\.\d kW; waiting", run.stderr), run.stderr

    comparison = json.loads((tmp_path / "comparison.json").read_text())["policies"]
    assert [row["policy"] for row in comparison] == compared
    table = markdown_rows((tmp_path / "comparison.md").read_text(), "Policy")
    assert [row[0] for row in table] == compared
    assert_png(tmp_path / "comparison.png")
    amounts = None
    for policy in compared:
        results = assert_report_agrees_with_results(tmp_path / policy)
        # Each run happened under its policy, with the same seeded requests, on an emptied grid.
        assert {s["policy"] for s in results["status_samples"]} == {policy}
        assert results["summary"]["admitted"] == 20, (policy, results["summary"])
        assert_no_violation_and_both_witnesses_looked(results["summary"])
        run_amounts = [r["amount_kw"] for r in results["requests"]]
        assert amounts in (None, run_amounts)
        amounts = run_amounts

    admin_policy = requests.get(policy_url, headers=admin, timeout=TIMEOUT).json()
    assert admin_policy["policy"] == "round_robin"
    assert active_sessions(stack) == {s.name: [] for s in stack.substations}


def test_ctrl_c_between_two_compared_policies_writes_the_comparison_so_far(stack_factory, tmp_path):
    stack = stack_factory(
        capacities=(300, 300, 300), balancer_env={"ADMIN_TOKEN": ADMIN_TOKEN, "POLL_INTERVAL_SECONDS": "1"}
    )
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    policy_url = f"{stack.balancer.url}/admin/policy"
    assert requests.put(policy_url, json={"policy": "random"}, headers=admin, timeout=TIMEOUT).status_code == 200
    options = (
        "--compare-policies", "--policies", "least_loaded,round_robin", "--scenario", "normal", "--requests", "4",
        "--ramp-up", "1", "--session-duration", "1.5", "--seed", "3", "--no-progress",
    )  # fmt: skip
    env = {**_base_env(), "ADMIN_TOKEN": ADMIN_TOKEN}
    process = start_interruptible(command_line(stack, tmp_path, *options), REPO_ROOT, tmp_path / "logs", env=env)

    def policy() -> str:
        return requests.get(policy_url, headers=admin, timeout=TIMEOUT).json()["policy"]

    try:
        # Load the first run did not put there: after it the comparison waits (two poll intervals and
        # more) for the grid to settle, and the Ctrl-C comes in that wait, between the two runs.
        wait_for(lambda: policy() == "least_loaded", RUN_TIMEOUT, "the switch to the first policy")
        body = {"vehicle_id": "ev-other-client", "amount": 10, "duration_seconds": 30}
        assert requests.post(f"{stack.charge.url}/charge", json=body, timeout=TIMEOUT).status_code == 201
        wait_for(lambda: (tmp_path / "least_loaded" / "report.md").exists(), RUN_TIMEOUT, "the first run's report")
        process.send_signal(signal.SIGINT)
        code = process.wait(RUN_TIMEOUT)
    finally:
        process.kill()
    out, err = ((tmp_path / "logs" / name).read_text() for name in ("stdout.txt", "stderr.txt"))
    assert code == EXIT_INTERRUPTED, out + err
    assert "Traceback" not in err and "interrupted: the comparison covers 1 policy run(s)" in err
    assert [row["policy"] for row in json.loads((tmp_path / "comparison.json").read_text())["policies"]] == [
        "least_loaded"
    ]
    assert [row[0] for row in markdown_rows((tmp_path / "comparison.md").read_text(), "Policy")] == ["least_loaded"]
    assert json.loads((tmp_path / "least_loaded" / "results.json").read_text())["stopped_by"] is None
    assert not (tmp_path / "round_robin").exists()
    assert policy() == "random"


def test_requests_name_the_tool_and_carry_their_request_id():
    with HoldingStack() as stack:
        stack.release.set()
        client = GridClient(stack.url, "http://127.0.0.1:1", read_timeout=5)
        try:
            response = client.charge({"vehicle_id": "ev-1", "amount": 5.0}, "loadtest-abc-00001")
        finally:
            client.close()
    assert response.status_code == 503
    [headers] = stack.charge_headers
    assert headers["X-Request-ID"] == "loadtest-abc-00001"
    assert headers["User-Agent"] == USER_AGENT


def test_rush_hour_on_a_small_grid_serves_every_vehicle_fairly_and_never_over_the_limit(stack_factory, tmp_path):
    # 20 EVs of 6-8 kW want 140 kW of a 30 kW grid: every one is admitted at its 1.4 kW minimum or more
    # (7 fit per 10 kW substation), and they share the limit; none that has to wait is left waiting.
    stack = stack_factory(capacities=(10, 10, 10))
    run = load_tester(
        stack, tmp_path, "--scenario", "rush-hour", "--requests", "20", "--amount-range", "6", "8",
        "--session-duration", "2", "--duration", "20", "--wait", "--seed", "8", "--no-progress",
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    results = assert_report_agrees_with_results(tmp_path)
    summary = results["summary"]
    assert (summary["vehicles_served"], summary["vehicles_requested"]) == (20, 20)
    assert (summary["rejected"], summary["failed"], summary["vehicles_energy_unknown"]) == (0, 0, 0)
    assert summary["jain_index_served"] >= 0.95 and summary["jain_index_all"] >= 0.95, summary
    assert_no_violation_and_both_witnesses_looked(summary)
    # Every substation was full the whole rush: each vehicle got far less than it asked for.
    assert summary["energy_delivered_ratio"] < 0.3
    assert all(s["peak_load_percentage"] == pytest.approx(100.0) for s in summary["substations"])
    # What the vehicles asked for was several times each limit; the allocations never passed it.
    assert all(s["end_requested_percentage"] > 300.0 for s in summary["substations"]), summary["substations"]
    # Balance under sharing: 6 or 7 vehicles a substation get 10/7 = 1.43 or 10/6 = 1.67 kW each, not the
    # hundreds of points between the requests' percentages; the load % spread is for strict runs only.
    assert summary["power_spread_end_kw"] < 1.0 and summary["power_spread_peak_kw"] is not None
    assert (summary["spread_end"], summary["spread_peak"]) == (None, None)
    assert summary["energy_delivered_kwh"] == pytest.approx(
        sum(s["energy_delivered_kwh"] for s in summary["substations"]), abs=1e-5
    )
    # The substations' default policy: deadline, which shares as fair_share does among sessions without a need.
    assert results["settings"]["wait"] is True and results["settings"]["allocation_policy"] == "deadline"
    assert re.search(r"^Jain's fairness index, served vehicles +0\.9\d\d|1\.000$", run.stdout, re.MULTILINE)
    assert re.search(r"^Capacity violations in allocation histories +0$", run.stdout, re.MULTILINE)
    assert re.search(r"^Capacity violations in substation samples +0$", run.stdout, re.MULTILINE)


def test_a_derate_halves_the_largest_substations_limit_and_restores_it_without_a_violation(stack_factory, tmp_path):
    stack = stack_factory(capacities=(10, 10, 20), substation_env={"ADMIN_TOKEN": ADMIN_TOKEN})
    run = load_tester(
        stack, tmp_path, "--scenario", "derate", "--requests", "20", "--amount-range", "5", "8",
        "--session-duration", "3", "--derate-at", "0.75", "--derate-for", "1", "--seed", "6", "--no-progress",
        env={"ADMIN_TOKEN": ADMIN_TOKEN},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    results = assert_report_agrees_with_results(tmp_path)
    derate = results["derate"]
    assert (derate["substation"], derate["limit_before_kw"], derate["limit_kw"], derate["error"]) == (
        "substation-3", 20.0, 10.0, None
    )
    assert 0.75 <= derate["applied_offset"] < 1.25 and 1.75 <= derate["restored_offset"] < 2.25
    # The substation's own limit history shows the cut and its end, at the times the tool made them.
    limits = results["limit_histories"]["substation-3"]
    cut = next(t for t, kw in limits if kw == 10.0)
    back = next(t for t, kw in limits if kw == 20.0 and t > cut)
    assert cut == pytest.approx(derate["applied_offset"], abs=0.3)
    assert back == pytest.approx(derate["restored_offset"], abs=0.3)
    # Both witnesses watched through it: samples under the halved limit too, and nothing over it.
    assert_no_violation_and_both_witnesses_looked(results["summary"])
    during = [s for s in results["substation_samples"] if s["substation"] == "substation-3" and s["limit_kw"] == 10.0]
    assert during and all(s["allocated_kw"] <= 10.0 + 1e-6 * s["sessions"] for s in during)
    text = (tmp_path / "report.md").read_text()
    assert "## Derate" in text and "substation-3's limit was lowered from 20.0 kW to 10.0 kW at t=" in text
    assert "Derate: substation-3's limit was lowered" in run.stdout
    limit = requests.get(f"{stack.substations[2].url}/limit", timeout=TIMEOUT).json()
    assert (limit["limit_kw"], limit["source"], limit["operator_limit_kw"]) == (20.0, "substation", None)


def test_compare_allocation_runs_strict_and_fair_share_and_restores_each_substations_policy(stack_factory, tmp_path):
    stack = stack_factory(
        capacities=(10, 10, 10), substation_env={"ADMIN_TOKEN": ADMIN_TOKEN},
        balancer_env={"POLL_INTERVAL_SECONDS": "1"},
    )  # fmt: skip
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    # Found half switched: each substation gets its own policy back at the end.
    first = f"{stack.substations[0].url}/allocation-policy"
    assert requests.put(first, json={"policy": "strict"}, headers=admin, timeout=TIMEOUT).status_code == 200
    # 9 EVs of 4-6 kW on 3 x 10 kW: strict gives each its whole amount, at most two at a time per
    # substation, the rest wait; fair share starts all at once and shares.
    run = load_tester(
        stack, tmp_path, "--compare-allocation", "strict,fair_share", "--scenario", "rush-hour", "--requests", "9",
        "--amount-range", "4", "6", "--session-duration", "1.5", "--duration", "20", "--wait", "--seed", "5",
        "--no-progress", env={"ADMIN_TOKEN": ADMIN_TOKEN},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    rows = json.loads((tmp_path / "comparison.json").read_text())["allocation_policies"]
    assert [row["policy"] for row in rows] == ["strict", "fair_share"]
    strict, fair = rows
    assert strict["vehicles_served"] == fair["vehicles_served"] == 9
    assert strict["share_of_request"]["min"] == pytest.approx(1.0, abs=1e-3)  # whole amounts, after a wait
    assert strict["queued"] > 0 and strict["queue_wait_p95_seconds"] > 1.0  # a session length at least
    assert fair["queued"] == 0 and fair["share_of_request"]["p50"] < 1.0  # at once, and shared
    assert fair["energy_delivered_ratio"] < strict["energy_delivered_ratio"]
    assert all(row["capacity_violations"] == 0 and row["passed"] for row in rows)
    table = markdown_rows((tmp_path / "comparison.md").read_text(), "Policy")
    assert [row[0] for row in table] == ["strict", "fair_share"]
    for name in ("comparison.png", "vehicles.png"):
        assert_png(tmp_path / name)
    for policy in ("strict", "fair_share"):
        results = assert_report_agrees_with_results(tmp_path / policy)
        assert results["settings"]["allocation_policy"] == policy
        assert {r["amount_kw"] for r in results["requests"]} == {r["amount_kw"] for r in json.loads(
            (tmp_path / "strict" / "results.json").read_text())["requests"]}  # fmt: skip
    policies = [
        requests.get(f"{s.url}/allocation-policy", timeout=TIMEOUT).json()["policy"] for s in stack.substations
    ]
    assert policies == ["strict", "deadline", "deadline"]  # the other two had the default


def test_requests_still_queued_at_the_time_limit_are_cancelled_and_count_as_rejected(
    stack_factory, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(runner, "GRACE_SECONDS", 0.5)
    stack = stack_factory(capacities=(5,), charge_env={"ADMIN_TOKEN": ADMIN_TOKEN})
    # Three sessions of other clients hold every minimum (3 x 1.4 of 5 kW) for longer than the run.
    for index in range(3):
        body = {"vehicle_id": f"ev-other-{index}", "amount": 5, "duration_seconds": 30}
        assert requests.post(f"{stack.charge.url}/charge", json=body, timeout=TIMEOUT).status_code == 201
    started = time.monotonic()
    code = main(
        ["--target", stack.charge.url, "--balancer", stack.balancer.url, "--output", str(tmp_path), "--wait",
         "--scenario", "burst", "--requests", "2", "--duration", "0.5", "--timeout", "1", "--no-progress"],
        environ={},
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert code == 0, capsys.readouterr()
    # The time limit (0.5 s + one 3 s timeout + 0.5 s), not the 30 s the grid stays full, ended the waiting.
    assert elapsed < 10, elapsed
    results = assert_report_agrees_with_results(tmp_path)
    assert [(r["outcome"], r["status"], r["error"], r["state"]) for r in results["requests"]] == [
        ("rejected", 202, "still_queued", "queued")
    ] * 2
    assert (results["summary"]["queued"], results["summary"]["vehicles_served"]) == (2, 0)
    assert "2 request(s) were still waiting in the queue at the time limit and were cancelled" in " ".join(
        results["warnings"]
    )
    # Cancelled, so they never start later on someone else's grid.
    operator = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for request in results["requests"]:
        answer = requests.get(f"{stack.charge.url}{request['location']}", headers=operator, timeout=TIMEOUT)
        assert answer.json()["state"] == "cancelled", answer.text
