"""Client keys and quotas at the public API, tried as clients and a hostile one would, against real processes.

Every stack here runs with ``PUBLIC_API_AUTH=keys``. Figures that matter (latencies, rates, kW) are
printed; what is asserted about them is a ratio measured within one run.
"""
from __future__ import annotations

import json
import re
import secrets
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from load_tester.api import GridClient
from tests.harness import OPERATOR, OPERATOR_TOKEN, REPO_ROOT, Stack, all_at_once, scrape, sessions_at, start_stack, wait_for

pytestmark = pytest.mark.integration

KEYS = {"PUBLIC_API_AUTH": "keys"}


def create_key(stack: Stack, name: str, **quotas: float) -> tuple[str, str]:
    answer = requests.post(f"{stack.charge.url}/client-keys", json={"name": name, "quotas": quotas},
                           headers=OPERATOR, timeout=5)
    assert answer.status_code == 201, answer.text
    return answer.json()["key_id"], answer.json()["api_key"]


def as_key(key: str, form: str = "x-api-key") -> dict[str, str]:
    return {"X-API-Key": key} if form == "x-api-key" else {"Authorization": f"Bearer {key}"}


def charge(stack: Stack, headers: dict[str, str], vehicle: str, amount: float = 5, **extra) -> requests.Response:
    return requests.post(f"{stack.charge.url}/charge",
                         json={"vehicle_id": vehicle, "amount": amount, "duration_seconds": 600, **extra},
                         headers=headers, timeout=15)


def stop_everything(stack: Stack) -> None:
    for session in requests.get(f"{stack.charge.url}/sessions", headers=OPERATOR, timeout=5).json()["sessions"]:
        requests.delete(f"{stack.charge.url}/sessions/{session['session_id']}", headers=OPERATOR, timeout=5)


def rejections(stack: Stack) -> dict[str, float]:
    metrics = scrape(stack.charge)
    return {reason: metrics.value("client_key_rejections_total", reason=reason)
            for reason in ("missing", "unknown", "revoked")}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    folder = tmp_path_factory.mktemp("client-keys")
    stack = start_stack(folder, capacities=(100.0, 100.0), charge_env={
        **KEYS, "STATE_DIR": str(folder / "state"), "RATE_LIMIT_PER_VEHICLE": "3/second", "QUEUE_RETRY_SECONDS": "0.2",
    })
    yield stack
    stack.stop()


