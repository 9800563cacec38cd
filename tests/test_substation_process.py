"""One real substation under gunicorn, driven over HTTP from many threads at once."""
from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.harness import Service, scrape
from tests.substation_support import epoch_of, max_overlapping_load

pytestmark = pytest.mark.integration

SUBSTATION = "substation-p"
CAPACITY_KW = 100.0
WORKERS = 16
REQUESTS_PER_WORKER = 250
HAMMER_SECONDS = 3.0  # the bound that ends the hammer: sessions come and go several times meanwhile


@pytest.fixture(scope="module")
def substation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    service = Service(
        name="substation",
        app="substation_service:create_app()",
        # Strict: sessions get their whole amounts, so the sum of the amounts is the load to check.
        env={"SUBSTATION_ID": SUBSTATION, "CAPACITY_KW": str(CAPACITY_KW), "SESSION_SECONDS": "1",
             "ALLOCATION_POLICY": "strict"},
        log_dir=Path(tmp_path_factory.mktemp("substation-logs")),
    )
    service.start()
    yield service
    service.stop()




def metric(service: Service, name: str, **labels: str) -> float:
    value = scrape(service).value(name, substation=SUBSTATION, **labels)
    assert value is not None, f"{name} missing from /metrics"
    return value


def wait_for_idle(service: Service, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(service, "current_load") == 0.0 and metric(service, "active_chargers") == 0.0:
            return
        time.sleep(0.1)
    pytest.fail(f"{service.name} still has load after {timeout} s: {service.log_text()[-2000:]}")


def hammer(service: Service, seed: int) -> list[requests.Response]:
    """Ask for far more power than there is, for a bounded number of requests and time."""
    rng = random.Random(seed)
    responses = []
    deadline = time.monotonic() + HAMMER_SECONDS
    with requests.Session() as http:
        for number in range(REQUESTS_PER_WORKER):
            if time.monotonic() > deadline:
                break
            body = {
                "vehicle_id": f"ev-{seed}-{number}",
                "amount": rng.choice([5, 11, 22, 35]),
                "duration_seconds": rng.choice([0.2, 0.4, 1]),
            }
            responses.append(http.post(f"{service.url}/charge", json=body, timeout=10))
            time.sleep(rng.uniform(0, 0.03))  # spread the requests so sessions come and go meanwhile
    return responses


def test_concurrent_requests_never_overload_the_substation(substation: Service) -> None:
    wait_for_idle(substation, timeout=3)
    finished_before = metric(substation, "charging_duration_seconds_count")
    admitted_before = metric(substation, "charging_requests_total", outcome="admitted")
    start = threading.Barrier(WORKERS)

    def worker(seed: int) -> list[requests.Response]:
        start.wait()
        return hammer(substation, seed)

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        responses = [r for batch in pool.map(worker, range(WORKERS)) for r in batch]

    assert {r.status_code for r in responses} == {201, 409}
    admitted = [r.json() for r in responses if r.status_code == 201]
    rejected = [r for r in responses if r.status_code == 409]
    assert all(body["load"] <= CAPACITY_KW for body in admitted)
    charged = [(epoch_of(body["started_at"]), epoch_of(body["ends_at"]), body["amount"]) for body in admitted]
    assert max_overlapping_load(charged) <= CAPACITY_KW
    # Far more was asked for than fits at once, and sessions ended and made room during the run.
    assert math.fsum(body["amount"] for body in admitted) > 2 * CAPACITY_KW
    for response in rejected:
        body = response.json()
        assert body["error"] == "capacity_exceeded"
        assert body["retry_after_seconds"] >= 1
        assert response.headers["Retry-After"] == str(body["retry_after_seconds"])

    wait_for_idle(substation, timeout=3)
    metrics = scrape(substation)
    assert metrics.value("charging_requests_total", outcome="admitted", substation=SUBSTATION) == (
        admitted_before + len(admitted)
    )
    assert metrics.value("charging_duration_seconds_count", substation=SUBSTATION) == finished_before + len(admitted)


def test_sessions_end_by_themselves(substation: Service) -> None:
    wait_for_idle(substation, timeout=3)
    finished_before = metric(substation, "charging_duration_seconds_count")
    seconds_before = metric(substation, "charging_duration_seconds_sum")
    version_before = metric(substation, "substation_state_version")
    with requests.Session() as http:
        for vehicle, amount in (("ev-a", 20), ("ev-b", 30), ("ev-c", 10)):
            body = {"vehicle_id": vehicle, "amount": amount, "duration_seconds": 1}
            assert http.post(f"{substation.url}/charge", json=body, timeout=5).status_code == 201
    assert metric(substation, "current_load") == 60.0
    assert metric(substation, "active_chargers") == 3.0

    wait_for_idle(substation, timeout=3)

    assert requests.get(f"{substation.url}/sessions", timeout=5).json()["sessions"] == []
    assert metric(substation, "charging_duration_seconds_count") == finished_before + 3
    assert metric(substation, "charging_duration_seconds_sum") == pytest.approx(seconds_before + 3)
    assert metric(substation, "substation_state_version") == version_before + 6
