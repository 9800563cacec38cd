"""Energy needs and finished records through a substation's HTTP API (Flask's test client, a clock the tests move).

What a driver is told (``feasible``, ``expected_energy_kwh``), what a bad need gets
(a 400 naming the field), the figures on /metrics, and the operator's records:
paged and exported, from the state file, only with the operator token.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from gridcommon.promtext import parse_metrics
from gridcommon.timefmt import format_time
from substation_service import create_app
from substation_service.config import Settings
from tests.substation_support import FakeClock, epoch_of

SUBSTATION = "substation-4"
TOKEN = "records-operator-token"
HOUR = 3600.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def client(clock: FakeClock, tmp_path: Path) -> FlaskClient:
    settings = Settings(substation_id=SUBSTATION, capacity_kw=22.0, admin_token=TOKEN, state_dir=str(tmp_path))
    return create_app(settings, start_background=False, clock=clock).test_client()


def operator(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def at(clock: FakeClock, hours: float) -> str:
    return format_time(clock() + hours * HOUR)


def test_a_need_is_planned_and_the_driver_is_told_whether_it_will_be_met(client: FlaskClient, clock: FakeClock) -> None:
    easy = client.post("/charge", json={"vehicle_id": "ev-1", "amount": 11, "energy_kwh": 10,
                                        "departure": at(clock, 3)})
    assert easy.status_code == 201, easy.get_json()
    body = easy.get_json()
    assert (body["energy_kwh"], body["delivered_kwh"], body["still_needed_kwh"]) == (10, 0.0, 10.0)
    assert (body["expected_energy_kwh"], body["expected_shortfall_kwh"], body["feasible"]) == (10.0, 0.0, True)
    assert epoch_of(body["departure"]) == pytest.approx(clock() + 3 * HOUR, abs=0.001)
    assert body["ends_at"] == body["departure"]  # no duration: it ends by its departure at the latest

    hopeless = client.post("/charge", json={"vehicle_id": "ev-2", "amount": 7.2, "energy_kwh": 40,
                                            "departure": at(clock, 1)}).get_json()
    assert hopeless["feasible"] is False
    assert hopeless["expected_energy_kwh"] == pytest.approx(7.2)
    assert hopeless["expected_shortfall_kwh"] == pytest.approx(32.8)

    clock.advance(HOUR / 2)
    now = client.get(f"/sessions/{body['session_id']}").get_json()
    assert now["delivered_kwh"] == pytest.approx(5.5) and now["still_needed_kwh"] == pytest.approx(4.5)
    clock.advance(HOUR)
    ended = client.get(f"/charge/{body['session_id']}").get_json()
    assert (ended["state"], ended["end_reason"], ended["need_met"]) == ("ended", "energy_delivered", True)
    late = client.get(f"/charge/{hopeless['session_id']}").get_json()
    assert (late["end_reason"], late["need_met"]) == ("departed", False)

    scrape = parse_metrics(client.get("/metrics").get_data(as_text=True))
    assert scrape.value("substation_energy_requested_kwh_total", substation=SUBSTATION) == pytest.approx(50.0)
    assert scrape.value("substation_energy_delivered_kwh_total", substation=SUBSTATION) == pytest.approx(10.0 + 7.2)
    assert scrape.value("substation_needs_total", substation=SUBSTATION, result="met") == 1
    assert scrape.value("substation_needs_total", substation=SUBSTATION, result="missed") == 1
    assert scrape.value("substation_expected_shortfall_kwh", substation=SUBSTATION) == 0.0


def test_the_expected_shortfall_on_metrics_is_the_sum_of_the_sessions(client: FlaskClient, clock: FakeClock) -> None:
    shortfalls = []
    for index, (energy, hours) in enumerate([(30, 1), (20, 2), (5, 4)]):
        body = client.post("/charge", json={"vehicle_id": f"ev-{index}", "amount": 11, "energy_kwh": energy,
                                            "departure": at(clock, hours)}).get_json()
        assert body["state"] == "charging"
    for session in client.get("/sessions").get_json()["sessions"]:
        shortfalls.append(session["expected_shortfall_kwh"])
    scrape = parse_metrics(client.get("/metrics").get_data(as_text=True))
    assert scrape.value("substation_expected_shortfall_kwh", substation=SUBSTATION) == pytest.approx(
        math.fsum(shortfalls), abs=1e-5)
    assert math.fsum(shortfalls) > 0


@pytest.mark.parametrize(("field", "value"), [
    ("energy_kwh", -5), ("energy_kwh", 0), ("energy_kwh", "30"), ("energy_kwh", True), ("energy_kwh", 501),
    ("energy_kwh", "NaN"), ("departure", "yesterday"), ("departure", 12.5e9), ("departure", ["2026-12-06"]),
    ("departure", "PAST"), ("departure", "FAR"), ("departure", "NaN"),
])
def test_a_bad_need_is_refused_naming_its_field(client: FlaskClient, clock: FakeClock, field: str, value) -> None:
    value = {"PAST": at(clock, -1), "FAR": at(clock, 8 * 24)}.get(value, value) if isinstance(value, str) else value
    body = {"vehicle_id": "ev-1", "amount": 11, "energy_kwh": 10, "departure": at(clock, 2), field: value}
    raw = json.dumps(body).replace('"NaN"', "NaN")  # JSON has no NaN; Python's parser takes it
    response = client.post("/charge", data=raw, content_type="application/json")
    assert response.status_code == 400, response.get_json()
    assert (response.get_json()["error"], response.get_json()["field"]) == ("invalid_field", field)
    assert field in response.get_json()["message"]
    patched = client.patch("/charge/nobody", data=raw, content_type="application/json")
    assert patched.status_code == 400 and patched.get_json()["field"] == field


def test_energy_alone_needs_a_departure(client: FlaskClient) -> None:
    response = client.post("/charge", json={"vehicle_id": "ev-1", "amount": 11, "energy_kwh": 10})
    assert (response.status_code, response.get_json()["field"]) == (400, "departure")


def test_records_are_paged_and_exported_for_the_operator_only(client: FlaskClient, clock: FakeClock) -> None:
    ids = []
    for index in range(7):
        body = client.post("/charge", json={"vehicle_id": f"ev-{index}", "amount": 3, "duration_seconds": 10,
                                            **({"energy_kwh": 1, "departure": at(clock, 1)} if index % 2 else {})})
        ids.append(body.get_json()["session_id"])
        clock.advance(20)
    client.get("/status")

    assert client.get("/sessions?ended=1&limit=3").status_code == 401
    assert client.get("/sessions?ended=1&limit=3", headers=operator("wrong")).status_code == 401
    assert client.get("/sessions/export?format=csv").status_code == 401
    assert client.get("/sessions/export?format=csv", headers=operator("wrong")).status_code == 401
    seen, after = [], None
    while True:
        page = client.get(f"/sessions?ended=1&limit=3{'' if after is None else '&after=' + after}",
                          headers=operator()).get_json()
        seen += page["sessions"]
        after = page["next_after"]
        if after is None:
            break
    assert [record["session_id"] for record in seen] == ids
    assert all(record["delivered_kwh"] > 0 and "history" not in record for record in seen)
    assert [record.get("need_met") for record in seen] == [None, False, None, False, None, False, None]

    since = seen[4]["ended_at"]
    recent = client.get(f"/sessions?ended=1&since={since}", headers=operator()).get_json()["sessions"]
    assert [record["session_id"] for record in recent] == ids[4:]

    lines = client.get("/sessions/export?format=jsonl", headers=operator()).get_data(as_text=True).splitlines()
    assert [json.loads(line)["session_id"] for line in lines] == ids
    exported = client.get(f"/sessions/export?format=csv&since={since}", headers=operator())
    assert exported.mimetype == "text/csv"
    rows = list(csv.DictReader(io.StringIO(exported.get_data(as_text=True))))
    assert [row["session_id"] for row in rows] == ids[4:]
    assert float(rows[1]["energy_kwh"]) == 1.0 and rows[1]["need_met"] == "False"

    for query, field in [("limit=0", "limit"), ("limit=5000", "limit"), ("since=noon", "since"),
                         ("after=bogus", "after")]:
        refused = client.get(f"/sessions?ended=1&{query}", headers=operator())
        assert (refused.status_code, refused.get_json()["field"]) == (400, field)
    assert client.get("/sessions/export?format=xlsx", headers=operator()).get_json()["field"] == "format"
