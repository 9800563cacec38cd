"""The figures of the report, drawn with matplotlib's Agg renderer (no display needed).

``matplotlib.figure.Figure`` is used directly rather than pyplot: no global
state, nothing to close, safe to call from any thread.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from load_tester.records import ADMITTED, FAILED, REJECTED, RequestResult, StatusSample
from load_tester.stats import Latency

OUTCOME_COLOURS = {ADMITTED: "tab:green", REJECTED: "tab:orange", FAILED: "tab:red"}
DPI = 110


def substation_colours(names: Sequence[str]) -> dict[str, str]:
    return {name: f"C{index % 10}" for index, name in enumerate(sorted(names))}


def load_series(samples: Sequence[StatusSample]) -> dict[str, dict[str, list[float]]]:
    """Per substation: sample times, load kW, capacity kW and load %."""
    series: dict[str, dict[str, list[float]]] = {}
    for sample in samples:
        for reading in sample.substations:
            line = series.setdefault(reading.substation, {"t": [], "load": [], "capacity": [], "percent": []})
            line["t"].append(sample.t)
            line["load"].append(reading.load_kw)
            line["capacity"].append(reading.capacity_kw)
            line["percent"].append(reading.load_percentage)
    return series


def draw_load_percentage(axes: Axes, samples: Sequence[StatusSample], colours: dict[str, str]) -> None:
    for name, line in sorted(load_series(samples).items()):
        axes.plot(line["t"], line["percent"], color=colours[name], label=name, linewidth=1.8)
    axes.axhline(100.0, color="black", linestyle="--", linewidth=1.2, label="capacity (100 %)")
    axes.set_ylabel("load (% of capacity)")
    axes.set_xlabel("seconds since the run started")
    axes.set_ylim(bottom=0, top=max(110.0, axes.get_ylim()[1]))
    axes.grid(alpha=0.3)


def write_load_plot(samples: Sequence[StatusSample], title: str, path: Path) -> None:
    figure = Figure(figsize=(10, 7), layout="constrained")
    kw_axes, percent_axes = figure.subplots(2, 1, sharex=True)
    series = load_series(samples)
    colours = substation_colours(list(series))
    if not series:
        _no_data(kw_axes, "No status sample could be read from the balancer.")
    for name, line in sorted(series.items()):
        kw_axes.plot(line["t"], line["load"], color=colours[name], label=f"{name} load", linewidth=1.8)
        kw_axes.step(
            line["t"], line["capacity"], where="post", color=colours[name], linestyle="--", alpha=0.7,
            label=f"{name} capacity",
        )
    kw_axes.set_ylabel("kW")
    kw_axes.set_ylim(bottom=0)
    kw_axes.grid(alpha=0.3)
    kw_axes.set_title("Load and capacity per substation (balancer's /status)")
    if series:
        kw_axes.legend(loc="best", fontsize="small", ncols=2)
    draw_load_percentage(percent_axes, samples, colours)
    percent_axes.set_title("Load as a share of capacity")
    percent_axes.legend(loc="best", fontsize="small")
    figure.suptitle(title)
    figure.savefig(path, dpi=DPI)


def write_latency_plot(results: Sequence[RequestResult], latency: Latency | None, title: str, path: Path) -> None:
    figure = Figure(figsize=(10, 5), layout="constrained")
    axes = figure.subplots()
    groups = {
        outcome: [r.latency_ms for r in results if r.outcome == outcome and r.answered and r.latency_ms is not None]
        for outcome in OUTCOME_COLOURS
    }
    present = {outcome: values for outcome, values in groups.items() if values}
    if latency is None or not present:
        _no_data(axes, "No request was answered.")
    else:
        axes.hist(
            list(present.values()),
            bins=40,
            stacked=True,
            color=[OUTCOME_COLOURS[outcome] for outcome in present],
            label=[f"{outcome} ({len(values)})" for outcome, values in present.items()],
        )
        marks = (("median", latency.median, "-"), ("p95", latency.p95, "--"), ("p99", latency.p99, ":"))
        for name, value, style in marks:
            axes.axvline(value, color="black", linestyle=style, linewidth=1.2, label=f"{name} {value:.1f} ms")
        axes.legend(fontsize="small")
    axes.set_xlabel("latency (ms), from sending the request to its answer")
    axes.set_ylabel("requests")
    axes.grid(alpha=0.3)
    axes.set_title(title)
    figure.savefig(path, dpi=DPI)


def write_comparison_plot(
    policies: Sequence[str],
    bars: dict[str, Sequence[float]],
    samples_by_policy: Sequence[Sequence[StatusSample]],
    title: str,
    path: Path,
) -> None:
    """Top row: one bar chart per figure; bottom row: load % over time under each policy."""
    figure = Figure(figsize=(max(12, 3.2 * len(policies)), 8.5), layout="constrained")
    top, bottom = figure.subfigures(2, 1, height_ratios=[1, 1.1])
    for axes, (label, values) in zip(top.subplots(1, len(bars)), bars.items()):
        axes.bar(policies, values, color=[f"C{i % 10}" for i in range(len(policies))])
        axes.set_title(label, fontsize="medium")
        axes.tick_params(axis="x", labelrotation=30, labelsize="small")
        axes.grid(axis="y", alpha=0.3)
        # All-zero bars (no rejection at all) would otherwise get an axis around zero.
        axes.set_ylim(bottom=0, top=max(1.0, max(values, default=0.0) * 1.15))
        for position, value in enumerate(values):
            axes.annotate(_bar_label(value), (position, value), ha="center", va="bottom", fontsize="small")
    names = sorted({reading.substation for run in samples_by_policy for s in run for reading in s.substations})
    colours = substation_colours(names)
    load_axes = bottom.subplots(1, len(policies), sharey=True, squeeze=False)[0]
    for axes, policy, samples in zip(load_axes, policies, samples_by_policy):
        draw_load_percentage(axes, samples, colours)
        axes.set_title(policy, fontsize="medium")
        if axes is not load_axes[0]:
            axes.set_ylabel("")
    load_axes[0].legend(loc="upper left", fontsize="x-small")
    bottom.suptitle("Load per substation over time", fontsize="medium")
    figure.suptitle(title)
    figure.savefig(path, dpi=DPI)


def _bar_label(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _no_data(axes: Axes, message: str) -> None:
    axes.text(0.5, 0.5, message, ha="center", va="center", transform=axes.transAxes, fontsize="large")
