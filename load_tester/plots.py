"""The figures of the report, drawn with matplotlib's Agg renderer (no display needed).

``matplotlib.figure.Figure`` is used directly rather than pyplot: no global
state, nothing to close, safe to call from any thread.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from load_tester.energy import average_power_kw
from load_tester.records import (
    ADMITTED,
    FAILED,
    REJECTED,
    DerateRecord,
    RequestResult,
    StatusSample,
    SubstationSample,
)
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


def substation_series(samples: Sequence[SubstationSample]) -> dict[str, dict[str, list[float]]]:
    """Per substation, from its own GET /sessions: sample times, allocated kW, limit kW and allocated %."""
    series: dict[str, dict[str, list[float]]] = {}
    for sample in samples:
        line = series.setdefault(sample.substation, {"t": [], "load": [], "capacity": [], "percent": []})
        line["t"].append(sample.t)
        line["load"].append(sample.allocated_kw)
        line["capacity"].append(sample.limit_kw)
        line["percent"].append(sample.allocated_kw / sample.limit_kw * 100.0 if sample.limit_kw > 0 else 0.0)
    return series


# What the lower panels show: the substations' own allocations, or the balancer's view, which counts a
# new session's whole amount until its next poll (so it can pass 100 % while the allocations do not).
OWN_PERCENT_LABEL = "allocated (% of limit)"
BALANCER_PERCENT_LABEL = "balancer's load (% of capacity)"


def draw_load_percentage(
    axes: Axes, samples: Sequence[StatusSample], colours: dict[str, str],
    series: Mapping[str, Mapping[str, list[float]]] | None = None, label: str = BALANCER_PERCENT_LABEL,
) -> None:  # fmt: skip
    for name, line in sorted((load_series(samples) if series is None else series).items()):
        axes.step(line["t"], line["percent"], where="post", color=colours[name], label=name, linewidth=1.8)
    axes.axhline(100.0, color="black", linestyle="--", linewidth=1.2, label="capacity (100 %)")
    axes.set_ylabel(label)
    axes.set_xlabel("seconds since the run started")
    axes.set_ylim(bottom=0, top=max(110.0, axes.get_ylim()[1]))
    axes.grid(alpha=0.3)


def write_load_plot(
    samples: Sequence[StatusSample],
    title: str,
    path: Path,
    substation_samples: Sequence[SubstationSample] = (),
    derate: DerateRecord | None = None,
) -> None:
    """Load and limit per substation: from the substations' own samples when there are any (exact
    allocations), else from the balancer's status (its load is an estimate between two polls)."""
    figure = Figure(figsize=(10, 7), layout="constrained")
    kw_axes, percent_axes = figure.subplots(2, 1, sharex=True)
    own = bool(substation_samples)
    series = substation_series(substation_samples) if own else load_series(samples)
    colours = substation_colours(list(series))
    if not series:
        _no_data(kw_axes, "No status sample could be read from the balancer.")
    for name, line in sorted(series.items()):
        # A sample holds until the next one: steps, as the limit is drawn, so neither seems to lead the other.
        kw_axes.step(line["t"], line["load"], where="post", color=colours[name], label=f"{name} load", linewidth=1.8)
        kw_axes.step(
            line["t"], line["capacity"], where="post", color=colours[name], linestyle="--", alpha=0.7,
            label=f"{name} {'limit' if own else 'capacity'}",
        )
    kw_axes.set_ylabel("kW")
    kw_axes.set_ylim(bottom=0)
    kw_axes.grid(alpha=0.3)
    kw_axes.set_title(
        "Allocated power and limit per substation (substations' GET /sessions)" if own
        else "Load and capacity per substation (balancer's /status)"
    )  # fmt: skip
    if series:
        kw_axes.legend(loc="best", fontsize="small", ncols=2)
    draw_load_percentage(percent_axes, samples, colours, series, OWN_PERCENT_LABEL if own else BALANCER_PERCENT_LABEL)
    if derate is not None and derate.applied_offset is not None:
        end = derate.restored_offset if derate.restored_offset is not None else kw_axes.get_xlim()[1]
        for axes in (kw_axes, percent_axes):
            axes.axvspan(derate.applied_offset, end, color="grey", alpha=0.15, label=f"{derate.substation} derated")
        percent_axes.legend(loc="best", fontsize="small")
    percent_axes.set_title(
        "Allocated power as a share of the limit" if own
        else "Load as a share of capacity (balancer's view: a new session counts its whole amount until the next poll)"
    )  # fmt: skip
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
    substation_samples_by_policy: Sequence[Sequence[SubstationSample]] = (),
) -> None:
    """Top row: one bar chart per figure; bottom row: load % over time under each policy, from the
    substations' own samples when every run has them (allocated % of the limit), else the balancer's view."""
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
    own = len(substation_samples_by_policy) == len(policies) and all(substation_samples_by_policy)
    series_by_policy = (
        [substation_series(run) for run in substation_samples_by_policy] if own
        else [load_series(samples) for samples in samples_by_policy]
    )  # fmt: skip
    colours = substation_colours(sorted({name for series in series_by_policy for name in series}))
    load_axes = bottom.subplots(1, len(policies), sharey=True, squeeze=False)[0]
    for axes, policy, samples, series in zip(load_axes, policies, samples_by_policy, series_by_policy):
        draw_load_percentage(axes, samples, colours, series, OWN_PERCENT_LABEL if own else BALANCER_PERCENT_LABEL)
        axes.set_title(policy, fontsize="medium")
        if axes is not load_axes[0]:
            axes.set_ylabel("")
    load_axes[0].legend(loc="upper left", fontsize="x-small")
    bottom.suptitle(
        "Allocated power per substation over time" if own else "Load per substation over time (balancer's view)",
        fontsize="medium",
    )
    figure.suptitle(title)
    figure.savefig(path, dpi=DPI)


