"""1,000 simulated OCPP stations on one gateway process: profile push after a limit cut, memory, idle CPU.

The stations are ``load_tester.stations`` (the ``ocpp`` package's client side, both OCPP
versions) in this process's event loop; the gateway and three substations are real
processes. 300 of the stations charge; then one substation's limit is halved through its
operator API, and the time from the cut (the substation's own limit history) to each
affected station holding a profile within its new allocation is measured.
"""
from __future__ import annotations

import asyncio
import os
import resource
import time
from dataclasses import replace
from pathlib import Path

from load_tester.api import GridClient
from load_tester.station_audit import StationTrace, percentile, push_latencies
from load_tester.station_run import read_histories
from load_tester.stations import RunOptions, SimulatedStation, StationPlan, plan_stations, register_stations
from tests.harness import OPERATOR_TOKEN, Service, start_all, stop_all
from tests.ocpp_support import Gateway

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STATIONS = 1_000
CHARGING = 300
IDLE_CPU_SECONDS = 10.0
# Every phase of the benchmark gives up after this long.
PHASE_TIMEOUT_SECONDS = 240.0
# The profiles are settled when none has arrived for this long.
QUIET_SECONDS = 3.0
NEVER = 1e9  # an arrival time past any run: the station stays connected without a vehicle
GATEWAY_ENV = {
    "MAX_CONNECTIONS_PER_ADDRESS": str(STATIONS + 100),
    # On a busy machine a handshake waits its turn for the password check longer than the default 10 s.
    "OPEN_TIMEOUT_SECONDS": "60",
    "MIN_PROFILE_INTERVAL_SECONDS": "1",
    "VEHICLE_RESPONSE_SECONDS": "1",
    "WATCH_WAIT_SECONDS": "10",
    "LOG_LEVEL": "warning",
}