@pytest.mark.parametrize("form", ["x-api-key", "bearer"])
def test_every_endpoint_without_a_key_with_a_wrong_a_revoked_and_the_right_one(stack: Stack, form: str) -> None:
    right_id, right = create_key(stack, f"right {form}", sessions=20, kw=200, requests_per_second=50)
    revoked_id, revoked = create_key(stack, f"revoked {form}")
    assert requests.delete(f"{stack.charge.url}/client-keys/{revoked_id}", headers=OPERATOR,
                           timeout=5).json()["state"] == "revoked"
    wrong = "sgk_" + secrets.token_urlsafe(32)
    credentials = {"none": {}, "wrong": as_key(wrong, form), "revoked": as_key(revoked, form),
                   "right": as_key(right, form)}
    sessions = [charge(stack, as_key(right), f"ev-every-{form}-{index}").json()["session_id"] for index in range(2)]
    base = stack.charge.url
    # (method, path, body, what each credential gets); None: the same answer whatever is sent.
    refused = {"none": 401, "wrong": 401, "revoked": 401}
    vehicles = iter(range(100))
    endpoints = [
        ("POST", "/charge", lambda: {"vehicle_id": f"ev-new-{form}-{next(vehicles)}", "amount": 3},
         {**refused, "right": 201}),
        ("GET", "/status", None, {**refused, "right": 200}),
        ("GET", f"/sessions/{sessions[0]}", None, {**refused, "right": 200}),
        ("GET", "/sessions", None, {**refused, "right": 401}),  # every session: the operator's alone
        ("GET", "/client-keys", None, {**refused, "right": 401}),
        ("POST", "/client-keys", lambda: {"name": "sneaky"}, {**refused, "right": 401}),
        ("GET", f"/client-keys/{right_id}", None, {**refused, "right": 401}),
        ("PATCH", f"/client-keys/{right_id}", lambda: {"quotas": {"kw": 1000}}, {**refused, "right": 401}),
        ("POST", f"/client-keys/{right_id}/rotate", None, {**refused, "right": 401}),
        ("DELETE", f"/client-keys/{right_id}", None, {**refused, "right": 401}),
        ("GET", "/health", None, None),
        ("GET", "/metrics", None, None),
        ("GET", "/openapi.json", None, None),
        ("GET", "/console/", None, None),
        ("DELETE", f"/sessions/{sessions[1]}", None, {**refused, "right": 200}),  # last: it stops the session
    ]
    before = rejections(stack)
    table = []
    for method, path, body, expected in endpoints:
        answers = {}
        for who, headers in credentials.items():
            answer = requests.request(method, base + path, json=body() if body else None, headers=headers,
                                      timeout=10)
            answers[who] = answer.status_code
            if expected is None:
                continue
            assert answer.status_code == expected[who], (method, path, who, answer.status_code, answer.text)
            if answer.status_code == 401:
                assert answer.headers["Content-Type"].startswith("application/json")
                assert answer.json()["message"] and answer.headers["WWW-Authenticate"].startswith("Bearer")
                if path in ("/charge", "/status") or path.startswith("/sessions/"):
                    assert answer.json()["error"] == {
                        "none": "api_key_required" if not path.startswith("/sessions/") else "unauthorized",
                        "wrong": "invalid_api_key", "revoked": "api_key_revoked"}[who]
        if expected is None:
            assert len(set(answers.values())) == 1 and answers["none"] < 400, (method, path, answers)
        table.append(f"{method:6} {path[:40]:40} " + " ".join(f"{who}={status}" for who, status in answers.items()))
    print("\n" + "\n".join(table))
    after = rejections(stack)
    # Each endpoint a key opens counted the wrong and the revoked key; /charge and /status a missing one too.
    assert after["unknown"] - before["unknown"] == 4
    assert after["revoked"] - before["revoked"] == 4
    assert after["missing"] - before["missing"] == 2
    # Each refusal is in the log with the address it came from, for the operator to find who sends wrong keys.
    assert re.search(r"access: POST /charge -> 401 in [0-9.]+ ms from 127\.0\.0\.1$", stack.charge.log_text(),
                     re.MULTILINE)
    stop_everything(stack)


def test_sessions_belong_to_the_key_that_created_them(stack: Stack) -> None:
    _, mine = create_key(stack, "owner")
    _, other = create_key(stack, "other")
    started = charge(stack, as_key(mine), "ev-owned")
    assert started.status_code == 201
    session = started.json()
    url = f"{stack.charge.url}/sessions/{session['session_id']}"
    never = f"{stack.charge.url}/sessions/{'0' * 32}"
    # Another key learns nothing: the very answer a session that does not exist gets.
    for method in ("GET", "DELETE"):
        theirs = requests.request(method, url, headers=as_key(other), timeout=5)
        absent = requests.request(method, never, headers=as_key(other), timeout=5)
        assert theirs.status_code == absent.status_code == 404
        assert theirs.json()["message"].replace(session["session_id"], "X") == \
            absent.json()["message"].replace("0" * 32, "X")
    # The vehicle is taken, and another key is told so without the session's id; its owner is told the id.
    busy = charge(stack, as_key(other), "ev-owned")
    assert busy.status_code == 409 and "session_id" not in busy.json()
    assert session["session_id"] not in busy.text
    assert charge(stack, as_key(mine), "ev-owned").json()["session_id"] == session["session_id"]
    assert requests.get(url, headers=as_key(mine), timeout=5).json()["state"] == "charging"
    assert requests.get(url, headers=OPERATOR, timeout=5).status_code == 200
    # The session's own token still opens it (a driver's app given just that session).
    assert requests.get(url, headers={"Authorization": f"Bearer {session['session_token']}"},
                        timeout=5).status_code == 200
    assert requests.delete(url, headers=as_key(mine), timeout=5).status_code == 200


