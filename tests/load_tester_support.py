"""Helpers shared by the load tester's tests: hand-made records and checks of its output files."""
from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from matplotlib import image

from load_tester.records import ADMITTED, RequestResult, StatusSample, SubstationReading

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BASE_TIME = datetime(2026, 11, 21, 14, 30, tzinfo=timezone.utc)


def iso(seconds: float) -> str:
    moment = BASE_TIME + timedelta(seconds=seconds)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def admitted(
    index: int,
    substation: str,
    amount: float,
    start: float,
    duration: float,
    capacity: float,
    *,
    load: float | None = None,
    state_version: int | None = None,
    latency_ms: float = 10.0,
) -> RequestResult:
    """An admission at ``start`` seconds after BASE_TIME (the substation's clock), lasting ``duration``."""
    return RequestResult(
        index=index,
        request_id=f"test-{index:05d}",
        vehicle_id=f"ev-test-{index:05d}",
        amount_kw=amount,
        duration_seconds=duration,
        scheduled_offset=0.0,
        outcome=ADMITTED,
        sent_offset=0.0,
        latency_ms=latency_ms,
        status=201,
        substation=substation,
        session_id=f"session-{index}",
        started_at=iso(start),
        ends_at=iso(start + duration),
        load_kw=load,
        capacity_kw=capacity,
        load_percentage=None if load is None else load / capacity * 100.0,
        state_version=state_version,
    )


def sample(t: float, *readings: tuple[str, float, float], policy: str = "least_loaded") -> StatusSample:
    """A status sample from ``(substation, load_kw, capacity_kw)`` triples."""
    return StatusSample(
        t=t,
        policy=policy,
        substations=tuple(SubstationReading(name, load, cap, load / cap * 100.0, True) for name, load, cap in readings),
    )


