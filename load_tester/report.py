"""The outputs of a run: results.json, three plots, a Markdown report, and the console table.

Every figure shown anywhere comes from one ``Summary`` through ``summary_rows``,
so the console, the report and results.json cannot disagree.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from load_tester.energy import energy_figures, vehicle_histories
from load_tester.plots import (
    VehicleRun,
    write_allocation_comparison_plot,
    write_comparison_plot,
    write_latency_plot,
    write_load_plot,
    write_vehicle_plot,
)
from load_tester.records import RunData
from load_tester.stats import STRICT, Summary, summarise
from load_tester.verdict import Limits, Verdict, judge
from load_tester.violations import CapacityViolation, Witnesses, find_violations, run_start_by_substation

RESULTS_FILE = "results.json"
LOAD_PLOT = "load.png"
LATENCY_PLOT = "latency.png"
VEHICLE_PLOT = "vehicles.png"
REPORT_FILE = "report.md"
COMPARISON_FILE = "comparison.json"
COMPARISON_PLOT = "comparison.png"
COMPARISON_REPORT = "comparison.md"
# results.json and report.md name at most this many violations of each witness; the counts cover all.
MAX_VIOLATIONS_LISTED = 1000
VIOLATIONS_IN_REPORT = 20


@dataclass(frozen=True)
class RunReport:
    title: str
    settings: dict[str, Any]
    data: RunData
    summary: Summary
    witnesses: Witnesses
    verdict: Verdict

    @property
    def violations(self) -> tuple[CapacityViolation, ...]:
        return self.witnesses.violations

    @property
    def policy(self) -> str | None:
        return next((sample.policy for sample in reversed(self.data.samples) if sample.policy), None)

    @property
    def allocation_policy(self) -> str | None:
        """The substations' allocation policy: the one a comparison set, else as the run's admissions said."""
        return self.settings.get("allocation_policy")

    def vehicle_histories(self) -> dict[int, list[tuple[float, float]]]:
        return vehicle_histories(self.data.results, self.data.audits, self.data.started_epoch)

    def as_json(self) -> dict[str, Any]:
        histories = self.vehicle_histories()
        start = self.data.started_epoch or 0.0
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
            "capacity_violations": [
                violation.as_json()
                for violations in (self.witnesses.history_violations, self.witnesses.sample_violations)
                for violation in violations[:MAX_VIOLATIONS_LISTED]
            ],
            "capacity_checks": {
                "history": [
                    {"substation": c.substation, "instants": c.instants, "violations": len(c.violations),
                     "peak_load_percentage": c.peak_load_percentage, "truncated_sessions": c.truncated_sessions}
                    for c in self.witnesses.history
                ],
                "samples": [
                    {"substation": c.substation, "samples": c.samples, "violations": len(c.violations),
                     "peak_load_percentage": c.peak_load_percentage}
                    for c in self.witnesses.samples
                ],
            },  # fmt: skip
            "derate": None if self.data.derate is None else self.data.derate.as_json(),
            "requests": [result.as_json() for result in self.data.results],
            # Each served vehicle's allocation over time: [seconds since the run started, kW] at every change.
            "allocation_histories": {str(index): points for index, points in sorted(histories.items())},
            # Each substation's limit at every change: [seconds since the run started, kW].
            "limit_histories": {
                audit.substation: [[round(at - start, 3), kw] for at, kw in audit.limit_history]
                for audit in self.data.audits
            },
            "status_samples": [sample.as_json() for sample in self.data.samples],
            "status_sample_errors": self.data.sample_errors,
            "substation_samples": [sample.as_json() for sample in self.data.substation_samples],
            "substation_sample_errors": self.data.substation_sample_errors,
            "notes": list(self.data.notes),
        }


def assemble(title: str, settings: dict[str, Any], data: RunData, limits: Limits, open_loop: bool) -> RunReport:
    witnesses = find_violations(
        data.audits, data.substation_samples, run_start_by_substation(data.substation_samples), data.started_epoch
    )
    energy = energy_figures(data.results, settings.get("need_met_within_kwh") or 0.1)
    summary = summarise(
        data.results, data.samples, witnesses, data.timing, energy, data.substation_samples, data.answers_end_t,
        allocation_policy=settings.get("allocation_policy"),
    )
    verdict = judge(summary, witnesses, data, limits, open_loop)
    return RunReport(title, settings, data, summary, witnesses, verdict)


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100.0:.1f}"


def share_text(summary: Summary) -> str:
    """``min / p5 / p50 / p95`` of the share of its request each served vehicle got, in %."""
    shares = summary.share_of_request
    if shares is None:
        return "-"
    return " / ".join(_percent(shares[key]) for key in ("min", "p5", "p50", "p95"))


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
        (POWER_SPREAD_END, _number(summary.power_spread_end_kw, 2)),
        (POWER_SPREAD_PEAK, _number(summary.power_spread_peak_kw, 2)),
        (LOAD_SPREAD_END, _number(summary.spread_end)),
        (LOAD_SPREAD_PEAK, _number(summary.spread_peak)),
        ("Vehicles served", f"{summary.vehicles_served} of {summary.vehicles_requested}"),
        ("Energy requested (kWh)", _number(summary.energy_requested_kwh, 3)),
        ("Energy delivered (kWh)", _number(summary.energy_delivered_kwh, 3)),
        ("Energy delivered (% of requested)", _percent(summary.energy_delivered_ratio)),
        ("Jain's fairness index, served vehicles", _number(summary.jain_index_served, 3)),
        ("Jain's fairness index, all requested vehicles", _number(summary.jain_index_all, 3)),
        ("Share of request delivered, min / p5 / p50 / p95 (%)", share_text(summary)),
        *(_demand_rows(summary) if summary.demands else []),
        ("Queued (202)", str(summary.queued)),
        ("Queue wait p50 (s)", _number(summary.queue_wait_p50_seconds, 2)),
        ("Queue wait p95 (s)", _number(summary.queue_wait_p95_seconds, 2)),
        ("Peak load % (allocated / limit, any substation)", _number(summary.peak_load_percentage)),
        ("Capacity violations", str(summary.capacity_violations)),
        ("Capacity violations in allocation histories", str(summary.history_violations)),
        ("Capacity violations in substation samples", str(summary.sample_violations)),
        ("Allocation instants checked", str(summary.history_instants_checked)),
        ("Substation samples checked", str(summary.substation_samples)),
        ("Load tester CPU (% of a core)", _number(summary.tool_cpu_percent)),
    ]


def _demand_rows(summary: Summary) -> list[tuple[str, str]]:
    """ACN-Sim's figures of a run whose vehicles stated an energy need."""
    met = "-" if summary.demands_met is None else f"{summary.demands_met} of {summary.demands}"
    return [
        # ACN-Sim's 0.1 kWh, scaled down with the energies of a time-compressed day.
        ("Demands met (less than 0.1 kWh missing)", met),
        ("Demands met (%)", _percent(summary.demands_met_ratio)),
        ("Jain's index of delivered / requested, vehicles with a need", _number(summary.jain_index_of_shares, 3)),
    ]


