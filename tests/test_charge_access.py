"""Who may do what at the public API, tried as a hostile client would, against a real stack."""
from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest
import requests

from tests.harness import OPERATOR, OPERATOR_TOKEN, Stack, start_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    stack = start_stack(tmp_path_factory.mktemp("access"), capacities=(3.0,), charge_env={
        "RATE_LIMIT_PER_VEHICLE": "3/second",
        "QUEUE_RETRY_SECONDS": "0.2",
    })
    yield stack
    stack.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def start(stack: Stack, vehicle: str, **extra) -> dict:
    answer = requests.post(f"{stack.charge.url}/charge", json={"vehicle_id": vehicle, "amount": 11, **extra},
                           timeout=10)
    assert answer.status_code in (201, 202), answer.text
    return answer.json()


def test_a_session_token_is_128_random_bits_and_only_its_own(stack: Stack) -> None:
    first, second = start(stack, "ev-a1"), start(stack, "ev-a2")
    tokens = [first["session_token"], second["session_token"]]
    assert tokens[0] != tokens[1]
    assert all(len(base64.urlsafe_b64decode(t + "==")) == 16 for t in tokens)
    # Another vehicle's token opens nothing of this one.
    url = f"{stack.charge.url}/sessions/{first['session_id']}"
    assert requests.get(url, headers=bearer(second["session_token"]), timeout=5).status_code == 403
    for session in (first, second):
        requests.delete(f"{stack.charge.url}/sessions/{session['session_id']}",
                        headers=bearer(session["session_token"]), timeout=5)


@pytest.mark.parametrize("method", ["get", "delete"])
def test_a_session_needs_its_token_or_the_operators(stack: Stack, method: str) -> None:
    session = start(stack, f"ev-{method}")
    url = f"{stack.charge.url}/sessions/{session['session_id']}"
    call = getattr(requests, method)

    missing = call(url, timeout=5)
    assert missing.status_code == 401 and missing.json()["error"] == "unauthorized"
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    for wrong in (bearer("not-the-token"), bearer(session["session_token"] + "x"),
                  {"Authorization": f"Basic {session['session_token']}"}):
        answer = call(url, headers=wrong, timeout=5)
        assert answer.status_code in (401, 403), (wrong, answer.status_code)
        assert answer.json()["error"] in {"unauthorized", "forbidden"}
    if method == "get":
        assert call(url, headers=bearer(session["session_token"]), timeout=5).status_code == 200
        assert call(url, headers=OPERATOR, timeout=5).status_code == 200
        requests.delete(url, headers=OPERATOR, timeout=5)
    else:
        assert call(url, headers=bearer(session["session_token"]), timeout=5).status_code == 200


def test_a_queued_request_is_its_clients_too(stack: Stack) -> None:
    holders = [start(stack, f"ev-hold-{index}", duration_seconds=30) for index in range(2)]
    waiting = start(stack, "ev-queued", wait=True)
    assert waiting["state"] == "queued" and waiting["session_token"]
    url = f"{stack.charge.url}/sessions/{waiting['session_id']}"
    assert requests.get(url, timeout=5).status_code == 401
    assert requests.delete(url, headers=bearer("guess"), timeout=5).status_code == 403
    assert requests.get(url, headers=bearer(waiting["session_token"]), timeout=5).json()["state"] == "queued"
    cancelled = requests.delete(url, headers=bearer(waiting["session_token"]), timeout=5)
    assert cancelled.json()["state"] == "cancelled"
    for holder in holders:
        requests.delete(f"{stack.charge.url}/sessions/{holder['session_id']}", headers=OPERATOR, timeout=5)


def test_the_list_of_every_session_is_the_operators(stack: Stack) -> None:
    session = start(stack, "ev-listed")
    url = f"{stack.charge.url}/sessions"
    assert requests.get(url, timeout=5).status_code == 401
    assert requests.get(url, headers=bearer(session["session_token"]), timeout=5).status_code == 401
    listed = requests.get(url, headers=OPERATOR, timeout=5)
    assert listed.status_code == 200 and session["session_id"] in listed.text
    requests.delete(f"{url}/{session['session_id']}", headers=OPERATOR, timeout=5)


def test_an_unknown_session_asks_for_a_credential_before_saying_it_does_not_exist(stack: Stack) -> None:
    url = f"{stack.charge.url}/sessions/no-such-session"
    assert requests.get(url, timeout=5).status_code == 401
    assert requests.get(url, headers=bearer("anything"), timeout=5).status_code == 404


