"""The floors of live power allocation, against the stock grid as real processes.

The stock grid is compose's and ``make run``'s: 80, 100 and 120 kW
transformers, 10 and 20 kW of storage at the last two, substation-3's solar
profile. Peer balancing is left out here (its own tests cover it), so the
limits are exactly what the tests compute. Every check of the guarantee comes
from the independent witnesses of tests/allocation_audit.py.
"""
from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from substation_service.peering.power import parse_profile
from tests.allocation_audit import Sampler, history_breaches, jain_index
from tests.harness import OPERATOR, OPERATOR_TOKEN, Service, Stack, start_all, wait_for

pytestmark = pytest.mark.integration

STOCK = ((80.0, 0.0), (100.0, 10.0), (120.0, 20.0))  # (CAPACITY_KW, STORAGE_KW)
STOCK_PROFILE = "0:0,6:20,9:45,11:70,15:45,18:20,20:0"
TOKEN = "floor-operator-token"


@pytest.fixture
def stock_grid(tmp_path: Path) -> Iterator[callable]:
    started: list[Service] = []

    def start(substation_env: dict[int, dict[str, str]] | None = None, charge_env: dict[str, str] | None = None):
        substations = [
            Service(
                name=f"substation-{index}",
                app="substation_service:create_app()",
                env={
                    "SUBSTATION_ID": f"substation-{index}",
                    "CAPACITY_KW": str(capacity),
                    "STORAGE_KW": str(storage),
                    "ADMIN_TOKEN": TOKEN,
                    **(substation_env or {}).get(index, {}),
                },
                log_dir=tmp_path,
            )
            for index, (capacity, storage) in enumerate(STOCK, start=1)
        ]
        started.extend(start_all(substations))
        balancer = Service(
            name="load-balancer",
            app="load_balancer:create_app()",
            env={"SUBSTATIONS": ",".join(s.url for s in substations), "POLL_INTERVAL_SECONDS": "1"},
            log_dir=tmp_path,
        )
        started.append(balancer.start())
        charge = Service(
            name="charge-request-service",
            app="charge_request_service:create_app()",
            env={"LOAD_BALANCER_URL": balancer.url, "QUEUE_RETRY_SECONDS": "0.2", "ADMIN_TOKEN": OPERATOR_TOKEN,
                 **(charge_env or {})},
            log_dir=tmp_path,
        )
        started.append(charge.start())
        return Stack(substations=substations, balancer=balancer, charge=charge)

    yield start
    for service in reversed(started):
        service.stop()


def send_all(stack: Stack, bodies: list[dict], concurrency: int) -> list[requests.Response]:
    barrier = threading.Barrier(min(concurrency, len(bodies)))
    http = requests.Session()
    http.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=concurrency))

    def send(body: dict) -> requests.Response:
        if body["index"] < concurrency:
            barrier.wait(timeout=10)  # the first wave plugs in at the same moment
        payload = {key: value for key, value in body.items() if key != "index"}
        return http.post(f"{stack.charge.url}/charge", json=payload, timeout=15)

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(send, bodies))


def final_record(stack: Stack, session_id: str) -> dict:
    return requests.get(f"{stack.charge.url}/sessions/{session_id}", headers=OPERATOR, timeout=5).json()


def assert_no_breach(stack: Stack, sampler: Sampler) -> int:
    """No sample and no recorded instant over the limit; returns how many samples were taken."""
    assert sampler.over_limit() == []
    for substation in stack.substations:
        breaches, points = history_breaches(substation)
        assert points > 0
        assert breaches == [], breaches[:3]
    return len(sampler.samples)


