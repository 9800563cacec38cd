"""Command line of the load tester: ``python -m load_tester --help``.

Exit codes: see EXIT_STATUS_HELP (also at the end of --help).
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from load_tester.api import GridClient, StackError
from load_tester import station_cli
from load_tester.compare import ALLOCATION_POLICIES, POLICIES, AllocationSwitch, compare_policies
from load_tester.config import Defaults
from load_tester.report import (
    ALLOCATION_HEADER,
    COMPARISON_REPORT,
    REPORT_FILE,
    RunReport,
    allocation_rows,
    assemble,
    comparison_header,
    comparison_rows,
    console_text,
    text_table,
    write_allocation_comparison,
    write_comparison,
    write_run,
)
from load_tester.runner import GRACE_SECONDS, Watching, run_load
from load_tester.scenarios import (
    DEFAULT_COMPRESSION,
    MAX_AMOUNT_KW,
    MAX_REQUESTS,
    MAX_SESSION_SECONDS,
    SCENARIOS,
    WORKPLACE_DAY,
    DeratePlan,
    LoadPlan,
    PlannedRequest,
    default_derate,
    generate_requests,
)
from load_tester.substations import choose_derated
from load_tester.verdict import Limits
from load_tester.workplace_day import DAY_SECONDS, MAX_SESSIONS

EXIT_PASSED, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
CONNECT_TIMEOUT_SECONDS = 2.0
EXIT_STATUS_HELP = f"""\
exit status:
  {EXIT_PASSED}    passed
  {EXIT_FAILED}    the error rate went above --max-error-rate, the rejection rate above
       --max-rejection-rate, a substation allocated more than its limit (in
       its sessions' allocation histories or in a sample of its sessions),
       the derate could not be done or undone, or requests were still
       unanswered at the time limit (--duration + --timeout +
       {CONNECT_TIMEOUT_SECONDS + GRACE_SECONDS:g} s)
  {EXIT_USAGE}    bad options, or the stack cannot be reached
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); the results so far are written

error rate: share of requests that failed (any answer but 201, 202 or a
capacity rejection, a timeout, a connection error) or were not sent.
rejection rate: share rejected for capacity (503 no_capacity or queue_full, or
queued and never started): the grid protecting itself.

