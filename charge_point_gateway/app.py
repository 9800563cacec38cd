"""Start the gateway: state file, deployment file, the OCPP port and the HTTP port in one event loop."""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import resource
import signal
from pathlib import Path

import aiohttp
from aiohttp import web
from ocpp.exceptions import OCPPError

from gridcommon.logs import configure_logging
from gridcommon.settings import SettingsError
from gridcommon.sqlitestate import StateFileError
from charge_point_gateway.config import Settings
from charge_point_gateway.gateway import Gateway
from charge_point_gateway.http_api import create_http_app
from charge_point_gateway.metrics import GatewayMetrics
from charge_point_gateway.registry import StationSpecError, parse_deployment
from charge_point_gateway.server import OcppServer
from charge_point_gateway.store import GatewayStore
from charge_point_gateway.substation_client import SubstationClient

log = logging.getLogger("gateway")


class StartupError(RuntimeError):
    """The gateway cannot start; the message says what to fix."""


def load_deployment(gateway: Gateway, path: str) -> int:
    """Create or replace the stations of the deployment file; how many there were."""
    try:
        document = json.loads(Path(path).read_text())
    except OSError as exc:
        raise StartupError(f"STATIONS_FILE {path} cannot be read: {exc}") from None
    except ValueError as exc:
        raise StartupError(f"STATIONS_FILE {path} is not JSON: {exc}") from None
    try:
        stations = parse_deployment(document)
    except StationSpecError as exc:
        raise StartupError(f"STATIONS_FILE {path}: {exc}") from None
    for station in stations:
        gateway.put_station(station)
    return len(stations)


# The event loop's lag is sampled this often (gateway_event_loop_lag_seconds).
LOOP_LAG_PERIOD_SECONDS = 0.1


async def watch_loop_lag(metrics: GatewayMetrics) -> None:
    """How much later than asked a timer fires: the wait every station's frame shares."""
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time()
        await asyncio.sleep(LOOP_LAG_PERIOD_SECONDS)
        metrics.loop_lag.observe(max(0.0, loop.time() - asked - LOOP_LAG_PERIOD_SECONDS))


def keep_out_of_full_collections() -> None:
    """What is loaded at start (modules, the registry, the servers) lives as long as the process: moved out
    of the cycle collector's reach, so that its full passes scan only what came later.

    A full pass holds the event loop, and every station's frames with it, for as long as it scans; it runs
    whenever enough objects have lived through two younger passes, which a burst of connections that last
    seconds (idle ones until their open timeout, a reconnect storm) brings about every few seconds. Scanning
    the start's tens of thousands of objects each time made these pauses several times longer (40 ms of a
    core instead of 5 with a thousand idle connections, measured).
    """
    gc.collect()  # what start left behind is freed now, not frozen with the rest
    gc.freeze()


# Descriptors besides the stations' and the waiting handshakes' sockets: the HTTP port's clients, the state
# file, the substations' connections, the password checks' threads.
OTHER_DESCRIPTORS = 1024


def make_room_for_connections(settings: Settings) -> None:
    """Raise the process's open-file limit to what ``MAX_CONNECTIONS`` and ``MAX_HANDSHAKING`` need, as far as
    its hard limit allows; say so if that is not enough, since past it no station could connect at all."""
    needed = settings.max_connections + settings.max_handshaking + OTHER_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("this process may open %d files, and MAX_CONNECTIONS (%d) + MAX_HANDSHAKING (%d) need about "
                    "%d: a flood of connections could leave no room for stations. Raise the limit (ulimit -n, "
                    "or the container's nofile ulimit) or lower those settings.", soft, settings.max_connections,
                    settings.max_handshaking, needed)


async def run(settings: Settings) -> None:
    make_room_for_connections(settings)
    try:
        store = GatewayStore(settings.state_file, settings.state_full_sync)
    except StateFileError as exc:
        raise StartupError(str(exc)) from None
    async with aiohttp.ClientSession() as http:
        gateway = Gateway(settings, store, SubstationClient(http, settings.substation_timeout_seconds))
        if settings.stations_file:
            log.info("loaded %d stations from %s", load_deployment(gateway, settings.stations_file),
                     settings.stations_file)
        await gateway.start()
        lag = asyncio.create_task(watch_loop_lag(gateway.metrics), name="loop lag")
        ocpp = OcppServer(gateway)
        await ocpp.start()
        # A scrape or an operator call in progress gets 2 s to finish when the gateway stops.
        runner = web.AppRunner(create_http_app(gateway), access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        await web.TCPSite(runner, settings.host, settings.http_port).start()
        keep_out_of_full_collections()
        scheme = "wss" if settings.tls else "ws"
        log.info("listening for stations at %s://%s:%d/<station-id>, HTTP API at http://%s:%d", scheme,
                 settings.host, settings.ocpp_port, settings.host, settings.http_port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping: closing station connections (their profiles hold) and the HTTP port")
        lag.cancel()
        await gateway.close()
        await ocpp.close()
        await runner.cleanup()
    store.close()


def _not_a_station_error(record: logging.LogRecord) -> bool:
    return not (record.exc_info and isinstance(record.exc_info[1], OCPPError))


def main() -> int:
    try:
        settings = Settings.from_env(os.environ)
    except SettingsError as exc:
        configure_logging("charge-point-gateway")
        log.error("cannot start: %s", exc)
        return 2
    configure_logging("charge-point-gateway", settings.log_level)
    # The ocpp package logs every frame at INFO (too much for thousands of stations), and every CALLERROR it
    # answers with a traceback: for a station's malformed CALL that is the station's fault, already answered
    # and counted, so only errors of the gateway's own handlers keep their traceback.
    ocpp_log = logging.getLogger("ocpp")
    ocpp_log.setLevel(logging.WARNING)
    ocpp_log.addFilter(_not_a_station_error)
    logging.getLogger("ocpp.station").setLevel(settings.log_level.upper())
    logging.getLogger("ocpp.server").setLevel(settings.log_level.upper())
    logging.getLogger("websockets").setLevel(logging.WARNING)
    try:
        asyncio.run(run(settings))
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 2
    return 0
