"""What the OCPP gateway asks of a substation, against one real substation under gunicorn.

Leased sessions (no fixed end: they charge while their lease is renewed), bulk renewal,
changing a session's amount or minimum, and the long poll of ``GET /sessions`` that tells a
watcher of every change of the allocations. The allocations are checked from the sessions'
own records (their ``allocated_kw`` and their histories), never from the substation's load.
"""
from __future__ import annotations

import json
import math
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.harness import Service, scrape, wait_for

pytestmark = pytest.mark.integration

SUBSTATION = "substation-o"
CAPACITY_KW = 30.0
LEASE = 5.0  # the shortest lease a substation grants


@pytest.fixture(scope="module")
def substation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    service = Service(
        name="substation",
        app="substation_service:create_app()",
        env={"SUBSTATION_ID": SUBSTATION, "CAPACITY_KW": str(CAPACITY_KW), "SESSION_SECONDS": "1",
             "MIN_CHARGE_KW": "1.4", "MAX_LONG_POLLS": "2",
             "STATE_DIR": str(tmp_path_factory.mktemp("state"))},
        log_dir=Path(tmp_path_factory.mktemp("substation-logs")),
    )
    service.start()
    yield service
    service.stop()


@pytest.fixture
def http(substation: Service) -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session
    # Every test starts from an idle substation: stop what is left.
    for listed in requests.get(f"{substation.url}/sessions", timeout=5).json()["sessions"]:
        requests.delete(f"{substation.url}/charge/{listed['session_id']}", timeout=5)


def admit(http: requests.Session, url: str, session_id: str, amount: float, **fields: Any) -> dict[str, Any]:
    response = http.post(f"{url}/charge", json={"vehicle_id": f"ev-{session_id}", "amount": amount,
                                                 "session_id": session_id, **fields}, timeout=5)
    assert response.status_code == 201, response.text
    return response.json()


def allocation_peak(records: list[dict[str, Any]]) -> float:
    """The highest sum of allocations at any instant, from the sessions' own histories."""
    changes: list[tuple[float, str, float]] = []
    for record in records:
        changes += [(at, record["session_id"], kw) for at, kw in record["history"]]
    current: dict[str, float] = {}
    peak = 0.0
    changes.sort()
    for index, (at, session_id, kw) in enumerate(changes):
        current[session_id] = kw
        # Every change at one instant is made before the sum at that instant counts.
        if index + 1 == len(changes) or changes[index + 1][0] != at:
            peak = max(peak, math.fsum(current.values()))
    return peak


def test_a_leased_session_charges_while_renewed_and_ends_when_its_lease_lapses(
    substation: Service, http: requests.Session
) -> None:
    url = substation.url
    body = admit(http, url, "tx-lease", 11.0, lease_seconds=LEASE, minimum_kw=4.14)
    assert (body["ends_at"], body["duration_seconds"], body["remaining_seconds"]) == (None, None, None)
    assert body["lease_seconds"] == LEASE and body["minimum_kw"] == 4.14
    assert body["lease_expires_at"] == pytest.approx(time.time() + LEASE, abs=1.0)

    # Past the default duration (1 s) and past one lease, renewed every lease/3 as the gateway does.
    renewed_until = time.monotonic() + 2 * LEASE
    while time.monotonic() < renewed_until:
        time.sleep(LEASE / 3)
        answer = http.post(f"{url}/leases", json={"session_ids": ["tx-lease"], "lease_seconds": LEASE}, timeout=5)
        assert answer.json() == {"renewed": ["tx-lease"], "unknown": [], "lease_seconds": LEASE}
    last_renewal = time.monotonic()
    record = http.get(f"{url}/charge/tx-lease", timeout=5).json()
    assert record["state"] == "charging"
    expires_at = record["lease_expires_at"]

    seconds = wait_for(lambda: http.get(f"{url}/charge/tx-lease", timeout=5).json()["state"] == "ended",
                       timeout=LEASE + 3, what="the unrenewed lease to lapse")
    assert time.monotonic() - last_renewal <= LEASE + 1.0, seconds
    ended = http.get(f"{url}/charge/tx-lease", timeout=5).json()
    assert ended["end_reason"] == "lease_expired"
    assert ended["history"][-1] == [pytest.approx(expires_at, abs=1e-6), 0.0]
    assert scrape(substation).value("leases_expired_total", substation=SUBSTATION) >= 1


