"""Waiting for power: the queue on its own, then the charge API with a real grid that is full."""
from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
import requests

from charge_request_service.queue import QueueFull, WaitingQueue
from gridcommon.validation import ChargeRequest
from tests.harness import OPERATOR, Stack, scrape, sessions_at, start_stack, wait_for
from tests.postgres_support import ChargeRecords

pytestmark = pytest.mark.integration


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now


def request(index: int) -> ChargeRequest:
    return ChargeRequest(f"ev-{index}", 11.0, 60.0, session_id=f"s-{index}")


def test_positions_follow_arrival_and_close_up_when_someone_leaves() -> None:
    queue = WaitingQueue(10, 300, Clock())
    positions = [queue.add(request(index))[1] for index in range(5)]
    assert positions == [1, 2, 3, 4, 5]
    queue.finish("s-2", "cancelled")  # cancelled in the middle
    assert [queue.get(f"s-{index}")[1] for index in (0, 1, 3, 4)] == [1, 2, 3, 4]
    queue.finish("s-0", "cancelled")  # the head left
    assert queue.head().session_id == "s-1"
    assert [queue.get(f"s-{index}")[1] for index in (1, 3, 4)] == [1, 2, 3]
    assert queue.get("s-2") is None and len(queue) == 3


def test_the_queue_is_bounded() -> None:
    queue = WaitingQueue(2, 300, Clock())
    queue.add(request(1))
    queue.add(request(2))
    with pytest.raises(QueueFull, match="2 vehicles are already waiting"):
        queue.add(request(3))


def test_requests_expire_oldest_first_after_their_time() -> None:
    clock = Clock()
    queue = WaitingQueue(10, 30, clock)
    queue.add(request(1))
    clock.now += timedelta(seconds=10)
    queue.add(request(2))
    clock.now += timedelta(seconds=20)
    assert [entry.session_id for entry in queue.expire()] == ["s-1"]
    assert queue.oldest_wait_seconds() == 20.0
    assert queue.get("s-2")[1] == 1


# ----- the charge API, against a real grid, its records in SQLite and in PostgreSQL -------------

SESSION_SECONDS = 2.0


@pytest.fixture
def small_grid(tmp_path: Path, charge_records: ChargeRecords) -> Stack:
    # 3 kW and a 1.4 kW minimum: room for two vehicles at once, whatever they ask for.
    stack = start_stack(
        tmp_path,
        capacities=(3.0,),
        balancer_env={"POLL_INTERVAL_SECONDS": "0.5"},
        charge_env={"QUEUE_RETRY_SECONDS": "0.1", "QUEUE_TIMEOUT_SECONDS": "30", "MAX_QUEUED": "3",
                    **charge_records.env(tmp_path)},
    )
    yield stack
    stack.stop()


def charge(stack: Stack, vehicle: str, wait: bool | None = None, duration: float = SESSION_SECONDS):
    body: dict = {"vehicle_id": vehicle, "amount": 11, "duration_seconds": duration}
    if wait is not None:
        body["wait"] = wait
    return requests.post(f"{stack.charge.url}/charge", json=body, timeout=10)


def session(stack: Stack, session_id: str) -> dict:
    return requests.get(f"{stack.charge.url}/sessions/{session_id}", headers=OPERATOR, timeout=5).json()


def test_a_full_grid_queues_who_asks_to_wait_and_starts_them_in_order(small_grid: Stack) -> None:
    assert [charge(small_grid, f"ev-{index}").status_code for index in (1, 2)] == [201, 201]
    refused = charge(small_grid, "ev-3")
    assert refused.status_code == 503 and refused.json()["error"] == "no_capacity"

    first = charge(small_grid, "ev-4", wait=True)
    assert first.status_code == 202
    body = first.json()
    assert (body["state"], body["position"]) == ("queued", 1)
    assert first.headers["Location"] == f"/sessions/{body['session_id']}"
    second = charge(small_grid, "ev-5", wait=True).json()
    assert second["position"] == 2
    # Nobody overtakes the vehicles already waiting, even without asking to wait.
    overtaker = charge(small_grid, "ev-6")
    assert overtaker.status_code == 503 and "waiting for power ahead" in overtaker.json()["message"]
    assert scrape(small_grid.charge).value("charge_queue_length") == 2.0

    wait_for(lambda: session(small_grid, second["session_id"])["state"] == "charging", SESSION_SECONDS * 3,
             "both waiting vehicles to start")
    started = [session(small_grid, body["session_id"]), session(small_grid, second["session_id"])]
    assert [s["state"] for s in started] == ["charging", "charging"]
    assert started[0]["started_at"] <= started[1]["started_at"], "first come, first served"
    assert all(s["queue_wait_seconds"] > 0 and s["allocated_kw"] == 1.5 for s in started)
    metrics = scrape(small_grid.charge)
    assert metrics.value("charge_queue_wait_seconds_count", outcome="started") == 2.0
    assert metrics.value("charge_queue_length") == 0.0


def test_a_waiting_request_can_be_cancelled_and_a_full_queue_refuses(small_grid: Stack) -> None:
    for index in (1, 2):
        charge(small_grid, f"ev-{index}", duration=60)
    waiting = [charge(small_grid, f"ev-w{index}", wait=True).json() for index in range(3)]
    full = charge(small_grid, "ev-late", wait=True)
    assert full.status_code == 503 and full.json()["error"] == "queue_full"
    assert int(full.headers["Retry-After"]) >= 1

    cancelled = requests.delete(f"{small_grid.charge.url}/sessions/{waiting[0]['session_id']}", headers=OPERATOR, timeout=5)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert session(small_grid, waiting[0]["session_id"])["state"] == "cancelled"
    assert session(small_grid, waiting[2]["session_id"])["position"] == 2
    assert len(sessions_at(small_grid.substations[0])) == 2


