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
from load_tester.compare import POLICIES, compare_policies
from load_tester.config import Defaults
from load_tester.report import (
    COMPARISON_HEADER,
    COMPARISON_REPORT,
    REPORT_FILE,
    RunReport,
    assemble,
    comparison_rows,
    console_text,
    text_table,
    write_comparison,
    write_run,
)
from load_tester.runner import GRACE_SECONDS, run_load
from load_tester.scenarios import (
    MAX_AMOUNT_KW,
    MAX_REQUESTS,
    MAX_SESSION_SECONDS,
    SCENARIOS,
    LoadPlan,
    PlannedRequest,
    generate_requests,
)
from load_tester.verdict import Limits

EXIT_PASSED, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
CONNECT_TIMEOUT_SECONDS = 2.0
EXIT_STATUS_HELP = f"""\
exit status:
  {EXIT_PASSED}    passed
  {EXIT_FAILED}    the error rate went above --max-error-rate, the rejection rate above
       --max-rejection-rate, a substation carried more than its capacity, or
       requests were still unanswered at the time limit (--duration +
       --timeout + {CONNECT_TIMEOUT_SECONDS + GRACE_SECONDS:g} s)
  {EXIT_USAGE}    bad options, or the stack cannot be reached
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); the results so far are written

error rate: share of requests that failed (any answer but 201 or a capacity
rejection, a timeout, a connection error) or were not sent. rejection rate:
share rejected for capacity (503 no_capacity): the grid protecting itself."""


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


def build_parser(defaults: Defaults) -> argparse.ArgumentParser:
    scenarios = "\n".join(f"  {s.name:<10} {s.description}" for s in SCENARIOS.values())
    parser = argparse.ArgumentParser(
        prog="python -m load_tester",
        description="Send charge requests to the Smart Grid Load Balancer and report what the grid did with them.",
        epilog=f"scenarios (options given explicitly override the scenario's):\n{scenarios}\n\n{EXIT_STATUS_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--scenario", choices=sorted(SCENARIOS), default="rush-hour", help="named preset (default: rush-hour)")
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
    add("--observe", type=_bounded(float, 0, 3600), default=0.0, metavar="SECONDS",
        help="keep sampling the balancer this long after the last answer, e.g. to see sessions end (default: 0)")
    add("--sample-interval", type=_bounded(float, 0.05, 60), default=0.5, metavar="SECONDS",
        help="seconds between status samples (default: %(default)s)")
    add("--timeout", type=_bounded(float, 0, 120, low_inclusive=False), default=10.0, metavar="SECONDS",
        help="seconds to wait for each answer (default: %(default)s)")
    add("--no-progress", action="store_true", help="no progress bar")
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
    return LoadPlan(
        scenario=scenario.name,
        requests=_pick(args.requests, scenario.requests),
        concurrency=_pick(args.concurrency, scenario.concurrency),
        ramp_up_seconds=_pick(args.ramp_up, scenario.ramp_up_seconds),
        duration_seconds=_pick(args.duration, scenario.duration_seconds),
        amount_min_kw=low,
        amount_max_kw=high,
        session_seconds=args.session_duration,
        seed=args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000),
        arrival_rate=None if scenario.arrival_rate is None else _pick(args.rate, scenario.arrival_rate),
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
    }


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
    plan = resolve_plan(parser, args)
    client = GridClient(
        args.target, args.balancer, admin_token=defaults.admin_token,
        connect_timeout=CONNECT_TIMEOUT_SECONDS, read_timeout=args.timeout, pool_size=plan.concurrency,
    )
    try:
        if args.compare_policies and not defaults.admin_token:
            raise CannotStart("--compare-policies switches the balancer's policy: set ADMIN_TOKEN to its admin token.")
        _writable(args.output)
        client.check_reachable("charge request service", client.target, "--target")
        if args.compare_policies:
            return _compare(client, plan, args)
        return _single_run(client, plan, args)
    except (CannotStart, StackError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        client.close()


def _run(
    client: GridClient,
    plan: LoadPlan,
    planned: Sequence[PlannedRequest],
    args: argparse.Namespace,
    settings: dict[str, Any],
    title: str,
    folder: Path,
) -> RunReport:
    data = run_load(
        client, plan, planned, sample_interval=args.sample_interval,
        label=title, observe_seconds=args.observe, progress=not args.no_progress,
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
    title = f"Load test: {plan.scenario} (seed {plan.seed})"
    planned = generate_requests(plan)
    report = _run(client, plan, planned, args, run_settings(plan, planned, args), title, args.output)
    print(console_text(report))
    print(f"\nReport: {args.output / REPORT_FILE}")
    if report.data.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_PASSED if report.verdict.passed else EXIT_FAILED


def _compare(client: GridClient, plan: LoadPlan, args: argparse.Namespace) -> int:
    client.check_reachable("balancer", client.balancer, "--balancer")
    planned = generate_requests(plan)
    settings = run_settings(plan, planned, args)

    def run_one(policy: str) -> RunReport:
        title = f"Load test: {plan.scenario} (seed {plan.seed}) under {policy}"
        return _run(client, plan, planned, args, {**settings, "policy": policy}, title, args.output / policy)

    comparison = compare_policies(client, args.policies, run_one)
    reports = comparison.reports
    if not reports:
        print("interrupted before the first policy's run was written: nothing to compare", file=sys.stderr)
        return EXIT_INTERRUPTED
    title = f"Routing policies compared: {plan.scenario} (seed {plan.seed})"
    write_comparison(args.output, title, reports)
    print(title)
    print(text_table(COMPARISON_HEADER, comparison_rows(reports)))
    for report in reports:
        for line in report.verdict.problems:
            print(f"PROBLEM ({report.settings['policy']}): {line}")
    print(f"\nReport: {args.output / COMPARISON_REPORT}")
    if comparison.interrupted:
        print(f"interrupted: the comparison covers {len(reports)} policy run(s)", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_PASSED if all(report.verdict.passed for report in reports) else EXIT_FAILED
