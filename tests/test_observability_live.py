"""The real proof: a real Prometheus, with the repository's scrape plan and rule files,
scrapes a real local stack under load, and every dashboard panel, recording rule and alert
reads data from it."""
from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from tests.harness import OPERATOR, REPO_ROOT, Service, Stack
from tests.test_gateway_observability_live import GATEWAY_DASHBOARD, GATEWAY_RULE_FILE
from tests.observability_support import (
    DASHBOARD_FILES,
    LOCAL_CONFIG,
    RULE_FILES,
    Prometheus,
    iter_panels,
    load_dashboard,
    load_rules,
    load_yaml,
    substitute_variables,
    vector_selectors,
)

pytestmark = pytest.mark.integration

CAPACITY_KW = 10.0
# Sessions ask for 4.75 kW but are admitted on their minimum (MIN_CHARGE_KW): seven fit on a 10 kW substation (9.8 kW of minimums), the eighth does not. So
# 21 sessions fill the grid for admission, each curtailed to 10/7 kW, and the 22nd is
# refused with 503.
FILL_KW = 4.75
SESSIONS_PER_SUBSTATION = 7
MIN_CHARGE_KW = 1.4
# An operator limit on substation-3 below its sessions' minimums: six of its seven keep
# charging (8.4 kW of minimums fit in 9 kW), one is suspended. Its transformer keeps only
# 1 kW to spare, less than one migration step (2 kW): no peer power moves, and the limits
# stay where the assertions below expect them.
OPERATOR_LIMIT_KW = 9.0
SUSPENDED_ON_SUBSTATION_3 = 1
ADMIN_TOKEN = "observability-test-token"
SUBSTATIONS = {"substation-1", "substation-2", "substation-3"}
# With a 1 s scrape, four scrapes per rate window, as Grafana's $__rate_interval would give.
INTERVALS = {"__rate_interval": "4s", "__interval": "1s", "__range": "1m"}
# Alerts the load below must bring to firing: vehicles refused on a grid full for admission
# for the whole hold time. The others need minutes of it (their promtool tests show them).
EXPECTED_FIRING = {"ChargingRejectedGridFull"}
# Never, on a correct system: the allocations stay within the limit even as it falls.
NEVER_FIRING = {"SubstationOverLimit"}
ALERT_DEADLINE_SECONDS = 40


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[[], Prometheus]]:
    started: list[Prometheus] = []

    def factory() -> Prometheus:
        workdir = tmp_path / f"prometheus-{len(started)}"
        workdir.mkdir()
        started.append(Prometheus(workdir))
        return started[-1]

    yield factory
    for prometheus in started:
        prometheus.stop()


def config_for(stack: Stack, prometheus: Prometheus) -> dict:
    """prometheus.local.yml with each `make run` port swapped for the test stack's port."""
    ports = {
        "5011": stack.substations[0].port,
        "5012": stack.substations[1].port,
        "5013": stack.substations[2].port,
        "5002": stack.balancer.port,
        "5000": stack.charge.port,
        "9090": prometheus.port,
    }
    config = load_yaml(LOCAL_CONFIG)
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(path) for path in RULE_FILES]
    # The test stack runs one balancer: the second one's target (5003) is left out.
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            local_ports = [target.rsplit(":", 1)[1] for target in static["targets"]]
            static["targets"] = [f"127.0.0.1:{ports[port]}" for port in local_ports if port in ports]
    return config


def charge(stack: Stack, vehicle: str, amount: float, duration_seconds: float, wait: bool = False) -> requests.Response:
    body = {"vehicle_id": vehicle, "amount": amount, "duration_seconds": duration_seconds}
    if wait:
        body["wait"] = True
    return requests.post(f"{stack.charge.url}/charge", json=body, timeout=10)