A run ends when the sessions it started have ended (at most one
--session-duration after the last one started), so each vehicle's delivered
energy is final; Ctrl-C cuts that wait short."""


class CannotStart(RuntimeError):
    """The run cannot start as configured; the message says what to change."""


def _bounded(
    cast: Callable[[str], Any], low: float, high: float, *, low_inclusive: bool = True
) -> Callable[[str], Any]:
    """An argparse type: a number in [low, high] (or (low, high])."""

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if cast is int else ''}number") from None
        too_low = value < low if low_inclusive else value <= low
        if too_low or value > high or math.isnan(value):
            bracket = "[" if low_inclusive else "("
            raise argparse.ArgumentTypeError(f"{text} is outside the allowed range {bracket}{low:g}, {high:g}]")
        return value

    return parse


def _policy_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"name at least one policy, e.g. {','.join(POLICIES[:2])}")
    return names


def _allocation_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"name at least one allocation policy, e.g. {','.join(ALLOCATION_POLICIES)}")
    return names


def build_parser(defaults: Defaults) -> argparse.ArgumentParser:
    scenarios = "\n".join(f"  {s.name:<13} {s.description}" for s in SCENARIOS.values())
    scenarios += f"\n  {station_cli.SCENARIO:<13} {station_cli.DESCRIPTION}"
    parser = argparse.ArgumentParser(
        prog="python -m load_tester",
        description="Send charge requests to the Smart Grid Load Balancer and report what the grid did with them.",
        epilog=f"scenarios (options given explicitly override the scenario's):\n{scenarios}\n\n{EXIT_STATUS_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--scenario", choices=sorted([*SCENARIOS, station_cli.SCENARIO]), default="rush-hour",
        help="named preset (default: rush-hour)")
    add("--target", default=defaults.target_url, metavar="URL",
        help="charge request service URL (default: %(default)s)")
    add("--balancer", default=defaults.balancer_url, metavar="URL",
        help="balancer URL, sampled for load (default: %(default)s)")
    add("--requests", type=_bounded(int, 1, MAX_REQUESTS), metavar="N",
        help="number of requests (sustained: at most this many)")
    add("--concurrency", type=_bounded(int, 1, 1000), metavar="N", help="requests in flight at most")
    add("--ramp-up", type=_bounded(float, 0, 3600), metavar="SECONDS",
        help="seconds over which request starts are spread")
    add("--duration", type=_bounded(float, 0, 86400, low_inclusive=False), metavar="SECONDS",
        help="time limit: nothing is sent after it (sustained: how long arrivals last)")
    add("--rate", type=_bounded(float, 0, 1000, low_inclusive=False), metavar="PER_SECOND",
        help="sustained only: mean arrivals per second (default: 2)")
    add("--amount-range", nargs=2, type=_bounded(float, 0, MAX_AMOUNT_KW, low_inclusive=False), default=(5.0, 20.0),
        metavar=("MIN_KW", "MAX_KW"), help="kW asked per request, drawn uniformly (default: 5 20)")
    add("--session-duration", type=_bounded(float, 0, MAX_SESSION_SECONDS, low_inclusive=False), default=60.0,
        metavar="SECONDS", help="seconds each charging session lasts (default: %(default)s)")
    add("--seed", type=_bounded(int, 0, 2**32 - 1), metavar="N",
        help="random seed: the same seed sends the same requests")
    add("--output", type=Path, default=Path(defaults.output_dir), metavar="DIR",
        help="output folder (default: %(default)s)")
    add("--max-error-rate", type=_bounded(float, 0, 1), default=Limits.max_error_rate, metavar="FRACTION",
        help="highest share of requests failed or not sent for exit code 0 (default: %(default)g)")
    add("--max-rejection-rate", type=_bounded(float, 0, 1), default=Limits.max_rejection_rate, metavar="FRACTION",
        help="highest share of requests rejected for capacity for exit code 0; "
             "0 demands every EV admitted (default: %(default)g, rejections allowed)")
    add("--compare-policies", action="store_true",
        help="run the same seeded scenario under each routing policy (needs ADMIN_TOKEN) and compare")
    add("--policies", type=_policy_list, metavar="LIST",
        help="with --compare-policies: which ones, comma-separated (default: every one the balancer offers)")
    add("--compare-allocation", nargs="?", const=(), type=_allocation_list, metavar="LIST",
        help="run the same seeded scenario under each allocation policy of the substations, comma-separated "
             f"(e.g. {','.join(ALLOCATION_POLICIES)}; alone: every one they offer), switched through their "
             "PUT /allocation-policy (needs ADMIN_TOKEN), and compare power and energy per vehicle")
    add("--wait", action="store_true",
        help='send "wait": true: with no room on the grid a request waits in the charge API\'s queue (202) '
             "and is followed until it starts, expires or the time limit comes")
    add("--substation-sample-hz", type=_bounded(float, 0, 100, low_inclusive=False), default=20.0, metavar="HZ",
        help="how many times a second each substation's sessions are read during the run, to check that "
             "their allocations never add up to more than its limit (default: %(default)g)")
    add("--derate-at", type=_bounded(float, 0, 86400), metavar="SECONDS",
        help=f"--scenario derate (or {WORKPLACE_DAY}, to halve a limit during the day): seconds into the run at "
             "which the limit is halved (default: a quarter of --session-duration, or of the compressed day)")
    add("--derate-for", type=_bounded(float, 0, 86400, low_inclusive=False), metavar="SECONDS",
        help="--scenario derate: how long it stays halved before DELETE /limit restores it "
             "(default: a quarter of --session-duration)")
    add("--derate-substation", metavar="ID",
        help="--scenario derate: the substation derated (default: the one with the highest limit then)")
    add("--compression", type=_bounded(float, 1, 86400), metavar="FACTOR",
        help=f"--scenario {WORKPLACE_DAY}: how many times faster than real time the day is played; energies "
             f"shrink alike, powers stay (default: {DEFAULT_COMPRESSION:g}, a day in "
             f"{DAY_SECONDS / DEFAULT_COMPRESSION:g} s). --requests is the number of vehicles that day")
    add("--observe", type=_bounded(float, 0, 3600), default=0.0, metavar="SECONDS",
        help="keep sampling this long after the run's sessions ended, e.g. to see the grid settle (default: 0)")
    add("--sample-interval", type=_bounded(float, 0.05, 60), default=0.5, metavar="SECONDS",
        help="seconds between status samples (default: %(default)s)")
    add("--timeout", type=_bounded(float, 0, 120, low_inclusive=False), default=10.0, metavar="SECONDS",
        help="seconds to wait for each answer (default: %(default)s)")
    add("--no-progress", action="store_true", help="no progress bar")
    station_cli.add_options(parser)
    return parser


def resolve_plan(parser: argparse.ArgumentParser, args: argparse.Namespace) -> LoadPlan:
    scenario = SCENARIOS[args.scenario]
    low, high = args.amount_range
    if low > high:
        parser.error(f"--amount-range: the minimum {low:g} is above the maximum {high:g}")
    if scenario.arrival_rate is None and args.rate is not None:
        parser.error("--rate applies only to --scenario sustained (the open-loop one)")
    if scenario.arrival_rate is not None and args.ramp_up is not None:
        parser.error("--ramp-up does not apply to --scenario sustained: arrivals follow --rate from the start")
    if args.policies is not None and not args.compare_policies:
        parser.error("--policies chooses the policies of --compare-policies: add --compare-policies, or drop it")
    if args.compare_policies and args.compare_allocation is not None:
        parser.error("--compare-policies and --compare-allocation each run the scenario once per policy: "
                     "choose one of them")  # fmt: skip
    workplace = scenario.workplace
    if args.compression is not None and not workplace:
        parser.error(f"--compression applies only to --scenario {WORKPLACE_DAY}: add it, or drop the option")
    if workplace and args.requests is not None and args.requests > MAX_SESSIONS:
        parser.error(f"--requests: a {WORKPLACE_DAY} has at most {MAX_SESSIONS} vehicles")
    compression = _pick(args.compression, DEFAULT_COMPRESSION) if workplace else None
    derate_options = [
        name for name in ("derate_at", "derate_for", "derate_substation") if getattr(args, name) is not None
    ]
    if derate_options and not (scenario.derate or workplace):
        parser.error(
            f"--{derate_options[0].replace('_', '-')} applies only to --scenario derate (or {WORKPLACE_DAY}, "
            "where it halves a limit during the day): add it, or drop the option"
        )
    return LoadPlan(
        scenario=scenario.name,
        requests=_pick(args.requests, scenario.requests),
        concurrency=_pick(args.concurrency, scenario.concurrency),
        ramp_up_seconds=_pick(args.ramp_up, scenario.ramp_up_seconds),
        # A workplace day is over when its last vehicle has arrived: a day, compressed.
        duration_seconds=_pick(args.duration, DAY_SECONDS / compression if compression else scenario.duration_seconds),
        amount_min_kw=low,
        amount_max_kw=high,
        # No stay of a workplace day is longer than the day itself.
        session_seconds=DAY_SECONDS / compression if compression else args.session_duration,
        seed=args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000),
        arrival_rate=None if scenario.arrival_rate is None else _pick(args.rate, scenario.arrival_rate),
        wait=args.wait,
        derate=(_derate_plan(args, DAY_SECONDS / compression if compression else None)
                if scenario.derate or (workplace and derate_options) else None),
        compression=compression,
    )


def _derate_plan(args: argparse.Namespace, session_seconds: float | None = None) -> DeratePlan:
    at, length = default_derate(session_seconds or args.session_duration)
    return DeratePlan(
        at_seconds=_pick(args.derate_at, at),
        for_seconds=_pick(args.derate_for, length),
        substation=args.derate_substation,
    )


def _pick(given: Any, preset: Any) -> Any:
    return preset if given is None else given


def run_settings(plan: LoadPlan, planned: Sequence[PlannedRequest], args: argparse.Namespace) -> dict[str, Any]:
    return {
        "scenario": plan.scenario,
        "target": args.target,
        "balancer": args.balancer,
        # Open loop: the arrivals drawn for the duration; --requests only caps them.
        "requests": len(planned),
        "max_requests": plan.requests if plan.open_loop else None,
        "concurrency": plan.concurrency,
        "ramp_up_seconds": plan.ramp_up_seconds,
        "duration_seconds": plan.duration_seconds,
        "arrival_rate": plan.arrival_rate,
        "amount_range_kw": [plan.amount_min_kw, plan.amount_max_kw],
        "session_seconds": plan.session_seconds,
        "seed": plan.seed,
        "max_error_rate": args.max_error_rate,
        "max_rejection_rate": args.max_rejection_rate,
        "sample_interval_seconds": args.sample_interval,
        "observe_seconds": args.observe,
        "timeout_seconds": args.timeout,
        "wait": plan.wait,
        "substation_sample_hz": args.substation_sample_hz,
        "compression": plan.compression,
        "need_met_within_kwh": plan.need_met_within_kwh,
        "derate": None if plan.derate is None else {
            "at_seconds": plan.derate.at_seconds, "for_seconds": plan.derate.for_seconds,
            "substation": plan.derate.substation, "factor": plan.derate.factor,
        },
    }  # fmt: skip


def _writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CannotStart(
            f"cannot create the output folder {folder}: {exc.strerror}. Choose another with --output."
        ) from exc
    if not os.access(folder, os.W_OK):
        raise CannotStart(
            f"cannot write to the output folder {folder} (running as uid {os.getuid()}). "
            "Make it writable for this user or choose another with --output."
        )


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    defaults = Defaults.from_env(os.environ if environ is None else environ)
    parser = build_parser(defaults)
    args = parser.parse_args(argv)
    if args.scenario == station_cli.SCENARIO:
        return station_cli.main(args, defaults)
    plan = resolve_plan(parser, args)
    client = GridClient(
        args.target, args.balancer, admin_token=defaults.admin_token,
        connect_timeout=CONNECT_TIMEOUT_SECONDS, read_timeout=args.timeout, pool_size=plan.concurrency,
    )
    try:
        if args.compare_policies and not defaults.admin_token:
            raise CannotStart("--compare-policies switches the balancer's policy: set ADMIN_TOKEN to its admin token.")
        if args.compare_allocation is not None and not defaults.admin_token:
            raise CannotStart(
                "--compare-allocation switches the substations' allocation policy: set ADMIN_TOKEN to their "
                "operator token."
            )
        if plan.derate is not None and not defaults.admin_token:
            raise CannotStart(
                "--scenario derate lowers a substation's limit (PUT /limit): set ADMIN_TOKEN to the substations' "
                "operator token."
            )
        _writable(args.output)
        client.check_reachable("charge request service", client.target, "--target")
        if args.compare_policies:
            return _compare(client, plan, args)
        if args.compare_allocation is not None:
            return _compare_allocation(client, plan, args)
        return _single_run(client, plan, args)
    except (CannotStart, StackError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        client.close()


def _substations(client: GridClient, plan: LoadPlan) -> list[tuple[str, str]]:
    """The substations the balancer lists; without them the capacity checks cannot run (a warning)."""
    try:
        substations = client.substations()
    except StackError as exc:
        substations, reason = [], str(exc)
    else:
        reason = "the balancer lists none"
    if not substations:
        if plan.derate is not None:
            raise CannotStart(f"--scenario derate needs the substations' URLs from the balancer: {reason}.")
        print(
            f"warning: cannot find the substations ({reason}). The run goes on without the capacity checks and "
            "the energy figures.",
            file=sys.stderr,
        )
    elif plan.derate is not None and plan.derate.substation is not None:
        try:
            choose_derated(client, substations, plan.derate.substation)
        except StackError as exc:
            raise CannotStart(str(exc)) from None
    return substations


def _allocation_policy(client: GridClient, substations: Sequence[tuple[str, str]]) -> str | None:
    """The substations' allocation policy for the report: one name, "mixed (...)", or None if unknown."""
    policies = {}
    for name, url in substations:
        try:
            policies[name] = client.allocation_policy(url)[0]
        except StackError:
            return None
    if not policies:
        return None
    if len(set(policies.values())) == 1:
        return next(iter(policies.values()))
    return "mixed (" + ", ".join(f"{name}: {policy}" for name, policy in sorted(policies.items())) + ")"