POWER_SPREAD_END = "Spread of power per vehicle across substations at end (kW)"
POWER_SPREAD_PEAK = "Largest spread of power per vehicle across substations (kW)"
LOAD_SPREAD_END = "Spread at end (points of load %, strict only)"
LOAD_SPREAD_PEAK = "Largest spread (points of load %, strict only)"
REQUESTED_AT_END = "Requested % of limit at end"

RATES_EXPLAINED = (
    "Error rate: share of requests that failed (any answer but 201, 202 or a capacity rejection, a timeout, "
    "a connection error, a queued request lost or cancelled by someone else) or were not sent. Rejection rate: "
    "share refused for lack of capacity (503 `no_capacity` or `queue_full`, or queued and never started: "
    "expired, or still waiting at the time limit), the grid protecting its substations: correct behaviour, "
    "judged on its own (`max_rejection_rate` in the settings below)."
)

FIGURES_EXPLAINED = (
    "A vehicle is served when it started charging: a 201, or a 202 that later reached charging. It asks for "
    "its amount for its whole session (kW x hours); it got what its session's own record says it delivered, "
    "read once the session ended. Jain's fairness index of delivered energy, (sum x)^2 / (n sum x^2), is 1 when "
    "every vehicle got the same and 1/n when one got everything; over all requested vehicles an unserved one "
    "counts as 0. Peak load is the highest sum of allocations over the limit in force. Capacity violations are "
    "checked by two witnesses that do not take a substation's word for its total: its sessions' allocation "
    "histories swept against its limit's history at every change, and its sessions sampled during the run "
    "(the allocations added up here, against the limit of the same answer). Balance: under sharing every "
    "vehicle should get the same power wherever it charges, so the spread of power per vehicle is max - min "
    "over the substations of their fair-share level (the power of a vehicle short of its amount; where no "
    "vehicle is short, the largest allocation), from the substations' own samples, 0 while no vehicle is short "
    "anywhere. The spread of load % is given under the strict policy only, where a session gets its whole "
    "amount: under sharing the vehicles ask for more than the limit, and it would say nothing of balance. "
    "Requested % of limit is what a substation's vehicles asked for (the sum of their amounts) over its limit: "
    "past 100 % the vehicles share the limit, which the allocations never exceed. \"At end\" is when the last "
    "answer came, before the sessions ended."
)