def test_idempotency_keys_are_each_clients_own_and_replays_are_not_rate_limited(stack: Stack) -> None:
    _, first = create_key(stack, "first", requests_per_second=1)
    _, second = create_key(stack, "second")
    body = {"vehicle_id": "ev-idem", "amount": 4, "duration_seconds": 600}
    url = f"{stack.charge.url}/charge"
    original = requests.post(url, json=body, headers={**as_key(first), "Idempotency-Key": "retry-1"}, timeout=5)
    assert original.status_code == 201
    # The same key and body from another client is that client's own request: no token of the first.
    stranger = requests.post(url, json=body, headers={**as_key(second), "Idempotency-Key": "retry-1"}, timeout=5)
    assert stranger.status_code == 409 and original.json()["session_token"] not in stranger.text
    assert "Idempotent-Replayed" not in stranger.headers
    # Retries after a timeout get the stored answer, however fast they come: the 1/second quota is not used.
    replays = [requests.post(url, json=body, headers={**as_key(first), "Idempotency-Key": "retry-1"}, timeout=5)
               for _ in range(5)]
    assert [r.status_code for r in replays] == [201] * 5
    assert all(r.headers["Idempotent-Replayed"] == "true" and r.json() == original.json() for r in replays)
    # A new request within that second is over the key's rate.
    over = charge(stack, as_key(first), "ev-idem-2")
    assert over.status_code == 429 and over.json()["quota"] == "requests_per_second"
    assert int(over.headers["Retry-After"]) >= 1
    stop_everything(stack)


def test_each_quota_refuses_with_429_naming_it(stack: Stack) -> None:
    key_id, key = create_key(stack, "small", sessions=2, kw=10, queued=1, requests_per_second=50)
    assert charge(stack, as_key(key), "ev-q1", amount=6).status_code == 201
    kw = charge(stack, as_key(key), "ev-q2", amount=5)
    assert kw.status_code == 429 and kw.json()["quota"] == "kw" and kw.json()["limit"] == 10
    assert kw.json()["in_use"] == 6 and int(kw.headers["Retry-After"]) >= 1
    assert "'small'" in kw.json()["message"] and kw.json()["error"] == "quota_exceeded"
    assert charge(stack, as_key(key), "ev-q2", amount=4).status_code == 201
    sessions = charge(stack, as_key(key), "ev-q3", amount=0.1)
    assert sessions.status_code == 429 and sessions.json()["quota"] == "sessions"
    # Its Retry-After is when its first session ends (600 s from now).
    assert 590 <= int(sessions.headers["Retry-After"]) <= 600
    figures = requests.get(f"{stack.charge.url}/client-keys/{key_id}", headers=OPERATOR, timeout=5).json()["usage"]
    assert (figures["sessions"], figures["kw"]) == (2, 10)
    assert figures["refusals"] == {"kw": 1, "sessions": 1}
    metrics = scrape(stack.charge)
    assert metrics.value("client_key_sessions", key=key_id) == 2
    assert metrics.value("client_key_allocated_kw", key=key_id) == 10
    assert metrics.value("client_key_allocated_kw_limit", key=key_id) == 10
    assert metrics.value("client_key_sessions_limit", key=key_id) == 2
    assert metrics.value("client_key_refusals_total", key=key_id, reason="kw") == 1
    # The console's table shows the same figures.
    browser = requests.Session()
    form = browser.get(f"{stack.charge.url}/console/", timeout=10).text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)
    browser.post(f"{stack.charge.url}/console/login", data={"token": OPERATOR["Authorization"][7:],
                                                           "csrf_token": csrf}, timeout=10)
    rows = browser.get(f"{stack.charge.url}/console/snapshot", timeout=10).json()["client_keys"]
    row = next(row for row in rows if row["key_id"] == key_id)
    assert (row["name"], row["sessions"], row["kw"], row["refusals"]) == ("small", 2, 10, {"kw": 1, "sessions": 1})
    assert row["quotas"]["kw"] == 10
    assert 'id="client-keys"' in browser.get(f"{stack.charge.url}/console/", timeout=10).text
    stop_everything(stack)
    # Stopped sessions free the quota at once.
    assert charge(stack, as_key(key), "ev-q4", amount=10).status_code == 201
    stop_everything(stack)


