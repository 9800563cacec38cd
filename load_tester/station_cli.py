"""Command line of the ``stations`` scenario: ``python -m load_tester --scenario stations --stations N``.

Simulated OCPP stations (``load_tester.stations``) connect to the charge point gateway,
their vehicles come and go on a seeded schedule, and the run is audited against what the
vehicles physically drew (``load_tester.station_run``). ``ADMIN_TOKEN`` is the operator
token of the gateway (to register the stations) and of the substations (``--derate-at``).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from pathlib import Path
from typing import Any

from load_tester.api import GridClient, StackError
from load_tester.config import Defaults
from load_tester.station_run import StationsScenario, console_text, run_scenario, write_results
from load_tester.stations import MAX_STATIONS, GatewayRefused, plan_stations, visits

SCENARIO = "stations"
DESCRIPTION = "simulated OCPP stations (--stations N) through the charge point gateway (needs ADMIN_TOKEN)"
DEFAULT_DURATION_SECONDS = 120.0
EXIT_PASSED, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "--scenario stations",
        "Vehicles arrive over the first half of --duration and stay from half of --session-duration to all of "
        "it; --seed, --output, --derate-at, --derate-for and --derate-substation (a URL) apply too.",
    )
    add = group.add_argument
    add("--stations", type=int, default=40, metavar="N", help=f"simulated stations, 1 to {MAX_STATIONS} (default: 40)")
    add("--gateway", default="ws://127.0.0.1:9000", metavar="URL",
        help="the gateway's OCPP endpoint, without the station id (default: %(default)s)")
    add("--gateway-api", default="http://127.0.0.1:9001", metavar="URL",
        help="the gateway's HTTP port, where the stations are registered (default: %(default)s)")
    add("--substations", metavar="URL,URL",
        help="the substations the stations are wired to (default: the ones the balancer lists)")
    add("--stations-file", type=Path, metavar="PATH",
        help="use the stations of the gateway's STATIONS_FILE (passwords included) instead of registering new ones")
    add("--response-time", type=float, default=1.0, metavar="SECONDS",
        help="how late the slowest vehicle follows its station's limit; the others take 20%% to 100%% of it "
             "(default: %(default)s)")
    add("--meter-interval", type=float, default=5.0, metavar="SECONDS",
        help="seconds between a station's meter values (default: %(default)s)")


def _usage(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(args: argparse.Namespace, defaults: Defaults) -> int:
    if not 1 <= args.stations <= MAX_STATIONS:
        return _usage(f"--stations must be from 1 to {MAX_STATIONS}, got {args.stations}")
    if not 0 <= args.response_time <= 60 or not 0.1 <= args.meter_interval <= 3600:
        return _usage("--response-time is 0 to 60 s and --meter-interval 0.1 to 3600 s")
    if not defaults.admin_token and args.stations_file is None:
        return _usage("the stations scenario registers its stations through the gateway's operator API: set "
                      "ADMIN_TOKEN to its operator token, or give the gateway's --stations-file.")
    if not defaults.admin_token and args.derate_at is not None:
        return _usage("--derate-at lowers a substation's limit (PUT /limit): set ADMIN_TOKEN to its operator token.")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
    duration = args.duration or DEFAULT_DURATION_SECONDS
    client = GridClient("http://127.0.0.1:9", args.balancer, admin_token=defaults.admin_token)
    try:
        arrive_within, stay = duration / 2, (args.session_duration / 2, args.session_duration)
        if args.stations_file is not None:
            try:
                document: Any = json.loads(args.stations_file.read_text())
                plans = visits(document["stations"][: args.stations], seed, arrive_within, stay)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                return _usage(f"--stations-file {args.stations_file} is not a gateway STATIONS_FILE "
                              '({"stations": [{"station_id", "substation_url", "max_current_a", "password"}, ...]}): '
                              f"{exc}")
        else:
            urls = [u.strip().rstrip("/") for u in args.substations.split(",")] if args.substations else [
                url for _, url in client.substations()]
            if not urls:
                return _usage("no substations: give --substations URL,URL or a --balancer that lists them")
            plans = plan_stations(args.stations, urls, seed, arrive_within, stay)
        derate_url = None
        if args.derate_at is not None:
            derate_url = args.derate_substation or plans[0].substation_url
        scenario = StationsScenario(
            plans=tuple(plans), gateway_ws=args.gateway.rstrip("/"), gateway_http=args.gateway_api.rstrip("/"),
            duration_seconds=duration, response_seconds=args.response_time,
            meter_interval_seconds=args.meter_interval, sample_hz=args.substation_sample_hz,
            register=args.stations_file is None, derate_url=derate_url, derate_at=args.derate_at or 0.0,
            derate_for=args.derate_for or duration / 4,
        )
        print(f"Stations scenario (seed {seed}): {len(plans)} stations at {scenario.gateway_ws}", file=sys.stderr)
        run = asyncio.run(run_scenario(scenario, client, defaults.admin_token))
    except (StackError, GatewayRefused) as exc:
        return _usage(str(exc))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        client.close()
    path = write_results(args.output, run)
    print(console_text(run))
    print(f"\nResults: {path}")
    return EXIT_PASSED if run.passed else EXIT_FAILED