def _run(
    client: GridClient,
    plan: LoadPlan,
    planned: Sequence[PlannedRequest],
    args: argparse.Namespace,
    settings: dict[str, Any],
    title: str,
    folder: Path,
    substations: Sequence[tuple[str, str]],
) -> RunReport:
    if "allocation_policy" not in settings:
        settings = {**settings, "allocation_policy": _allocation_policy(client, substations)}
    data = run_load(
        client, plan, planned, sample_interval=args.sample_interval,
        label=title, observe_seconds=args.observe, progress=not args.no_progress,
        watching=Watching(substations=substations, substation_hz=args.substation_sample_hz),
    )
    limits = Limits(max_error_rate=args.max_error_rate, max_rejection_rate=args.max_rejection_rate)
    report = assemble(title, settings, data, limits, plan.open_loop)
    write_run(folder, report)
    return report


def _single_run(client: GridClient, plan: LoadPlan, args: argparse.Namespace) -> int:
    try:
        client.check_reachable("balancer", client.balancer, "--balancer")
    except StackError as exc:
        print(f"warning: {exc} The run goes on without load samples.", file=sys.stderr)
    substations = _substations(client, plan)
    title = f"Load test: {plan.scenario} (seed {plan.seed})"
    planned = generate_requests(plan)
    report = _run(client, plan, planned, args, run_settings(plan, planned, args), title, args.output, substations)
    print(console_text(report))
    print(f"\nReport: {args.output / REPORT_FILE}")
    if report.data.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_PASSED if report.verdict.passed else EXIT_FAILED