def test_a_key_may_queue_its_quota_of_requests_and_no_more(tmp_path: Path) -> None:
    stack = start_stack(tmp_path, capacities=(3.0,), charge_env={**KEYS, "QUEUE_RETRY_SECONDS": "0.2"})
    try:
        _, filler = create_key(stack, "filler", kw=30)
        _, waiter = create_key(stack, "waiter", sessions=5, kw=50, queued=1)
        # Two sessions take every minimum share the substation has: the next request waits.
        assert [charge(stack, as_key(filler), f"ev-fill-{index}", amount=11).status_code
                for index in range(2)] == [201, 201]
        first = charge(stack, as_key(waiter), "ev-w1", amount=5, wait=True)
        assert first.status_code == 202
        second = charge(stack, as_key(waiter), "ev-w2", amount=5, wait=True)
        assert second.status_code == 429 and second.json()["quota"] == "queued"
        # The refused request left nothing behind: its vehicle is free for a later request.
        listed = requests.get(f"{stack.charge.url}/sessions", headers=OPERATOR, timeout=5).json()["sessions"]
        assert sorted(s["vehicle_id"] for s in listed) == ["ev-fill-0", "ev-fill-1"]
        # The queued one belongs to its key: another key cannot see or cancel it.
        url = f"{stack.charge.url}/sessions/{first.json()['session_id']}"
        assert requests.get(url, headers=as_key(filler), timeout=5).status_code == 404
        assert requests.get(url, headers=as_key(waiter), timeout=5).json()["state"] == "queued"
        stop_everything(stack)
        wait_for(lambda: requests.get(url, headers=as_key(waiter), timeout=5).json()["state"] == "charging", 10,
                 "the queued request to start")
    finally:
        stack.stop()


def test_the_operator_changes_a_keys_quotas_and_name_and_the_next_request_is_held_to_them(stack: Stack) -> None:
    key_id, key = create_key(stack, "growing fleet", sessions=1, kw=50)
    url = f"{stack.charge.url}/client-keys/{key_id}"
    assert charge(stack, as_key(key), "ev-grow-1").status_code == 201
    over = charge(stack, as_key(key), "ev-grow-2")
    assert over.status_code == 429 and over.json()["quota"] == "sessions"

    changed = requests.patch(url, json={"quotas": {"sessions": 2}, "name": "grown fleet"}, headers=OPERATOR, timeout=5)
    assert changed.status_code == 200, changed.text
    assert changed.json()["name"] == "grown fleet"
    assert changed.json()["quotas"] == {"sessions": 2, "kw": 50.0, "queued": 10, "requests_per_second": 5}
    assert changed.json()["usage"]["sessions"] == 1
    assert charge(stack, as_key(key), "ev-grow-2").status_code == 201  # the same key, its new quota

    # Lowered below what it holds: both sessions run on, and the next request waits until it is under.
    lowered = requests.patch(url, json={"quotas": {"sessions": 1}}, headers=OPERATOR, timeout=5)
    assert lowered.status_code == 200 and lowered.json()["usage"]["sessions"] == 2
    assert charge(stack, as_key(key), "ev-grow-3").status_code == 429
    held = [s for s in requests.get(f"{stack.charge.url}/sessions", headers=OPERATOR, timeout=5).json()["sessions"]
            if s["vehicle_id"].startswith("ev-grow-")]
    assert len(held) == 2

    for body, field in [({"quotas": {"kw": -1}}, "quotas.kw"), ({"quotas": {"seats": 3}}, "quotas.seats"),
                        ({"quotas": [1]}, "quotas"), ({"name": ""}, "name"), ({"colour": "red"}, "colour")]:
        bad = requests.patch(url, json=body, headers=OPERATOR, timeout=5)
        assert bad.status_code == 400 and bad.json()["field"] == field, (body, bad.text)
        assert field.split(".")[-1] in bad.json()["message"]
    assert requests.get(url, headers=OPERATOR, timeout=5).json()["quotas"]["sessions"] == 1  # unchanged by those
    missing = requests.patch(f"{stack.charge.url}/client-keys/ck_000000000000", json={}, headers=OPERATOR, timeout=5)
    assert missing.status_code == 404 and missing.json()["error"] == "client_key_not_found"
    assert requests.delete(url, headers=OPERATOR, timeout=5).status_code == 200
    revoked = requests.patch(url, json={"quotas": {"sessions": 5}}, headers=OPERATOR, timeout=5)
    assert revoked.status_code == 409 and revoked.json()["error"] == "client_key_revoked"
    stop_everything(stack)


