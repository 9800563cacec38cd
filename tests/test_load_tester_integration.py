"""The load tester against the real stack (gunicorn processes on 127.0.0.1), run as users run it."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from load_tester.api import USER_AGENT, GridClient
from load_tester.cli import EXIT_INTERRUPTED, build_parser, resolve_plan
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


def test_rush_hour_admits_every_request_when_the_grid_has_room(stack_factory, tmp_path):
    # 100 EVs of up to 20 kW need up to 2000 kW: 3 x 700 kW always has room.
    stack = stack_factory(capacities=(700, 700, 700))
    run = load_tester(stack, tmp_path, "--scenario", "rush-hour", "--session-duration", "30", "--seed", "11")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "100/100" in run.stderr  # the progress bar reached the end
    assert re.search(r"^Admitted +100$", run.stdout, re.MULTILINE) and run.stdout.rstrip().splitlines()[-3] == "PASSED"

    results = assert_report_agrees_with_results(tmp_path)
    summary = results["summary"]
    assert (summary["admitted"], summary["rejected"], summary["failed"]) == (100, 0, 0)
    assert summary["capacity_violations"] == 0
    by_substation = {s["substation"]: s for s in summary["substations"]}
    assert sorted(by_substation) == ["substation-1", "substation-2", "substation-3"]
    # Least-loaded routing shares the rush hour out: roughly a third each, as in the design documents.
    assert all(25 <= s["admitted"] <= 42 for s in by_substation.values()), by_substation
    # One run, one id prefix: "loadtest-<run>-<index>".
    assert len({r["request_id"].rsplit("-", 1)[0] for r in results["requests"]}) == 1

    # The last status sample is the grid as the run left it: exactly the sessions the run opened.
    last = {r["substation"]: r for r in results["status_samples"][-1]["substations"]}
    for name, figures in by_substation.items():
        assert last[name]["load_kw"] == pytest.approx(figures["admitted_kw"], abs=0.01)
        assert figures["end_load_percentage"] == pytest.approx(figures["admitted_kw"] / 7.0, abs=0.01)
    live = {s["id"]: s["load"] for s in balancer_status(stack)["substations"]}
    assert live == pytest.approx({name: s["admitted_kw"] for name, s in by_substation.items()}, abs=0.01)

    # Every request carried its id through the stack.
    some_id = results["requests"][57]["request_id"]
    assert f"[{some_id}]" in stack.charge.log_text()
    assert f"[{some_id}]" in stack.balancer.log_text()


def test_capacity_rejections_pass_by_default_and_fail_above_the_allowed_rejection_rate(stack_factory, tmp_path):
    # A tiny grid: 3 x 10 kW holds at most two 5-8 kW sessions per substation, so most requests are refused.
    stack = stack_factory(capacities=(10, 10, 10))
    common = ("--scenario", "burst", "--session-duration", "60", "--no-progress")
    crowd = load_tester(stack, tmp_path / "crowd", *common, "--requests", "20", "--amount-range", "5", "8")
    assert crowd.returncode == 0, crowd.stdout + crowd.stderr
    results = assert_report_agrees_with_results(tmp_path / "crowd")
    summary = results["summary"]
    assert 3 <= summary["admitted"] <= 6 and summary["rejected"] == 20 - summary["admitted"]
    assert (summary["failed"], summary["error_rate"], summary["capacity_violations"]) == (0, 0.0, 0)
    assert summary["rejection_rate"] == summary["rejected"] / 20
    assert results["passed"] is True and results["problems"] == []
    assert results["settings"]["max_rejection_rate"] == 1.0
    assert re.search(r"^Rejection rate \(%\) +\d+\.\d$", crowd.stdout, re.MULTILINE)

    # Each substation now carries at least 5 kW for a minute: nothing above 5 kW fits, a rejection rate
    # of exactly 100 %, which fails a run that allows less.
    strict = load_tester(
        stack, tmp_path / "strict", *common, "--requests", "4", "--amount-range", "6", "8",
        "--max-rejection-rate", "0.99",
    )  # fmt: skip
    assert strict.returncode == 1, strict.stdout + strict.stderr
    results = json.loads((tmp_path / "strict" / "results.json").read_text())
    assert (results["summary"]["rejected"], results["summary"]["rejection_rate"]) == (4, 1.0)
    [problem] = results["problems"]
    assert problem.startswith("rejection rate 100.0% is above the allowed 99.0% (4 of 4 requests rejected")
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
        "--session-duration", "5", "--max-error-rate", "1", "--no-progress",
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    summary = assert_report_agrees_with_results(tmp_path)["summary"]
    assert (summary["sent"], summary["admitted"], summary["not_sent"]) == (1, 1, 9)
    assert summary["wall_seconds"] < 3
    assert "9 request(s) were not sent before the time limit" in run.stdout


def test_sustained_sends_poisson_arrivals_at_the_rate_and_none_after_the_time_limit(stack_factory, tmp_path):
    stack = stack_factory(capacities=(700, 700, 700))
    options = ("--scenario", "sustained", "--rate", "20", "--duration", "2", "--seed", "5", "--session-duration", "5")
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
    stack = stack_factory(capacities=(80, 100, 120), balancer_env={"ADMIN_TOKEN": ADMIN_TOKEN})
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    policy_url = f"{stack.balancer.url}/admin/policy"
    put = requests.put(policy_url, json={"policy": "round_robin"}, headers=admin, timeout=TIMEOUT)
    assert put.status_code == 200, put.text
    offered = put.json()["available"]
    # The grid is still full from an earlier run: the comparison waits for it to empty rather than
    # let the first policy admit nothing and look worst.
    for capacity in (120, 100, 80):
        body = {"vehicle_id": f"ev-earlier-{capacity}", "amount": capacity, "duration_seconds": 2}
        earlier = requests.post(f"{stack.charge.url}/charge", json=body, timeout=TIMEOUT)
        assert earlier.status_code == 201, earlier.text

    # 20 requests of 5-10 kW: at most 200 kW, which fits the 300 kW grid once but not twice.
    run = load_tester(
        stack, tmp_path, "--compare-policies", "--scenario", "burst", "--requests", "20", "--concurrency", "10",
        "--amount-range", "5", "10", "--session-duration", "60", "--seed", "3", "--no-progress",
        env={"ADMIN_TOKEN": ADMIN_TOKEN},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "The grid already carries 300.0 kW; waiting" in run.stderr

    comparison = json.loads((tmp_path / "comparison.json").read_text())["policies"]
    assert [row["policy"] for row in comparison] == offered
    table = markdown_rows((tmp_path / "comparison.md").read_text(), "Policy")
    assert [row[0] for row in table] == offered
    assert_png(tmp_path / "comparison.png")
    amounts = None
    for policy in offered:
        results = assert_report_agrees_with_results(tmp_path / policy)
        # Each run happened under its policy, with the same seeded requests, on an emptied grid.
        assert {s["policy"] for s in results["status_samples"]} == {policy}
        assert results["summary"]["admitted"] == 20, (policy, results["summary"])
        run_amounts = [r["amount_kw"] for r in results["requests"]]
        assert amounts in (None, run_amounts)
        amounts = run_amounts

    admin_policy = requests.get(policy_url, headers=admin, timeout=TIMEOUT).json()
    assert admin_policy["policy"] == "round_robin"
    assert all(s["load"] == 0 for s in balancer_status(stack)["substations"])
    assert requests.get(f"{stack.charge.url}/sessions", timeout=TIMEOUT).json()["sessions"] == []


def test_ctrl_c_between_two_compared_policies_writes_the_comparison_so_far(stack_factory, tmp_path):
    stack = stack_factory(
        capacities=(300, 300, 300), balancer_env={"ADMIN_TOKEN": ADMIN_TOKEN, "POLL_INTERVAL_SECONDS": "1"}
    )
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    policy_url = f"{stack.balancer.url}/admin/policy"
    assert requests.put(policy_url, json={"policy": "random"}, headers=admin, timeout=TIMEOUT).status_code == 200
    options = (
        "--compare-policies", "--policies", "least_loaded,round_robin", "--scenario", "normal", "--requests", "4",
        "--ramp-up", "1", "--seed", "3", "--no-progress",
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