def test_bulk_renewal_answers_renewed_and_unknown(substation: Service, http: requests.Session) -> None:
    url = substation.url
    for number in range(3):
        admit(http, url, f"tx-bulk-{number}", 5.0, lease_seconds=60)
    admit(http, url, "fixed", 5.0, duration_seconds=60)
    http.delete(f"{url}/charge/tx-bulk-2", timeout=5)
    ids = ["tx-bulk-0", "tx-bulk-1", "tx-bulk-2", "fixed", "never-here"]

    answer = http.post(f"{url}/leases", json={"session_ids": ids, "lease_seconds": 120}, timeout=5)

    assert answer.status_code == 200
    assert answer.json() == {"renewed": ["tx-bulk-0", "tx-bulk-1"], "unknown": ["tx-bulk-2", "fixed", "never-here"],
                             "lease_seconds": 120}
    assert http.get(f"{url}/charge/tx-bulk-0", timeout=5).json()["lease_expires_at"] == pytest.approx(
        time.time() + 120, abs=2.0)
    assert scrape(substation).value("leased_sessions", substation=SUBSTATION) == 2.0


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/charge", {"lease_seconds": 10, "duration_seconds": 10}, "lease_seconds"),
        ("/charge", {"lease_seconds": 4}, "lease_seconds"),
        ("/charge", {"lease_seconds": 601}, "lease_seconds"),
        ("/charge", {"lease_seconds": "10"}, "lease_seconds"),
        ("/charge", {"lease_seconds": True}, "lease_seconds"),
        ("/charge", {"minimum_kw": 1.0}, "minimum_kw"),
        ("/charge", {"minimum_kw": 12.0}, "minimum_kw"),
        ("/charge", {"minimum_kw": -5}, "minimum_kw"),
        ("/charge", {"minimum_kw": 1e400}, "minimum_kw"),
        ("/leases", {"session_ids": ["a"], "lease_seconds": 0}, "lease_seconds"),
        ("/leases", {"session_ids": "a", "lease_seconds": 10}, "session_ids"),
        ("/leases", {"session_ids": ["a b"], "lease_seconds": 10}, "session_ids"),
        ("/leases", {"session_ids": ["a"] * 5001, "lease_seconds": 10}, "session_ids"),
    ],
)
def test_bad_fields_are_a_400_naming_the_field(
    substation: Service, http: requests.Session, path: str, body: dict[str, Any], field: str
) -> None:
    if path == "/charge":
        body = {"vehicle_id": "ev-1", "amount": 11, **body}
    response = http.post(f"{substation.url}{path}", data=_json(body), headers={"Content-Type": "application/json"},
                         timeout=5)
    if response.status_code == 413:  # 5001 ids are more than a body may hold: refused before it is read
        assert response.json()["error"] == "request_entity_too_large"
        return
    assert response.status_code == 400, response.text
    assert response.json()["field"] == field
    assert field in response.json()["message"]


def _json(body: dict[str, Any]) -> str:
    # Python reads 1e400 as inf, which json writes as Infinity; sent as 1e400: valid JSON that no float holds.
    return json.dumps(body).replace("Infinity", "1e400")