def test_the_load_tester_run_by_the_operator_asks_with_the_operator_token(stack: Stack) -> None:
    with_token = GridClient(stack.charge.url, stack.balancer.url, admin_token=OPERATOR_TOKEN)
    without = GridClient(stack.charge.url, stack.balancer.url)
    try:
        assert with_token.charge({"vehicle_id": "ev-load-test", "amount": 2}, "load-1").status_code == 201
        assert without.charge({"vehicle_id": "ev-load-test-2", "amount": 2}, "load-2").status_code == 401
    finally:
        with_token.close()
        without.close()
    stop_everything(stack)


def test_keys_quotas_and_ownership_survive_a_restart(tmp_path: Path) -> None:
    stack = start_stack(tmp_path, capacities=(100.0,), charge_env={**KEYS, "STATE_DIR": str(tmp_path / "state")})
    try:
        _, key = create_key(stack, "durable", sessions=1, kw=20)
        _, other = create_key(stack, "bystander")
        session = charge(stack, as_key(key), "ev-durable").json()
        stack.charge.kill()
        stack.charge.start()
        url = f"{stack.charge.url}/sessions/{session['session_id']}"
        assert requests.get(url, headers=as_key(key), timeout=5).json()["state"] == "charging"
        assert requests.get(url, headers=as_key(other), timeout=5).status_code == 404
        again = charge(stack, as_key(key), "ev-durable-2")
        assert again.status_code == 429 and again.json()["quota"] == "sessions"
    finally:
        stack.stop()


def test_active_keys_are_bounded_and_open_mode_serves_anyone(tmp_path: Path) -> None:
    stack = start_stack(tmp_path, capacities=(100.0,),
                        charge_env={"PUBLIC_API_AUTH": "open", "MAX_CLIENT_KEYS": "2"})
    try:
        assert "PUBLIC_API_AUTH=open" in stack.charge.log_text()
        create_key(stack, "one")
        key_id, key = create_key(stack, "two", sessions=1)
        third = requests.post(f"{stack.charge.url}/client-keys", json={"name": "three"}, headers=OPERATOR, timeout=5)
        assert third.status_code == 409 and third.json()["error"] == "too_many_client_keys"
        assert "MAX_CLIENT_KEYS" in third.json()["message"]
        # Open: no key is needed; a key sent is still held to its quotas, and a wrong one is refused.
        assert charge(stack, {}, "ev-open").status_code == 201
        assert charge(stack, as_key(key), "ev-open-keyed").status_code == 201
        assert charge(stack, as_key(key), "ev-open-keyed-2").json()["quota"] == "sessions"
        assert charge(stack, as_key("sgk_" + "x" * 43), "ev-open-wrong").status_code == 401
        bad = requests.post(f"{stack.charge.url}/client-keys", json={"name": "x", "quotas": {"kw": -1}},
                            headers=OPERATOR, timeout=5)
        assert bad.status_code == 400 and "quotas.kw" in bad.json()["message"]
        for body, error in (({}, "missing_field"), ({"name": "x", "owner": "y"}, "invalid_field"),
                            ({"name": "<script>"}, "invalid_field"), ([], "invalid_json")):
            answer = requests.post(f"{stack.charge.url}/client-keys", json=body, headers=OPERATOR, timeout=5)
            assert (answer.status_code, answer.json()["error"]) == (400, error), answer.text
        missing = requests.post(f"{stack.charge.url}/client-keys/ck_000000000000/rotate", headers=OPERATOR, timeout=5)
        assert missing.status_code == 404 and missing.json()["error"] == "client_key_not_found"
        metrics = requests.get(f"{stack.charge.url}/metrics", timeout=5).text
        assert f'client_key_info{{key="{key_id}",name="two"}} 1.0' in metrics
    finally:
        stack.stop()


