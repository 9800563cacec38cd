"""The whole stack as real processes: the charge API, the balancer and three substations."""
from __future__ import annotations

import json
import shlex
import subprocess

import pytest
import requests

from gridcommon.web import MAX_BODY_BYTES
from tests.harness import OPERATOR, REPO_ROOT, Service, Stack, logged_within

pytestmark = pytest.mark.integration

SUBSTATION_IDS = {"substation-1", "substation-2", "substation-3"}
TIMEOUT = 10


def readme_curl(base_url: str) -> list[str]:
    """The README's first charge request, word for word, aimed at this stack's charge API, with a client key
    the operator made for it where it says ``$key``."""
    text = (REPO_ROOT / "README.md").read_text().replace("\\\n", " ")
    command = next(
        line for line in text.splitlines() if line.startswith("curl") and "POST localhost:5000/charge" in line
    )
    key = requests.post(f"{base_url}/client-keys", json={"name": "readme"}, headers=OPERATOR,
                        timeout=TIMEOUT).json()["api_key"]
    words = [word.replace("localhost:5000", base_url.removeprefix("http://")).replace("$key", key)
             for word in shlex.split(command)]
    return [*words, "-w", "\n%{http_code}"]




def substation_by_id(stack: Stack, substation_id: str) -> Service:
    return next(s for s in stack.substations if s.env["SUBSTATION_ID"] == substation_id)


def substation_load(service: Service) -> float:
    return requests.get(f"{service.url}/status", timeout=TIMEOUT).json()["load"]


