"""Two charge API replicas on one PostgreSQL database, as the Helm chart runs them (real processes).

Whatever replica a request reaches, the API behaves as one: a session made through one is read and
stopped through the other, one Idempotency-Key books once, the queue has one order. SIGKILL of one
replica under load is audited from the substations' own SQLite records, not from the API's answers.
"""
from __future__ import annotations

import math
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from tests.harness import OPERATOR, OPERATOR_TOKEN, Service, all_at_once, sessions_at, start_all, wait_for
from tests.postgres_support import PostgresServer
from tests.test_chaos import (
    CLIENTS,
    RECONCILE_SECONDS,
    RECONCILIATION_WINDOW_SECONDS,
    REQUEST_TIMEOUT_SECONDS,
    SESSION_SECONDS,
    ClientRecord,
    hard_kill,
    run_clients,
    substation_records,
)

pytestmark = pytest.mark.integration

# A replica that dies holding the reconciliation lease keeps it this long (3 rounds) before the other takes it.
LEASE_TAKEOVER_SECONDS = 3 * RECONCILE_SECONDS


@dataclass
class Replicas:
    substations: list[Service]
    balancer: Service
    apis: list[Service]
    state: Path

    def stop(self) -> None:
        for service in (*self.apis, self.balancer, *self.substations):
            service.stop()


def start_replicas(folder: Path, database_url: str, capacities: tuple[float, ...], **charge_env: str) -> Replicas:
    state = folder / "state"
    substations = start_all([
        Service(name=f"substation-{index}", app="substation_service:create_app()", env={
            "SUBSTATION_ID": f"substation-{index}", "CAPACITY_KW": str(capacity), "STATE_DIR": str(state),
        }, log_dir=folder)
        for index, capacity in enumerate(capacities, start=1)
    ])
    balancer = Service(name="load-balancer", app="load_balancer:create_app()", env={
        "SUBSTATIONS": ",".join(s.url for s in substations), "POLL_INTERVAL_SECONDS": "0.5",
        "FORWARD_TIMEOUT_SECONDS": "1", "ROUTE_DEADLINE_SECONDS": "4", "CONNECT_TIMEOUT_SECONDS": "0.5",
    }, log_dir=folder).start()
    apis = start_all([
        Service(name=f"charge-api-{index}", app="charge_request_service:create_app()", env={
            "LOAD_BALANCER_URL": balancer.url, "DATABASE_URL": database_url, "ADMIN_TOKEN": OPERATOR_TOKEN,
            "RATE_LIMIT_PER_VEHICLE": "", "REQUEST_TIMEOUT_SECONDS": str(REQUEST_TIMEOUT_SECONDS),
            "CONNECT_TIMEOUT_SECONDS": "0.5", "RECONCILE_SECONDS": str(RECONCILE_SECONDS), **charge_env,
        }, log_dir=folder)
        for index in (1, 2)
    ])
    return Replicas(substations, balancer, apis, state)


@pytest.fixture
def replicas(tmp_path: Path, postgres: PostgresServer) -> Replicas:
    running = start_replicas(tmp_path, postgres.new_database(), (30.0, 30.0), QUEUE_RETRY_SECONDS="0.1")
    yield running
    running.stop()


def charge(api: Service, vehicle: str, key: str | None = None, **extra) -> requests.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return requests.post(f"{api.url}/charge", json={"vehicle_id": vehicle, "amount": 11.0, **extra},
                         headers=headers, timeout=15)


def held(replicas: Replicas) -> list[dict]:
    return [session for substation in replicas.substations for session in sessions_at(substation)]


def test_a_session_made_through_one_replica_is_read_and_stopped_through_the_other(replicas: Replicas) -> None:
    first, second = replicas.apis
    made = charge(first, "ev-across", duration_seconds=60)
    assert made.status_code == 201, made.text
    session = made.json()
    client = {"Authorization": f"Bearer {session['session_token']}"}

    read = requests.get(f"{second.url}/sessions/{session['session_id']}", headers=client, timeout=5)
    assert read.status_code == 200 and read.json()["state"] == "charging"
    assert read.json()["substation"] == session["substation"]
    busy = charge(second, "ev-across")  # one session per vehicle, whichever replica is asked
    assert busy.status_code == 409 and busy.json()["error"] == "vehicle_already_charging"

    stopped = requests.delete(f"{second.url}/sessions/{session['session_id']}", headers=client, timeout=5)
    assert stopped.status_code == 200, stopped.text
    assert session["session_id"] not in {s["session_id"] for s in held(replicas)}
    after = requests.get(f"{first.url}/sessions/{session['session_id']}", headers=client, timeout=5).json()
    assert (after["state"], after["end_reason"]) == ("ended", "stopped")
    again = requests.delete(f"{first.url}/sessions/{session['session_id']}", headers=client, timeout=5)
    assert again.status_code == 404  # stopped once, through either
    assert charge(first, "ev-across").status_code == 201  # the vehicle is free again


