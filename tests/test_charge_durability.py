"""A retry, a restart or a lost answer never forgets, duplicates or overbooks a session (real processes).

Every test runs with the charge API's records in SQLite and in PostgreSQL (``charge_records``).
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests

from charge_request_service.balancer import BalancerClient
from charge_request_service.idempotency import Idempotency, KeyBusy, KeyMisused, fingerprint
from charge_request_service.reconcile import Reconciler
from charge_request_service.sessions import SessionTracker, SharedSessionTracker
from charge_request_service.store import ChargeStore
from gridcommon.deadline import DEADLINE_HEADER
from gridcommon.httpclient import HttpClient
from gridcommon.timefmt import utc_now
from tests.harness import OPERATOR, OPERATOR_TOKEN, Service, Stack, sessions_at, start_all, start_stack, wait_for
from tests.postgres_support import ChargeRecords

pytestmark = pytest.mark.integration


def charge(stack: Stack, vehicle: str, key: str | None = None, amount: float = 11.0, **extra) -> requests.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return requests.post(f"{stack.charge.url}/charge", json={"vehicle_id": vehicle, "amount": amount, **extra},
                         headers=headers, timeout=15)


def held_everywhere(stack: Stack) -> list[dict]:
    return [session for substation in stack.substations for session in sessions_at(substation)]


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory, charge_records: ChargeRecords) -> Stack:
    folder = tmp_path_factory.mktemp("durability")
    stack = start_stack(folder, capacities=(30.0, 30.0),
                        charge_env={"RATE_LIMIT_PER_VEHICLE": "", **charge_records.env(folder)})
    yield stack
    stack.stop()


def test_a_repeat_with_the_same_idempotency_key_gets_the_first_answer_and_books_nothing(grid: Stack) -> None:
    first = charge(grid, "ev-idem-1", key="key-0001")
    again = charge(grid, "ev-idem-1", key="key-0001")
    assert first.status_code == again.status_code == 201
    assert again.json()["session_id"] == first.json()["session_id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert [s["vehicle_id"] for s in held_everywhere(grid)].count("ev-idem-1") == 1
    other_body = charge(grid, "ev-idem-1", key="key-0001", amount=22.0)
    assert other_body.status_code == 422 and other_body.json()["error"] == "idempotency_key_reused"
    bad = charge(grid, "ev-idem-2", key="with space")
    assert bad.status_code == 400 and bad.json()["field"] == "Idempotency-Key"
    requests.delete(f"{grid.charge.url}/sessions/{first.json()['session_id']}", headers=OPERATOR, timeout=5)


def test_an_answer_that_may_change_is_not_replayed(tmp_path: Path, charge_records: ChargeRecords) -> None:
    keys = Idempotency(ChargeStore(charge_records.store_target(tmp_path)))
    body = fingerprint({"vehicle_id": "ev-1", "amount": 11})
    assert keys.begin("k-1", body) is None
    with pytest.raises(KeyBusy):
        keys.begin("k-1", body)  # the first is still being answered
    keys.finish("k-1", body, 503, {"error": "no_capacity"}, {"Retry-After": "1"})
    assert keys.begin("k-1", body) is None  # a 503 may be a 201 a moment later: asked again
    keys.finish("k-1", body, 201, {"session_id": "s-1"}, {})
    assert keys.begin("k-1", fingerprint({"amount": 11, "vehicle_id": "ev-1"})).body == {"session_id": "s-1"}
    with pytest.raises(KeyMisused):
        keys.begin("k-1", fingerprint({"vehicle_id": "ev-1", "amount": 12}))


def test_one_vehicle_has_one_session_at_a_time(grid: Stack) -> None:
    first = charge(grid, "ev-single").json()
    second = charge(grid, "ev-single")
    assert second.status_code == 409
    body = second.json()
    # Nobody is shown to own it without a client key: the answer does not name the session.
    assert body["error"] == "vehicle_already_charging" and "session_id" not in body
    requests.delete(f"{grid.charge.url}/sessions/{first['session_id']}",
                    headers={"Authorization": f"Bearer {first['session_token']}"}, timeout=5)
    assert charge(grid, "ev-single").status_code == 201


def test_a_substation_admits_nothing_after_the_deadline(grid: Stack) -> None:
    substation = grid.substations[0]
    late = requests.post(f"{substation.url}/charge", json={"vehicle_id": "ev-late", "amount": 5},
                         headers={DEADLINE_HEADER: f"{time.time() - 0.01:.3f}"}, timeout=5)
    assert late.status_code == 409 and late.json()["error"] == "deadline_passed"
    # Through the balancer too: it stops routing by then, and the substations refuse what it still sends.
    through = requests.post(f"{grid.balancer.url}/charge", json={"vehicle_id": "ev-late", "amount": 5},
                            headers={DEADLINE_HEADER: f"{time.time() + 0.001:.3f}"}, timeout=5)
    assert through.status_code == 503
    assert "ev-late" not in {s["vehicle_id"] for s in held_everywhere(grid)}


def test_a_late_copy_of_a_stopped_request_is_refused_for_its_id_then_for_its_deadline(grid: Stack) -> None:
    substation = grid.substations[0]
    deadline = {DEADLINE_HEADER: f"{time.time() + 1.5:.3f}"}
    body = {"vehicle_id": "ev-copy", "amount": 5, "session_id": "copied-0001"}
    assert requests.post(f"{substation.url}/charge", json=body, headers=deadline, timeout=5).status_code == 201
    assert requests.delete(f"{substation.url}/charge/copied-0001", timeout=5).status_code == 200

    copy = requests.post(f"{substation.url}/charge", json=body, headers=deadline, timeout=5)
    assert copy.status_code == 409 and copy.json()["error"] == "session_id_retired"
    time.sleep(max(0.0, float(deadline[DEADLINE_HEADER]) - time.time()) + 0.05)
    copy = requests.post(f"{substation.url}/charge", json=body, headers=deadline, timeout=5)
    assert copy.status_code == 409 and copy.json()["error"] == "deadline_passed"
    assert "ev-copy" not in {s["vehicle_id"] for s in held_everywhere(grid)}


# ----- several balancers -------------------------------------------------------------------------


@pytest.fixture
def two_balancers(tmp_path: Path, charge_records: ChargeRecords) -> Stack:
    substations = start_all([
        Service(name=f"substation-{index}", app="substation_service:create_app()",
                env={"SUBSTATION_ID": f"substation-{index}", "CAPACITY_KW": "50"}, log_dir=tmp_path)
        for index in (1, 2)
    ])
    urls = ",".join(s.url for s in substations)
    balancers = start_all([
        Service(name=f"load-balancer-{index}", app="load_balancer:create_app()",
                env={"SUBSTATIONS": urls, "POLL_INTERVAL_SECONDS": "0.5"}, log_dir=tmp_path)
        for index in (1, 2)
    ])
    charge_api = Service(
        name="charge-request-service", app="charge_request_service:create_app()",
        env={"LOAD_BALANCER_URL": ",".join(b.url for b in balancers), "ADMIN_TOKEN": OPERATOR_TOKEN,
             "REQUEST_TIMEOUT_SECONDS": "8", "RATE_LIMIT_PER_VEHICLE": "", **charge_records.env(tmp_path)},
        log_dir=tmp_path,
    ).start()
    for balancer in balancers:  # both have polled every substation: none needs a refresh to route
        wait_for(lambda: all(entry["up"] for entry in requests.get(f"{balancer.url}/status", timeout=5).json()
                             ["substations"]), 10, "the balancers to see the substations")
    stack = Stack(substations=substations, balancer=balancers[0], charge=charge_api)
    stack.balancers = balancers  # type: ignore[attr-defined]
    yield stack
    for service in (charge_api, *balancers, *substations):
        service.stop()


def test_a_killed_balancer_costs_no_request(two_balancers: Stack) -> None:
    first, second = two_balancers.balancers  # type: ignore[attr-defined]
    assert charge(two_balancers, "ev-before").status_code == 201
    first.kill()
    answers = [charge(two_balancers, f"ev-after-{index}").status_code for index in range(20)]
    assert answers == [201] * 20
    assert len(held_everywhere(two_balancers)) == 21


def test_a_frozen_balancer_is_given_up_on_and_the_session_booked_once(two_balancers: Stack) -> None:
    first, _ = two_balancers.balancers  # type: ignore[attr-defined]
    assert charge(two_balancers, "ev-warm").status_code == 201  # the first balancer is the preferred one
    first.suspend()  # every process of it, its edge and gunicorn's worker included: nothing answers
    try:
        answer = charge(two_balancers, "ev-frozen")
        assert answer.status_code == 201, answer.text
    finally:
        first.resume()
    time.sleep(1.0)  # the thawed balancer's forward, if any, reaches its substation now
    held = [s for s in held_everywhere(two_balancers) if s["vehicle_id"] == "ev-frozen"]
    assert [s["session_id"] for s in held] == [answer.json()["session_id"]]


# ----- restarts ------------------------------------------------------------------------------------


def test_a_restarted_charge_api_remembers_every_session_and_queue(tmp_path: Path,
                                                                  charge_records: ChargeRecords) -> None:
    stack = start_stack(tmp_path, capacities=(3.0,), charge_env={
        **charge_records.env(tmp_path), "QUEUE_RETRY_SECONDS": "0.2", "RATE_LIMIT_PER_VEHICLE": "",
    })
    try:
        running = [charge(stack, f"ev-kept-{index}", duration_seconds=60).json() for index in range(2)]
        waiting = charge(stack, "ev-waiting", wait=True, duration_seconds=60).json()
        keyed = charge(stack, "ev-keyed", key="key-restart", duration_seconds=60)
        assert waiting["state"] == "queued" and keyed.status_code == 503
        stack.charge.kill()
        stack.charge.start()
        for session in running:
            body = requests.get(f"{stack.charge.url}/sessions/{session['session_id']}",
                                headers={"Authorization": f"Bearer {session['session_token']}"}, timeout=5).json()
            assert body["state"] == "charging"
        queued = requests.get(f"{stack.charge.url}/sessions/{waiting['session_id']}",
                              headers={"Authorization": f"Bearer {waiting['session_token']}"}, timeout=5).json()
        assert (queued["state"], queued["position"]) == ("queued", 1)
        # Asked by the operator, who may know whose session it is: its id is in the answer.
        busy = requests.post(f"{stack.charge.url}/charge", json={"vehicle_id": "ev-kept-0", "amount": 11.0},
                             headers=OPERATOR, timeout=15)
        assert busy.status_code == 409 and busy.json()["session_id"] == running[0]["session_id"]
        # The stop of a running session frees room: the queued one starts, as before the restart.
        requests.delete(f"{stack.charge.url}/sessions/{running[0]['session_id']}", headers=OPERATOR, timeout=5)
        wait_for(lambda: requests.get(f"{stack.charge.url}/sessions/{waiting['session_id']}", headers=OPERATOR,
                                      timeout=5).json()["state"] == "charging", 10, "the queued vehicle to start")
    finally:
        stack.stop()


def test_reconciliation_stops_what_no_client_was_told_of_and_ends_what_no_substation_holds(
        tmp_path: Path, charge_records: ChargeRecords) -> None:
    stack = start_stack(tmp_path, capacities=(30.0,))
    try:
        substation = stack.substations[0]
        # A session admitted behind an answer that never came back: the charge API only has its pending record.
        requests.post(f"{substation.url}/charge", json={"vehicle_id": "ev-orphan", "amount": 5,
                                                        "session_id": "orphan-0001"}, timeout=5).raise_for_status()
        # And a session the charge API believes in that its substation no longer holds.
        requests.post(f"{substation.url}/charge", json={"vehicle_id": "ev-gone", "amount": 5,
                                                        "session_id": "gone-0001"}, timeout=5).raise_for_status()
        admission = requests.get(f"{substation.url}/charge/gone-0001", timeout=5).json()
        requests.delete(f"{substation.url}/charge/gone-0001", timeout=5)

        store = ChargeStore(charge_records.store_target(tmp_path))
        tracker = SharedSessionTracker(utc_now, store) if store.shared else SessionTracker(store=store)
        tracker.reserve("orphan-0001", "ev-orphan", 5.0)
        from charge_request_service.sessions import ChargeSession
        from gridcommon.timefmt import parse_time
        tracker.reserve("gone-0001", "ev-gone", 5.0)
        tracker.record(ChargeSession("gone-0001", "ev-gone", "substation-1", 5.0,
                                     parse_time(admission["started_at"]), parse_time(admission["ends_at"])))
        client = BalancerClient((stack.balancer.url,), HttpClient("test", (1.0, 3.0)), (1.0, 1.0))
        reconciler = Reconciler(tracker, client, interval_seconds=60, pending_grace_seconds=0.0, store=store,
                                holder="test")
        assert reconciler.run_once() == (1, 1)
        assert "orphan-0001" not in {s["session_id"] for s in sessions_at(substation)}
        late_copy = requests.post(f"{substation.url}/charge", json={"vehicle_id": "ev-orphan", "amount": 5,
                                                                    "session_id": "orphan-0001"}, timeout=5)
        assert late_copy.status_code == 409 and late_copy.json()["error"] == "session_id_retired"
        assert tracker.finished("gone-0001").state == "ended"
        assert tracker.pending() == []
    finally:
        stack.stop()
