"""Registering substations at run time, attacked: against the real balancer as a gunicorn process.

POST and DELETE /substations are the operator's (ADMIN_TOKEN); only URLs on
allowed hosts are accepted, up to MAX_SUBSTATIONS; and a registered URL that
answers slowly, endlessly or with something else is cut off within the poll's
total time limit, refused without its answer being quoted, and never keeps the
balancer from polling and routing to the real substations.
"""
from __future__ import annotations

import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from tests.harness import Service, sessions_at, start_all, stop_all, wait_for

pytestmark = pytest.mark.integration

TOKEN = "registration-test-token"
OPERATOR = {"Authorization": f"Bearer {TOKEN}"}
# One byte a second arrives well within each read timeout: only the limit on the whole poll cuts it off.
CONNECT_TIMEOUT, POLL_TIMEOUT = 0.5, 1.5
POLL_LIMIT = CONNECT_TIMEOUT + POLL_TIMEOUT  # a whole poll, however the other end sends
BALANCER_ENV = {
    "ADMIN_TOKEN": TOKEN,
    "POLL_INTERVAL_SECONDS": "0.5",
    "CONNECT_TIMEOUT_SECONDS": str(CONNECT_TIMEOUT),
    "POLL_TIMEOUT_SECONDS": str(POLL_TIMEOUT),
    # Names only: a fake is registered as http://localhost:<port>, and http://127.0.0.1:<port> is refused.
    "SUBSTATION_URL_ALLOW": "localhost",
}
MAX_METRICS_BYTES = 1024 * 1024  # the default
SECRET = "INTERNAL-ONLY-BANNER-7f3a"
# Scheduling on a busy two-core machine.
SLACK_SECONDS = 1.0


# A substation impostor -------------------------------------------------------------


@dataclass
class Connection:
    mode: str
    path: str
    opened: float
    lasted: float | None = None  # seconds until the balancer hung up


