"""The edge every service is served behind (gridcommon/edge.py): idle and slow clients cost a socket, never a thread.

Real processes throughout: nginx in front of gunicorn, started by ``python -m gridcommon.serve``
as in compose and local mode, spoken to over real sockets, some of them from a second source
address (127.0.0.2, 127.0.0.3: the whole of 127/8 is loopback on Linux).
"""
from __future__ import annotations

import http.client
import json
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from benchmarks.closedloop import closed_loop
from tests.harness import REPO_ROOT, Service, Stack, free_port, start_all, start_stack

pytestmark = pytest.mark.integration

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
PER_CLIENT = 4
IN_ALL = 8


def substation(name: str, log_dir: Path, **edge: str) -> Service:
    return Service(name=name, app="substation_service:create_app()",
                   env={"SUBSTATION_ID": name, "CAPACITY_KW": "100", **edge}, log_dir=log_dir)


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Service]]:
    log_dir = tmp_path_factory.mktemp("edge")
    started = {
        "timeouts": substation("substation-timeouts", log_dir, EDGE_HEADER_TIMEOUT_SECONDS=str(HEADER_TIMEOUT),
                               EDGE_BODY_TIMEOUT_SECONDS=str(BODY_TIMEOUT)),
        "caps": substation("substation-caps", log_dir, EDGE_MAX_REQUESTS_PER_CLIENT=str(PER_CLIENT),
                           EDGE_MAX_REQUESTS=str(IN_ALL)),
    }
    start_all(list(started.values()))
    yield started
    for service in started.values():
        service.stop()


