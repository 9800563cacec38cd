"""The charge point gateway's monitoring, proven live: a real Prometheus, with the repository's
scrape plan and rule files, scrapes a real gateway whose simulated stations (real WebSockets)
charge through a real substation. Every panel of the Charging stations dashboard, every
recording rule of rules/gateway.yml and every series its alerts read return data, and the
figures agree with the substation's own account and with what the stations did.

(test_observability_live.py proves the other dashboards and rules against a stack without
a gateway: it leaves these two files to this test.)
"""
from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

from charge_point_gateway.transactions import session_id_for
from tests.harness import OPERATOR_TOKEN, Service, get_json, start_all, stop_all
from tests.observability_support import (
    GRAFANA_DIR,
    LOCAL_CONFIG,
    PROMETHEUS_DIR,
    Prometheus,
    iter_panels,
    load_dashboard,
    load_rules,
    load_yaml,
    substitute_variables,
    vector_selectors,
)
from tests.ocpp_support import Gateway, Station16, Station201, connect

pytestmark = pytest.mark.integration

GATEWAY_DASHBOARD = GRAFANA_DIR / "dashboards" / "charging-stations.json"
GATEWAY_RULE_FILE = PROMETHEUS_DIR / "rules" / "gateway.yml"
# With a 1 s scrape, four scrapes per rate window, as Grafana's $__rate_interval would give.
INTERVALS = {"__rate_interval": "4s", "__interval": "1s", "__range": "1m"}
FAST = {
    "LEASE_SECONDS": "15",
    "WATCH_WAIT_SECONDS": "5",
    "MIN_PROFILE_INTERVAL_SECONDS": "0.5",
    "VEHICLE_RESPONSE_SECONDS": "0.2",
    "SUBSTATION_TIMEOUT_SECONDS": "3",
}
CAPACITY_KW = 30.0
# What the two connected stations report drawing (MeterValues), kW.
MEASURED_KW = {"cp-polite": 4.0, "cp-stubborn": 7.5}
SEQ_NO_GAP = 2
DEADLINE_SECONDS = 45


@pytest.fixture
def services(tmp_path: Path) -> Iterator[list]:
    started: list = []
    yield started
    for item in reversed(started):
        item.stop() if isinstance(item, (Gateway, Prometheus)) else stop_all([item])


def config_for(gateway: Gateway) -> dict:
    """prometheus.local.yml's gateway job, on the test gateway's HTTP port, scraped every second."""
    config = load_yaml(LOCAL_CONFIG)
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(GATEWAY_RULE_FILE)]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "charge_point_gateway"]
    (static,) = job["static_configs"]
    assert [target.rsplit(":", 1)[1] for target in static["targets"]] == ["9001"]
    static["targets"] = [f"127.0.0.1:{gateway.http_port}"]
    config["scrape_configs"] = [job]
    return config


def gateway_queries() -> list[tuple[str, str]]:
    """Every panel query of the dashboard; each recording rule and its series; what each alert reads."""
    dashboard = load_dashboard(GATEWAY_DASHBOARD)
    queries = [
        (f"panel {panel['title']}", substitute_variables(target["expr"], dashboard, INTERVALS))
        for panel in iter_panels(dashboard)
        for target in panel["targets"]
    ]
    for rule in load_rules():
        if rule.file != GATEWAY_RULE_FILE.name:
            continue
        if rule.is_alert:
            queries += [(f"alert {rule.name}", selector) for selector in vector_selectors(rule.body["expr"])]
        else:
            labels = ",".join(f'{name}="{value}"' for name, value in rule.body.get("labels", {}).items())
            queries += [(f"rule {rule.name}", rule.body["expr"]), (f"rule {rule.name}", f"{rule.name}{{{labels}}}")]
    return queries


def values(prometheus: Prometheus, expr: str, label: str) -> dict[str, float]:
    return {series["metric"].get(label, ""): float(series["value"][1]) for series in prometheus.query(expr)}