def test_rush_hour_on_the_stock_grid_serves_every_vehicle_fairly(stock_grid) -> None:
    stack = stock_grid()
    session_seconds = 8.0
    rng = random.Random(7)
    bodies = [
        {"index": index, "vehicle_id": f"ev-rush-{index:03d}", "amount": round(rng.uniform(5, 20), 1),
         "duration_seconds": session_seconds}
        for index in range(100)
    ]
    with Sampler(stack.substations) as sampler:
        answers = send_all(stack, bodies, concurrency=100)
        assert [a.status_code for a in answers] == [201] * 100  # 100 of 100 served
        time.sleep(session_seconds + 0.5)
    sampled = assert_no_breach(stack, sampler)
    assert sampled > 100

    # Energy delivered per vehicle, from each session's own final record.
    records = [final_record(stack, answer.json()["session_id"]) for answer in answers]
    assert all("energy_kwh" in r for r in records), [r for r in records if "energy_kwh" not in r][:2]
    delivered = [r["energy_kwh"] for r in records]
    assert all(kwh > 0 for kwh in delivered)
    assert jain_index(delivered) >= 0.95, jain_index(delivered)

    # While demand exceeded the grid, the grid was used: allocations summed over the substations,
    # at instants where every substation was sampled within 50 ms of each other and the vehicles
    # at each asked for more than it has. (Without peer balancing a substation whose sessions
    # have all ended cannot lend its power to the others, so instants where one is idle while
    # another is curtailed are not "demand exceeding the grid".)
    by_time: dict[int, dict[str, tuple[float, float, float]]] = {}
    for sample in sampler.samples:
        slot = by_time.setdefault(round(sample.taken_at * 20), {})
        slot[sample.substation] = (sample.allocated_kw, sample.limit_kw, sample.requested_kw)
    used = [
        sum(a for a, _, _ in slot.values()) / sum(limit for _, limit, _ in slot.values())
        for slot in by_time.values()
        if len(slot) == 3 and all(requested > limit for _, limit, requested in slot.values())
    ]
    assert len(used) > 20
    assert min(used) >= 0.95, min(used)
    print(f"\nrush hour: 100/100 served, Jain {jain_index(delivered):.4f}, grid used >= {min(used):.4f} while "
          f"demand exceeded it ({len(used)} instants), {sampled} samples and every history point: 0 over the limit")


def test_a_burst_of_500_charges_waits_or_is_refused_and_the_queue_starts_in_order(stock_grid) -> None:
    stack = stock_grid()
    session_seconds = 4.0
    bodies = [
        {"index": index, "vehicle_id": f"ev-burst-{index:03d}", "amount": 11.0, "duration_seconds": session_seconds}
        for index in range(500)
    ]
    # Without waiting: each one either charges or is refused with 503, nothing else.
    answers = send_all(stack, bodies, concurrency=50)
    assert {a.status_code for a in answers} <= {201, 503}
    assert all("Retry-After" in a.headers for a in answers if a.status_code == 503)
    admitted = sum(a.status_code == 201 for a in answers)
    assert admitted >= 230  # every minimum the grid holds: 57 + 78 + 100 vehicles of 1.4 kW
    time.sleep(session_seconds + 0.5)

    waiting_bodies = [{**body, "vehicle_id": f"ev-wait-{body['index']:03d}", "wait": True} for body in bodies]
    with Sampler(stack.substations) as sampler:
        answers = send_all(stack, waiting_bodies, concurrency=50)
        assert {a.status_code for a in answers} <= {201, 202}
        queued = [a.json() for a in answers if a.status_code == 202]
        charging_first = [a.json() for a in answers if a.status_code == 201]
        assert queued and len(charging_first) + len(queued) == 500
        # The queue drains in at most two more session lengths (the grid holds about half the burst).
        last = sorted(queued, key=lambda q: q["queued_at"])[-1]
        wait_for(lambda: final_record(stack, last["session_id"])["state"] in {"charging", "ended"},
                 timeout=4 * session_seconds + 10, what="the last waiting vehicle to start")
        time.sleep(session_seconds + 0.5)
    assert_no_breach(stack, sampler)

    records = [final_record(stack, q["session_id"]) for q in queued]
    assert all(r["state"] == "ended" for r in records), {r["state"] for r in records}
    # First come, first served, as the charge API started them (its log is in the order it did) ...
    started_lines = [line.split("queued request ")[1].split()[0]
                     for line in stack.charge.log_text().splitlines() if " started at substation-" in line]
    queued_at = {r["session_id"]: r["queued_at"] for r in records}
    assert sorted(started_lines) == sorted(queued_at)
    arrivals = [queued_at[session_id] for session_id in started_lines]
    assert arrivals == sorted(arrivals), "a waiting vehicle was overtaken"  # ties within a millisecond aside
    by_id = {r["session_id"]: r for r in records}
    in_arrival_order = [by_id[session_id] for session_id in started_lines]
    # ... and as the substations saw them, up to the few milliseconds their clocks differ by.
    starts = [time_of(r["started_at"]) for r in in_arrival_order]
    assert all(later >= earlier - 0.05 for earlier, later in zip(starts, starts[1:]))
    # Room frees when earlier sessions end; the k-th waiting vehicle takes the k-th room that frees.
    ends = sorted(
        time_of(final_record(stack, a["session_id"])["ended_at"]) for a in charging_first
    ) + sorted(time_of(r["ended_at"]) for r in in_arrival_order)
    worst = 0.0
    for k, record in enumerate(in_arrival_order):
        room_freed = max(ends[k], time_of(record["queued_at"]))
        worst = max(worst, time_of(record["started_at"]) - room_freed)
        assert time_of(record["started_at"]) - room_freed <= session_seconds, record
    print(f"\nburst of 500: {admitted} charging at once without waiting, the rest 503; with wait: "
          f"{len(charging_first)} at once, {len(queued)} queued, started in arrival order, longest start after "
          f"room freed {worst:.2f} s (session {session_seconds:g} s)")