def test_answers_never_show_other_vehicles(stack: Stack) -> None:
    other = start(stack, "ev-other-vehicle")
    mine = requests.post(f"{stack.charge.url}/charge", json={"vehicle_id": "ev-mine", "amount": 11}, timeout=5)
    status = requests.get(f"{stack.charge.url}/status", timeout=5)
    for answer in (mine, status, requests.get(f"{stack.charge.url}/sessions/{other['session_id']}", timeout=5)):
        assert "ev-other-vehicle" not in answer.text
    for session in (other, mine.json()):
        if "session_id" in session:
            requests.delete(f"{stack.charge.url}/sessions/{session['session_id']}", headers=OPERATOR, timeout=5)


def test_operator_endpoints_are_off_without_an_operator_token(tmp_path: Path) -> None:
    stack = start_stack(tmp_path, capacities=(10.0,), charge_env={"ADMIN_TOKEN": ""})
    try:
        answer = requests.get(f"{stack.charge.url}/sessions", headers=OPERATOR, timeout=5)
        assert answer.status_code == 403 and "ADMIN_TOKEN" in answer.json()["message"]
        session = start(stack, "ev-no-operator")
        # The operator token of other stacks opens nothing here; the session's own still does.
        url = f"{stack.charge.url}/sessions/{session['session_id']}"
        assert requests.get(url, headers=OPERATOR, timeout=5).status_code == 403
        assert requests.get(url, headers=bearer(session["session_token"]), timeout=5).status_code == 200
    finally:
        stack.stop()


def test_a_vehicle_asking_many_times_a_second_is_slowed_down_then_let_through(stack: Stack) -> None:
    url = f"{stack.charge.url}/charge"
    # Broken requests never count against the vehicle they name: thirty of them lock nobody out.
    broken = [requests.post(url, json={"vehicle_id": "ev-hammer", "amount": 0}, timeout=5).status_code
              for _ in range(30)]
    assert set(broken) == {400}
    body = {"vehicle_id": "ev-hammer", "amount": 0.5, "duration_seconds": 30}
    answers = [requests.post(url, json=body, timeout=5) for _ in range(6)]
    limited = [a for a in answers if a.status_code == 429]
    assert [a.status_code for a in answers[:3]] == [201, 409, 409] and limited
    assert limited[0].json()["error"] == "too_many_requests"
    assert int(limited[0].headers["Retry-After"]) >= 1
    # Other vehicles from the same address are not held back by it.
    assert requests.post(url, json={"vehicle_id": "ev-bystander", "amount": 0}, timeout=5).status_code == 400
    time.sleep(int(limited[0].headers["Retry-After"]) + 0.1)
    assert requests.post(url, json=body, timeout=5).status_code == 409
    requests.delete(f"{stack.charge.url}/sessions/{answers[0].json()['session_id']}", headers=OPERATOR, timeout=5)


def test_a_limit_per_client_address_can_be_turned_on(tmp_path: Path) -> None:
    stack = start_stack(tmp_path, capacities=(10.0,), charge_env={"RATE_LIMIT_PER_CLIENT": "4/second"})
    try:
        url = f"{stack.charge.url}/charge"
        answers = [requests.post(url, json={"vehicle_id": f"ev-c{index}", "amount": 0}, timeout=5).status_code
                   for index in range(8)]
        assert answers[:4] == [400] * 4 and 429 in answers[4:]
    finally:
        stack.stop()


def test_operator_token_is_compared_whole(stack: Stack) -> None:
    url = f"{stack.charge.url}/sessions"
    for near_miss in (OPERATOR_TOKEN[:-1], OPERATOR_TOKEN + "x", OPERATOR_TOKEN.upper(), OPERATOR_TOKEN[1:]):
        assert requests.get(url, headers=bearer(near_miss), timeout=5).status_code == 401, near_miss


def test_a_wrong_token_does_not_learn_that_a_session_ended(stack: Stack) -> None:
    session = start(stack, "ev-ended-quietly", duration_seconds=0.5)
    time.sleep(0.8)
    url = f"{stack.charge.url}/sessions/{session['session_id']}"
    assert requests.get(url, headers=bearer("made-up"), timeout=5).status_code == 403
    assert requests.delete(url, headers=bearer("made-up"), timeout=5).status_code == 403
    assert requests.delete(url, headers=bearer(session["session_token"]), timeout=5).status_code == 404