def assert_json_error(response: requests.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["error"] and body["message"]
    return body


def test_the_readme_curl_starts_a_session_at_a_substation(stack_factory):
    stack = stack_factory()
    result = subprocess.run(readme_curl(stack.charge.url), capture_output=True, text=True, timeout=TIMEOUT, check=True)
    body_text, status = result.stdout.rsplit("\n", 1)
    assert status == "201", result.stdout
    body = json.loads(body_text)
    assert body["substation"] in SUBSTATION_IDS
    assert body["vehicle_id"] and body["amount"] > 0
    assert body["ends_at"].endswith("Z") and body["started_at"].endswith("Z")
    assert substation_load(substation_by_id(stack, body["substation"])) == body["amount"]
    listed = requests.get(f"{stack.charge.url}/sessions", headers=OPERATOR, timeout=TIMEOUT).json()["sessions"]
    assert [session["session_id"] for session in listed] == [body["session_id"]]


def test_request_id_follows_a_charge_through_all_three_services(stack_factory):
    stack = stack_factory()
    response = requests.post(
        f"{stack.charge.url}/charge",
        json={"vehicle_id": "EV-trace", "amount": 11},
        headers={"X-Request-ID": "trace-it-0001"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 201, response.text
    assert response.headers["X-Request-ID"] == "trace-it-0001"
    admitting = substation_by_id(stack, response.json()["substation"])
    for service in (stack.charge, stack.balancer, admitting):
        assert logged_within(service, "[trace-it-0001]"), f"{service.name} never logged the request id"

    # Without one, the charge API makes an id, answers with it and passes it on.
    generated = requests.post(
        f"{stack.charge.url}/charge", json={"vehicle_id": "EV-trace-2", "amount": 1}, timeout=TIMEOUT
    )
    request_id = generated.headers["X-Request-ID"]
    assert request_id and request_id != "trace-it-0001"
    assert logged_within(substation_by_id(stack, generated.json()["substation"]), f"[{request_id}]")


OVERSIZED = '{"vehicle_id": "EV-001", "amount": 22, "note": "' + "x" * MAX_BODY_BYTES + '"}'
BAD_INPUTS = [
    ("missing vehicle_id", json.dumps({"amount": 22}), "application/json", 400, "vehicle_id"),
    ("empty vehicle_id", json.dumps({"vehicle_id": "", "amount": 22}), "application/json", 400, "vehicle_id"),
    ("65-char vehicle_id", json.dumps({"vehicle_id": "v" * 65, "amount": 22}), "application/json", 400, "vehicle_id"),
    ("vehicle_id with a space", json.dumps({"vehicle_id": "EV 1", "amount": 22}), "application/json", 400,
     "vehicle_id"),
    ("zero amount", json.dumps({"vehicle_id": "EV-1", "amount": 0}), "application/json", 400, "amount"),
    ("negative amount", json.dumps({"vehicle_id": "EV-1", "amount": -3}), "application/json", 400, "amount"),
    ("amount over the limit", json.dumps({"vehicle_id": "EV-1", "amount": 351}), "application/json", 400, "amount"),
    ("boolean amount", json.dumps({"vehicle_id": "EV-1", "amount": True}), "application/json", 400, "amount"),
    ("400-digit amount", '{"vehicle_id": "EV-1", "amount": 1' + "0" * 400 + "}", "application/json", 400, "amount"),
    ("string amount", json.dumps({"vehicle_id": "EV-1", "amount": "22"}), "application/json", 400, "amount"),
    ("NaN amount", '{"vehicle_id": "EV-1", "amount": NaN}', "application/json", 400, "amount"),
    ("duration too long", json.dumps({"vehicle_id": "EV-1", "amount": 5, "duration_seconds": 3601}),
     "application/json", 400, "duration_seconds"),
    ("negative duration", json.dumps({"vehicle_id": "EV-1", "amount": 5, "duration_seconds": -1}),
     "application/json", 400, "duration_seconds"),
    ("broken JSON", '{"vehicle_id": ', "application/json", 400, None),
    ("JSON list", "[]", "application/json", 400, None),
    ("plain text", "vehicle_id=EV-1&amount=22", "text/plain", 415, None),
    ("form", "vehicle_id=EV-1&amount=22", "application/x-www-form-urlencoded", 415, None),
    ("over 16 KiB", OVERSIZED, "application/json", 413, None),
]


def test_every_bad_input_gets_its_status_as_json_and_the_stack_stays_up(stack_factory):
    # Without the per-vehicle limit, which would answer most of these 429 (tests/test_charge_access.py).
    stack = stack_factory(charge_env={"RATE_LIMIT_PER_VEHICLE": ""})
    for label, data, content_type, status, field in BAD_INPUTS:
        response = requests.post(
            f"{stack.charge.url}/charge", data=data, headers={"Content-Type": content_type}, timeout=TIMEOUT
        )
        body = assert_json_error(response, status)
        assert body.get("field") == field, label
    metrics = requests.get(f"{stack.charge.url}/metrics", timeout=TIMEOUT).text
    bad_field_count = sum(1 for *_, status, _field in BAD_INPUTS if status == 400)
    assert f'charge_requests_total{{status="400"}} {bad_field_count:.1f}' in metrics
    assert "failed_requests_total 0.0" in metrics
    for service in stack.services:
        assert requests.get(f"{service.url}/health", timeout=TIMEOUT).json()["status"] == "ok", service.name
    # Nothing invalid got through to a substation.
    assert all(substation_load(substation) == 0 for substation in stack.substations)


def test_unknown_paths_and_methods_are_json_on_every_service(stack_factory):
    stack = stack_factory(capacities=(50.0,))
    for service in stack.services:
        not_found = assert_json_error(requests.get(f"{service.url}/no/such/path", timeout=TIMEOUT), 404)
        # The 404 points at the document listing this service's endpoints, and that document is there.
        assert "GET /openapi.json" in not_found["message"], not_found
        assert requests.get(f"{service.url}/openapi.json", timeout=TIMEOUT).status_code == 200, service.name
        wrong_method = requests.put(f"{service.url}/health", timeout=TIMEOUT)
        assert_json_error(wrong_method, 405)
        assert "GET" in wrong_method.headers["Allow"]


def test_stopping_a_session_frees_its_load_at_the_substation(stack_factory):
    stack = stack_factory()
    admitted = requests.post(
        f"{stack.charge.url}/charge",
        json={"vehicle_id": "EV-stop", "amount": 30, "duration_seconds": 600},
        timeout=TIMEOUT,
    ).json()
    substation = substation_by_id(stack, admitted["substation"])
    assert substation_load(substation) == 30

    stopped = requests.delete(f"{stack.charge.url}/sessions/{admitted['session_id']}", headers=OPERATOR, timeout=TIMEOUT)
    assert stopped.status_code == 200, stopped.text
    assert substation_load(substation) == 0
    assert requests.get(f"{stack.charge.url}/sessions", headers=OPERATOR, timeout=TIMEOUT).json() == {"sessions": []}
    ended = requests.get(f"{stack.charge.url}/sessions/{admitted['session_id']}", headers=OPERATOR, timeout=TIMEOUT).json()
    assert (ended["state"], ended["end_reason"], ended["allocated_kw"]) == ("ended", "stopped", 0.0)
    assert "active_sessions 0.0" in requests.get(f"{stack.charge.url}/metrics", timeout=TIMEOUT).text
