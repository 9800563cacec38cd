"""The outputs of a run: results.json, two plots, a Markdown report, and the console table.

Every figure shown anywhere comes from one ``Summary`` through ``summary_rows``,
so the console, the report and results.json cannot disagree.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from load_tester.plots import write_comparison_plot, write_latency_plot, write_load_plot
from load_tester.records import RunData
from load_tester.stats import Summary, summarise
from load_tester.verdict import Limits, Verdict, judge
from load_tester.violations import CapacityViolation, find_violations

RESULTS_FILE = "results.json"
LOAD_PLOT = "load.png"
LATENCY_PLOT = "latency.png"
REPORT_FILE = "report.md"
COMPARISON_FILE = "comparison.json"
COMPARISON_PLOT = "comparison.png"
COMPARISON_REPORT = "comparison.md"


@dataclass(frozen=True)
class RunReport:
    title: str
    settings: dict[str, Any]
    data: RunData
    summary: Summary
    violations: tuple[CapacityViolation, ...]
    verdict: Verdict

    @property
    def policy(self) -> str | None:
        return next((sample.policy for sample in reversed(self.data.samples) if sample.policy), None)

    def as_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "settings": self.settings,
            "policy": self.policy,
            "started_at": self.data.started_at,
            "finished_at": self.data.finished_at,
            "stopped_by": self.data.stopped_by,
            "passed": self.verdict.passed,
            "problems": list(self.verdict.problems),
            "warnings": list(self.verdict.warnings),
            "summary": self.summary.as_json(),
            "capacity_violations": [violation.as_json() for violation in self.violations],
            "requests": [result.as_json() for result in self.data.results],
            "status_samples": [sample.as_json() for sample in self.data.samples],
            "status_sample_errors": self.data.sample_errors,
        }


def assemble(title: str, settings: dict[str, Any], data: RunData, limits: Limits, open_loop: bool) -> RunReport:
    violations = tuple(find_violations(data.results, data.samples))
    summary = summarise(data.results, data.samples, violations, data.timing)
    verdict = judge(summary, violations, data, limits, open_loop)
    return RunReport(title, settings, data, summary, violations, verdict)


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_rows(summary: Summary) -> list[tuple[str, str]]:
    latency = summary.latency
    return [
        ("Requests planned", str(summary.planned)),
        ("Requests sent", str(summary.sent)),
        ("Admitted", str(summary.admitted)),
        ("Rejected for capacity", str(summary.rejected)),
        ("Failed", str(summary.failed)),
        ("Failed by status", summary.failure_causes() or "none"),
        ("Not sent (time limit or interrupted)", str(summary.not_sent)),
        ("Error rate (%)", _number(summary.error_rate * 100.0)),
        ("Rejection rate (%)", _number(summary.rejection_rate * 100.0)),
        ("Latency mean (ms)", _number(latency.mean if latency else None)),
        ("Latency median (ms)", _number(latency.median if latency else None)),
        ("Latency p95 (ms)", _number(latency.p95 if latency else None)),
        ("Latency p99 (ms)", _number(latency.p99 if latency else None)),
        ("Latency max (ms)", _number(latency.max if latency else None)),
        ("Throughput (answers/s)", _number(summary.throughput_rps)),
        ("Run time (s)", _number(summary.wall_seconds, 2)),
        ("Spread at end (points of load %)", _number(summary.spread_end)),
        ("Largest spread (points of load %)", _number(summary.spread_peak)),
        ("Capacity violations", str(summary.capacity_violations)),
        ("Load tester CPU (% of a core)", _number(summary.tool_cpu_percent)),
    ]


RATES_EXPLAINED = (
    "Error rate: share of requests that failed (any answer but 201 or a capacity rejection, a timeout, "
    "a connection error) or were not sent. Rejection rate: share refused for lack of capacity "
    "(503 `no_capacity`), the grid protecting its substations: correct behaviour, judged on its own "
    "(`max_rejection_rate` in the settings below)."
)

SUBSTATION_HEADER = ("Substation", "Admitted", "Admitted kW", "Capacity kW", "Load % at end", "Peak load %")


def substation_rows(summary: Summary) -> list[tuple[str, ...]]:
    return [
        (
            s.substation,
            str(s.admitted),
            _number(s.admitted_kw),
            _number(s.capacity_kw),
            _number(s.end_load_percentage),
            _number(s.peak_load_percentage),
        )
        for s in summary.substations
    ]


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    lines = [header, ["-" * width for width in widths], *rows]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def console_text(report: RunReport) -> str:
    parts = [
        report.title,
        text_table(("Figure", "Value"), summary_rows(report.summary)),
        text_table(SUBSTATION_HEADER, substation_rows(report.summary)),
    ]
    parts += [f"WARNING: {warning}" for warning in report.verdict.warnings]
    parts += [f"PROBLEM: {problem}" for problem in report.verdict.problems]
    parts.append("PASSED" if report.verdict.passed else "FAILED")
    return "\n\n".join(parts)


def _markdown(report: RunReport) -> str:
    settings = report.settings
    verdict = report.verdict
    lines = [
        f"# {report.title}",
        "",
        f"Run from {report.data.started_at} to {report.data.finished_at} against {settings['target']} "
        f"(balancer {settings['balancer']}, routing policy {report.policy or 'unknown'}), seed {settings['seed']}.",
        "",
        f"**Result: {'PASSED' if verdict.passed else 'FAILED'}**",
        "",
        *(f"- {problem}" for problem in verdict.problems),
        "",
        "## Summary",
        "",
        markdown_table(("Figure", "Value"), summary_rows(report.summary)),
        "",
        RATES_EXPLAINED,
        "",
        "## Substations",
        "",
        markdown_table(SUBSTATION_HEADER, substation_rows(report.summary)),
        "",
        "## Capacity violations",
        "",
        *([f"- {v.describe()}" for v in report.violations] or ["None."]),
        "",
        "## Load per substation",
        "",
        f"![Load per substation over time]({LOAD_PLOT})",
        "",
        "## Latency",
        "",
        f"![Latency distribution]({LATENCY_PLOT})",
        "",
    ]
    if verdict.warnings:
        lines += ["## Warnings", "", *(f"- {warning}" for warning in verdict.warnings), ""]
    lines += ["## Settings", "", markdown_table(("Setting", "Value"), [(k, str(v)) for k, v in settings.items()]), ""]
    return "\n".join(lines)


def write_run(output_dir: Path, report: RunReport) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_json(output_dir / RESULTS_FILE, report.as_json())
    write_load_plot(report.data.samples, report.title, output_dir / LOAD_PLOT)
    write_latency_plot(report.data.results, report.summary.latency, report.title, output_dir / LATENCY_PLOT)
    (output_dir / REPORT_FILE).write_text(_markdown(report), encoding="utf-8")


COMPARISON_HEADER = (
    "Policy", "Admitted", "Rejected", "Failed", "Largest spread", "Spread at end", "Peak load %",
    "Latency mean (ms)", "Latency p95 (ms)", "Violations",
)


def _peak_load(summary: Summary) -> float | None:
    peaks = [s.peak_load_percentage for s in summary.substations if s.peak_load_percentage is not None]
    return max(peaks) if peaks else None


def comparison_rows(reports: Sequence[RunReport]) -> list[tuple[str, ...]]:
    rows = []
    for report in reports:
        summary = report.summary
        latency = summary.latency
        rows.append(
            (
                report.settings["policy"],
                str(summary.admitted),
                str(summary.rejected),
                str(summary.failed),
                _number(summary.spread_peak),
                _number(summary.spread_end),
                _number(_peak_load(summary)),
                _number(latency.mean if latency else None),
                _number(latency.p95 if latency else None),
                str(summary.capacity_violations),
            )
        )
    return rows


def comparison_json(reports: Sequence[RunReport]) -> dict[str, Any]:
    return {
        "policies": [
            {
                "policy": report.settings["policy"],
                "folder": report.settings["policy"],
                "passed": report.verdict.passed,
                "admitted": report.summary.admitted,
                "rejected": report.summary.rejected,
                "failed": report.summary.failed,
                "spread_peak": report.summary.spread_peak,
                "spread_end": report.summary.spread_end,
                "peak_load_percentage": _peak_load(report.summary),
                "latency_ms": None if report.summary.latency is None else asdict(report.summary.latency),
                "capacity_violations": report.summary.capacity_violations,
            }
            for report in reports
        ]
    }


def write_comparison(output_dir: Path, title: str, reports: Sequence[RunReport]) -> None:
    """One table and one figure, policy by policy; each run keeps its own full report in <policy>/."""
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_json(output_dir / COMPARISON_FILE, comparison_json(reports))
    policies = [report.settings["policy"] for report in reports]
    bars = {
        "Largest spread (points of load %)": [r.summary.spread_peak or 0.0 for r in reports],
        "Peak load % (any substation)": [_peak_load(r.summary) or 0.0 for r in reports],
        "Rejected for capacity": [float(r.summary.rejected) for r in reports],
        "Latency p95 (ms)": [r.summary.latency.p95 if r.summary.latency else 0.0 for r in reports],
    }
    write_comparison_plot(policies, bars, [r.data.samples for r in reports], title, output_dir / COMPARISON_PLOT)
    lines = [
        f"# {title}",
        "",
        "The same seeded requests under each routing policy; each run started from an empty grid.",
        "",
        markdown_table(COMPARISON_HEADER, comparison_rows(reports)),
        "",
        f"![Routing policies compared]({COMPARISON_PLOT})",
        "",
        *(f"- [{policy}]({policy}/{REPORT_FILE})" for policy in policies),
        "",
    ]
    (output_dir / COMPARISON_REPORT).write_text("\n".join(lines), encoding="utf-8")


def _write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