def raise_open_files(needed: int) -> None:
    """Both ends of every connection live on this machine: lift the soft limit of open files (inherited by
    the gateway) as far as the hard limit allows, and say so when it is not enough."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    if wanted < needed:
        raise SystemExit(f"the open-file limit is {hard}; {needed} are needed for {STATIONS} stations: "
                         "raise it (ulimit -Hn) and run the benchmark again")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def _wait(condition, what: str, timeout: float = PHASE_TIMEOUT_SECONDS) -> None:  # noqa: ANN001 - a predicate
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(0.2)


def _last_profile_at(stations: list[SimulatedStation]) -> float:
    return max((r.at for s in stations for r in s.outcome.model.received), default=0.0)


async def _scenario(gw: Gateway, subs: list[Service], plans: list[StationPlan]) -> None:
    assert gw.process is not None
    pid = gw.process.pid
    started = time.perf_counter()
    await register_stations(gw.http, OPERATOR_TOKEN, plans)
    print(f"  registered {len(plans)} stations in {time.perf_counter() - started:.1f} s")
    idle_kib = rss_kib(pid)
    run_start = time.time()
    stop = asyncio.Event()
    # The gateway checks passwords two at a time (scrypt): more handshakes at once only wait there.
    connects = asyncio.Semaphore(4)
    options = RunOptions(f"ws://127.0.0.1:{gw.ocpp_port}", response_seconds=1.0, meter_interval_seconds=30.0)
    stations = [SimulatedStation(plan, options, run_start, connects) for plan in plans]
    tasks: list[asyncio.Task] = []
    half_kib = 0
    try:
        started = time.perf_counter()
        # In two halves: the second half's growth is what one more station costs, without what the
        # first connections cost once (the password checks' scrypt buffers kept by the allocator).
        for part in (stations[: len(stations) // 2], stations[len(stations) // 2:]):
            tasks += [asyncio.create_task(s.run(stop)) for s in part]
            await _wait(lambda: all(s.outcome.booted or s.outcome.errors for s in part), "every station booted")
            failed = [s.outcome for s in part if s.outcome.error_count]
            if failed:
                raise RuntimeError(f"{len(failed)} stations failed, e.g. {failed[0].plan.station_id}: "
                                   f"{failed[0].errors}")
            await _wait(lambda: time.time() - _last_profile_at(stations) > QUIET_SECONDS, "fallback profiles settled")
            half_kib = half_kib or rss_kib(pid)
        print(f"  {len(stations)} stations connected and booted in {time.perf_counter() - started:.1f} s")
        connected_kib = rss_kib(pid)
        before = cpu_seconds(pid)
        await asyncio.sleep(IDLE_CPU_SECONDS)
        idle_cpu = cpu_seconds(pid) - before
        print(f"  gateway memory: {idle_kib / 1024:.1f} MiB with 0 connected, {connected_kib / 1024:.1f} MiB with "
              f"{len(stations)} -> {(connected_kib - idle_kib) / len(stations):.1f} KiB per connected station; "
              f"the second {len(stations) - len(stations) // 2} alone: "
              f"{(connected_kib - half_kib) / (len(stations) - len(stations) // 2):.1f} KiB each")
        print(f"  idle gateway with {len(stations)} connections: {idle_cpu:.2f} CPU s over {IDLE_CPU_SECONDS:g} s "
              f"({100 * idle_cpu / IDLE_CPU_SECONDS:.1f}% of one core)")

        charging = [s for s in stations if s.plan.arrive_at < NEVER]
        await _wait(lambda: all(s.outcome.started or s.outcome.errors for s in charging), "every vehicle started")
        await _wait(lambda: all(any(r.purpose == "TxProfile" for r in s.outcome.model.received) for s in charging)
                    and time.time() - _last_profile_at(stations) > QUIET_SECONDS, "the allocations settled")
        cut = subs[0]
        client = GridClient("http://127.0.0.1:9", "http://127.0.0.1:9", admin_token=OPERATOR_TOKEN)
        try:
            limit = (await asyncio.to_thread(client.substation_limit, cut.url))["limit_kw"]
            await asyncio.to_thread(client.set_substation_limit, cut.url, limit / 2)
            await asyncio.sleep(5.0)  # every decrease has had its time to arrive
            end = time.time()
            history = (await asyncio.to_thread(read_histories, client, [cut.url]))[cut.url]
        finally:
            client.close()
        drop_at = max(at for at, _ in history.limits)
        latencies, missing = [], 0
        for s in charging:
            if s.plan.substation_url != cut.url:
                continue
            trace = StationTrace(s.plan.station_id, cut.url, s.plan.id_tag, s.outcome.model)
            found, unmatched = push_latencies(trace, history.allocations.get(s.plan.id_tag, ()), end)
            latencies += [seconds for at, seconds in found if abs(at - drop_at) < 1e-3]
            missing += sum(1 for at in unmatched if abs(at - drop_at) < 1e-3)
        if not latencies:
            raise RuntimeError("halving the limit cut no station's profile: the substation was not loaded")
        p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
        print(f"  limit of {cut.name} halved ({limit:g} -> {limit / 2:g} kW): {len(latencies)} stations cut, "
              f"new profile after p50 {p50:.3f} s, p99 {p99:.3f} s, max {max(latencies):.3f} s"
              + (f" ({missing} never got one)" if missing else ""))
        print(f"  floor: p99 at most 1 s -> {p99:.3f} s")
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), PHASE_TIMEOUT_SECONDS)


def stations_at_scale(log_dir: Path) -> None:
    print(f"\n## {STATIONS} OCPP stations on one gateway process ({CHARGING} charging on 3 substations)")
    raise_open_files(4 * STATIONS + 1024)
    # Each substation's limit binds: its 100 vehicles could draw up to 2.2 MW.
    subs = [Service(name=f"substation-{n}", app="substation_service:create_app()", log_dir=log_dir, env={
        "SUBSTATION_ID": f"substation-{n}", "CAPACITY_KW": "900", "ADMIN_TOKEN": OPERATOR_TOKEN,
    }) for n in (1, 2, 3)]
    start_all(subs)
    gw = Gateway(log_dir / "gateway", env=GATEWAY_ENV)
    try:
        gw.start()
        plans = plan_stations(STATIONS, [s.url for s in subs], seed=5, arrive_within=20.0, stay_range=(3600, 3600))
        plans = [p if index < CHARGING else replace(p, arrive_at=NEVER) for index, p in enumerate(plans)]
        asyncio.run(_scenario(gw, subs, plans))
    finally:
        gw.stop()
        stop_all(subs)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sglb-bench-stations-") as tmp:
        stations_at_scale(Path(tmp))