def test_patch_reallocates_at_once_and_refuses_what_does_not_fit(substation: Service, http: requests.Session) -> None:
    url = substation.url
    for key in ("a", "b", "c"):
        admit(http, url, f"tx-{key}", 22.0, lease_seconds=60, minimum_kw=4.14)
    shares = {s["session_id"]: s["allocated_kw"] for s in http.get(f"{url}/sessions", timeout=5).json()["sessions"]}
    assert shares == {"tx-a": 10.0, "tx-b": 10.0, "tx-c": 10.0}

    changed = http.patch(f"{url}/charge/tx-a", json={"amount": 4.0}, timeout=5)

    assert changed.status_code == 200, changed.text
    assert (changed.json()["amount"], changed.json()["allocated_kw"], changed.json()["minimum_kw"]) == (4.0, 4.0, 4.0)
    shares = {s["session_id"]: s["allocated_kw"] for s in http.get(f"{url}/sessions", timeout=5).json()["sessions"]}
    assert shares == {"tx-a": 4.0, "tx-b": 13.0, "tx-c": 13.0}

    too_much = http.patch(f"{url}/charge/tx-b", json={"minimum_kw": 22.0}, timeout=5)
    assert too_much.status_code == 409 and too_much.json()["error"] == "capacity_exceeded", too_much.text
    assert "nothing was changed" in too_much.json()["message"]
    above_amount = http.patch(f"{url}/charge/tx-a", json={"minimum_kw": 5.0}, timeout=5)
    assert above_amount.status_code == 400 and above_amount.json()["field"] == "minimum_kw"
    for bad in ({}, {"amount": -1}, {"amount": "4"}, {"amount": 1000}, {"minimum_kw": [1]}):
        refused = http.patch(f"{url}/charge/tx-a", json=bad, timeout=5)
        assert refused.status_code == 400 and refused.json()["error"] == "invalid_field", (bad, refused.text)
    missing = http.patch(f"{url}/charge/never-here", json={"amount": 4.0}, timeout=5)
    assert missing.status_code == 404 and missing.json()["error"] == "session_not_found"


def test_concurrent_changes_never_pass_the_limit(substation: Service, http: requests.Session) -> None:
    """Admissions, changes and stops from many threads; every record and history stays within the limit."""
    url = substation.url
    started = time.time()
    stop = threading.Event()
    over_limit: list[dict[str, Any]] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        with requests.Session() as own:
            mine: list[str] = []
            for number in range(40):
                if stop.is_set():
                    return
                choice = rng.random()
                if choice < 0.35 or not mine:
                    key = f"tx-{seed}-{number}"
                    answer = own.post(f"{url}/charge", json={
                        "vehicle_id": f"ev-{seed}", "amount": rng.choice([7.0, 11.0, 22.0]), "session_id": key,
                        "lease_seconds": 60, "minimum_kw": rng.choice([1.4, 4.14])}, timeout=10)
                    if answer.status_code == 201:
                        mine.append(key)
                elif choice < 0.85:
                    own.patch(f"{url}/charge/{rng.choice(mine)}", json={
                        "amount": rng.choice([2.0, 6.0, 11.0, 22.0]), "minimum_kw": rng.choice([None, 1.4])},
                        timeout=10)
                else:
                    own.delete(f"{url}/charge/{mine.pop(rng.randrange(len(mine)))}", timeout=10)

    def watch() -> None:
        with requests.Session() as own:
            while not stop.is_set():
                listing = own.get(f"{url}/sessions", timeout=10).json()
                if math.fsum(s["allocated_kw"] for s in listing["sessions"]) > listing["limit_kw"] + 1e-9:
                    over_limit.append(listing)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(work, range(6)))
    stop.set()
    watcher.join(10)

    assert not over_limit
    records = [record for record in http.get(f"{url}/sessions?history=1&ended=1", timeout=10).json()["sessions"]
               if record["started_at"] and record["history"] and record["history"][0][0] >= started]
    assert len(records) > 10
    assert allocation_peak(records) <= CAPACITY_KW + 1e-9