# ----- floors: hostile clients and races, against real processes -----------------------------------------


def flood(stack: Stack, seconds: float, rate: float, connections: int, *who: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.client_key_flood", stack.charge.host, str(stack.charge.port), "--seconds",
         str(seconds), "--rate", str(rate), "--connections", str(connections), *who],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
    )


def flood_figures(process: subprocess.Popen) -> dict:
    out, _ = process.communicate(timeout=120)
    return json.loads(out.strip().splitlines()[-1])


def held_kw(stack: Stack, prefix: str) -> tuple[int, float]:
    """Sessions and kW the substations themselves hold for vehicles named ``prefix...``."""
    held = [s for substation in stack.substations for s in sessions_at(substation)
            if s["vehicle_id"].startswith(prefix) and s.get("state") != "ended"]
    return len(held), sum(s["amount"] for s in held)


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98]


def test_a_key_flooding_invented_vehicles_gets_its_kw_quota_and_another_key_its_usual_latency(
        tmp_path: Path) -> None:
    stack = start_stack(tmp_path, capacities=(100.0, 100.0, 100.0),
                        charge_env={**KEYS, "RATE_LIMIT_PER_VEHICLE": ""})
    try:
        _, hostile = create_key(stack, "hostile", sessions=10_000, kw=66, queued=0, requests_per_second=10_000)
        _, fleet = create_key(stack, "fleet", sessions=1_000, kw=10_000, requests_per_second=1_000)
        latencies: dict[str, list[float]] = {"idle": [], "flood": []}
        most_held = 0.0
        fleet_statuses: list[int] = []
        http = requests.Session()

        def fleet_requests(phase: str, count: int) -> None:
            for _ in range(count):
                began = time.perf_counter()
                answer = http.post(f"{stack.charge.url}/charge", headers=as_key(fleet), timeout=15, json={
                    "vehicle_id": f"fleet-{secrets.token_hex(4)}", "amount": 1, "duration_seconds": 600})
                latencies[phase].append(time.perf_counter() - began)
                fleet_statuses.append(answer.status_code)
                if answer.status_code == 201:
                    http.delete(f"{stack.charge.url}/sessions/{answer.json()['session_id']}",
                                headers=as_key(fleet), timeout=15)
                time.sleep(0.02)

        fleet_requests("idle", 20)  # warm-up, not counted
        latencies["idle"].clear()
        floods = []
        # Idle and flooded rounds alternate, so whatever else the machine does weighs on both alike.
        for _ in range(3):
            fleet_requests("idle", 60)
            # 500 requests a second: twice the rate that booked the whole grid in 1.1 s before keys existed.
            hostile_client = flood(stack, 5, 500, 8, "--key", hostile)
            time.sleep(0.3)
            fleet_requests("flood", 60)
            while hostile_client.poll() is None:
                most_held = max(most_held, held_kw(stack, "flood-")[1])
                time.sleep(0.2)
            floods.append(flood_figures(hostile_client))
            most_held = max(most_held, held_kw(stack, "flood-")[1])
        idle, flooded = p99(latencies["idle"]), p99(latencies["flood"])
        print(f"\nhostile key: {[f['rate'] for f in floods]} requests/s, answers "
              f"{[f['statuses'] for f in floods]}; most kW held for it at the substations: {most_held:g} (quota 66)")
        print(f"fleet key p99: idle {idle * 1000:.1f} ms, during the flood {flooded * 1000:.1f} ms, "
              f"ratio {flooded / idle:.2f}; medians {statistics.median(latencies['idle']) * 1000:.1f} / "
              f"{statistics.median(latencies['flood']) * 1000:.1f} ms")
        assert floods[0]["statuses"].get("201", 0) >= 1
        assert all(f["statuses"].get("429", 0) >= 1000 and f["rate"] >= 450 for f in floods)
        assert 0 < most_held <= 66
        assert set(fleet_statuses) == {201}
        assert flooded <= 2 * idle
    finally:
        stack.stop()


