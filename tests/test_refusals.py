"""A refusal says its true reason, and a request that fits nowhere never blocks the queue.

Every case goes through the charge API's POST /charge with two balancers behind it, as
deployed: real substations, balancers and charge API, each a gunicorn process.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.harness import (
    OPERATOR,
    OPERATOR_TOKEN,
    Service,
    Stack,
    all_at_once,
    get_json,
    sessions_at,
    start_all,
    stop_all,
    wait_for,
)

pytestmark = pytest.mark.integration

# Long enough that no background poll happens while a test runs: what the balancers learn between
# two polls comes from their answers and their refresh.
LONG_POLL_SECONDS = "3600"
STRICT = {"ALLOCATION_POLICY": "strict"}


def two_balancer_stack(
    log_dir: Path,
    capacities: tuple[float, ...],
    substation_env: dict[str, str] | None = None,
    balancer_env: dict[str, str] | None = None,
    charge_env: dict[str, str] | None = None,
) -> Stack:
    """Substations, two balancers over them, and the charge API failing over from the first to the second."""
    substations = start_all([
        Service(name=f"substation-{index}", app="substation_service:create_app()",
                env={"SUBSTATION_ID": f"substation-{index}", "CAPACITY_KW": str(capacity),
                     "ADMIN_TOKEN": OPERATOR_TOKEN, **(substation_env or {})}, log_dir=log_dir)
        for index, capacity in enumerate(capacities, start=1)
    ])
    urls = ",".join(s.url for s in substations)
    balancers = start_all([
        Service(name=f"load-balancer-{index}", app="load_balancer:create_app()",
                env={"SUBSTATIONS": urls, **(balancer_env or {})}, log_dir=log_dir)
        for index in (1, 2)
    ])
    charge_api = Service(
        name="charge-request-service", app="charge_request_service:create_app()",
        env={"LOAD_BALANCER_URL": ",".join(b.url for b in balancers), "ADMIN_TOKEN": OPERATOR_TOKEN,
             "RATE_LIMIT_PER_VEHICLE": "", **(charge_env or {})},
        log_dir=log_dir,
    ).start()
    for balancer in balancers:
        wait_for(lambda: all(entry["up"] for entry in get_json(f"{balancer.url}/status")["substations"]), 20,
                 "the balancers to poll every substation")
    stack = Stack(substations=substations, balancer=balancers[0], charge=charge_api)
    stack.balancers = balancers  # type: ignore[attr-defined]
    return stack


def stop_stack(stack: Stack) -> None:
    for substation in stack.substations:
        substation.resume()
    stop_all([stack.charge, *stack.balancers, *stack.substations])  # type: ignore[attr-defined]


def charge(stack: Stack, vehicle: str, amount: float, **extra: Any) -> requests.Response:
    return requests.post(f"{stack.charge.url}/charge", json={"vehicle_id": vehicle, "amount": amount, **extra},
                         timeout=20)


def free_at(substation: Service) -> float:
    """What a strict substation has free, from its own records: its limit less every session's amount."""
    limit = get_json(f"{substation.url}/limit")["limit_kw"]
    return limit - sum(session["amount"] for session in sessions_at(substation))


# ----- (1) sessions freed between two polls are used at once --------------------------------------


def test_sessions_freed_between_two_polls_are_used_by_the_next_request(tmp_path: Path) -> None:
    stack = two_balancer_stack(tmp_path, capacities=(50.0,), substation_env=STRICT,
                               balancer_env={"POLL_INTERVAL_SECONDS": LONG_POLL_SECONDS})
    substation = stack.substations[0]
    try:
        holder = charge(stack, "ev-holder-0", 50.0)
        assert holder.status_code == 201, holder.text
        assert charge(stack, "ev-too-many", 10.0).json()["error"] == "no_capacity", "the grid is full"
        admitted = 0
        for run in range(1, 11):
            # Ended at the substation itself: no balancer hears of it before its next poll, an hour away.
            ended = requests.delete(f"{substation.url}/charge/{holder.json()['session_id']}", timeout=5)
            assert ended.status_code == 200, ended.text
            assert free_at(substation) == 50.0
            time.sleep(0.6)  # past REFRESH_MIN_INTERVAL_SECONDS (0.5) since the last refresh
            holder = charge(stack, f"ev-holder-{run}", 50.0)
            admitted += holder.status_code == 201
            if holder.status_code != 201:
                break
        assert admitted == 10, f"{admitted} of 10 requests used the room freed since the last poll"
    finally:
        stop_stack(stack)


# ----- (2) a full grid says so, with what is free now ---------------------------------------------


def test_a_full_grid_is_refused_as_full_with_what_is_free_now(tmp_path: Path) -> None:
    stack = two_balancer_stack(tmp_path, capacities=(100.0, 100.0), substation_env=STRICT,
                               balancer_env={"POLL_INTERVAL_SECONDS": LONG_POLL_SECONDS})
    try:
        for index in range(4):
            assert charge(stack, f"ev-fill-{index}", 30.0).status_code == 201
        free = {substation.env["SUBSTATION_ID"]: free_at(substation) for substation in stack.substations}
        assert sorted(free.values()) == [40.0, 40.0]

        refused = charge(stack, "ev-big", 50.0, wait=False)
        body = refused.json()
        assert refused.status_code == 503 and body["error"] == "no_capacity", body
        assert body["free_kw"] == free
        assert "ask for at most 40 kW" in body["message"]
        assert int(refused.headers["Retry-After"]) >= 1

        # A burst against the full grid: every answer is "full", none "too slow" or "unreachable".
        errors: list[str] = []
        all_at_once(40, lambda number: errors.append(charge(stack, f"ev-burst-{number}", 50.0).json()["error"]))
        assert errors == ["no_capacity"] * 40

        # The advice holds: what it says is free starts at once.
        assert charge(stack, "ev-fits", 40.0).status_code == 201
    finally:
        stop_stack(stack)