async def eventually(check: Callable[[], object], what: str) -> None:
    """Until ``check`` stops raising AssertionError (Prometheus scrapes and evaluates every second)."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        try:
            await asyncio.to_thread(check)
            return
        except AssertionError as error:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {DEADLINE_SECONDS} s: {error}") from None
        await asyncio.sleep(0.5)


def test_the_charging_stations_dashboard_and_gateway_rules_read_a_live_gateway(
    tmp_path: Path, services: list
) -> None:
    substation = Service(name="substation-1", app="substation_service:create_app()", log_dir=tmp_path, env={
        "SUBSTATION_ID": "substation-1", "CAPACITY_KW": str(CAPACITY_KW), "ADMIN_TOKEN": OPERATOR_TOKEN,
        "STATE_DIR": str(tmp_path / "state"),
    })
    start_all([substation])
    services.append(substation)
    gateway = Gateway(tmp_path / "gateway", env=FAST).start()
    services.append(gateway)
    for station_id in ("cp-polite", "cp-stubborn", "cp-away"):
        gateway.register(station_id, substation.url, phases=3, max_current_a=16)
    prometheus = Prometheus(tmp_path / "prometheus-work")
    prometheus.workdir.mkdir()
    services.append(prometheus)
    prometheus.start(config_for(gateway))

    def scraped() -> None:
        assert values(prometheus, "up", "job") == {"charge_point_gateway": 1.0}

    async def scenario() -> None:
        # Counters must be seen at 0 first: an increase from a series' first sample is none.
        await eventually(scraped, "the gateway scraped")
        # A wrong password: a refused handshake.
        with pytest.raises(InvalidStatus):
            await connect(gateway.ws_url("cp-polite"), "cp-polite", "ocpp1.6", password="not-the-password-0")
        sockets = {
            "cp-polite": await connect(gateway.ws_url("cp-polite"), "cp-polite", "ocpp1.6"),
            "cp-stubborn": await connect(gateway.ws_url("cp-stubborn"), "cp-stubborn", "ocpp2.0.1"),
            "cp-away": await connect(gateway.ws_url("cp-away"), "cp-away", "ocpp1.6"),
        }
        polite = Station16("cp-polite", sockets["cp-polite"])
        stubborn = Station201("cp-stubborn", sockets["cp-stubborn"], reject_profiles=True)
        away = Station16("cp-away", sockets["cp-away"])
        loops = [asyncio.create_task(station.start()) for station in (polite, stubborn, away)]
        for station in (polite, stubborn, away):
            await station.boot()
        polite_tx = str(await polite.start_transaction(1))
        await stubborn.start_transaction(1, "tx-stubborn")
        away_tx = str(await away.start_transaction(1))
        await polite.meter(1, power_w=MEASURED_KW["cp-polite"] * 1000, energy_wh=500.0)
        # Two TransactionEvents lost on the way: seqNo jumps by three.
        stubborn.seq_no += SEQ_NO_GAP
        await stubborn.meter(1, power_w=MEASURED_KW["cp-stubborn"] * 1000, energy_wh=800.0)
        # cp-away loses its connection with its transaction running.
        loops[2].cancel()
        await sockets["cp-away"].close()
        session_ids = {session_id_for("cp-polite", polite_tx), session_id_for("cp-stubborn", "tx-stubborn"),
                       session_id_for("cp-away", away_tx)}

        def stations_by_state() -> None:
            states = values(prometheus, "sum by (state) (gateway_stations)", "state")
            assert states == {"charging": 2.0, "connected": 0.0, "offline": 1.0}, states
            offline = values(prometheus, "gateway_offline_transactions", "substation")
            assert offline == {substation.url: 1.0}, offline

        def power_agrees_with_the_meters_and_the_substation() -> None:
            measured = values(prometheus, "gateway_measured_power_kw", "substation")
            assert measured == {substation.url: pytest.approx(sum(MEASURED_KW.values()))}, measured
            # The substation's own account of the gateway's sessions, at the same moment.
            sessions = get_json(f"{substation.url}/sessions")["sessions"]
            assert {session["session_id"] for session in sessions} == session_ids
            allocated_there = sum(session["allocated_kw"] for session in sessions)
            allocated = values(prometheus, "gateway_allocated_power_kw", "substation")
            assert allocated == {substation.url: pytest.approx(allocated_there, abs=1e-3)}, (allocated, sessions)
            assert 0 < allocated_there <= CAPACITY_KW

        def profiles_and_events_counted() -> None:
            # The stubborn station refused its TxProfile: the alert on it is pending (its hold is a minute).
            rejected = prometheus.query('ALERTS{alertname="ChargingProfilesRejected"}')
            assert [series["metric"]["kind"] for series in rejected] == ["rejected"], rejected
            gaps = values(prometheus, "sum(increase(gateway_transaction_event_gaps_total[5m]))", "")
            # A series the recording rule has not evaluated yet is missing: wait for it, as for a value.
            assert gaps.get("", 0.0) >= SEQ_NO_GAP, gaps
            latency = values(prometheus, 'gateway:profile_latency_seconds:quantile{quantile="0.5"}', "quantile")
            assert "0.5" in latency, f"no profile latency recorded yet: {latency}"
            assert math.isfinite(latency["0.5"]) and 0 <= latency["0.5"] <= 30, latency
            refused = values(prometheus, "gateway_handshakes_refused_total", "reason")
            assert refused == {"wrong_password": 1.0}, refused

        def every_query_has_data() -> None:
            empty = [f"{where}: {expr}" for where, expr in gateway_queries() if not prometheus.query(expr)]
            assert empty == [], "queries without data:\n" + "\n".join(empty)

        await eventually(stations_by_state, "one offline station, two charging")
        await eventually(power_agrees_with_the_meters_and_the_substation, "measured and allocated power")
        await eventually(profiles_and_events_counted, "rejected profile, seqNo gap, profile latency")
        await eventually(every_query_has_data, "every panel, rule and alert series")
        # The gateway's down alert reads `up`, which is 1: it does not fire.
        assert not prometheus.query('ALERTS{alertname="ChargePointGatewayDown"}')
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        for socket in sockets.values():
            await socket.close()

    asyncio.run(scenario())
    for rule in load_rules():
        if rule.file == GATEWAY_RULE_FILE.name:
            prometheus.query(rule.body["expr"])  # raises with Prometheus's error if it cannot run
    assert "Traceback" not in gateway.log_text(), gateway.log_text()[-3000:]