def test_a_thousand_wrong_keys_a_second_for_ten_seconds_leave_the_service_healthy(tmp_path: Path) -> None:
    stack = start_stack(tmp_path, capacities=(100.0,), charge_env=KEYS)
    try:
        _, key = create_key(stack, "legit", sessions=1_000, kw=10_000, requests_per_second=1_000)
        before = rejections(stack)["unknown"]
        attack = flood(stack, 10, 1000, 16, "--wrong-keys")
        right: list[tuple[int, float]] = []
        health: list[int] = []
        while attack.poll() is None:
            began = time.perf_counter()
            answer = charge(stack, as_key(key), f"ev-legit-{len(right)}", amount=0.5)
            right.append((answer.status_code, time.perf_counter() - began))
            health.append(requests.get(f"{stack.charge.url}/health", timeout=5).status_code)
            time.sleep(0.1)
        figures = flood_figures(attack)
        counted = rejections(stack)["unknown"] - before
        slowest = max(seconds for _, seconds in right)
        print(f"\nwrong keys: {figures['sent']} sent in {figures['seconds']} s ({figures['rate']} answered/s), "
              f"answers {figures['statuses']}, {counted:g} counted; right key: {len(right)} requests, statuses "
              f"{sorted({status for status, _ in right})}, median {statistics.median(s for _, s in right) * 1000:.1f}"
              f" ms, slowest {slowest * 1000:.1f} ms")
        assert figures["rate"] >= 900 and figures["statuses"] == {"401": figures["sent"]}
        assert counted == figures["sent"]
        assert len(right) >= 20 and {status for status, _ in right} == {201} and set(health) == {200}
        assert requests.get(f"{stack.charge.url}/health", timeout=5).status_code == 200
        assert "Traceback" not in stack.charge.log_text()
    finally:
        stack.stop()


def test_thirty_two_threads_racing_on_one_key_never_pass_its_quotas(tmp_path: Path) -> None:
    stack = start_stack(tmp_path, capacities=(100.0, 100.0),
                        charge_env={**KEYS, "RATE_LIMIT_PER_VEHICLE": ""})
    try:
        _, key = create_key(stack, "racer", sessions=5, kw=24, queued=0, requests_per_second=1_000)
        statuses: list[int] = []
        lock = threading.Lock()
        most = (0, 0.0)
        for round_number in range(4):
            def race(number: int) -> None:
                answer = charge(stack, as_key(key), f"race-{round_number}-{number}", amount=3 + number % 4)
                with lock:
                    statuses.append(answer.status_code)

            all_at_once(32, race)
            sessions, kw = held_kw(stack, "race-")
            most = (max(most[0], sessions), max(most[1], kw))
            assert sessions <= 5 and kw <= 24, f"round {round_number}: {sessions} sessions, {kw:g} kW at substations"
            # Free some room for the next round, so each one races for what is left.
            listed = requests.get(f"{stack.charge.url}/sessions", headers=OPERATOR, timeout=5).json()["sessions"]
            for session in listed[:2]:
                requests.delete(f"{stack.charge.url}/sessions/{session['session_id']}", headers=OPERATOR, timeout=5)
        print(f"\n32 threads x 4 rounds: answers {sorted(set(statuses))}, "
              f"{statuses.count(201)} admitted, {statuses.count(429)} refused; most held at the substations: "
              f"{most[0]} sessions, {most[1]:g} kW (quotas 5 and 24)")
        assert statuses.count(201) >= 5 and statuses.count(429) >= 100
        assert set(statuses) <= {201, 429}
    finally:
        stack.stop()
