"""The charge request service's HTTP API through Flask's test client.

Forwarding goes to a real load balancer and real substations (gunicorn
processes from tests/harness.py); an unreachable balancer is a closed port. Only
a balancer that answers nonsense, which the real one never does, is played by a
small stand-in HTTP server.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from charge_request_service import create_app
from charge_request_service.config import Settings
from charge_request_service.routes import EXTENSION_KEY
from charge_request_service.sessions import ChargeSession, utc_now
from gridcommon.promtext import Scrape, parse_metrics
from gridcommon.web import MAX_BODY_BYTES
from tests.harness import Stack, free_port, logged_within, start_stack, wait_for

SUBSTATION_CAPACITY_KW = 60.0
BALANCER_MAX_AMOUNT_KW = 100.0
GRID_IDS = {"substation-1", "substation-2"}


# --- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Two real substations behind a real balancer, shared by this module's forwarding tests."""
    stack = start_stack(
        tmp_path_factory.mktemp("charge-api-grid"),
        capacities=(SUBSTATION_CAPACITY_KW, SUBSTATION_CAPACITY_KW),
        # Strict: a request fits whole or is refused, so a 503 is easy to provoke and pass on.
        substation_env={"ALLOCATION_POLICY": "strict"},
        balancer_env={"POLL_INTERVAL_SECONDS": "0.5", "MAX_AMOUNT_KW": str(BALANCER_MAX_AMOUNT_KW)},
    )
    yield stack
    stack.stop()


