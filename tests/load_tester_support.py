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

from load_tester.records import (
    ADMITTED,
    RequestResult,
    SessionRecord,
    StatusSample,
    SubstationAudit,
    SubstationReading,
    SubstationSample,
    parse_sessions_sample,
)

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
    energy_kwh: float | None = None,
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
        state="charging",
        energy_kwh=energy_kwh,
        energy_source=None if energy_kwh is None else "substation",
    )


BASE_EPOCH = BASE_TIME.timestamp()


def session_record(
    session_id: str, history: list[tuple[float, float]], *, substation: str = "substation-1", amount: float = 10.0,
    energy: float = 0.0, ended: bool = True,
) -> SessionRecord:  # fmt: skip
    """A substation's session whose ``history`` is (seconds after BASE_TIME, kW)."""
    start = history[0][0]
    return SessionRecord(
        substation=substation,
        session_id=session_id,
        vehicle_id=f"ev-{session_id}",
        amount_kw=amount,
        state="ended" if ended else "charging",
        energy_kwh=energy,
        started_at=BASE_EPOCH + start,
        ends_at=BASE_EPOCH + history[-1][0],
        history=tuple((BASE_EPOCH + at, kw) for at, kw in history),
    )


def audit(
    limits: list[tuple[float, float]], *sessions: SessionRecord, substation: str = "substation-1",
    taken_at: float = 100.0,
) -> SubstationAudit:  # fmt: skip
    """A substation's end-of-run records: its limit history (seconds after BASE_TIME, kW) and its sessions."""
    return SubstationAudit(
        substation=substation,
        url=f"http://{substation}",
        taken_at=BASE_EPOCH + taken_at,
        limit_history=tuple((BASE_EPOCH + at, kw) for at, kw in limits),
        sessions=sessions,
    )


def substation_sample(
    t: float, allocations: list[float], limit: float, substation: str = "substation-1",
    amounts: list[float] | None = None,
) -> SubstationSample:  # fmt: skip
    """One GET /sessions of a substation, ``t`` seconds after BASE_TIME (both clocks agree here), read by the
    load tester's own parser; ``amounts`` are what the sessions ask for (by default, what they get)."""
    amounts = allocations if amounts is None else amounts
    body = {
        "substation": substation, "taken_at": BASE_EPOCH + t, "limit_kw": limit,
        "sessions": [{"amount": amount, "allocated_kw": kw} for kw, amount in zip(allocations, amounts)],
    }  # fmt: skip
    parsed = parse_sessions_sample(t, substation, body)
    assert parsed is not None
    return parsed


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
    assert summary["capacity_violations"] == summary["history_violations"] + summary["sample_violations"]
    listed = [v["source"] for v in results["capacity_violations"]]
    assert listed.count("history") == min(summary["history_violations"], 1000)
    assert listed.count("samples") == min(summary["sample_violations"], 1000)
    served = [r for r in requests if r["outcome"] == "admitted"]
    assert summary["vehicles_requested"] == len(requests) and summary["vehicles_served"] == len(served)
    assert summary["queued"] == sum(1 for r in requests if r["status"] == 202)
    assert abs(summary["energy_requested_kwh"] - sum(r["energy_requested_kwh"] for r in requests)) < 1e-5
    known = [r["energy_kwh"] for r in served if r["energy_kwh"] is not None]
    assert abs(summary["energy_delivered_kwh"] - sum(known)) < 1e-5
    assert summary["vehicles_energy_unknown"] == len(served) - len(known)

    report = (folder / "report.md").read_text()
    figures = dict(markdown_rows(report, "Figure"))
    latency = summary["latency"] or {}
    shares = summary["share_of_request"]
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
        "Spread of power per vehicle across substations at end (kW)": digits(summary["power_spread_end_kw"], 2),
        "Largest spread of power per vehicle across substations (kW)": digits(summary["power_spread_peak_kw"], 2),
        "Spread at end (points of load %, strict only)": one_decimal(summary["spread_end"]),
        "Largest spread (points of load %, strict only)": one_decimal(summary["spread_peak"]),
        "Vehicles served": f"{summary['vehicles_served']} of {summary['vehicles_requested']}",
        "Energy requested (kWh)": digits(summary["energy_requested_kwh"], 3),
        "Energy delivered (kWh)": digits(summary["energy_delivered_kwh"], 3),
        "Energy delivered (% of requested)": one_decimal(
            None if summary["energy_delivered_ratio"] is None else summary["energy_delivered_ratio"] * 100
        ),
        "Jain's fairness index, served vehicles": digits(summary["jain_index_served"], 3),
        "Jain's fairness index, all requested vehicles": digits(summary["jain_index_all"], 3),
        "Share of request delivered, min / p5 / p50 / p95 (%)": (
            "-" if shares is None else " / ".join(one_decimal(shares[k] * 100) for k in ("min", "p5", "p50", "p95"))
        ),
        "Queued (202)": str(summary["queued"]),
        "Queue wait p50 (s)": digits(summary["queue_wait_p50_seconds"], 2),
        "Queue wait p95 (s)": digits(summary["queue_wait_p95_seconds"], 2),
        "Peak load % (allocated / limit, any substation)": one_decimal(summary["peak_load_percentage"]),
        "Capacity violations": str(summary["capacity_violations"]),
        "Capacity violations in allocation histories": str(summary["history_violations"]),
        "Capacity violations in substation samples": str(summary["sample_violations"]),
        "Allocation instants checked": str(summary["history_instants_checked"]),
        "Substation samples checked": str(summary["substation_samples"]),
    }
    for label, value in expected.items():
        assert figures[label] == value, f"report.md shows {label} = {figures[label]}, results.json {value}"
    # What the vehicles asked for, named as such: it passes 100 % under sharing while the allocations do not.
    assert "| Capacity kW | Requested % of limit at end | Peak load % |" in report
    assert "Load % at end" not in report
    table = {row[0]: row[1:] for row in markdown_rows(report, "Substation")}
    assert sorted(table) == sorted(s["substation"] for s in summary["substations"])
    for s in summary["substations"]:
        assert table[s["substation"]] == [
            str(s["admitted"]),
            one_decimal(s["admitted_kw"]),
            one_decimal(s["capacity_kw"]),
            one_decimal(s["end_requested_percentage"]),
            one_decimal(s["peak_load_percentage"]),
            digits(s["energy_delivered_kwh"], 3),
            str(s["capacity_violations"]),
        ]
    assert "![Load per substation over time](load.png)" in report
    assert "![Latency distribution](latency.png)" in report
    assert "![Power and energy per vehicle](vehicles.png)" in report
    for plot in ("load.png", "latency.png", "vehicles.png"):
        assert_png(folder / plot)
    return results


def digits(value: float | None, places: int) -> str:
    return "-" if value is None else f"{value:.{places}f}"


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