def time_of(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_a_limit_halved_under_load_and_a_whole_solar_day_never_carry_more_than_the_limit(stock_grid) -> None:
    day_seconds = 24.0  # a whole profile day in 24 s: an hour a second
    stack = stock_grid(substation_env={3: {"GENERATION_PROFILE": STOCK_PROFILE, "PROFILE_DAY_SECONDS": str(day_seconds)}})
    profile = parse_profile(STOCK_PROFILE, day_seconds)
    substation_3 = stack.substations[2]
    stop = threading.Event()
    operator_limits: list[tuple[float, float, float | None]] = []  # (from, to, kW) as the test set them

    def keep_vehicles_coming() -> None:
        rng = random.Random(3)
        http = requests.Session()
        deadline = time.monotonic() + day_seconds + 10
        index = 0
        while not stop.is_set() and time.monotonic() < deadline:
            body = {"vehicle_id": f"ev-day-{index:04d}", "amount": round(rng.uniform(5, 20), 1),
                    "duration_seconds": rng.uniform(2, 6)}
            http.post(f"{stack.charge.url}/charge", json=body, timeout=10)
            index += 1
            stop.wait(0.02)

    with Sampler(stack.substations) as sampler:
        load = threading.Thread(target=keep_vehicles_coming)
        load.start()
        try:
            time.sleep(day_seconds / 3)
            limit = requests.get(f"{substation_3.url}/limit", timeout=5).json()["limit_kw"]
            halved = limit / 2
            before = time.time()
            answer = requests.put(f"{substation_3.url}/limit", json={"limit_kw": halved},
                                  headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
            assert answer.status_code == 200 and answer.json()["load"] <= halved + 1e-6
            operator_limits.append((time.time(), 0.0, halved))
            time.sleep(day_seconds / 3)
            lifted_at = time.time()
            requests.delete(f"{substation_3.url}/limit", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
            operator_limits[0] = (operator_limits[0][0], lifted_at, halved)
            time.sleep(day_seconds / 3 + 1)
        finally:
            stop.set()
            load.join(timeout=15)
    assert before < operator_limits[0][0]
    assert_no_breach(stack, sampler)

    # The limit itself, checked from the profile and the operator's actions, not from the substation.
    solar = [s for s in sampler.samples if s.substation == "substation-3"]
    assert len(solar) > 10 * day_seconds  # about 20 a second
    for sample in solar:
        own = 120.0 + 20.0 + profile.at(sample.taken_at)
        set_at, lifted_at, halved = operator_limits[0]
        if set_at <= sample.taken_at <= lifted_at:
            own = min(own, halved)
        assert sample.allocated_kw <= own + 1e-6, sample
    # The day's steps did happen under load: outside the operator's window, every level the profile held
    # for a second either side of a sample shows in the substation's limit. Which levels those are depends
    # on where the wall clock's phase of the 24 s day puts the window; at least two always fall outside it.
    set_at, lifted_at, _ = operator_limits[0]
    outside = [s for s in solar if not set_at - 1 <= s.taken_at <= lifted_at + 1]
    generation_seen = {round(s.limit_kw - 140.0) for s in outside}
    steadily_held = {round(profile.at(s.taken_at)) for s in outside
                     if profile.at(s.taken_at - 1) == profile.at(s.taken_at) == profile.at(s.taken_at + 1)}
    assert len(steadily_held) >= 2 and steadily_held <= generation_seen, (steadily_held, generation_seen)
    assert any(s.requested_kw > s.limit_kw for s in solar), "the substation was never loaded"
    print(f"\nhalved limit and a solar day: {len(sampler.samples)} samples at 20 Hz, generation levels seen "
          f"{sorted(generation_seen)}, 0 instants over the limit (samples, histories, the profile's own limit)")
