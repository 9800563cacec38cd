"""Energy by departure against a real substation process: deadline sessions while the operator halves the limit.

The witnesses are tests/allocation_audit.py's: the sessions' own allocations sampled
twenty times a second, and every session's allocation history swept against the
limit's history. Neither trusts the substation's reported load.
"""
from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from gridcommon.timefmt import format_time
from tests.allocation_audit import Sampler, history_breaches
from tests.harness import OPERATOR, OPERATOR_TOKEN, Service
from tests.substation_support import epoch_of

pytestmark = pytest.mark.integration

CAPACITY_KW = 60.0
HOUR = 3600.0


@pytest.fixture
def substation(tmp_path: Path):
    service = Service(
        name="substation-needs",
        app="substation_service:create_app()",
        env={"SUBSTATION_ID": "substation-needs", "CAPACITY_KW": str(CAPACITY_KW), "ADMIN_TOKEN": OPERATOR_TOKEN,
             "STATE_DIR": str(tmp_path / "state")},
        log_dir=tmp_path,
    ).start()
    yield service
    service.stop()


def test_deadline_sessions_never_pass_a_limit_halved_under_them(substation: Service) -> None:
    rng = random.Random(23)
    http = requests.Session()
    http.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=8))

    def arrive(index: int) -> dict | None:
        time.sleep(index * 0.15)  # arrivals spread over about 6 s
        amount = rng.choice([7.4, 11.0, 22.0])
        body = {"vehicle_id": f"ev-{index:02d}", "amount": amount,
                # A few seconds' worth at full power, some more than the time before departure allows.
                "energy_kwh": round(amount * rng.uniform(2, 9) / HOUR, 6),
                "departure": format_time(time.time() + rng.uniform(3, 8))}
        answer = http.post(f"{substation.url}/charge", json=body, timeout=10)
        if answer.status_code == 409:  # while the limit is a quarter, the minimums may not fit
            assert answer.json()["error"] == "capacity_exceeded", answer.text
            return None
        assert answer.status_code == 201, answer.text
        return answer.json()

    def operator() -> None:
        time.sleep(2.0)
        for limit in (CAPACITY_KW / 2, CAPACITY_KW / 4, CAPACITY_KW / 2):  # halved, halved again, restored half
            assert http.put(f"{substation.url}/limit", json={"limit_kw": limit}, headers=OPERATOR,
                            timeout=5).status_code == 200
            time.sleep(1.5)
        assert http.delete(f"{substation.url}/limit", headers=OPERATOR, timeout=5).status_code == 200

    with Sampler([substation]) as sampler:
        limits = threading.Thread(target=operator)
        limits.start()
        with ThreadPoolExecutor(8) as pool:
            admitted = [answer for answer in pool.map(arrive, range(40)) if answer is not None]
        limits.join()
        last_departure = max(epoch_of(a["departure"]) for a in admitted)
        time.sleep(max(0.0, last_departure - time.time()) + 0.5)

    assert len(admitted) >= 25
    assert len(sampler.samples) > 150  # about 20 a second for the whole run
    assert sampler.over_limit() == [], sampler.over_limit()[:3]
    assert {sample.limit_kw for sample in sampler.samples} >= {CAPACITY_KW / 4, CAPACITY_KW / 2, CAPACITY_KW}
    breaches, points = history_breaches(substation)
    assert points > 80 and breaches == [], breaches[:3]

    ended = [requests.get(f"{substation.url}/charge/{a['session_id']}", timeout=5).json() for a in admitted]
    reasons = {record["end_reason"] for record in ended}
    assert reasons <= {"energy_delivered", "departed"} and len(reasons) == 2, reasons
    for record in ended:
        assert record["delivered_kwh"] <= record["energy_kwh"] + 1e-6
        assert record["need_met"] == (record["energy_kwh"] - record["delivered_kwh"] < 0.1)
        if record["end_reason"] == "energy_delivered":
            assert record["delivered_kwh"] == pytest.approx(record["energy_kwh"], abs=1e-6)
        else:
            assert epoch_of(record["ended_at"]) == pytest.approx(epoch_of(record["departure"]), abs=0.002)
    print(f"\nneeds under a halved limit: {len(admitted)} sessions, {len(sampler.samples)} samples at 20 Hz and "
          f"{points} history points, 0 over the limit; "
          f"{sum(r['end_reason'] == 'energy_delivered' for r in ended)} delivered, "
          f"{sum(r['end_reason'] == 'departed' for r in ended)} departed first")