def _compare(client: GridClient, plan: LoadPlan, args: argparse.Namespace) -> int:
    client.check_reachable("balancer", client.balancer, "--balancer")
    substations = _substations(client, plan)
    planned = generate_requests(plan)
    settings = run_settings(plan, planned, args)

    def run_one(policy: str) -> RunReport:
        title = f"Load test: {plan.scenario} (seed {plan.seed}) under {policy}"
        return _run(
            client, plan, planned, args, {**settings, "policy": policy}, title, args.output / policy, substations
        )

    comparison = compare_policies(client, args.policies, run_one)
    reports = comparison.reports
    if not reports:
        print("interrupted before the first policy's run was written: nothing to compare", file=sys.stderr)
        return EXIT_INTERRUPTED
    title = f"Routing policies compared: {plan.scenario} (seed {plan.seed})"
    write_comparison(args.output, title, reports)
    print(title)
    print(text_table(comparison_header(reports), comparison_rows(reports)))
    for report in reports:
        for line in report.verdict.problems:
            print(f"PROBLEM ({report.settings['policy']}): {line}")
    print(f"\nReport: {args.output / COMPARISON_REPORT}")
    if comparison.interrupted:
        print(f"interrupted: the comparison covers {len(reports)} policy run(s)", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_PASSED if all(report.verdict.passed for report in reports) else EXIT_FAILED


def _compare_allocation(client: GridClient, plan: LoadPlan, args: argparse.Namespace) -> int:
    client.check_reachable("balancer", client.balancer, "--balancer")
    substations = _substations(client, plan)
    planned = generate_requests(plan)
    settings = run_settings(plan, planned, args)
    switch = AllocationSwitch(client, substations)

    def run_one(policy: str) -> RunReport:
        title = f"Load test: {plan.scenario} (seed {plan.seed}) under allocation {policy}"
        return _run(
            client, plan, planned, args, {**settings, "allocation_policy": policy}, title, args.output / policy,
            substations,
        )  # fmt: skip

    requested = args.compare_allocation or None
    comparison = compare_policies(client, requested, run_one, switch=switch, known=ALLOCATION_POLICIES)
    reports = comparison.reports
    if not reports:
        print("interrupted before the first policy's run was written: nothing to compare", file=sys.stderr)
        return EXIT_INTERRUPTED
    title = f"Allocation policies compared: {plan.scenario} (seed {plan.seed})"
    write_allocation_comparison(args.output, title, reports)
    print(title)
    print(text_table(ALLOCATION_HEADER, allocation_rows(reports)))
    for report in reports:
        for line in report.verdict.problems:
            print(f"PROBLEM ({report.allocation_policy}): {line}")
    print(f"\nReport: {args.output / COMPARISON_REPORT}")
    if comparison.interrupted:
        print(f"interrupted: the comparison covers {len(reports)} policy run(s)", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_PASSED if all(report.verdict.passed for report in reports) else EXIT_FAILED