def test_the_same_idempotency_key_sent_to_both_at_once_books_once(replicas: Replicas) -> None:
    rounds = 12
    answers: dict[str, list[requests.Response]] = defaultdict(list)
    for index in range(rounds):
        key, vehicle = f"key-both-{index}", f"ev-both-{index}"
        barrier = threading.Barrier(2)

        def send(api: Service) -> None:
            barrier.wait()
            answers[vehicle].append(charge(api, vehicle, key=key, duration_seconds=60))

        threads = [threading.Thread(target=send, args=(api,)) for api in replicas.apis]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    bookings = defaultdict(list)
    for session in held(replicas):
        bookings[session["vehicle_id"]].append(session["session_id"])
    for vehicle, pair in answers.items():
        statuses = sorted(answer.status_code for answer in pair)
        # Both got the one answer (the second replayed it), or the second was told the first is in progress.
        assert statuses in ([201, 201], [201, 409]), (vehicle, [answer.text for answer in pair])
        admitted = {answer.json()["session_id"] for answer in pair if answer.status_code == 201}
        busy = [answer.json()["error"] for answer in pair if answer.status_code == 409]
        assert busy in ([], ["idempotency_key_in_use"])
        assert len(admitted) == 1 and bookings[vehicle] == list(admitted), (vehicle, bookings[vehicle], admitted)


def test_a_keys_quotas_hold_over_both_replicas_together(tmp_path: Path, postgres: PostgresServer) -> None:
    """32 threads a round race one key's requests through both replicas at once: what the substations
    themselves hold for the key stays within its session and kW quotas, summed over both replicas."""
    running = start_replicas(tmp_path, postgres.new_database(), (60.0, 60.0), PUBLIC_API_AUTH="keys")
    try:
        first, second = running.apis
        made = requests.post(f"{first.url}/client-keys", headers=OPERATOR, timeout=5, json={
            "name": "racer", "quotas": {"sessions": 5, "kw": 24, "queued": 0, "requests_per_second": 1_000}})
        assert made.status_code == 201, made.text
        key = {"X-API-Key": made.json()["api_key"]}
        # The other replica reads keys another one created within its reload period.
        wait_for(lambda: requests.get(f"{second.url}/status", headers=key, timeout=5).status_code == 200, 10,
                 "the second replica to accept the key the first created")
        statuses: list[int] = []
        most = (0, 0.0)
        for round_number in range(4):
            def race(number: int) -> None:
                answer = requests.post(f"{running.apis[number % 2].url}/charge", headers=key, timeout=15, json={
                    "vehicle_id": f"race-{round_number}-{number}", "amount": 3 + number % 4, "duration_seconds": 600})
                statuses.append(answer.status_code)

            all_at_once(32, race)
            charging = [s for s in held(running) if s["vehicle_id"].startswith("race-") and s.get("state") != "ended"]
            sessions, kw = len(charging), sum(s["amount"] for s in charging)
            most = (max(most[0], sessions), max(most[1], kw))
            assert sessions <= 5 and kw <= 24, f"round {round_number}: {sessions} sessions, {kw:g} kW at substations"
            # Free some room through one replica or the other, so each round races for what is left.
            listed = requests.get(f"{first.url}/sessions", headers=OPERATOR, timeout=5).json()["sessions"]
            for index, session in enumerate(listed[:2]):
                stopped = requests.delete(f"{running.apis[index % 2].url}/sessions/{session['session_id']}",
                                          headers=OPERATOR, timeout=5)
                assert stopped.status_code == 200, stopped.text
        print(f"\ntwo replicas, 32 threads x 4 rounds: {statuses.count(201)} admitted, {statuses.count(429)} refused; "
              f"most held at the substations: {most[0]} sessions, {most[1]:g} kW (quotas 5 and 24)")
        assert set(statuses) <= {201, 429} and statuses.count(429) >= 100
        assert most[0] >= 4  # the quota did fill: at most 6 kW a session, so at least four fit in 24 kW
        figures = requests.get(f"{second.url}/client-keys", headers=OPERATOR, timeout=5).json()
        racer = next(k for k in figures["client_keys"] if k["name"] == "racer")
        assert racer["usage"]["sessions"] == len(requests.get(f"{first.url}/sessions", headers=OPERATOR,
                                                              timeout=5).json()["sessions"])
    finally:
        running.stop()