def wait_until_balancer_sees_no_load(stack: Stack, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while any(entry["load"] for entry in requests.get(f"{stack.balancer.url}/status", timeout=5).json()["substations"]):
        assert time.monotonic() < deadline, "the short sessions did not end"
        time.sleep(0.2)


def set_operator_limit(substation: Service, limit_kw: float) -> None:
    response = requests.put(
        f"{substation.url}/limit",
        json={"limit_kw": limit_kw},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=5,
    )
    assert response.status_code == 200, response.text


def drive_load(stack: Stack) -> None:
    """Short sessions that finish (charging durations), a bad request, then a grid full for
    admission with every session curtailed, sessions suspended under an operator limit,
    vehicles in the charge API's queue: one waiting, one cancelled (a queue wait observed), and a
    client key refused past its quota beside a key nobody issued."""
    assert [charge(stack, f"ev-short-{i}", 1.0, 1).status_code for i in range(3)] == [201] * 3
    assert charge(stack, "", -1.0, 1).status_code == 400
    wait_until_balancer_sees_no_load(stack)  # the short sessions end before the grid fills up
    fill = 3 * SESSIONS_PER_SUBSTATION
    statuses = [charge(stack, f"ev-fill-{i}", FILL_KW, 600).status_code for i in range(fill + 1)]
    assert statuses == [201] * fill + [503], statuses
    set_operator_limit(stack.substations[2], OPERATOR_LIMIT_KW)
    queued = [charge(stack, f"ev-queued-{i}", FILL_KW, 600, wait=True) for i in range(2)]
    assert [response.status_code for response in queued] == [202, 202], [r.text for r in queued]
    cancelled = requests.delete(
        f"{stack.charge.url}{queued[1].headers['Location']}", timeout=5,
        headers={"Authorization": f"Bearer {queued[1].json()['session_token']}"},
    )
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled", cancelled.text
    # A client key past its kW quota, and a key nobody issued: the client key panels' series.
    made = requests.post(f"{stack.charge.url}/client-keys", headers=OPERATOR, timeout=5,
                         json={"name": "small fleet", "quotas": {"kw": 1}})
    assert made.status_code == 201, made.text
    over = requests.post(f"{stack.charge.url}/charge", headers={"X-API-Key": made.json()["api_key"]}, timeout=10,
                         json={"vehicle_id": "ev-keyed", "amount": FILL_KW, "duration_seconds": 600})
    assert over.status_code == 429 and over.json()["quota"] == "kw", over.text
    guessed = requests.post(f"{stack.charge.url}/charge", headers={"X-API-Key": "sgk_" + "A" * 43}, timeout=10,
                            json={"vehicle_id": "ev-guess", "amount": FILL_KW})
    assert guessed.status_code == 401, guessed.text


def alerts(prometheus: Prometheus, state: str = "firing") -> set[str]:
    return {series["metric"]["alertname"] for series in prometheus.query(f'ALERTS{{alertstate="{state}"}}')}


def keep_grid_full_until_alerts_fire(stack: Stack, prometheus: Prometheus) -> None:
    """Refused requests every half second until the expected alerts fire (bounded in time)."""
    deadline = time.monotonic() + ALERT_DEADLINE_SECONDS
    attempt = 0
    while not EXPECTED_FIRING <= alerts(prometheus):
        assert time.monotonic() < deadline, f"only {alerts(prometheus)} fire, want {EXPECTED_FIRING}"
        attempt += 1
        assert charge(stack, f"ev-refused-{attempt}", FILL_KW, 600).status_code == 503
        time.sleep(0.5)


def by_substation(prometheus: Prometheus, expr: str) -> dict[str, float]:
    return {series["metric"]["substation"]: float(series["value"][1]) for series in prometheus.query(expr)}


def panel_queries() -> list[tuple[str, str]]:
    # The stack here has no gateway: test_gateway_observability_live.py proves its dashboard and rules.
    return [
        (f"{path.name} / {panel['title']}", substitute_variables(target["expr"], dashboard, INTERVALS))
        for path in DASHBOARD_FILES
        if path != GATEWAY_DASHBOARD
        for dashboard in [load_dashboard(path)]
        for panel in iter_panels(dashboard)
        for target in panel["targets"]
    ]


def rule_queries() -> list[tuple[str, str]]:
    """A recording rule's expression and its recorded series; the series an alert compares.

    An alert's expression returns data only while its condition holds, so for alerts the
    test runs the expression (it must not fail) and asks for every series it reads.
    """
    queries = []
    for rule in load_rules():
        if rule.file == GATEWAY_RULE_FILE.name:
            continue
        if rule.is_alert:
            queries += [(f"alert {rule.name}", selector) for selector in vector_selectors(rule.body["expr"])]
        else:
            labels = ",".join(f'{name}="{value}"' for name, value in rule.body.get("labels", {}).items())
            queries += [(f"rule {rule.name}", rule.body["expr"]), (f"rule {rule.name}", f"{rule.name}{{{labels}}}")]
    return queries


def variable_values(prometheus: Prometheus) -> dict[str, set[str]]:
    """What each `label_values(metric, label)` variable lists, asked as Grafana asks it."""
    values = {}
    for path in DASHBOARD_FILES:
        for variable in load_dashboard(path).get("templating", {}).get("list", []):
            metric, label = variable["query"].removeprefix("label_values(").removesuffix(")").split(", ")
            values[f"{path.name} ${variable['name']}"] = set(
                prometheus.api(f"label/{label}/values", **{"match[]": metric})
            )
    return values


def test_every_panel_rule_and_alert_reads_data_from_the_live_stack(
    stack_factory: Callable[..., Stack], prometheus_factory: Callable[[], Prometheus]
) -> None:
    # Peer balancing on, so the Peer balancing dashboard and its alerts have real series too.
    # With no local generation no substation ever has power to spare: no migration changes
    # the capacities the load below is computed against.
    stack = stack_factory(
        capacities=(CAPACITY_KW,) * 3,
        substation_env={
            "ADMIN_TOKEN": ADMIN_TOKEN,
            "ALLOCATION_POLICY": "fair_share",
            "MIN_CHARGE_KW": str(MIN_CHARGE_KW),
        },
        balancer_env={"POLL_INTERVAL_SECONDS": "1"},
        peers=True,
    )
    prometheus = prometheus_factory()
    prometheus.start(config_for(stack, prometheus))
    drive_load(stack)
    keep_grid_full_until_alerts_fire(stack, prometheus)

    targets = prometheus.api("targets")["activeTargets"]
    assert len(targets) == 6 and {target["health"] for target in targets} == {"up"}, targets
    assert {series["metric"]["substation"] for series in prometheus.query('up{job="substation"}')} == SUBSTATIONS
    # Every substation allocates its whole limit (to the milliwatt, rounded down) and no more.
    load = by_substation(prometheus, "substation:load:percent")
    assert load == pytest.approx(dict.fromkeys(SUBSTATIONS, 100.0), abs=1e-3)
    assert all(value <= 100.0 for value in load.values()), load
    limits = by_substation(prometheus, "max by (substation) (substation_limit_kw)")
    assert limits == {"substation-1": CAPACITY_KW, "substation-2": CAPACITY_KW, "substation-3": OPERATOR_LIMIT_KW}
    assert by_substation(prometheus, 'max by (substation) (substation_limit_source{source="operator"})') == {
        "substation-1": 0.0, "substation-2": 0.0, "substation-3": 1.0,
    }
    assert by_substation(prometheus, 'max by (substation) (charging_sessions{state="suspended"})') == {
        "substation-1": 0.0, "substation-2": 0.0, "substation-3": float(SUSPENDED_ON_SUBSTATION_3),
    }
    requested = SESSIONS_PER_SUBSTATION * FILL_KW
    assert by_substation(prometheus, "substation:curtailed:ratio") == pytest.approx({
        "substation-1": 1 - CAPACITY_KW / requested,
        "substation-2": 1 - CAPACITY_KW / requested,
        "substation-3": 1 - OPERATOR_LIMIT_KW / requested,
    }, abs=1e-3)
    assert [float(series["value"][1]) for series in prometheus.query("charge_queue_length")] == [1.0]
    # The allocation never passed the limit, at any scrape of the run, and the alert saying
    # so never even went pending.
    (breach,) = prometheus.query("max(max_over_time((current_load - substation_limit_kw)[10m:1s]))")
    assert float(breach["value"][1]) <= 0, breach
    assert not NEVER_FIRING & (alerts(prometheus) | alerts(prometheus, "pending"))
    assert not prometheus.query('count_over_time(ALERTS{alertname=~"%s"}[10m])' % "|".join(NEVER_FIRING))
    variables = variable_values(prometheus)
    assert variables and all(found == SUBSTATIONS for found in variables.values()), variables

    for rule in load_rules():
        prometheus.query(rule.body["expr"])  # raises with Prometheus's error if it cannot run
    empty = [f"{where}: {expr}" for where, expr in panel_queries() + rule_queries() if not prometheus.query(expr)]
    assert empty == [], "queries without data:\n" + "\n".join(empty)


def test_procfile_prometheus_line_loads_the_local_config_and_rules(
    prometheus_factory: Callable[[], Prometheus]
) -> None:
    """The exact command of `make run`, on a free port and a temporary data directory."""
    line = next(
        line for line in (REPO_ROOT / "Procfile").read_text().splitlines() if line.startswith("prometheus:")
    )
    command = shlex.split(line.removeprefix("prometheus:").split("&&")[-1])
    assert command[0] == "prometheus"
    args = [arg for arg in command[1:] if not arg.startswith(("--web.listen-address", "--storage.tsdb.path"))]
    assert "--config.file=prometheus/prometheus.local.yml" in args

    prometheus = prometheus_factory().run(args)
    groups = prometheus.api("rules")["groups"]
    loaded = {rule["name"] for group in groups for rule in group["rules"]}
    assert loaded == {rule.name for rule in load_rules()}
    expected = {f"http://127.0.0.1:{port}/metrics" for port in (5011, 5012, 5013, 5002, 5003, 5000, 9001, 9090)}
    deadline = time.monotonic() + 10
    # Scrape targets appear a moment after Prometheus reports ready.
    while {target["scrapeUrl"] for target in prometheus.api("targets")["activeTargets"]} != expected:
        assert time.monotonic() < deadline, prometheus.api("targets")["activeTargets"]
        time.sleep(0.2)