class ShiftedClock:
    """The real UTC time plus an offset the test moves."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return utc_now() + self.offset


OPERATOR_TOKEN = "charge-api-test-operator"


def make_client(balancer_url: str, clock: Callable[[], datetime] = utc_now, **settings: float) -> FlaskClient:
    """A charge API whose every request carries the operator's token, the right to see and stop any session.

    Who may do what without it is tested in tests/test_charge_access.py.
    """
    timeouts = {"request_timeout_seconds": 3, "health_timeout_seconds": 1}
    app = create_app(
        Settings(load_balancer_url=balancer_url, admin_token=OPERATOR_TOKEN, rate_limit_per_vehicle="",
                 public_api_auth="open", **{**timeouts, **settings}),
        clock=clock,
    )
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {OPERATOR_TOKEN}"
    return client


@pytest.fixture
def grid_client(grid: Stack) -> FlaskClient:
    return make_client(grid.balancer.url)


@pytest.fixture
def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def offline_client(closed_port_url: str) -> FlaskClient:
    """A service whose balancer is down: nothing listens on its port."""
    return make_client(closed_port_url, connect_timeout_seconds=0.5)


def scrape(client: FlaskClient) -> Scrape:
    response = client.get("/metrics")
    assert response.status_code == 200
    return parse_metrics(response.get_data(as_text=True))


def charge_count(client: FlaskClient, status: int) -> float:
    return scrape(client).value("charge_requests_total", default=0.0, status=str(status))


def failed_count(client: FlaskClient) -> float:
    return scrape(client).value("failed_requests_total")


def assert_json_error(response, status: int, error: str | None = None) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert isinstance(body["error"], str) and body["message"]
    if error is not None:
        assert body["error"] == error
    return body


def substation_session_ids(grid: Stack) -> set[str]:
    ids = set()
    for substation in grid.substations:
        answer = requests.get(f"{substation.url}/sessions", timeout=5).json()
        ids.update(session["session_id"] for session in answer["sessions"])
    return ids




# --- validation: nothing invalid is forwarded ----------------------------------------------------


BAD_BODIES = [
    ({"amount": 22}, "vehicle_id"),
    ({"vehicle_id": "", "amount": 22}, "vehicle_id"),
    ({"vehicle_id": "x" * 65, "amount": 22}, "vehicle_id"),
    ({"vehicle_id": "EV 001", "amount": 22}, "vehicle_id"),
    ({"vehicle_id": "EV/001", "amount": 22}, "vehicle_id"),
    ({"vehicle_id": 1001, "amount": 22}, "vehicle_id"),
    ({"vehicle_id": "EV-001"}, "amount"),
    ({"vehicle_id": "EV-001", "amount": 0}, "amount"),
    ({"vehicle_id": "EV-001", "amount": -5}, "amount"),
    ({"vehicle_id": "EV-001", "amount": 350.001}, "amount"),
    ({"vehicle_id": "EV-001", "amount": True}, "amount"),
    ({"vehicle_id": "EV-001", "amount": "22"}, "amount"),
    ({"vehicle_id": "EV-001", "amount": None}, "amount"),
    ({"vehicle_id": "EV-001", "amount": 22, "duration_seconds": 0}, "duration_seconds"),
    ({"vehicle_id": "EV-001", "amount": 22, "duration_seconds": 3601}, "duration_seconds"),
    ({"vehicle_id": "EV-001", "amount": 22, "duration_seconds": "60"}, "duration_seconds"),
    ({"vehicle_id": "EV-001", "amount": 22, "duration_seconds": False}, "duration_seconds"),
]


@pytest.mark.parametrize(("body", "field"), BAD_BODIES)
def test_invalid_field_is_400_naming_it_and_never_forwarded(offline_client, body, field):
    answer = assert_json_error(offline_client.post("/charge", json=body), 400, "invalid_field")
    assert answer["field"] == field
    assert field in answer["message"]
    # Forwarding to the closed port would have been a 502 and a failure.
    assert charge_count(offline_client, 400) == 1
    assert failed_count(offline_client) == 0


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_amount_is_400(offline_client, literal):
    body = '{"vehicle_id": "EV-001", "amount": %s}' % literal
    answer = assert_json_error(offline_client.post("/charge", data=body, content_type="application/json"), 400)
    assert answer["field"] == "amount"


@pytest.mark.parametrize("raw", ['{"vehicle_id": "EV-001", "amount": ', "[1, 2]", '"EV-001"', ""])
def test_body_that_is_not_a_json_object_is_400(offline_client, raw):
    response = offline_client.post("/charge", data=raw, content_type="application/json")
    assert_json_error(response, 400, "invalid_json")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_non_json_content_type_is_415(offline_client, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = offline_client.post("/charge", data='{"vehicle_id": "EV-001", "amount": 22}', headers=headers)
    body = assert_json_error(response, 415)
    assert "application/json" in body["message"]
    assert charge_count(offline_client, 415) == 1


def padded_body(size: int) -> str:
    start = '{"vehicle_id": "EV-001", "amount": 22'
    return start + " " * (size - len(start) - 1) + "}"


def test_body_over_16_kib_is_413_and_one_at_the_limit_is_read(offline_client):
    at_limit = offline_client.post("/charge", data=padded_body(MAX_BODY_BYTES), content_type="application/json")
    # Read, valid, forwarded: it fails only because nothing listens at the balancer's port.
    assert_json_error(at_limit, 502)
    too_big = offline_client.post("/charge", data=padded_body(MAX_BODY_BYTES + 1), content_type="application/json")
    body = assert_json_error(too_big, 413)
    assert str(MAX_BODY_BYTES) in body["message"]


def test_amount_limit_follows_the_setting(closed_port_url):
    client = make_client(closed_port_url, max_amount_kw=50)
    body = assert_json_error(client.post("/charge", json={"vehicle_id": "EV-001", "amount": 50.5}), 400)
    assert body["field"] == "amount" and "50" in body["message"]


def test_unknown_path_and_wrong_method_are_json(offline_client):
    assert_json_error(offline_client.get("/nope"), 404)
    wrong_method = offline_client.put("/charge", json={})
    assert_json_error(wrong_method, 405)
    assert "POST" in wrong_method.headers["Allow"]
    assert_json_error(offline_client.post("/sessions"), 405)


# --- the balancer is down ------------------------------------------------------------------------


def test_unreachable_balancer_is_502_json_and_counted(offline_client):
    response = offline_client.post("/charge", json={"vehicle_id": "EV-001", "amount": 22})
    body = assert_json_error(response, 502, "load_balancer_unavailable")
    assert "could not be reached" in body["message"]
    # The public answer names no internal host, URL or exception; the log says what broke.
    assert "127.0.0.1" not in body["message"] and "Error" not in body["message"]
    assert failed_count(offline_client) == 1
    assert charge_count(offline_client, 502) == 1
    assert offline_client.get("/sessions").get_json() == {"sessions": []}


def test_status_says_when_the_balancer_does_not_answer(offline_client, closed_port_url):
    status = offline_client.get("/status").get_json()
    assert status["load_balancer"] == {"healthy": False}  # no internal address in a public answer
    assert offline_client.get("/health").get_json() == {"status": "ok", "service": "charge_request_service"}


def track(client: FlaskClient, session: ChargeSession) -> None:
    client.application.extensions[EXTENSION_KEY].tracker.record(session)


def test_stopping_while_the_balancer_is_down_keeps_the_session_for_a_retry(offline_client):
    now = utc_now()
    session = ChargeSession("s-1", "EV-001", "substation-1", 22.0, now, now + timedelta(minutes=5))
    track(offline_client, session)

    assert_json_error(offline_client.delete("/sessions/s-1"), 502, "load_balancer_unavailable")
    assert offline_client.get("/sessions/s-1").status_code == 200
    assert failed_count(offline_client) == 1


# --- forwarding to the real balancer -------------------------------------------------------------


def test_admitted_request_returns_the_balancers_201_and_is_tracked(grid, grid_client):
    response = grid_client.post(
        "/charge",
        json={"vehicle_id": "EV-api-1", "amount": 7.5, "duration_seconds": 120},
        headers={"X-Request-ID": "api-admit-1"},
    )
    assert response.status_code == 201, response.get_data(as_text=True)
    body = response.get_json()
    assert body["substation"] in GRID_IDS
    assert body["vehicle_id"] == "EV-api-1" and body["amount"] == 7.5
    assert body["routing"]["attempts"] >= 1
    assert response.headers["X-Request-ID"] == "api-admit-1"
    assert body["session_id"] in substation_session_ids(grid)

    tracked = grid_client.get(f"/sessions/{body['session_id']}").get_json()
    shared = ("session_id", "vehicle_id", "substation", "amount", "started_at", "ends_at")
    assert {key: tracked[key] for key in shared} == {key: body[key] for key in shared}
    assert 0 < tracked["remaining_seconds"] <= 120
    assert (tracked["state"], tracked["live"]) == ("charging", True)
    assert [s["session_id"] for s in grid_client.get("/sessions").get_json()["sessions"]] == [body["session_id"]]

    metrics = scrape(grid_client)
    assert metrics.value("active_sessions") == 1
    assert metrics.value("charge_requests_total", status="201") == 1
    assert metrics.value("requests_duration_seconds_count") == 1
    # The id given here travelled with the forwarded call.
    assert logged_within(grid.balancer, "[api-admit-1]")
    grid_client.delete(f"/sessions/{body['session_id']}")


def test_status_reports_the_balancer_and_the_counts(grid, grid_client):
    admitted = grid_client.post("/charge", json={"vehicle_id": "EV-api-2", "amount": 1}).get_json()
    grid_client.post("/charge", json={"vehicle_id": "EV-api-2", "amount": -1})
    status = grid_client.get("/status").get_json()
    assert status["load_balancer"] == {"healthy": True}
    assert status["active_sessions"] == 1
    assert status["sessions"] == {"recorded": 1, "stopped": 0, "expired": 0, "active": 1}
    assert status["charge_requests"] == {"201": 1, "400": 1}
    assert status["failed_requests"] == 0
    grid_client.delete(f"/sessions/{admitted['session_id']}")


def test_stop_frees_the_session_at_its_substation(grid, grid_client):
    admitted = grid_client.post("/charge", json={"vehicle_id": "EV-api-3", "amount": 5}).get_json()
    session_id = admitted["session_id"]

    stopped = grid_client.delete(f"/sessions/{session_id}")
    assert stopped.status_code == 200, stopped.get_data(as_text=True)
    assert stopped.get_json()["session_id"] == session_id
    assert "ended_at" in stopped.get_json()
    assert session_id not in substation_session_ids(grid)
    # It is no longer running, but it can still be read: how it ended and what it got.
    ended = grid_client.get(f"/sessions/{session_id}").get_json()
    assert (ended["state"], ended["end_reason"]) == ("ended", "stopped")
    assert ended["live"] is False, "an ended session's figures are final, not live"
    assert ended["energy_kwh"] >= 0.0 and "finished_at" in ended
    assert_json_error(grid_client.delete(f"/sessions/{session_id}"), 404, "session_not_found")
    assert grid_client.get("/status").get_json()["sessions"]["stopped"] == 1
    assert scrape(grid_client).value("active_sessions") == 0


def test_unknown_session_is_404_json(grid_client):
    body = assert_json_error(grid_client.get("/sessions/does-not-exist"), 404, "session_not_found")
    assert body["session_id"] == "does-not-exist"
    assert_json_error(grid_client.delete("/sessions/does-not-exist"), 404, "session_not_found")


def test_a_request_larger_than_every_limit_is_refused_at_once_and_not_queued(grid_client):
    # More than any one substation's limit (60 kW), though within every limit on amounts: it could never start.
    # (A full grid's 503, passed on with its reason, is in tests/test_refusals.py.)
    response = grid_client.post("/charge", json={"vehicle_id": "EV-big", "amount": 80, "wait": True})
    body = assert_json_error(response, 409, "exceeds_every_limit")
    assert body["largest_limit_kw"] == 60.0 and "Ask for at most 60 kW" in body["message"]
    assert charge_count(grid_client, 409) == 1
    assert failed_count(grid_client) == 0
    assert grid_client.get("/sessions").get_json() == {"sessions": []}
    assert grid_client.get("/status").get_json()["queued_requests"] == 0


def test_balancers_own_refusal_of_a_field_is_passed_on(grid_client):
    # This service allows up to 350 kW; the balancer here allows 100 kW and says so.
    body = assert_json_error(grid_client.post("/charge", json={"vehicle_id": "EV-big", "amount": 150}), 400)
    assert body["field"] == "amount"
    assert failed_count(grid_client) == 0


def test_sessions_past_their_end_drop_out_of_every_view_without_a_request(grid):
    clock = ShiftedClock()
    client = make_client(grid.balancer.url, clock=clock)
    admitted = client.post("/charge", json={"vehicle_id": "EV-api-4", "amount": 1, "duration_seconds": 2})
    assert admitted.status_code == 201
    assert scrape(client).value("active_sessions") == 1

    clock.offset = timedelta(seconds=3)
    assert scrape(client).value("active_sessions") == 0
    assert client.get("/sessions").get_json() == {"sessions": []}
    assert client.get("/status").get_json()["sessions"]["expired"] == 1


def test_a_session_that_ran_its_time_reads_as_ended_and_not_live(grid):
    client = make_client(grid.balancer.url)
    admitted = client.post("/charge", json={"vehicle_id": "EV-api-6", "amount": 2, "duration_seconds": 0.3})
    session_id = admitted.get_json()["session_id"]
    wait_for(lambda: client.get(f"/sessions/{session_id}").get_json()["state"] == "ended", 5, "the session ended")
    first = client.get(f"/sessions/{session_id}").get_json()
    assert (first["end_reason"], first["live"]) == ("completed", False)
    assert first["energy_kwh"] > 0 and "ended_at" in first and "finished_at" in first
    # The substation's last record is kept: read again, it is the same, and still not live.
    assert client.get(f"/sessions/{session_id}").get_json() == first


def test_stopping_a_session_its_substation_already_ended_is_404_and_forgets_it(grid):
    clock = ShiftedClock()
    clock.offset = timedelta(seconds=-30)  # this service's clock lags, so it still thinks the session runs
    client = make_client(grid.balancer.url, clock=clock)
    admitted = client.post("/charge", json={"vehicle_id": "EV-api-5", "amount": 1, "duration_seconds": 0.2})
    session_id = admitted.get_json()["session_id"]
    time.sleep(0.4)
    # Still tracked as running here, but the substation's record says it ended: nothing in it changes any more.
    tracked = client.get(f"/sessions/{session_id}").get_json()
    assert (tracked["state"], tracked["end_reason"], tracked["live"]) == ("ended", "completed", False)

    body = assert_json_error(client.delete(f"/sessions/{session_id}"), 404, "session_not_found")
    assert body["substation"] in GRID_IDS and body["substation"] in body["message"]
    assert client.get(f"/sessions/{session_id}").get_json()["state"] == "ended"
    assert failed_count(client) == 0


def test_balancer_that_does_not_answer_in_time_is_502(grid):
    client = make_client(grid.balancer.url, request_timeout_seconds=0.3)
    balancer_group = grid.balancer.process.pid
    os.killpg(balancer_group, signal.SIGSTOP)  # frozen: connections are accepted, nothing answers
    try:
        started = time.monotonic()
        response = client.post("/charge", json={"vehicle_id": "EV-slow", "amount": 0.5, "duration_seconds": 1})
        elapsed = time.monotonic() - started
    finally:
        os.killpg(balancer_group, signal.SIGCONT)
    body = assert_json_error(response, 502, "load_balancer_unavailable")
    assert "in time" in body["message"]
    assert elapsed < 2
    assert failed_count(client) == 1


# --- a balancer that answers nonsense ------------------------------------------------------------


class StandInBalancer:
    """An HTTP server on 127.0.0.1 that answers every call with one fixed reply."""

    def __init__(self, status: int, body: str, headers: dict[str, str]) -> None:
        reply = (status, body.encode(), headers)

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                code, payload, extra = reply
                self.send_response(code)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_POST = do_DELETE = do_GET = _answer

            def log_message(self, *_args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stand_in() -> Iterator[Callable[..., StandInBalancer]]:
    servers: list[StandInBalancer] = []

    def start(status: int, body: str, content_type: str = "application/json", **headers: str) -> StandInBalancer:
        server = StandInBalancer(status, body, {"Content-Type": content_type, **headers})
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


NONSENSE = [
    (201, "<html><body>Welcome</body></html>", "text/html"),
    (201, '{"session_id": "x1"}', "application/json"),
    (201, json.dumps({"session_id": "x1", "substation": "s", "vehicle_id": "v", "amount": 1,
                      "started_at": "yesterday", "ends_at": "today"}), "application/json"),
    (201, "[1, 2, 3]", "application/json"),
    (500, "<h1>Internal Server Error</h1>", "text/html"),
    (200, '{"error": "none", "message": "fine"}', "application/json"),
    (503, '{"busy": true}', "application/json"),
    (404, "Not Found", "text/plain"),
]


@pytest.mark.parametrize(("status", "body", "content_type"), NONSENSE)
def test_nonsense_from_the_balancer_is_502_json(stand_in, status, body, content_type):
    client = make_client(stand_in(status, body, content_type).url)
    response = client.post("/charge", json={"vehicle_id": "EV-001", "amount": 22})
    answer = assert_json_error(response, 502, "load_balancer_unavailable")
    assert "<" not in answer["message"]
    assert failed_count(client) == 1
    assert client.get("/sessions").get_json() == {"sessions": []}


def test_503_without_retry_after_gets_one(stand_in):
    balancer = stand_in(503, '{"error": "no_capacity", "message": "All substations are full."}')
    response = make_client(balancer.url).post("/charge", json={"vehicle_id": "EV-001", "amount": 22})
    assert_json_error(response, 503, "no_capacity")
    assert response.headers["Retry-After"] == "1"


def test_stop_answered_with_nonsense_is_502_and_keeps_the_session(stand_in):
    client = make_client(stand_in(200, "ok", "text/plain").url)
    now = utc_now()
    track(client, ChargeSession("s-2", "EV-001", "substation-1", 22.0, now, now + timedelta(minutes=5)))
    assert_json_error(client.delete("/sessions/s-2"), 502)
    assert client.get("/sessions/s-2").status_code == 200


def test_each_app_has_its_own_metrics(closed_port_url):
    first: Flask = make_client(closed_port_url).application
    second: Flask = make_client(closed_port_url).application
    first.test_client().post("/charge", json={"amount": 1})
    assert charge_count(first.test_client(), 400) == 1
    assert charge_count(second.test_client(), 400) == 0


def test_stopping_a_session_at_a_substation_the_balancer_no_longer_knows_keeps_it_tracked(grid):
    client = make_client(grid.balancer.url)
    now = utc_now()
    # Tracked here, but at a substation that is not (or no longer) registered at the balancer.
    track(client, ChargeSession("s-gone", "EV-001", "substation-gone", 5.0, now, now + timedelta(minutes=5)))

    error = assert_json_error(client.delete("/sessions/s-gone"), 502, "load_balancer_unavailable")

    assert "substation-gone" not in error["message"]  # the grid's layout is not the public's business
    assert client.get("/sessions/s-gone").status_code == 200