def assert_png(path: Path) -> None:
    """A real PNG: the signature, and matplotlib can decode it into a non-empty image."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} does not start with the PNG signature"
    pixels = image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100, pixels.shape
    # A blank canvas would be one colour: a drawn figure has many.
    assert pixels.reshape(-1, pixels.shape[2]).std(axis=0).max() > 0.05


def markdown_rows(text: str, first_header: str) -> list[list[str]]:
    """The body rows of the Markdown table whose first header cell is ``first_header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def one_decimal(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def assert_report_agrees_with_results(folder: Path) -> dict[str, Any]:
    """report.md shows the figures of results.json, and those figures follow from its request records."""
    results = json.loads((folder / "results.json").read_text())
    summary = results["summary"]
    requests = results["requests"]
    outcomes = [r["outcome"] for r in requests]
    assert summary["planned"] == len(requests)
    for outcome in ("admitted", "rejected", "failed", "not_sent"):
        assert summary[outcome] == outcomes.count(outcome), outcome
    assert summary["sent"] == len(requests) - outcomes.count("not_sent")
    errors = outcomes.count("failed") + outcomes.count("not_sent")
    assert abs(summary["error_rate"] - errors / len(requests)) < 1e-9
    assert abs(summary["rejection_rate"] - outcomes.count("rejected") / len(requests)) < 1e-9
    answered = [r["latency_ms"] for r in requests if r["status"] is not None]
    if answered:
        assert abs(summary["latency"]["max"] - max(answered)) < 1e-6
        assert abs(summary["latency"]["mean"] - sum(answered) / len(answered)) < 1e-6
    for substation in summary["substations"]:
        mine = [r for r in requests if r["outcome"] == "admitted" and r["substation"] == substation["substation"]]
        assert substation["admitted"] == len(mine)
        assert abs(substation["admitted_kw"] - sum(r["amount_kw"] for r in mine)) < 1e-6
    assert summary["capacity_violations"] == len(results["capacity_violations"])

    report = (folder / "report.md").read_text()
    figures = dict(markdown_rows(report, "Figure"))
    latency = summary["latency"] or {}
    expected = {
        "Requests planned": str(summary["planned"]),
        "Requests sent": str(summary["sent"]),
        "Admitted": str(summary["admitted"]),
        "Rejected for capacity": str(summary["rejected"]),
        "Failed": str(summary["failed"]),
        "Not sent (time limit or interrupted)": str(summary["not_sent"]),
        "Error rate (%)": one_decimal(summary["error_rate"] * 100),
        "Rejection rate (%)": one_decimal(summary["rejection_rate"] * 100),
        "Latency mean (ms)": one_decimal(latency.get("mean")),
        "Latency median (ms)": one_decimal(latency.get("median")),
        "Latency p95 (ms)": one_decimal(latency.get("p95")),
        "Latency p99 (ms)": one_decimal(latency.get("p99")),
        "Latency max (ms)": one_decimal(latency.get("max")),
        "Throughput (answers/s)": one_decimal(summary["throughput_rps"]),
        "Spread at end (points of load %)": one_decimal(summary["spread_end"]),
        "Largest spread (points of load %)": one_decimal(summary["spread_peak"]),
        "Capacity violations": str(summary["capacity_violations"]),
    }
    for label, value in expected.items():
        assert figures[label] == value, f"report.md shows {label} = {figures[label]}, results.json {value}"
    table = {row[0]: row[1:] for row in markdown_rows(report, "Substation")}
    assert sorted(table) == sorted(s["substation"] for s in summary["substations"])
    for s in summary["substations"]:
        assert table[s["substation"]] == [
            str(s["admitted"]),
            one_decimal(s["admitted_kw"]),
            one_decimal(s["capacity_kw"]),
            one_decimal(s["end_load_percentage"]),
            one_decimal(s["peak_load_percentage"]),
        ]
    assert "![Load per substation over time](load.png)" in report
    assert "![Latency distribution](latency.png)" in report
    assert_png(folder / "load.png")
    assert_png(folder / "latency.png")
    return results


def start_interruptible(
    command: list[str], cwd: Path, logs: Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start ``command`` with its output in ``logs``/stdout.txt and stderr.txt, so that SIGINT is a Ctrl-C."""
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / "stdout.txt").open("w") as out, (logs / "stderr.txt").open("w") as err:
        return subprocess.Popen(
            command, cwd=cwd, env=env, text=True, stdout=out, stderr=err,
            # A shell without job control starts background commands ignoring SIGINT: undo that, as a terminal would.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip


# A held request never waits longer than this, whatever the test does.
HOLD_LIMIT_SECONDS = 20.0


class HoldingStack(ThreadingHTTPServer):
    """Stands in for the charge API and the balancer on 127.0.0.1, holding every charge request until released.

    Held requests are answered 503 ``no_capacity``; the headers of each are kept in ``charge_headers``.

    ``trickle`` keeps a held answer coming one byte at a time, so a per-read timeout never ends it.
    The real stack answers at once: requests held for seconds are what only a stand-in can make happen.
    """

    daemon_threads = True

    def __init__(self, trickle: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), _HoldingHandler)
        self.trickle = trickle
        self.release = threading.Event()
        self.charge_headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, name="holding-stack", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    def held(self) -> int:
        with self._lock:
            return len(self.charge_headers)

    def record_charge(self, headers: dict[str, str]) -> None:
        with self._lock:
            self.charge_headers.append(headers)

    def __enter__(self) -> HoldingStack:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


class _HoldingHandler(BaseHTTPRequestHandler):
    server: HoldingStack

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        self._answer(200, {"status": "ok", "policy": "least_loaded", "substations": []})

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.record_charge(dict(self.headers))
        if self.server.trickle:
            self._trickle()
        else:
            self.server.release.wait(HOLD_LIMIT_SECONDS)
            self._answer(503, {"error": "no_capacity", "message": "full"})

    def _trickle(self) -> None:
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        deadline = time.monotonic() + HOLD_LIMIT_SECONDS
        while not self.server.release.wait(0.05) and time.monotonic() < deadline:
            self.wfile.write(b" ")
            self.wfile.flush()
        self.close_connection = True

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        return