def test_the_queue_has_one_order_across_replicas(tmp_path: Path, postgres: PostgresServer) -> None:
    running = start_replicas(tmp_path, postgres.new_database(), (3.0,), QUEUE_RETRY_SECONDS="0.1",
                             QUEUE_TIMEOUT_SECONDS="30")
    try:
        first, second = running.apis
        assert [charge(api, f"ev-full-{index}", duration_seconds=1.5).status_code
                for index, api in enumerate(running.apis)] == [201, 201]
        waiting = [charge(api, f"ev-wait-{index}", wait=True, duration_seconds=30).json()
                   for index, api in enumerate([first, second, first])]
        assert [entry["position"] for entry in waiting] == [1, 2, 3]
        for api in running.apis:  # both replicas see one queue
            positions = [requests.get(f"{api.url}/sessions/{entry['session_id']}", headers=OPERATOR,
                                      timeout=5).json()["position"] for entry in waiting]
            assert positions == [1, 2, 3]
        overtaker = charge(second, "ev-overtaker")
        assert overtaker.status_code == 503 and "waiting for power ahead" in overtaker.json()["message"]

        def state(entry: dict) -> str:
            return requests.get(f"{second.url}/sessions/{entry['session_id']}", headers=OPERATOR,
                                timeout=5).json()["state"]

        wait_for(lambda: state(waiting[1]) == "charging", 10, "the first two waiting vehicles to start")
        started = [requests.get(f"{first.url}/sessions/{entry['session_id']}", headers=OPERATOR, timeout=5).json()
                   for entry in waiting[:2]]
        assert started[0]["started_at"] <= started[1]["started_at"], "first come, first served"
        assert state(waiting[2]) == "queued"

        # Cancelled through one replica while the other is polled: it reads queued, then cancelled, never missing.
        seen: list[tuple[int, str | None]] = []
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                answer = requests.get(f"{second.url}/sessions/{waiting[2]['session_id']}", headers=OPERATOR, timeout=5)
                seen.append((answer.status_code, answer.json().get("state")))

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            time.sleep(0.3)
            cancelled = requests.delete(f"{first.url}/sessions/{waiting[2]['session_id']}", headers=OPERATOR, timeout=5)
            time.sleep(0.3)
        finally:
            stop.set()
            poller.join()
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled", cancelled.text
        assert {status for status, _ in seen} == {200}, seen
        assert [state for _, state in seen] == sorted((state for _, state in seen), key=["queued", "cancelled"].index)
        assert seen[0][1] == "queued" and seen[-1][1] == "cancelled"
    finally:
        running.stop()


# ----- SIGKILL of one replica under load ----------------------------------------------------------

REQUESTS = 1_200
LONGEST_RUN_SECONDS = 180.0


@dataclass
class Endpoints:
    """The replicas a client may reach now, as a Kubernetes Service's endpoints: a killed one is taken out."""

    apis: list[Service]
    down: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def pick(self, rng: random.Random) -> tuple[Service, float]:
        """A replica that is up, and when it was picked: a request to it is sent from that moment on."""
        with self.lock:
            up = [api for api in self.apis if api.name != self.down]
            return rng.choice(up), time.time()

    def kill(self, victim: Service) -> float:
        """SIGKILL ``victim`` and take it out at once; when it died. A request to it that was picked
        before is one in flight when it died; none is picked after."""
        with self.lock:
            killed_at = time.time()
            hard_kill(victim)
            self.down = victim.name  # as a failed readiness probe takes it out of the Service
            return killed_at


@dataclass
class Attempt:
    api: str
    failed: bool
    sent_at: float


def attempt_recorder(attempts: list[Attempt]) -> Callable[[Service, requests.Response | None, float], None]:
    """Keeps each attempt: where it went, when, and whether it failed (no answer, or a 5xx but the 503 of a
    full grid)."""
    def attempted(api: Service, answer: requests.Response | None, sent_at: float) -> None:
        attempts.append(Attempt(api.name, answer is None or answer.status_code >= 500 and answer.status_code != 503,
                                sent_at))
    return attempted


