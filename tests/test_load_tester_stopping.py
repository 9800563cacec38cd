"""How a run stops early: at its time limit, or on Ctrl-C (SIGINT to the real command), with its results written."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from load_tester import runner
from load_tester.cli import EXIT_FAILED, EXIT_INTERRUPTED, main
from tests.harness import REPO_ROOT, wait_for
from tests.load_tester_support import HoldingStack, start_interruptible

# Each case takes a few seconds; this only stops a hung command from hanging the suite.
COMMAND_TIMEOUT = 30
WAITING_MESSAGE = "press Ctrl-C again to stop waiting"


def test_requests_still_open_at_the_time_limit_fail_the_run_without_waiting_for_them(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runner, "GRACE_SECONDS", 0.2)
    with HoldingStack(trickle=True) as stack:
        started = time.monotonic()
        code = main(
            ["--target", stack.url, "--balancer", stack.url, "--output", str(tmp_path), "--scenario", "burst",
             "--requests", "2", "--duration", "0.2", "--timeout", "0.3", "--max-error-rate", "1", "--no-progress"],
            environ={},
        )  # fmt: skip
        elapsed = time.monotonic() - started
        # The answers are still trickling in: the run gave up on them at its limit (0.2 + 2 + 0.3 + 0.2 s).
        assert not stack.release.is_set() and stack.held() == 2
    assert code == EXIT_FAILED
    assert elapsed < 6, elapsed
    out = capsys.readouterr().out
    assert "PROBLEM: 2 request(s) still unanswered at the time limit" in out
    assert "Ctrl-C" not in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert (results["stopped_by"], results["passed"]) == ("time_limit", False)
    assert [(r["outcome"], r["failure"]) for r in results["requests"]] == [("failed", "unanswered")] * 2
    assert all(r["sent_offset"] is not None and r["status"] is None for r in results["requests"])
    assert results["summary"]["failed_by_status"] == {"unanswered": 2}


def start_load_tester(stack: HoldingStack, output: Path) -> subprocess.Popen:
    """Six requests, three at a time: three are held in flight, three wait for a worker."""
    command = [
        sys.executable, "-m", "load_tester", "--target", stack.url, "--balancer", stack.url, "--output", str(output),
        "--scenario", "burst", "--requests", "6", "--concurrency", "3", "--timeout", "20", "--sample-interval", "0.1",
        "--no-progress",
    ]  # fmt: skip
    return start_interruptible(command, REPO_ROOT, output)


def interrupt_while_requests_are_in_flight(process: subprocess.Popen, stack: HoldingStack, output: Path) -> None:
    wait_for(lambda: stack.held() == 3, COMMAND_TIMEOUT, "three requests in flight")
    process.send_signal(signal.SIGINT)
    wait_for(lambda: WAITING_MESSAGE in (output / "stderr.txt").read_text(), COMMAND_TIMEOUT, "the waiting message")


def finished(process: subprocess.Popen, output: Path) -> tuple[int, str, str, dict]:
    code = process.wait(COMMAND_TIMEOUT)
    results = json.loads((output / "results.json").read_text())
    return code, (output / "stdout.txt").read_text(), (output / "stderr.txt").read_text(), results


def test_ctrl_c_sends_nothing_more_and_records_the_answers_still_in_flight(tmp_path):
    with HoldingStack() as stack:
        process = start_load_tester(stack, tmp_path / "out")
        try:
            interrupt_while_requests_are_in_flight(process, stack, tmp_path / "out")
            assert "Waiting up to 27 s for the answers to the 3 request(s) in flight" in (
                tmp_path / "out" / "stderr.txt"
            ).read_text()
            stack.release.set()
            code, out, err, results = finished(process, tmp_path / "out")
        finally:
            process.kill()
        assert stack.held() == 3
    assert code == EXIT_INTERRUPTED, out + err
    assert "Traceback" not in err
    assert results["stopped_by"] == "interrupt"
    assert [r["outcome"] for r in results["requests"]] == ["rejected"] * 3 + ["not_sent"] * 3
    # The three never sent count as errors too; the interruption is named on its own.
    assert results["problems"][-1] == "the run was interrupted (Ctrl-C): its figures cover only what happened before"
    assert "PROBLEM: the run was interrupted (Ctrl-C)" in out
    assert (tmp_path / "out" / "report.md").exists()


def test_a_second_ctrl_c_stops_waiting_and_still_writes_the_results(tmp_path):
    with HoldingStack() as stack:
        process = start_load_tester(stack, tmp_path / "out")
        try:
            interrupt_while_requests_are_in_flight(process, stack, tmp_path / "out")
            process.send_signal(signal.SIGINT)
            # Written while the three requests are still held: nobody waited for them.
            wait_for(lambda: (tmp_path / "out" / "report.md").exists(), COMMAND_TIMEOUT, "the report")
            stack.release.set()
            code, out, err, results = finished(process, tmp_path / "out")
        finally:
            process.kill()
    assert code == EXIT_INTERRUPTED, out + err
    assert "Traceback" not in err
    assert results["stopped_by"] == "interrupt"
    assert [(r["outcome"], r["failure"]) for r in results["requests"]] == (
        [("failed", "unanswered")] * 3 + [("not_sent", None)] * 3
    )
    assert results["summary"]["failed_by_status"] == {"unanswered": 3}