SUBSTATION_HEADER = (
    "Substation", "Admitted", "Admitted kW", "Capacity kW", REQUESTED_AT_END, "Peak load %", "Energy kWh",
    "Violations",
)  # fmt: skip


def substation_rows(summary: Summary) -> list[tuple[str, ...]]:
    return [
        (
            s.substation,
            str(s.admitted),
            _number(s.admitted_kw),
            _number(s.capacity_kw),
            _number(s.end_requested_percentage),
            _number(s.peak_load_percentage),
            _number(s.energy_delivered_kwh, 3),
            str(s.capacity_violations),
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
    if report.data.derate is not None:
        parts.append(f"Derate: {report.data.derate.describe()}")
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
        f"(balancer {settings['balancer']}, routing policy {report.policy or 'unknown'}"
        f"{_allocation_text(report)}), seed {settings['seed']}.",
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
        FIGURES_EXPLAINED,
        "",
        "## Substations",
        "",
        markdown_table(SUBSTATION_HEADER, substation_rows(report.summary)),
        "",
        *_derate_lines(report),
        "## Capacity violations",
        "",
        *_violation_lines(report),
        "## Load per substation",
        "",
        f"![Load per substation over time]({LOAD_PLOT})",
        "",
        "## Power and energy per vehicle",
        "",
        f"![Power and energy per vehicle]({VEHICLE_PLOT})",
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


def _allocation_text(report: RunReport) -> str:
    policy = report.allocation_policy
    return "" if policy is None else f", allocation policy {policy}"


def _derate_lines(report: RunReport) -> list[str]:
    derate = report.data.derate
    if derate is None:
        return []
    return ["## Derate", "", derate.describe(), *(f"- {note}" for note in derate.notes), ""]


def _violation_lines(report: RunReport) -> list[str]:
    lines = []
    for name, violations, checked in (
        ("allocation histories", report.witnesses.history_violations,
         f"{report.summary.history_instants_checked} instants checked"),
        ("substation samples", report.witnesses.sample_violations,
         f"{report.summary.substation_samples} samples checked"),
    ):  # fmt: skip
        lines.append(f"In the {name} ({checked}): {len(violations) or 'none'}.")
        lines += [f"- {v.describe()}" for v in violations[:VIOLATIONS_IN_REPORT]]
        if len(violations) > VIOLATIONS_IN_REPORT:
            lines.append(f"- ... and {len(violations) - VIOLATIONS_IN_REPORT} more in results.json")
        lines.append("")
    return lines


def vehicle_run(report: RunReport, label: str) -> VehicleRun:
    return VehicleRun(label, report.data.results, report.vehicle_histories())


def write_run(output_dir: Path, report: RunReport) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_json(output_dir / RESULTS_FILE, report.as_json())
    write_load_plot(
        report.data.samples, report.title, output_dir / LOAD_PLOT, report.data.substation_samples, report.data.derate
    )
    write_latency_plot(report.data.results, report.summary.latency, report.title, output_dir / LATENCY_PLOT)
    write_vehicle_plot(vehicle_run(report, report.title), output_dir / VEHICLE_PLOT)
    (output_dir / REPORT_FILE).write_text(_markdown(report), encoding="utf-8")


def balance(summary: Summary, strict: bool) -> tuple[float | None, float | None]:
    """The largest spread and the spread at end that say how balanced a run was: load % under strict,
    power per vehicle (kW) under sharing."""
    if strict:
        return summary.spread_peak, summary.spread_end
    return summary.power_spread_peak_kw, summary.power_spread_end_kw


def _all_strict(reports: Sequence[RunReport]) -> bool:
    return bool(reports) and all(report.allocation_policy == STRICT for report in reports)


def _balance_unit(strict: bool) -> str:
    return "points of load %" if strict else "kW per vehicle"


def comparison_header(reports: Sequence[RunReport]) -> tuple[str, ...]:
    unit = _balance_unit(_all_strict(reports))
    return (
        "Policy", "Admitted", "Rejected", "Failed", f"Largest spread ({unit})", f"Spread at end ({unit})",
        "Peak load %", "Latency mean (ms)", "Latency p95 (ms)", "Violations",
    )  # fmt: skip


def _peak_load(summary: Summary) -> float | None:
    peaks = [s.peak_load_percentage for s in summary.substations if s.peak_load_percentage is not None]
    return max(peaks) if peaks else None


def comparison_rows(reports: Sequence[RunReport]) -> list[tuple[str, ...]]:
    rows = []
    strict = _all_strict(reports)
    for report in reports:
        summary = report.summary
        latency = summary.latency
        largest, at_end = balance(summary, strict)
        rows.append(
            (
                report.settings["policy"],
                str(summary.admitted),
                str(summary.rejected),
                str(summary.failed),
                _number(largest, 1 if strict else 2),
                _number(at_end, 1 if strict else 2),
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
                "power_spread_peak_kw": report.summary.power_spread_peak_kw,
                "power_spread_end_kw": report.summary.power_spread_end_kw,
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
    strict = _all_strict(reports)
    bars = {
        f"Largest spread ({_balance_unit(strict)})": [balance(r.summary, strict)[0] or 0.0 for r in reports],
        "Peak load % (any substation)": [_peak_load(r.summary) or 0.0 for r in reports],
        "Rejected for capacity": [float(r.summary.rejected) for r in reports],
        "Latency p95 (ms)": [r.summary.latency.p95 if r.summary.latency else 0.0 for r in reports],
    }
    write_comparison_plot(
        policies, bars, [r.data.samples for r in reports], title, output_dir / COMPARISON_PLOT,
        [r.data.substation_samples for r in reports],
    )
    lines = [
        f"# {title}",
        "",
        "The same seeded requests under each routing policy; each run started from an empty grid.",
        "",
        markdown_table(comparison_header(reports), comparison_rows(reports)),
        "",
        f"![Routing policies compared]({COMPARISON_PLOT})",
        "",
        *(f"- [{policy}]({policy}/{REPORT_FILE})" for policy in policies),
        "",
    ]
    (output_dir / COMPARISON_REPORT).write_text("\n".join(lines), encoding="utf-8")


ALLOCATION_HEADER = (
    "Policy", "Served", "Rejected", "Failed", "Energy delivered %", "Jain (served)", "Jain (all)",
    "Share min %", "Share p5 %", "Share p50 %", "Queued", "Queue wait p50 (s)", "Queue wait p95 (s)",
    "Peak load %", "Violations",
)  # fmt: skip


def allocation_rows(reports: Sequence[RunReport]) -> list[tuple[str, ...]]:
    rows = []
    for report in reports:
        summary = report.summary
        shares = summary.share_of_request or {}
        rows.append(
            (
                str(report.allocation_policy),
                f"{summary.vehicles_served} of {summary.vehicles_requested}",
                str(summary.rejected),
                str(summary.failed),
                _percent(summary.energy_delivered_ratio),
                _number(summary.jain_index_served, 3),
                _number(summary.jain_index_all, 3),
                _percent(shares.get("min")),
                _percent(shares.get("p5")),
                _percent(shares.get("p50")),
                str(summary.queued),
                _number(summary.queue_wait_p50_seconds, 2),
                _number(summary.queue_wait_p95_seconds, 2),
                _number(summary.peak_load_percentage),
                str(summary.capacity_violations),
            )
        )
    return rows


def allocation_comparison_json(reports: Sequence[RunReport]) -> dict[str, Any]:
    fields = (
        "vehicles_requested", "vehicles_served", "rejected", "failed", "energy_requested_kwh",
        "energy_delivered_kwh", "energy_delivered_ratio", "jain_index_served", "jain_index_all",
        "share_of_request", "queued", "queue_wait_p50_seconds", "queue_wait_p95_seconds", "peak_load_percentage",
        "capacity_violations", "history_violations", "sample_violations",
    )  # fmt: skip
    summaries = [report.summary.as_json() for report in reports]
    return {
        "allocation_policies": [
            {
                "policy": report.allocation_policy,
                "folder": report.allocation_policy,
                "passed": report.verdict.passed,
                **{name: summary[name] for name in fields},
            }
            for report, summary in zip(reports, summaries)
        ]
    }


def write_allocation_comparison(output_dir: Path, title: str, reports: Sequence[RunReport]) -> None:
    """Allocation policies side by side: one table, the figures as bars, and power and energy per vehicle."""
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_json(output_dir / COMPARISON_FILE, allocation_comparison_json(reports))
    policies = [str(report.allocation_policy) for report in reports]
    bars = {
        "Vehicles served (% of requested)": [
            100.0 * r.summary.vehicles_served / max(1, r.summary.vehicles_requested) for r in reports
        ],
        "Energy delivered (% of requested)": [100.0 * (r.summary.energy_delivered_ratio or 0.0) for r in reports],
        "Jain's index, all vehicles (x100)": [100.0 * (r.summary.jain_index_all or 0.0) for r in reports],
        "Capacity violations": [float(r.summary.capacity_violations) for r in reports],
    }
    write_comparison_plot(
        policies, bars, [r.data.samples for r in reports], title, output_dir / COMPARISON_PLOT,
        [r.data.substation_samples for r in reports],
    )
    write_allocation_comparison_plot(
        [vehicle_run(report, policy) for report, policy in zip(reports, policies)], title, output_dir / VEHICLE_PLOT
    )
    lines = [
        f"# {title}",
        "",
        "The same seeded requests under each allocation policy of the substations; each run started from an "
        "empty grid. Share: delivered / requested energy of each served vehicle.",
        "",
        markdown_table(ALLOCATION_HEADER, allocation_rows(reports)),
        "",
        f"![Allocation policies compared]({COMPARISON_PLOT})",
        "",
        "Power and energy per vehicle under each policy: allocated kW of every vehicle over time, delivered "
        "against requested energy, and how the vehicles' average power is spread.",
        "",
        f"![Power and energy per vehicle]({VEHICLE_PLOT})",
        "",
        *(f"- [{policy}]({policy}/{REPORT_FILE})" for policy in policies),
        "",
    ]
    (output_dir / COMPARISON_REPORT).write_text("\n".join(lines), encoding="utf-8")


def _write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