def test_sigkill_of_one_replica_under_load_forgets_nothing_and_books_nothing_twice(
        tmp_path: Path, postgres: PostgresServer) -> None:
    running = start_replicas(tmp_path, postgres.new_database(), (40.0, 50.0, 60.0))
    endpoints = Endpoints(list(running.apis))
    victim = running.apis[0]
    records: list[ClientRecord] = []
    attempts: list[Attempt] = []
    stop = threading.Event()
    try:
        loop = threading.Thread(target=run_clients, args=(endpoints.pick, lambda api: api.name, records, stop), kwargs={
            "prefix": "ev-replica", "wanted": REQUESTS, "longest_seconds": LONGEST_RUN_SECONDS,
            "attempted": attempt_recorder(attempts)})
        loop.start()
        try:
            time.sleep(3.0)
            killed_at = endpoints.kill(victim)
            time.sleep(2.0)
            victim.start()
            back_at = time.time()
            with endpoints.lock:
                endpoints.down = None
            time.sleep(3.0)
        finally:
            stop.set()
            loop.join(timeout=LONGEST_RUN_SECONDS + 60)
        # Every session has ended, or been settled by whichever replica reconciles.
        time.sleep(SESSION_SECONDS[1] + RECONCILIATION_WINDOW_SECONDS + LEASE_TAKEOVER_SECONDS)

        assert len(records) >= REQUESTS, f"only {len(records)} requests were answered within the run's bound"
        assert all(r.status in (201, 503) for r in records), [r for r in records if r.status not in (201, 503)][:3]
        admitted = {r.session_id: r for r in records if r.status == 201}
        assert len(admitted) > REQUESTS / 4

        # From the substations' own records: every 201 a client got is a session its substation held.
        every_session: list[dict] = []
        for substation in running.substations:
            sessions, _ = substation_records(running.state, substation.env["SUBSTATION_ID"])
            every_session += [{**s, "substation": substation.env["SUBSTATION_ID"]} for s in sessions]
        held_by = defaultdict(list)
        for session in every_session:
            held_by[session["session_id"]].append(session["substation"])
        forgotten = [r for r in admitted.values() if r.substation not in held_by.get(r.session_id, [])]
        # And the API, through either replica, still knows every one of them.
        unknown_to_api = [session_id for session_id in admitted if requests.get(
            f"{running.apis[len(session_id) % 2].url}/sessions/{session_id}", headers=OPERATOR,
            timeout=5).status_code != 200]

        # No double booking: a vehicle never charged twice at once, beyond a session no client was told of
        # that reconciliation stopped within its window.
        told = [s for s in every_session if admitted.get(s["session_id"]) and
                admitted[s["session_id"]].substation == s["substation"]]
        untold = [s for s in every_session if s["session_id"] not in admitted]
        window = RECONCILIATION_WINDOW_SECONDS + LEASE_TAKEOVER_SECONDS
        for session in untold:
            assert session["ended_at"] is not None, session
            lived = session["ended_at"] - session["started_at"]
            assert (session["end_reason"] == "stopped" and lived <= window) or lived <= SESSION_SECONDS[1] + 0.01, \
                session
        spans = defaultdict(list)
        for session in told:
            spans[session["vehicle_id"]].append((session["started_at"], session["ended_at"] or math.inf))
        double = [vehicle for vehicle, times in spans.items() if len(times) > 1]

        # Client failures: only requests in flight to the killed replica when it died.
        failed = [a for a in attempts if a.failed]
        in_flight = [a for a in failed if a.api == victim.name and a.sent_at <= killed_at]
        print(f"\nreplicas: {len(records)} requests, {len(admitted)} admitted, killed {victim.name} for "
              f"{back_at - killed_at:.2f} s; admitted sessions forgotten: {len(forgotten)} by the substations, "
              f"{len(unknown_to_api)} by the API; vehicles booked twice: {len(double)}; failed attempts: "
              f"{len(failed)} ({len(in_flight)} in flight to it when it died); "
              f"sessions no client was told of: {len(untold)}")
        assert forgotten == [] and unknown_to_api == []
        assert double == [] and len(told) == len(admitted)
        assert failed == in_flight and len(in_flight) <= CLIENTS, failed
    finally:
        running.stop()
