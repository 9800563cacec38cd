"""Start the real services on free 127.0.0.1 ports, as they are deployed: granian behind its edge.

Tests never use the ports of ``make run``, so both can run at once.
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from gridcommon.promtext import Scrape, parse_metrics

REPO_ROOT = Path(__file__).resolve().parent.parent
# The operator token of the stacks the tests start: it may list, read and stop every session.
OPERATOR_TOKEN = "test-operator-token"
OPERATOR = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
GUNICORN_CONF = "python:gridcommon.gunicorn_conf"
# How every service is deployed (Procfile, Dockerfiles): granian behind nginx (gridcommon.edge).
SERVE = "gridcommon.serve"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(url: str, process: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{url}: process exited with code {process.returncode} before becoming healthy")
        try:
            if requests.get(url, timeout=1).ok:
                return
        except requests.RequestException as exc:
            last_error = str(exc)
        time.sleep(0.1)
    raise RuntimeError(f"{url} not healthy after {timeout}s: {last_error}")


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> float:
    """Seconds until ``condition()`` held; fails naming ``what`` after ``timeout`` seconds."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout:g} s")


def get_json(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> Any:
    response = requests.get(url, timeout=timeout, headers=headers)
    response.raise_for_status()
    return response.json()


def scrape(service: "Service") -> Scrape:
    """The service's /metrics page, parsed."""
    response = requests.get(f"{service.url}/metrics", timeout=5)
    response.raise_for_status()
    return parse_metrics(response.text)


def sessions_at(substation: "Service") -> list[dict[str, Any]]:
    return get_json(f"{substation.url}/sessions")["sessions"]


def logged_within(service: "Service", text: str, timeout: float = 5.0) -> bool:
    """Whether ``text`` shows up in the service's log within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in service.log_text():
            return True
        time.sleep(0.05)
    return False


@dataclass
class Service:
    """One service process; ``app`` is its ``module:create_app()`` target.

    It runs behind its edge (``python -m gridcommon.serve``) as deployed; ``edge=False`` runs
    gunicorn alone on the port, as the benchmarks' reference chain does.
    """

    name: str
    app: str
    env: dict[str, str]
    log_dir: Path
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    netns: str | None = None  # run inside this network namespace, reachable at ``host``
    edge: bool = True
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def start(self, wait: bool = True) -> "Service":
        env = {**os.environ, **self.env, "HOST": self.host, "PORT": str(self.port)}
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.edge:
            command = [sys.executable, "-m", SERVE, self.app]
        else:
            command = [sys.executable, "-m", "gunicorn", "-c", GUNICORN_CONF, self.app]
        if self.netns:
            command = ["ip", "netns", "exec", self.netns, *command]
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        if wait:
            wait_until_healthy(f"{self.url}/health", self.process)
        return self

    def kill(self) -> None:
        """Die at once, as a crashed container would."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def suspend(self) -> None:
        """Freeze the processes (SIGSTOP): the kernel still accepts connections and takes in
        requests, but nothing answers them until ``resume()``."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGCONT)

    def _signal(self, sig: int) -> None:
        self.send_signal(sig)
        self.wait_stopped()

    def send_signal(self, sig: int) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def wait_stopped(self) -> None:
        """Wait for the process to end; kill it if it takes longer than a graceful stop should."""
        if self.process is None:
            return
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start_all(services: list[Service]) -> list[Service]:
    """Start the services at once, then wait until every one is healthy: faster than one after another."""
    for service in services:
        service.start(wait=False)
    for service in services:
        wait_until_healthy(f"{service.url}/health", service.process)
    return services


@dataclass
class Stack:
    substations: list[Service]
    balancer: Service
    charge: Service

    @property
    def services(self) -> list[Service]:
        return [*self.substations, self.balancer, self.charge]

    def stop(self) -> None:
        stop_all(list(reversed(self.services)))


def stop_all(services: list[Service]) -> None:
    """Ask every service to stop at once, then wait: each takes a moment to close its connections."""
    for service in services:
        service.send_signal(signal.SIGTERM)
    for service in services:
        service.wait_stopped()


def start_stack(
    log_dir: Path,
    capacities: tuple[float, ...] = (100.0, 100.0, 100.0),
    substation_env: dict[str, str] | None = None,
    balancer_env: dict[str, str] | None = None,
    charge_env: dict[str, str] | None = None,
    peers: bool = False,
) -> Stack:
    """Substations, then the balancer pointed at them, then the charge request service.

    ``peers`` lists every substation in each one's PEERS and gives them one PEER_KEY, so they
    balance power together.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    substations = [
        Service(
            name=f"substation-{index}",
            app="substation_service:create_app()",
            env={
                "SUBSTATION_ID": f"substation-{index}",
                "CAPACITY_KW": str(capacity),
                **(substation_env or {}),
            },
            log_dir=log_dir,
        )
        for index, capacity in enumerate(capacities, start=1)
    ]
    if peers:
        # The group signs its peer traffic with one key (PEER_KEY): new for every stack.
        group_key = secrets.token_hex(32)
        for substation in substations:
            substation.env.setdefault("PEERS", ",".join(peer.url for peer in substations))
            substation.env.setdefault("PEER_KEY", group_key)
    started: list[Service] = []
    try:
        for substation in substations:
            started.append(substation.start())
        balancer = Service(
            name="load-balancer",
            app="load_balancer:create_app()",
            env={"SUBSTATIONS": ",".join(s.url for s in substations), **(balancer_env or {})},
            log_dir=log_dir,
        )
        started.append(balancer.start())
        charge = Service(
            name="charge-request-service",
            app="charge_request_service:create_app()",
            env={"LOAD_BALANCER_URL": balancer.url, "ADMIN_TOKEN": OPERATOR_TOKEN, **(charge_env or {})},
            log_dir=log_dir,
        )
        started.append(charge.start())
    except Exception:
        for service in reversed(started):
            service.stop()
        raise
    return Stack(substations=substations, balancer=balancer, charge=charge)


def all_at_once(count: int, work: Callable[[int], None]) -> None:
    """Run ``work(0)`` ... ``work(count - 1)`` in threads of their own, released together; wait for all."""
    start = threading.Barrier(count)

    def released(number: int) -> None:
        start.wait()
        work(number)

    threads = [threading.Thread(target=released, args=(number,)) for number in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
