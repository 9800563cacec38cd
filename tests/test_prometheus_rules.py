"""Prometheus configuration and rules: promtool's own checks, the rule unit tests, and the
conventions every alert and scrape job here follows."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from charge_request_service.metrics import DURATION_BUCKETS
from tests.observability_support import (
    COMPOSE_CONFIG,
    DASHBOARD_FILES,
    LOCAL_CONFIG,
    PROMETHEUS_DIR,
    RULE_FILES,
    RULE_TEST_FILES,
    iter_panels,
    load_dashboard,
    load_rules,
    load_yaml,
    vector_selectors,
)

# The compose service names and their internal ports (README, "Architecture").
COMPOSE_TARGETS = {
    "substation": {"substation_1:5011", "substation_2:5012", "substation_3:5013"},
    "load_balancer": {"load_balancer:5002", "load_balancer_2:5003"},
    "charge_request_service": {"charge_request_service:5000"},
    # The gateway's HTTP port: its OCPP port (9000) serves the stations only.
    "charge_point_gateway": {"charge_point_gateway:9001"},
    "prometheus": {"localhost:9090"},
}
ALERTS = [rule for rule in load_rules() if rule.is_alert]


def promtool(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["promtool", *map(str, args)], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60
    )


def assert_promtool_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"promtool failed:\n{result.stdout}\n{result.stderr}"


@pytest.mark.parametrize("config", [COMPOSE_CONFIG, LOCAL_CONFIG], ids=lambda path: path.name)
def test_promtool_accepts_config_and_its_rule_files(config: Path) -> None:
    result = promtool("check", "config", config)
    assert_promtool_ok(result)
    assert f"{len(RULE_FILES)} rule files found" in result.stdout


def test_promtool_accepts_rule_files() -> None:
    assert_promtool_ok(promtool("check", "rules", *RULE_FILES))


def test_rule_unit_tests_pass() -> None:
    assert RULE_TEST_FILES, "prometheus/tests/ holds no rule unit test"
    result = promtool("test", "rules", *RULE_TEST_FILES)
    assert_promtool_ok(result)
    assert "FAILED" not in result.stdout + result.stderr


def test_promtool_unit_tests_catch_a_wrong_expectation(tmp_path: Path) -> None:
    """The unit tests really compare: a test expecting the wrong value fails."""
    recording_test = load_yaml(PROMETHEUS_DIR / "tests" / "recording_test.yml")
    recording_test["rule_files"] = [str(PROMETHEUS_DIR / "rules" / "recording.yml")]
    first_expectation = recording_test["tests"][0]["promql_expr_test"][0]["exp_samples"][0]
    first_expectation["value"] += 1
    broken = tmp_path / "broken_test.yml"
    broken.write_text(yaml.safe_dump(recording_test))
    result = promtool("test", "rules", broken)
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr


# The share of its limit a substation allocates: with fair sharing it is 100 % whenever the
# vehicles ask for more than the limit, the allocation working as designed.
LOAD_SHARE_SERIES = {"load_percentage", "substation_load_percentage", "substation:load:percent"}


@pytest.mark.parametrize("alert", ALERTS, ids=lambda rule: rule.name)
def test_alert_has_hold_time_severity_and_human_text(alert) -> None:
    body = alert.body
    # Every alert waits a while before firing, but for one whose condition a correct system
    # never meets, not even for one scrape: that one fires at once (an explicit `for: 0s`)
    # and keeps firing a while, so that a breach of a single scrape is seen.
    assert "for" in body, "every alert states its hold time"
    assert body["for"] != "0s" or body.get("keep_firing_for"), "an alert without hold keeps firing a while"
    assert body.get("labels", {}).get("severity") in {"info", "warning", "critical"}
    annotations = body.get("annotations", {})
    assert len(annotations.get("summary", "")) > 20
    assert len(annotations.get("description", "")) > 60


@pytest.mark.parametrize("alert", ALERTS, ids=lambda rule: rule.name)
def test_no_alert_fires_on_a_substation_using_its_whole_limit(alert) -> None:
    """A full grid that curtails as designed is no alarm: alerts read curtailment, suspended
    sessions, waiting or refused vehicles, or an allocation above the limit instead."""
    read = {selector.split("{")[0] for selector in vector_selectors(alert.body["expr"])}
    assert read.isdisjoint(LOAD_SHARE_SERIES)


def _alert_rule_tests() -> list[dict]:
    return [
        case
        for path in RULE_TEST_FILES
        for test in load_yaml(path)["tests"]
        for case in test.get("alert_rule_test", [])
    ]


@pytest.mark.parametrize("alert", ALERTS, ids=lambda rule: rule.name)
def test_alert_is_unit_tested_firing_and_not_firing(alert) -> None:
    cases = [case for case in _alert_rule_tests() if case["alertname"] == alert.name]
    assert any(case.get("exp_alerts") for case in cases), f"no test shows {alert.name} firing"
    assert any(not case.get("exp_alerts") for case in cases), f"no test shows {alert.name} not firing"


def test_latency_limit_is_a_bucket_boundary_of_the_charge_histogram() -> None:
    """Between two buckets histogram_quantile interpolates: with the limit inside a bucket,
    requests all well under it can still give a p95 above it."""
    alert = next(rule for rule in ALERTS if rule.name == "ChargeRequestLatencyHigh")
    limit_seconds = float(alert.body["expr"].rsplit(">", 1)[1])
    assert limit_seconds in DURATION_BUCKETS


def test_every_recording_rule_is_read_by_a_dashboard_or_an_alert() -> None:
    readers = [rule.body["expr"] for rule in load_rules()] + [
        target["expr"]
        for path in DASHBOARD_FILES
        for panel in iter_panels(load_dashboard(path))
        for target in panel["targets"]
    ]
    read_names = {selector.split("{")[0] for expr in readers for selector in vector_selectors(expr)}
    recorded = {rule.name for rule in load_rules() if not rule.is_alert}
    assert recorded - read_names == set(), "recording rules nobody reads"


def _scrape_plan(config_path: Path) -> dict[str, dict]:
    config = load_yaml(config_path)
    return {
        job["job_name"]: {
            "honor_labels": job.get("honor_labels", False),
            "targets": [
                (target, static.get("labels", {}))
                for static in job["static_configs"]
                for target in static["targets"]
            ],
        }
        for job in config["scrape_configs"]
    }


def test_compose_config_scrapes_every_service_by_its_compose_name() -> None:
    plan = _scrape_plan(COMPOSE_CONFIG)
    assert {job: {target for target, _ in entry["targets"]} for job, entry in plan.items()} == COMPOSE_TARGETS


@pytest.mark.parametrize("config", [COMPOSE_CONFIG, LOCAL_CONFIG], ids=lambda path: path.name)
def test_config_scrapes_every_5_seconds_and_names_each_substation(config: Path) -> None:
    loaded = load_yaml(config)
    assert loaded["global"]["scrape_interval"] == "5s"
    assert loaded["rule_files"] == ["rules/*.yml"]
    substations = _scrape_plan(config)["substation"]
    assert substations["honor_labels"] is True
    assert sorted(labels["substation"] for _, labels in substations["targets"]) == [
        "substation-1", "substation-2", "substation-3",
    ]


def test_local_config_is_the_compose_plan_on_loopback() -> None:
    """The two files differ only in the host part of each target."""
    compose, local = _scrape_plan(COMPOSE_CONFIG), _scrape_plan(LOCAL_CONFIG)
    assert compose.keys() == local.keys()
    for job in compose:
        assert compose[job]["honor_labels"] == local[job]["honor_labels"]
        compose_targets = [(target.split(":")[1], labels) for target, labels in compose[job]["targets"]]
        local_targets = [(target.split(":")[1], labels) for target, labels in local[job]["targets"]]
        assert compose_targets == local_targets, job
        assert all(target.startswith("127.0.0.1:") for target, _ in local[job]["targets"])
    assert load_yaml(COMPOSE_CONFIG)["global"] == load_yaml(LOCAL_CONFIG)["global"]


@pytest.mark.parametrize(
    ("expr", "selectors"),
    [
        ('sum(rate(x_total{outcome="no_capacity"}[1m])) > 0', ['x_total{outcome="no_capacity"}']),
        ("a > on (job, instance) group_left () (3 * b)", ["a", "b"]),
        (
            '(sum(a and b == 1) / sum(c and b == 1) > 0.8) and on () sum(increase(x{o="n"}[15s])) > 0',
            ["a", "b", "c", "b", 'x{o="n"}'],
        ),
        ('max by (substation) (load{substation=~"$s"}) / ignoring(le) c:d:e', ['load{substation=~"$s"}', "c:d:e"]),
        ("(sum(rate(y[1m])) or vector(0)) / histogram_quantile(0.9, z_bucket)", ["y", "z_bucket"]),
    ],
)
def test_vector_selectors_finds_the_series_an_expression_reads(expr: str, selectors: list[str]) -> None:
    assert vector_selectors(expr) == selectors