def test_a_request_that_waits_too_long_expires(tmp_path: Path, charge_records: ChargeRecords) -> None:
    stack = start_stack(tmp_path, capacities=(1.5,), charge_env={"QUEUE_TIMEOUT_SECONDS": "0.5",
                                                                  "QUEUE_RETRY_SECONDS": "0.1",
                                                                  **charge_records.env(tmp_path)})
    try:
        charge(stack, "ev-1", duration=60)
        waiting = charge(stack, "ev-2", wait=True).json()
        wait_for(lambda: session(stack, waiting["session_id"])["state"] == "expired", 5, "the request to expire")
        assert scrape(stack.charge).value("charge_queue_wait_seconds_count", outcome="expired") == 1.0
        assert len(sessions_at(stack.substations[0])) == 1
    finally:
        stack.stop()


@pytest.mark.parametrize("wait", ["yes", 1, None])
def test_wait_must_be_a_boolean(small_grid: Stack, wait) -> None:
    response = requests.post(
        f"{small_grid.charge.url}/charge", json={"vehicle_id": "ev-1", "amount": 11, "wait": wait}, timeout=5
    )
    assert response.status_code == 400 and response.json()["field"] == "wait"


def test_a_request_cancelled_while_it_is_being_started_leaves_no_session(small_grid: Stack) -> None:
    """Cancel and start race: whichever wins, the vehicle has one answer and no stray session."""
    for index in (1, 2):
        charge(small_grid, f"ev-{index}", duration=1.0)
    waiting = charge(small_grid, "ev-w", wait=True).json()
    outcome: dict = {}

    def cancel_when_room_frees() -> None:
        time.sleep(0.95)
        outcome["status"] = requests.delete(
            f"{small_grid.charge.url}/sessions/{waiting['session_id']}", headers=OPERATOR, timeout=5
        ).status_code

    thread = threading.Thread(target=cancel_when_room_frees)
    thread.start()
    thread.join()
    time.sleep(1.0)
    state = session(small_grid, waiting["session_id"])["state"]
    held = {s["session_id"] for s in sessions_at(small_grid.substations[0])}
    if state == "cancelled":
        assert waiting["session_id"] not in held
    else:  # it had started before the cancel arrived: the cancel stopped it
        assert outcome["status"] == 200 and waiting["session_id"] not in held


POLLERS = 4
STATE_CHANGES = """
CREATE TABLE state_changes (session_id TEXT, old_state TEXT, new_state TEXT);
CREATE FUNCTION note_state_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO state_changes VALUES (NEW.session_id, OLD.state, NEW.state);
    RETURN NEW;
END $$;
CREATE TRIGGER state_changes AFTER UPDATE OF state ON sessions FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION note_state_change();
"""


def test_a_request_polled_while_it_starts_or_expires_is_always_found(tmp_path: Path,
                                                                     charge_records: ChargeRecords) -> None:
    """Leaving the queue is one step for a reader: waiting, then charging or expired, never "no such session".

    Dozens of requests start or expire while clients poll each of them many times a second.
    """
    records = charge_records.env(tmp_path)
    stack = start_stack(tmp_path, capacities=(3.0,), balancer_env={"POLL_INTERVAL_SECONDS": "0.5"},
                        charge_env={"QUEUE_RETRY_SECONDS": "0.05", "QUEUE_TIMEOUT_SECONDS": "5", "MAX_QUEUED": "50",
                                    **records})
    if "DATABASE_URL" in records:  # every change of a row's state, as PostgreSQL saw it (replicas read the same)
        with psycopg.connect(records["DATABASE_URL"], autocommit=True, connect_timeout=10) as db:
            db.execute(STATE_CHANGES)
    try:
        answers = [charge(stack, f"ev-poll-{index}", wait=True, duration=0.2) for index in range(42)]
        assert {answer.status_code for answer in answers} == {201, 202}
        queued = [answer.json()["session_id"] for answer in answers if answer.status_code == 202]
        states: dict[str, list[str]] = {session_id: [] for session_id in queued}
        missing: list[tuple[str, list[str], int, str]] = []
        deadline = time.monotonic() + 7.0  # every one has started or expired by then

        def poll(share: list[str]) -> None:
            http = requests.Session()
            while time.monotonic() < deadline:
                for session_id in share:
                    answer = http.get(f"{stack.charge.url}/sessions/{session_id}", headers=OPERATOR, timeout=5)
                    if answer.status_code != 200:
                        missing.append((session_id, states[session_id][-3:], answer.status_code, answer.text))
                    else:
                        states[session_id].append(answer.json()["state"])

        pollers = [threading.Thread(target=poll, args=(queued[index::POLLERS],)) for index in range(POLLERS)]
        for poller in pollers:
            poller.start()
        for poller in pollers:
            poller.join()
        assert missing == []
        last = [polled[-1] for polled in states.values()]
        assert set(last) <= {"charging", "ended", "expired"} and "expired" in last and "ended" in last, last
        if "DATABASE_URL" in records:  # and each left the queue in one update: no step between for anyone to see
            with psycopg.connect(records["DATABASE_URL"], connect_timeout=10) as db:
                left = db.execute("SELECT new_state, count(*) FROM state_changes WHERE old_state = 'queued' "
                                  "GROUP BY new_state").fetchall()
            assert set(dict(left)) == {"active", "expired"}, left
    finally:
        stack.stop()