# ----- (3) unreachable substations ----------------------------------------------------------------


def test_substations_that_cannot_be_reached_are_refused_as_unreachable(tmp_path: Path) -> None:
    stack = two_balancer_stack(tmp_path, capacities=(100.0, 100.0),
                               balancer_env={"POLL_INTERVAL_SECONDS": LONG_POLL_SECONDS})
    try:
        for substation in stack.substations:
            substation.kill()
        for attempt in range(2):  # first by the forwards' refused connections, then by the view that knows
            refused = charge(stack, f"ev-{attempt}", 10.0)
            body = refused.json()
            assert refused.status_code == 503 and body["error"] == "substations_unreachable", body
            assert "could be reached" in body["message"] and "Retry after" in body["message"]
            assert "free_kw" not in body
    finally:
        stop_stack(stack)


# ----- (4) a frozen substation --------------------------------------------------------------------


def test_a_frozen_substation_is_refused_as_too_slow(tmp_path: Path) -> None:
    stack = two_balancer_stack(tmp_path, capacities=(100.0,),
                               balancer_env={"POLL_INTERVAL_SECONDS": LONG_POLL_SECONDS})
    frozen = stack.substations[0]
    try:
        frozen.suspend()  # connections are still accepted; nothing answers
        started = time.monotonic()
        refused = charge(stack, "ev-frozen", 10.0)
        took = time.monotonic() - started
        body = refused.json()
        assert refused.status_code == 503 and body["error"] == "substations_too_slow", body
        assert "substation-1: no answer within the timeout" in body["message"]
        assert took < 10.0, "answered within the charge API's REQUEST_TIMEOUT_SECONDS"
        tracked = requests.get(f"{stack.charge.url}/sessions", headers=OPERATOR, timeout=5).json()["sessions"]
        assert tracked == [], "nothing is booked for a request that was refused"
    finally:
        stop_stack(stack)


# ----- (5) a request that fits nowhere ------------------------------------------------------------


def test_a_request_that_fits_nowhere_is_refused_at_once_and_never_blocks_the_queue(tmp_path: Path) -> None:
    stack = two_balancer_stack(
        tmp_path, capacities=(100.0, 100.0), substation_env=STRICT,
        balancer_env={"POLL_INTERVAL_SECONDS": "0.5"},
        charge_env={"QUEUE_RETRY_SECONDS": "0.2", "QUEUE_TIMEOUT_SECONDS": "300"},
    )
    first, second = stack.substations
    try:
        # More than any limit: refused at once, not queued, even asking to wait; then also while others wait.
        too_large = charge(stack, "ev-350", 350.0, wait=True)
        body = too_large.json()
        assert too_large.status_code == 409 and body["error"] == "exceeds_every_limit", body
        assert (body["largest_limit_kw"], body["minimum_kw"]) == (100.0, 350.0)
        assert "Ask for at most 100 kW" in body["message"]

        for index in range(2):
            assert charge(stack, f"ev-base-{index}", 60.0).status_code == 201  # one at each, 40 kW free
        head = charge(stack, "ev-head", 90.0, wait=True)
        behind = charge(stack, "ev-behind", 15.0, wait=True)
        assert (head.status_code, behind.status_code) == (202, 202)
        assert behind.json()["position"] == 2
        queued_refusal = charge(stack, "ev-350-queue", 350.0, wait=True)
        assert queued_refusal.status_code == 409 and queued_refusal.json()["error"] == "exceeds_every_limit"

        # First come, first served among requests that can start: the one behind fits now, yet waits.
        time.sleep(1.0)
        assert state_of(stack, behind) == "queued"

        # The limits fall below the head's amount: it could never start, and must not hold the other.
        for substation in (first, second):
            limited = requests.put(f"{substation.url}/limit", json={"limit_kw": 80.0}, headers=OPERATOR, timeout=5)
            assert limited.status_code == 200, limited.text
        waited = wait_for(lambda: state_of(stack, behind) == "charging", 15, "the request behind the head to start")
        assert waited < 15
        assert state_of(stack, head) == "cancelled"
        held = [s for substation in stack.substations for s in sessions_at(substation)]
        assert sorted(s["amount"] for s in held) == [15.0, 60.0, 60.0]
        assert all(free_at(substation) >= 0 for substation in stack.substations)
    finally:
        stop_stack(stack)


def state_of(stack: Stack, queued: requests.Response) -> str:
    body = queued.json()
    answer = requests.get(f"{stack.charge.url}/sessions/{body['session_id']}",
                          headers={"Authorization": f"Bearer {body['session_token']}"}, timeout=5)
    assert answer.status_code == 200, answer.text
    return answer.json()["state"]