def connect(service: Service, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection((service.host, service.port), timeout=5, source_address=(source, 0))


def read_answer(sock: socket.socket, timeout: float) -> tuple[int | None, dict, float]:
    """(status or None if closed without one, JSON body or {}, seconds until the server answered or closed)."""
    started = time.monotonic()
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None, {}, time.monotonic() - started
            data += chunk
    except ConnectionResetError:
        return None, {}, time.monotonic() - started
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next((int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), json.loads(body) if body else {}, time.monotonic() - started


def held_open(service: Service, source: str) -> socket.socket:
    """A POST whose headers have arrived and whose body has not: a request the edge holds."""
    sock = connect(service, source)
    sock.sendall(b"POST /charge HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n")
    return sock


def get(service: Service, path: str = "/health", source: str = "127.0.0.1",
        headers: dict[str, str] | None = None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection(service.host, service.port, timeout=5, source_address=(source, 0))
    try:
        connection.request("GET", path, headers=headers or {})
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        connection.close()


# --- settings --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, value", [("EDGE_BODY_TIMEOUT_SECONDS", "soon"), ("EDGE_MAX_REQUESTS_PER_CLIENT", "0")])
def test_a_bad_edge_setting_stops_the_service_at_start_naming_it(tmp_path, name, value):
    service = substation("substation-bad-setting", tmp_path, **{name: value})
    service.start(wait=False)
    assert service.process.wait(timeout=20) != 0
    assert name in service.log_text(), service.log_text()


# --- timeouts --------------------------------------------------------------------------------------


def test_headers_sent_slower_than_the_header_timeout_are_cut(services):
    service = services["timeouts"]
    sock = connect(service)
    started = time.monotonic()
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    sock.settimeout(0.3)
    cut, answer = None, b""
    # A header line every 0.3 s: the connection is never quiet, but the head is never whole either.
    for number in range(20):
        try:
            sock.sendall(b"X-Slow-%d: 1\r\n" % number)
            answer = sock.recv(65536)  # anything at all, or the end: the server let go
        except socket.timeout:
            continue
        except OSError:  # reset by the server
            pass
        cut = time.monotonic() - started
        break
    sock.close()
    assert cut is not None, "a head trickling in for 6 s was never cut"
    assert answer == b"", answer
    assert HEADER_TIMEOUT - 0.2 <= cut <= HEADER_TIMEOUT + 1.5, cut
    assert get(service)[0] == 200


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(services):
    sock = connect(services["timeouts"])
    status, _, waited = read_answer(sock, timeout=10)
    sock.close()
    assert status is None and HEADER_TIMEOUT - 0.2 <= waited <= HEADER_TIMEOUT + 1.5, (status, waited)


def test_a_body_pausing_longer_than_the_body_timeout_is_cut(services):
    sock = connect(services["timeouts"])
    sock.sendall(b"POST /charge HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
    status, body, waited = read_answer(sock, timeout=10)
    sock.close()
    assert status is None, (status, body)  # closed (reset) without an answer
    assert BODY_TIMEOUT - 0.2 <= waited <= BODY_TIMEOUT + 1.5, waited


def test_a_body_with_short_pauses_arrives_whole_and_the_service_answers_it(services):
    body = json.dumps({"vehicle_id": "EV-paced", "amount": 3, "duration_seconds": 30}).encode()
    sock = connect(services["timeouts"])
    sock.sendall(b"POST /charge HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                 % len(body))
    # Ten pieces 0.3 s apart: 3 s in all, longer than the body timeout, but never a pause that long.
    for start in range(0, len(body), -(-len(body) // 10)):
        sock.sendall(body[start:start + -(-len(body) // 10)])
        time.sleep(0.3)
    status, answer, _ = read_answer(sock, timeout=10)
    sock.close()
    assert status == 201 and answer["vehicle_id"] == "EV-paced", answer


def test_keep_alive_outlasts_the_header_timeout(services):
    """An idle kept-alive connection is the keep-alive timeout's (15 s), not the header timeout's."""
    sock = connect(services["timeouts"])
    for _ in range(2):
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answer(sock, timeout=5)[0] == 200
        time.sleep(HEADER_TIMEOUT + 1.0)
    sock.close()


# --- caps ------------------------------------------------------------------------------------------


def test_the_per_address_cap_refuses_the_excess_while_another_address_gets_through(services):
    service = services["caps"]
    held = [held_open(service, "127.0.0.1") for _ in range(PER_CLIENT)]
    try:
        time.sleep(0.3)  # the edge has read every head
        status, body = get(service, source="127.0.0.1")
        assert status == 429 and body["error"] == "too_many_connections", body
        assert "from your address" in body["message"]
        assert get(service, source="127.0.0.2") == (200, {"status": "ok", "substation": "substation-caps"})
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert get(service, source="127.0.0.1")[0] == 200


def test_the_cap_in_all_refuses_every_address_past_it(services):
    service = services["caps"]
    held = [held_open(service, source) for source in ("127.0.0.1", "127.0.0.3") for _ in range(IN_ALL // 2)]
    try:
        time.sleep(0.3)
        status, body = get(service, source="127.0.0.2")
        assert status == 429 and body["error"] == "too_many_connections", body
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert get(service, source="127.0.0.2")[0] == 200


# --- heads too large -------------------------------------------------------------------------------


def raw_answer(service: Service, request: bytes) -> tuple[int | None, dict]:
    sock = connect(service)
    sock.sendall(request)
    status, body, _ = read_answer(sock, timeout=5)
    sock.close()
    return status, body


@pytest.mark.parametrize("headers", [
    b"X-Large: %s\r\n" % (b"a" * 9000),  # over one header buffer: the edge's own refusal
    b"".join(b"X-Many-%d: %s\r\n" % (n, b"b" * 900) for n in range(40)),  # a head over 32 KiB in all
    b"".join(b"X-H%d: v\r\n" % n for n in range(150)),  # past gunicorn's 100 headers
], ids=["one 9000-byte header", "40 headers of 900 bytes", "150 headers"])
def test_too_many_or_too_large_headers_are_431(services, headers):
    status, body = raw_answer(services["caps"], b"GET /health HTTP/1.1\r\nHost: x\r\n%s\r\n" % headers)
    assert status == 431 and body["error"] == "request_header_fields_too_large", (status, body)


def test_a_body_past_the_edges_limit_gets_the_same_413_as_the_services_own(services):
    """The edge takes in bodies up to 64 KiB, the services up to 16 KiB: past either, one answer."""
    def post(length: int) -> tuple[int | None, dict]:
        head = b"POST /charge HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        return raw_answer(services["caps"], head % length + b"x" * length)

    services_own, edges = post(20 * 1024), post(100 * 1024)
    assert services_own[0] == edges[0] == 413 and services_own[1] == edges[1], (services_own, edges)


def test_a_request_line_too_long_is_414(services):
    status, body = raw_answer(services["caps"], b"GET /%s HTTP/1.1\r\nHost: x\r\n\r\n" % (b"a" * 9000))
    assert status == 414 and body["error"] == "uri_too_long", (status, body)


def test_trace_which_nginx_refuses_itself_gets_the_services_own_405_with_allow(services):
    sock = connect(services["caps"])
    sock.sendall(b"TRACE /health HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.settimeout(5)
    answer = b""
    while b"}" not in answer:
        chunk = sock.recv(65536)
        if not chunk:
            break
        answer += chunk
    sock.close()
    head = answer.split(b"\r\n\r\n")[0].lower()  # header names are case-insensitive
    assert answer.startswith(b"HTTP/1.1 405 ") and b"\r\nallow: get, head\r\n" in head, answer
    assert b'"error":"method_not_allowed"' in answer and b"\r\nx-request-id: " in head, answer


# --- the client's address --------------------------------------------------------------------------


def test_the_service_sees_the_clients_own_address_and_cannot_be_told_another(tmp_path):
    """A per-address rate limit of the charge API counts 127.0.0.1 and 127.0.0.2 apart, whatever they claim."""
    charge = Service(name="charge-request-service", app="charge_request_service:create_app()", log_dir=tmp_path,
                     env={"LOAD_BALANCER_URL": f"http://127.0.0.1:{free_port()}", "RATE_LIMIT_PER_CLIENT": "2/minute"})
    charge.start()
    try:
        def post(source: str, headers: dict[str, str] | None = None) -> int:
            connection = http.client.HTTPConnection(charge.host, charge.port, timeout=5, source_address=(source, 0))
            body = json.dumps({"vehicle_id": f"EV-{time.monotonic_ns()}", "amount": 0})
            connection.request("POST", "/charge", body=body,
                               headers={"Content-Type": "application/json", **(headers or {})})
            status = connection.getresponse().status
            connection.close()
            return status

        assert [post("127.0.0.1"), post("127.0.0.1"), post("127.0.0.1")] == [400, 400, 429]
        for forged in ({"X-Real-IP": "198.51.100.7"}, {"X-Forwarded-For": "198.51.100.7"}):
            assert post("127.0.0.1", forged) == 429, forged
        assert post("127.0.0.2") == 400
    finally:
        charge.stop()


# --- the floors: normal traffic under 1,000 idle and 100 slow clients -------------------------------

CLIENTS = 8
QUIET_SECONDS = 10.0
IDLE, SLOW = 1_000, 100
ATTACKER = "127.0.0.3"


def raise_open_files(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.fail(f"the test needs {needed} open files; the hard limit is {hard}: raise it (ulimit -Hn)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def probe_health(url: str, stop: threading.Event, answers: list[int | str]) -> None:
    """GET /health every 0.25 s until ``stop``; the status of each, or the error that came instead."""
    while not stop.wait(0.25):
        try:
            answers.append(requests.get(url, timeout=2).status_code)
        except requests.RequestException as exc:
            answers.append(type(exc).__name__)


def under_attack(stack: Stack, target: Service, seconds: float) -> tuple[object, list[int | str], dict[str, int]]:
    """The closed loop on the charge API for ``seconds`` while ``target``'s port is attacked; health probed."""
    attacker = subprocess.Popen(
        [sys.executable, "-m", "tests.edge_attack", target.host, str(target.port), "--idle", str(IDLE),
         "--slow", str(SLOW), "--seconds", str(seconds + 4.0), "--source", ATTACKER],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(2.0)  # every attacking connection open
        stop, health = threading.Event(), []
        prober = threading.Thread(target=probe_health, args=(f"{target.url}/health", stop, health))
        prober.start()
        try:
            loop = closed_loop(stack.charge.url, CLIENTS, seconds, prefix=f"EV-under-{target.name}")
        finally:
            stop.set()
            prober.join(timeout=10)
        output, _ = attacker.communicate(timeout=30)
    finally:
        attacker.kill()
        attacker.wait(timeout=10)
    return loop, health, json.loads(output.strip().splitlines()[-1])


@pytest.fixture
def roomy_stack(tmp_path) -> Iterator[Stack]:
    stack = start_stack(tmp_path, capacities=(10_000.0, 10_000.0, 10_000.0))
    yield stack
    stack.stop()


def test_idle_and_slow_clients_do_not_slow_anyone_else(roomy_stack):
    """The floors: 1,000 idle connections and 100 slow bodies against the charge API for 60 s, then
    against a substation for 30 s: charge requests never fail, their p99 stays within 2x of a quiet
    run's, and the attacked port's /health answers every probe."""
    raise_open_files(IDLE + SLOW + 512)
    stack = roomy_stack
    closed_loop(stack.charge.url, CLIENTS, 1.0, prefix="EV-warm")
    quiet = closed_loop(stack.charge.url, CLIENTS, QUIET_SECONDS, prefix="EV-quiet")
    quiet_p99 = quiet.latency_percentile(0.99)
    assert quiet.failures == 0 and set(quiet.statuses) == {201}, quiet.statuses
    for target, seconds in ((stack.charge, 60.0), (stack.substations[0], 30.0)):
        loop, health, attack = under_attack(stack, target, seconds)
        p99 = loop.latency_percentile(0.99)
        print(f"{target.name}: quiet p99 {1000 * quiet_p99:.1f} ms ({quiet.answers_per_second:.0f}/s), "
              f"attacked p99 {1000 * p99:.1f} ms ({loop.answers_per_second:.0f}/s), {len(health)} health probes, "
              f"attacker {attack}")
        assert loop.failures == 0 and set(loop.statuses) == {201}, (loop.failures, loop.statuses)
        assert p99 <= 2 * quiet_p99, f"p99 {1000 * p99:.1f} ms under attack, {1000 * quiet_p99:.1f} ms quiet"
        assert len(health) >= seconds * 3 and set(health) == {200}, [answer for answer in health if answer != 200]
        # The attack really ran: all its connections were opened, and the idle ones were cut (by the
        # header timeout) and replaced; the slow ones kept sending.
        assert attack["opened"] >= IDLE + SLOW and attack["connect_failures"] == 0, attack
        assert attack["closed_by_server"] >= IDLE and attack["body_bytes_sent"] >= SLOW * (seconds / 2 - 2), attack