def test_a_long_poll_answers_within_100_ms_of_a_change(substation: Service, http: requests.Session) -> None:
    url = substation.url
    admit(http, url, "tx-watched", 22.0, lease_seconds=60)
    version = http.get(f"{url}/sessions", timeout=5).json()["state_version"]
    answered: list[tuple[float, dict[str, Any]]] = []

    def long_poll() -> None:
        body = requests.get(f"{url}/sessions?after_version={version}&wait=20", timeout=30).json()
        answered.append((time.monotonic(), body))

    watcher = threading.Thread(target=long_poll)
    watcher.start()
    time.sleep(0.5)
    assert not answered
    admit(http, url, "tx-other", 22.0, lease_seconds=60)  # another request's change
    changed_at = time.monotonic()
    watcher.join(25)

    at, body = answered[0]
    assert at - changed_at < 0.1
    assert body["state_version"] > version
    assert {s["session_id"]: s["allocated_kw"] for s in body["sessions"]} == {"tx-watched": 15.0, "tx-other": 15.0}


def test_a_long_poll_with_nothing_changing_answers_after_its_wait(substation: Service, http: requests.Session) -> None:
    url = substation.url
    admit(http, url, "tx-quiet", 11.0, lease_seconds=60)
    version = http.get(f"{url}/sessions", timeout=5).json()["state_version"]
    started = time.monotonic()
    body = http.get(f"{url}/sessions?after_version={version}&wait=1.5", timeout=10).json()
    assert 1.5 <= time.monotonic() - started < 2.5
    assert body["state_version"] == version and [s["session_id"] for s in body["sessions"]] == ["tx-quiet"]
    at_once = http.get(f"{url}/sessions?after_version={version - 1}&wait=20", timeout=10)
    assert at_once.elapsed.total_seconds() < 1.0 and at_once.json()["state_version"] == version


def test_long_polls_are_bounded_and_bad_queries_are_a_400(substation: Service, http: requests.Session) -> None:
    url = substation.url
    version = http.get(f"{url}/sessions", timeout=5).json()["state_version"]
    with ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(requests.get, f"{url}/sessions?after_version={version + 1000}&wait=2", timeout=10)
                   for _ in range(2)]
        time.sleep(0.5)
        refused = http.get(f"{url}/sessions?after_version={version + 1000}&wait=2", timeout=10)
        assert refused.status_code == 429 and refused.json()["error"] == "too_many_long_polls", refused.text
        assert "MAX_LONG_POLLS" in refused.json()["message"] and refused.headers["Retry-After"] == "1"
        assert [future.result().status_code for future in waiting] == [200, 200]
    for query, field in (("after_version=-1&wait=1", "after_version"), ("after_version=x&wait=1", "after_version"),
                         ("after_version=1&wait=26", "wait"), ("after_version=1&wait=nan", "wait"),
                         ("wait=1", "after_version")):
        bad = http.get(f"{url}/sessions?{query}", timeout=5)
        assert bad.status_code == 400 and bad.json()["field"] == field, (query, bad.text)


def test_a_killed_substation_comes_back_with_its_leased_sessions(substation: Service, http: requests.Session) -> None:
    url = substation.url
    admit(http, url, "tx-durable", 11.0, lease_seconds=LEASE, minimum_kw=4.14)
    http.patch(f"{url}/charge/tx-durable", json={"amount": 9.0}, timeout=5)
    before = http.get(f"{url}/charge/tx-durable", timeout=5).json()

    substation.kill()
    time.sleep(LEASE + 1)  # down past the lease: it runs again from the restart
    substation.start()
    restarted = time.time()

    after = http.get(f"{url}/charge/tx-durable", timeout=5).json()
    assert after["state"] == "charging"
    assert (after["amount"], after["minimum_kw"], after["lease_seconds"]) == (9.0, 4.14, LEASE)
    assert after["history"][: len(before["history"])] == before["history"]
    assert restarted - 1.0 <= after["lease_expires_at"] - LEASE <= restarted + 0.5
    renewed = http.post(f"{url}/leases", json={"session_ids": ["tx-durable"], "lease_seconds": LEASE}, timeout=5)
    assert renewed.json()["renewed"] == ["tx-durable"]