@dataclass(frozen=True)
class VehicleRun:
    """One run's vehicles for the per-vehicle plots: the records, and each served one's allocation history."""

    label: str
    results: Sequence[RequestResult]
    # Request index -> (seconds since the run started, kW) at every change of its allocation.
    histories: Mapping[int, Sequence[tuple[float, float]]]


# More lines than this in one panel are a grey blur: the plot draws an even selection of them.
MAX_VEHICLE_LINES = 200


def draw_vehicle_power(axes: Axes, run: VehicleRun) -> None:
    """Allocated kW of every served vehicle over time, one step line each."""
    histories = sorted(run.histories.items())
    if not histories:
        _no_data(axes, "No allocation history could be read.")
        return
    step = max(1, len(histories) // MAX_VEHICLE_LINES)
    amounts = {r.index: r.amount_kw for r in run.results}
    top = max(amounts.values(), default=1.0)
    cmap = colormaps["viridis"]
    for index, points in histories[::step]:
        times = [t for t, _ in points]
        kws = [kw for _, kw in points]
        axes.step(times, kws, where="post", linewidth=0.8, alpha=0.6, color=cmap(amounts.get(index, 0.0) / top))
    axes.set_xlabel("seconds since the run started")
    axes.set_ylabel("allocated kW")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)


def draw_delivered_vs_requested(axes: Axes, run: VehicleRun) -> None:
    served = [r for r in run.results if r.served and r.energy_kwh is not None]
    unserved = [r for r in run.results if not r.served]
    if not served and not unserved:
        _no_data(axes, "No vehicle.")
        return
    axes.scatter([r.energy_requested_kwh for r in served], [r.energy_kwh for r in served], s=12, alpha=0.7,
                 color="tab:blue", label=f"served ({len(served)})")  # fmt: skip
    if unserved:
        axes.scatter([r.energy_requested_kwh for r in unserved], [0.0] * len(unserved), s=12, marker="x",
                     color="tab:red", label=f"not served ({len(unserved)})")  # fmt: skip
    top = max((r.energy_requested_kwh for r in run.results), default=1.0)
    axes.plot([0, top], [0, top], color="black", linestyle="--", linewidth=1.0, label="delivered = requested")
    axes.set_xlabel("requested kWh (amount x session length)")
    axes.set_ylabel("delivered kWh")
    axes.set_xlim(left=0)
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="x-small", loc="upper left")


def draw_average_power(axes: Axes, run: VehicleRun) -> None:
    """How the vehicles' average power over their sessions is spread (unserved ones at 0)."""
    powers = [average_power_kw(r) if r.served else 0.0 for r in run.results]
    known = [p for p in powers if p is not None]
    if not known:
        _no_data(axes, "No delivered energy could be read.")
        return
    # From 0 to the largest amount: equal powers (fair sharing) stay a visible bar, not a sliver.
    top = max([r.amount_kw for r in run.results] + known)
    axes.hist(known, bins=30, range=(0.0, top), color="tab:green", alpha=0.8)
    axes.set_xlabel("average kW over the session (energy / session length)")
    axes.set_ylabel("vehicles")
    axes.grid(alpha=0.3)


def write_vehicle_plot(run: VehicleRun, path: Path) -> None:
    # A fixed layout: the constrained one costs more than all the drawing here.
    figure = Figure(figsize=(12, 8))
    grid = figure.add_gridspec(2, 2, left=0.07, right=0.98, bottom=0.07, top=0.9, hspace=0.35, wspace=0.2)
    power_axes = figure.add_subplot(grid[0, :])
    draw_vehicle_power(power_axes, run)
    power_axes.set_title("Allocated power per vehicle (colour: the vehicle's amount)", fontsize="medium")
    energy_axes, average_axes = figure.add_subplot(grid[1, 0]), figure.add_subplot(grid[1, 1])
    draw_delivered_vs_requested(energy_axes, run)
    energy_axes.set_title("Delivered against requested energy", fontsize="medium")
    draw_average_power(average_axes, run)
    average_axes.set_title("Average power per vehicle", fontsize="medium")
    figure.suptitle(run.label)
    figure.savefig(path, dpi=DPI)


def write_allocation_comparison_plot(runs: Sequence[VehicleRun], title: str, path: Path) -> None:
    """One column per policy: power per vehicle over time, delivered against requested, average power."""
    figure = Figure(figsize=(max(10, 5.5 * len(runs)), 12), layout="constrained")
    grid = figure.subplots(3, max(1, len(runs)), squeeze=False)
    for column, run in enumerate(runs):
        draw_vehicle_power(grid[0][column], run)
        draw_delivered_vs_requested(grid[1][column], run)
        draw_average_power(grid[2][column], run)
        grid[0][column].set_title(f"{run.label}: allocated kW per vehicle", fontsize="medium")
        grid[1][column].set_title(f"{run.label}: delivered vs requested kWh", fontsize="medium")
        grid[2][column].set_title(f"{run.label}: average kW per vehicle", fontsize="medium")
    # The same scales in every column, so the policies compare at a glance.
    for row in grid:
        top = max(axes.get_ylim()[1] for axes in row)
        right = max(axes.get_xlim()[1] for axes in row)
        for axes in row:
            axes.set_ylim(0, top)
            axes.set_xlim(0, right)
    figure.suptitle(title)
    figure.savefig(path, dpi=DPI)


def _bar_label(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _no_data(axes: Axes, message: str) -> None:
    axes.text(0.5, 0.5, message, ha="center", va="center", transform=axes.transAxes, fontsize="large")