@dataclass
class FakeSubstation:
    """A local HTTP server whose /metrics answer changes with ``mode``.

    ``metrics``: a substation's page with no capacity (so nothing is routed to it);
    ``trickle``: headers, then one byte a second for as long as the caller listens;
    ``flood``: a 200 whose body never ends; ``leak``: a page of internal-looking text.
    """

    substation_id: str
    mode: str = "metrics"
    connections: list[Connection] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://localhost:{self.port}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        opened = time.monotonic()
        with sock:
            sock.settimeout(5)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    return
                head += chunk
            method, path, *_ = head.split(b" ", 2) + [b"", b""]
            # The path without its query: a poll asks for the families it reads (?name[]=...).
            connection = Connection(self.mode, path.decode("latin-1").partition("?")[0], opened)
            self.connections.append(connection)
            if method != b"GET" or connection.path != "/metrics":
                sock.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            try:
                getattr(self, f"_answer_{connection.mode}")(sock)
            except OSError:
                pass
            connection.lasted = time.monotonic() - opened

    def page(self) -> bytes:
        labels = f'{{substation="{self.substation_id}"}}'
        return "".join(
            f"{name}{labels} {value}\n"
            for name, value in [
                ("current_load", 0),
                ("substation_state_version", 1),
                ("admission_capacity", 0),
                ("total_capacity", 0),
                ("active_chargers", 0),
            ]
        ).encode()

    def _answer_metrics(self, sock: socket.socket) -> None:
        page = self.page()
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(page) + page)

    def _answer_leak(self, sock: socket.socket) -> None:
        page = f"<html><title>{SECRET}</title>db=postgres://10.9.8.7/grid</html>\n".encode()
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n" % len(page) + page)

    def _answer_trickle(self, sock: socket.socket) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
        while not self._stop.is_set():
            # One byte a second, each well within the balancer's read timeout; stop when it hangs up.
            readable, _, _ = select.select([sock], [], [], 1.0)
            if readable and not sock.recv(1):
                return
            sock.sendall(b"#")

    def _answer_flood(self, sock: socket.socket) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n" + self.page())
        padding = b"# padding, padding, padding\n" * 2048
        for _ in range(64 * MAX_METRICS_BYTES // len(padding)):  # bounded: 64 MiB at most
            sock.sendall(padding)


@pytest.fixture
def fakes() -> Iterator[Callable[[str], FakeSubstation]]:
    made: list[FakeSubstation] = []

    def make(substation_id: str) -> FakeSubstation:
        made.append(FakeSubstation(substation_id))
        return made[-1]

    yield make
    for fake in made:
        fake.close()


@dataclass
class Grid:
    substations: list[Service]
    balancer: Service

    def status(self) -> dict[str, dict]:
        response = requests.get(f"{self.balancer.url}/status", timeout=5)
        response.raise_for_status()
        return {entry["url"]: entry for entry in response.json()["substations"]}

    def register(self, url: str, headers: dict[str, str] | None = OPERATOR) -> requests.Response:
        return requests.post(f"{self.balancer.url}/substations", json={"url": url}, headers=headers, timeout=10)

    def deregister(self, substation_id: str, headers: dict[str, str] | None = OPERATOR) -> requests.Response:
        return requests.delete(f"{self.balancer.url}/substations/{substation_id}", headers=headers, timeout=10)


@pytest.fixture
def grid_factory(tmp_path: Path) -> Iterator[Callable[..., Grid]]:
    started: list[Service] = []

    def start(substation_count: int = 2, **balancer_env: str) -> Grid:
        index = len(started)
        substations = [
            Service(
                name=f"substation-{index}-{n}",
                app="substation_service:create_app()",
                env={"SUBSTATION_ID": f"substation-{n}", "CAPACITY_KW": "100", "ALLOCATION_POLICY": "strict"},
                log_dir=tmp_path,
            )
            for n in range(1, substation_count + 1)
        ]
        start_all(substations)
        started.extend(substations)
        env = {**BALANCER_ENV, **balancer_env, "SUBSTATIONS": ",".join(s.url for s in substations)}
        balancer = Service(name=f"load-balancer-{index}", app="load_balancer:create_app()", env=env, log_dir=tmp_path)
        started.append(balancer.start())
        grid = Grid(substations, balancer)
        wait_for(lambda: all(entry["up"] for entry in grid.status().values()), 10, "the first polls")
        return grid

    yield start
    stop_all(list(reversed(started)))


def assert_error(response: requests.Response, status: int, error: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error and isinstance(body["message"], str) and body["message"], body
    return body


# The token ---------------------------------------------------------------------------


def test_registering_and_deregistering_need_the_operator_token(grid_factory, fakes) -> None:
    grid = grid_factory()
    fake = fakes("substation-fake")

    for headers in (None, {"Authorization": "Bearer wrong-token"}, {"Authorization": TOKEN}):
        assert_error(grid.register(fake.url, headers=headers), 401, "unauthorized")
    assert fake.connections == [], "nothing is sent to a URL before the token is checked"
    assert fake.url not in grid.status()

    registered = grid.register(fake.url)
    assert registered.status_code == 201, registered.text
    assert (registered.json()["id"], registered.json()["url"]) == ("substation-fake", fake.url)

    for headers in (None, {"Authorization": "Bearer wrong-token"}):
        assert_error(grid.deregister("substation-fake", headers=headers), 401, "unauthorized")
        assert_error(grid.deregister("substation-1", headers=headers), 401, "unauthorized")
    assert {fake.url, *(s.url for s in grid.substations)} == set(grid.status())
    assert grid.deregister("substation-fake").status_code == 200
    assert fake.url not in grid.status()


def test_without_an_admin_token_registration_is_off_and_says_how_to_turn_it_on(grid_factory, fakes) -> None:
    grid = grid_factory(substation_count=1, ADMIN_TOKEN="")
    fake = fakes("substation-fake")
    answers = (grid.register(fake.url, headers={"Authorization": "Bearer anything"}), grid.deregister("substation-1"))
    for response in answers:
        body = assert_error(response, 403, "admin_disabled")
        assert "ADMIN_TOKEN" in body["message"]
    assert fake.connections == []
    assert [entry["up"] for entry in grid.status().values()] == [True]


# The allow-list ------------------------------------------------------------------------


def test_urls_outside_the_allow_list_are_refused_before_anything_is_sent(grid_factory, fakes) -> None:
    grid = grid_factory(substation_count=1)
    fake = fakes("substation-fake")
    # SUBSTATION_URL_ALLOW=localhost: the same server written with its address is another host.
    for url in (
        f"http://127.0.0.1:{fake.port}",
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.7:5011",
        f"http://localhost.attacker.example:{fake.port}",
    ):
        body = assert_error(grid.register(url), 403, "url_not_allowed")
        assert body["field"] == "url" and "SUBSTATION_URL_ALLOW" in body["message"]
    for url in (f"http://user:pw@localhost:{fake.port}", f"{fake.url}/?x=1", f"{fake.url}#f"):
        assert assert_error(grid.register(url), 400, "invalid_field")["field"] == "url"
    assert fake.connections == []
    assert grid.register(fake.url).status_code == 201


# Slow, endless and foreign answers ----------------------------------------------------------


class Traffic:
    """Charge requests through the balancer, and a watch on the real substations, while a test runs."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self._stop = threading.Event()
        self.statuses: Counter[int] = Counter()
        self.down_seen: list[str] = []
        self._pool = ThreadPoolExecutor(3)
        self._futures = [self._pool.submit(self._charge, worker) for worker in range(2)]
        self._futures.append(self._pool.submit(self._watch))

    def _charge(self, worker: int) -> None:
        for n in range(10_000):  # bounded; the test stops it long before
            if self._stop.is_set():
                return
            body = {"vehicle_id": f"ev-{worker}-{n}", "amount": 1.0, "duration_seconds": 1.0}
            response = requests.post(f"{self._grid.balancer.url}/charge", json=body, timeout=15)
            self.statuses[response.status_code] += 1
            time.sleep(0.05)

    def _watch(self) -> None:
        real = {s.url for s in self._grid.substations}
        while not self._stop.is_set():
            for url, entry in self._grid.status().items():
                if url in real and not entry["up"]:
                    self.down_seen.append(f"{entry['id']}: {entry['last_error']}")
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        for future in self._futures:
            future.result(timeout=30)
        self._pool.shutdown()


def assert_quotes_nothing(text: str) -> None:
    for fragment in (SECRET, "10.9.8.7", "postgres", "padding", "##"):
        assert fragment not in text, text


def test_slow_endless_and_foreign_answers_are_refused_in_time_while_routing_goes_on(grid_factory, fakes) -> None:
    grid = grid_factory()
    traffic = Traffic(grid)
    try:
        # At registration: each refused within the poll's total limit, in the balancer's own words.
        for mode, complaint in (
            ("trickle", f"no complete answer within {POLL_LIMIT:g} s"),
            ("flood", f"larger than {MAX_METRICS_BYTES} bytes"),
            ("leak", "not a substation's metrics page"),
        ):
            fake = fakes(f"substation-{mode}")
            fake.mode = mode
            started = time.monotonic()
            response = grid.register(fake.url)
            took = time.monotonic() - started
            body = assert_error(response, 502, "substation_unreachable")
            assert complaint in body["message"], body
            assert_quotes_nothing(response.text)
            assert took <= POLL_LIMIT + SLACK_SECONDS, f"{mode}: answered after {took:.2f} s"
            assert fake.url not in grid.status()

        # Once registered: a substation turned hostile is polled, cut off each time and marked down.
        turncoat = fakes("substation-turncoat")
        assert grid.register(turncoat.url).status_code == 201
        for mode, complaint in (
            ("trickle", "no complete answer within"),
            ("flood", "larger than"),
            ("leak", "not a substation's metrics page"),
        ):
            turncoat.mode = mode
            wait_for(
                lambda: complaint in (grid.status()[turncoat.url]["last_error"] or ""),
                POLL_LIMIT + 3,
                f"the balancer to refuse the {mode} answer",
            )
            assert not grid.status()[turncoat.url]["up"]
            time.sleep(3)  # several rounds with the hostile answer in them
            assert_quotes_nothing(requests.get(f"{grid.balancer.url}/status", timeout=5).text)
    finally:
        traffic.stop()

    assert traffic.down_seen == [], "the real substations were never marked down"
    assert set(traffic.statuses) == {201} and traffic.statuses[201] >= 20, traffic.statuses
    trickled = [c for fake in [turncoat] for c in fake.connections if c.mode == "trickle"]
    assert len(trickled) >= 3, "the trickling substation was polled round after round"
    longest = max(c.lasted or 0.0 for c in trickled)
    assert longest <= POLL_LIMIT + 0.5, f"a poll stayed on the trickling server for {longest:.2f} s"
    assert all(c.path == "/metrics" for c in turncoat.connections), "no charge request was sent to it"
    for substation in grid.substations:
        assert requests.get(f"{substation.url}/health", timeout=5).ok
    assert requests.get(f"{grid.balancer.url}/health", timeout=5).ok
    assert "Traceback" not in grid.balancer.log_text()


# The cap -----------------------------------------------------------------------------------------


def test_the_number_of_substations_is_capped(grid_factory, fakes) -> None:
    grid = grid_factory(MAX_SUBSTATIONS="3")  # two configured, room for one more
    first, second = fakes("substation-a"), fakes("substation-b")

    assert grid.register(first.url).status_code == 201
    full = assert_error(grid.register(second.url), 409, "too_many_substations")
    assert full["max_substations"] == 3 and "MAX_SUBSTATIONS" in full["message"]
    assert second.connections == [], "a full balancer polls nothing new"
    assert grid.register(first.url).status_code == 200, "registering a tracked URL again is not one more"
    assert len(grid.status()) == 3

    assert grid.deregister("substation-a").status_code == 200
    assert grid.register(second.url).status_code == 201
    assert {entry["id"] for entry in grid.status().values()} == {"substation-1", "substation-2", "substation-b"}
    assert all(sessions_at(substation) == [] for substation in grid.substations)
