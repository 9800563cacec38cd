"""The substation's HTTP API through Flask's test client, with a clock the tests move.

The admission tests run under ``strict`` allocation (a session gets its whole
amount or a 409), where the figures are easy to state; sharing under
``fair_share``, the limit and the operator's endpoints have tests of their own
at the end.
"""
from __future__ import annotations

import pytest
from flask import Flask
from flask.testing import FlaskClient

from gridcommon.promtext import Scrape, parse_metrics
from gridcommon.settings import SettingsError
from substation_service import create_app
from substation_service.allocation import AllocationPolicy
from substation_service.config import Settings
from substation_service.peering import PeeringSettings
from substation_service.peering.power import LocalPower
from tests.substation_support import FakeClock, epoch_of

SUBSTATION = "substation-7"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def app(clock: FakeClock) -> Flask:
    settings = Settings(
        substation_id=SUBSTATION,
        capacity_kw=100.0,
        session_seconds=30.0,
        max_session_seconds=600.0,
        max_amount_kw=150.0,
        public_url="http://substation-7.test:5017",
        allocation_policy=AllocationPolicy.STRICT,
    )
    return create_app(settings, start_background=False, clock=clock)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def charge(client: FlaskClient, amount: float, vehicle_id: str = "ev-1", **extra: float):
    return client.post("/charge", json={"vehicle_id": vehicle_id, "amount": amount, **extra})


def scrape(client: FlaskClient) -> Scrape:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    return parse_metrics(response.get_data(as_text=True))


def test_charge_admits_and_describes_the_session(client: FlaskClient, clock: FakeClock) -> None:
    response = charge(client, 40, duration_seconds=90)

    assert response.status_code == 201
    body = response.get_json()
    assert list(body) == [
        "session_id",
        "substation",
        "vehicle_id",
        "amount",
        "state",
        "allocated_kw",
        "minimum_kw",
        "energy_kwh",
        "suspended_seconds",
        "started_at",
        "ends_at",
        "duration_seconds",
        "remaining_seconds",
        "load",
        "requested_load",
        "minimum_load",
        "capacity",
        "limit_source",
        "total_capacity",
        "fair_share_kw",
        "load_percentage",
        "available",
        "active_chargers",
        "charging",
        "suspended",
        "curtailed_sessions",
        "allocation_policy",
        "min_charge_kw",
        "state_version",
    ]
    assert (body["state"], body["allocated_kw"], body["minimum_kw"], body["energy_kwh"]) == ("charging", 40.0, 40.0, 0.0)
    assert body["substation"] == SUBSTATION
    assert body["vehicle_id"] == "ev-1"
    assert body["amount"] == 40.0
    assert body["remaining_seconds"] == 90.0
    assert epoch_of(body["started_at"]) == clock.now
    assert epoch_of(body["ends_at"]) == clock.now + 90
    assert body["duration_seconds"] == 90.0
    assert (body["load"], body["capacity"], body["total_capacity"]) == (40.0, 100.0, 100.0)
    assert (body["load_percentage"], body["available"], body["active_chargers"]) == (40.0, 60.0, 1)
    assert body["state_version"] == 1
    assert response.headers["X-Request-ID"]


def test_charge_without_duration_lasts_session_seconds(client: FlaskClient) -> None:
    assert charge(client, 10).get_json()["duration_seconds"] == 30.0


def test_charge_past_capacity_is_409_with_retry_after(client: FlaskClient, clock: FakeClock) -> None:
    charge(client, 70, duration_seconds=100)
    charge(client, 20, duration_seconds=12.5)
    clock.advance(2)

    response = charge(client, 11, vehicle_id="ev-2")

    assert response.status_code == 409
    body = response.get_json()
    assert body["error"] == "capacity_exceeded"
    assert "11 kW does not fit" in body["message"] and "retry in 11 s" in body["message"]
    assert body["substation"] == SUBSTATION
    assert (body["load"], body["capacity"], body["available"]) == (90.0, 100.0, 10.0)
    assert body["retry_after_seconds"] == 11  # the 12.5 s session has 10.5 s left
    assert response.headers["Retry-After"] == "11"
    assert body["state_version"] == 2


def test_amount_beyond_the_whole_capacity_says_so(client: FlaskClient) -> None:
    response = charge(client, 120)

    assert response.status_code == 409
    assert "exceeds this substation's whole limit" in response.get_json()["message"]
    assert response.get_json()["retry_after_seconds"] == 1


def test_exactly_filling_the_capacity_is_admitted(client: FlaskClient) -> None:
    charge(client, 60)

    body = charge(client, 40).get_json()

    assert (body["load"], body["available"], body["load_percentage"]) == (100.0, 0.0, 100.0)


def test_stop_session_ends_it_early(client: FlaskClient, clock: FakeClock) -> None:
    session = charge(client, 30, duration_seconds=60).get_json()
    clock.advance(4.5)

    response = client.delete(f"/charge/{session['session_id']}")

    assert response.status_code == 200
    body = response.get_json()
    assert body["session_id"] == session["session_id"]
    assert body["vehicle_id"] == "ev-1"
    assert body["started_at"] == session["started_at"]
    assert epoch_of(body["ended_at"]) == clock.now
    assert (body["load"], body["capacity"], body["active_chargers"]) == (0.0, 100.0, 0)
    assert body["state_version"] == session["state_version"] + 1


def test_stopping_twice_or_an_unknown_session_is_404(client: FlaskClient) -> None:
    session_id = charge(client, 30).get_json()["session_id"]
    client.delete(f"/charge/{session_id}")

    for unknown in (session_id, "never-issued"):
        response = client.delete(f"/charge/{unknown}")
        assert response.status_code == 404
        body = response.get_json()
        assert body["error"] == "session_not_found"
        assert body["session_id"] == unknown
        assert "GET /sessions" in body["message"]


def test_sessions_lists_the_active_ones(client: FlaskClient, clock: FakeClock) -> None:
    short = charge(client, 10, vehicle_id="ev-short", duration_seconds=5).get_json()
    long = charge(client, 20, vehicle_id="ev-long", duration_seconds=50).get_json()

    listed = client.get("/sessions").get_json()
    assert listed["substation"] == SUBSTATION
    assert [s["session_id"] for s in listed["sessions"]] == [short["session_id"], long["session_id"]]
    assert listed["sessions"][1] == {key: long[key] for key in listed["sessions"][1]}

    clock.advance(5)
    assert [s["vehicle_id"] for s in client.get("/sessions").get_json()["sessions"]] == ["ev-long"]


def test_status_reports_capacity_and_url(client: FlaskClient, clock: FakeClock) -> None:
    charge(client, 25, duration_seconds=10)
    charge(client, 25, duration_seconds=20)
    clock.advance(10)

    body = client.get("/status").get_json()

    assert body.items() >= {
        "substation": SUBSTATION,
        "load": 25.0,
        "requested_load": 25.0,
        "capacity": 100.0,
        "limit_source": "substation",
        "total_capacity": 100.0,
        "load_percentage": 25.0,
        "available": 75.0,
        "active_chargers": 1,
        "charging": 1,
        "suspended": 0,
        "state_version": 3,
        "url": "http://substation-7.test:5017",
    }.items()


def test_health(client: FlaskClient) -> None:
    response = client.get("/health")

    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "substation": SUBSTATION}


def test_generation_and_storage_show_in_status_and_admission(clock: FakeClock) -> None:
    settings = Settings(
        substation_id=SUBSTATION,
        capacity_kw=100.0,
        allocation_policy=AllocationPolicy.STRICT,
        peering=PeeringSettings(power=LocalPower(generation_kw=20.0, storage_kw=10.0)),
    )
    client = create_app(settings, start_background=False, clock=clock).test_client()

    assert charge(client, 130).status_code == 201
    body = client.get("/status").get_json()
    assert (body["capacity"], body["total_capacity"], body["load"]) == (130.0, 100.0, 130.0)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"amount": 10}, "vehicle_id"),
        ({"vehicle_id": "ev 1", "amount": 10}, "vehicle_id"),
        ({"vehicle_id": "ev-1"}, "amount"),
        ({"vehicle_id": "ev-1", "amount": "10"}, "amount"),
        ({"vehicle_id": "ev-1", "amount": 0}, "amount"),
        ({"vehicle_id": "ev-1", "amount": True}, "amount"),
        ({"vehicle_id": "ev-1", "amount": 150.5}, "amount"),
        ({"vehicle_id": "ev-1", "amount": 10, "duration_seconds": 0}, "duration_seconds"),
        ({"vehicle_id": "ev-1", "amount": 10, "duration_seconds": 601}, "duration_seconds"),
    ],
)
def test_invalid_fields_are_400_naming_the_field(client: FlaskClient, body: dict, field: str) -> None:
    response = client.post("/charge", json=body)

    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_field"
    assert response.get_json()["field"] == field
    assert client.get("/status").get_json()["active_chargers"] == 0


def test_amount_bound_comes_from_settings_not_capacity(client: FlaskClient) -> None:
    # 150 kW is over the 100 kW capacity but within MAX_AMOUNT_KW: a capacity answer, not a validation one.
    assert charge(client, 150).status_code == 409


@pytest.mark.parametrize("data", ["{not json", "[1, 2]", "null"])
def test_body_that_is_not_a_json_object_is_400(client: FlaskClient, data: str) -> None:
    response = client.post("/charge", data=data, content_type="application/json")

    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_json"


def test_body_that_is_not_json_is_415(client: FlaskClient) -> None:
    response = client.post("/charge", data="vehicle_id=ev-1&amount=10", content_type="application/x-www-form-urlencoded")

    assert response.status_code == 415
    assert response.get_json()["error"] == "unsupported_media_type"


def test_oversized_body_is_413(client: FlaskClient) -> None:
    response = client.post(
        "/charge", data='{"vehicle_id": "' + "x" * 20_000 + '"}', content_type="application/json"
    )

    assert response.status_code == 413
    assert response.get_json()["error"] == "request_entity_too_large"


@pytest.mark.parametrize(("method", "path"), [("get", "/charge"), ("put", "/status"), ("post", "/sessions")])
def test_wrong_method_is_405(client: FlaskClient, method: str, path: str) -> None:
    response = getattr(client, method)(path)

    assert response.status_code == 405
    assert response.get_json()["error"] == "method_not_allowed"
    assert response.headers["Allow"]


def test_unknown_path_is_404_json(client: FlaskClient) -> None:
    response = client.get("/charges")

    assert response.status_code == 404
    assert response.get_json()["error"] == "not_found"


GAUGES = (
    "current_load",
    "total_capacity",
    "admission_capacity",
    "available_capacity",
    "active_chargers",
    "load_percentage",
    "substation_state_version",
)


def test_every_metric_is_labelled_with_the_substation(client: FlaskClient) -> None:
    metrics = scrape(client)

    for name in (*GAUGES, "charging_requests_total", "charging_duration_seconds_count"):
        assert name in metrics.samples, name
    for name, samples in metrics.samples.items():
        for labels, _ in samples:
            assert labels.get("substation") == SUBSTATION, (name, labels)


def test_gauges_are_exact_at_scrape_time(client: FlaskClient, clock: FakeClock) -> None:
    charge(client, 30, duration_seconds=10)
    charge(client, 50, duration_seconds=20)
    metrics = scrape(client)
    assert metrics.value("current_load", substation=SUBSTATION) == 80.0
    assert metrics.value("total_capacity", substation=SUBSTATION) == 100.0
    assert metrics.value("admission_capacity", substation=SUBSTATION) == 100.0
    assert metrics.value("available_capacity", substation=SUBSTATION) == 20.0
    assert metrics.value("active_chargers", substation=SUBSTATION) == 2.0
    assert metrics.value("load_percentage", substation=SUBSTATION) == 80.0
    assert metrics.value("substation_state_version", substation=SUBSTATION) == 2.0

    clock.advance(10)  # no request in between: the scrape itself must see the 30 kW session gone
    metrics = scrape(client)
    assert metrics.value("current_load", substation=SUBSTATION) == 50.0
    assert metrics.value("active_chargers", substation=SUBSTATION) == 1.0
    assert metrics.value("substation_state_version", substation=SUBSTATION) == 3.0


def test_request_outcomes_are_counted(client: FlaskClient) -> None:
    charge(client, 60)
    charge(client, 60)
    charge(client, 40)
    client.post("/charge", json={"vehicle_id": "ev-1"})  # invalid: no decision, not counted

    metrics = scrape(client)

    assert metrics.value("charging_requests_total", outcome="admitted", substation=SUBSTATION) == 2.0
    assert metrics.value("charging_requests_total", outcome="rejected", substation=SUBSTATION) == 1.0


def test_charging_duration_is_observed_on_expiry_and_on_stop(client: FlaskClient, clock: FakeClock) -> None:
    assert scrape(client).value("charging_duration_seconds_count", substation=SUBSTATION) == 0.0
    charge(client, 10, duration_seconds=8)
    stopped = charge(client, 10, duration_seconds=60).get_json()
    clock.advance(3)
    client.delete(f"/charge/{stopped['session_id']}")
    clock.advance(5)

    metrics = scrape(client)

    assert metrics.value("charging_duration_seconds_count", substation=SUBSTATION) == 2.0
    assert metrics.value("charging_duration_seconds_sum", substation=SUBSTATION) == pytest.approx(8 + 3)
    assert metrics.value("charging_duration_seconds_bucket", le="5.0", substation=SUBSTATION) == 1.0
    assert metrics.value("charging_duration_seconds_bucket", le="15.0", substation=SUBSTATION) == 2.0


def test_each_app_has_its_own_metrics(clock: FakeClock) -> None:
    first = create_app(Settings(substation_id="substation-a"), start_background=False, clock=clock).test_client()
    second = create_app(Settings(substation_id="substation-b"), start_background=False, clock=clock).test_client()
    charge(first, 10)

    assert scrape(first).value("current_load", substation="substation-a") == 10.0
    assert scrape(second).value("current_load", substation="substation-b") == 0.0


def test_settings_defaults() -> None:
    assert Settings.from_env({}) == Settings(
        substation_id="substation-1",
        capacity_kw=100.0,
        session_seconds=60.0,
        max_session_seconds=3600.0,
        max_amount_kw=350.0,
        public_url="http://127.0.0.1:8000",
        log_level="info",
    )


def test_settings_from_env() -> None:
    env = {
        "SUBSTATION_ID": "substation-3",
        "CAPACITY_KW": "120",
        "SESSION_SECONDS": "5",
        "MAX_SESSION_SECONDS": "90",
        "MAX_AMOUNT_KW": "50",
        "PORT": "5013",
        "LOG_LEVEL": "WARNING",
    }

    settings = Settings.from_env(env)

    assert settings == Settings("substation-3", 120.0, 5.0, 90.0, 50.0, "http://127.0.0.1:5013", "warning")
    assert Settings.from_env({**env, "PUBLIC_URL": "http://substation_3:5013/"}).public_url == "http://substation_3:5013"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"CAPACITY_KW": "lots"}, "CAPACITY_KW"),
        ({"CAPACITY_KW": "-1"}, "CAPACITY_KW"),
        ({"SUBSTATION_ID": "sub station/1"}, "SUBSTATION_ID"),
        ({"SESSION_SECONDS": "0"}, "SESSION_SECONDS"),
        ({"SESSION_SECONDS": "100", "MAX_SESSION_SECONDS": "50"}, "MAX_SESSION_SECONDS"),
        ({"MAX_AMOUNT_KW": "0"}, "MAX_AMOUNT_KW"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
        ({"PORT": "99999"}, "PORT"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(env)


def test_a_repeated_session_id_answers_with_the_admitted_session(client: FlaskClient) -> None:
    first = charge(client, 30, session_id="fwd-1")
    again = charge(client, 30, session_id="fwd-1")

    assert first.status_code == again.status_code == 201
    assert first.get_json()["session_id"] == "fwd-1"
    assert again.get_json()["replayed"] is True
    assert again.get_json()["load"] == 30
    assert scrape(client).value("charging_requests_total", outcome="admitted") == 1


def test_a_session_id_in_use_by_another_vehicle_is_409(client: FlaskClient) -> None:
    charge(client, 30, session_id="fwd-1")

    response = charge(client, 30, vehicle_id="ev-2", session_id="fwd-1")

    assert response.status_code == 409
    assert response.get_json()["error"] == "session_id_in_use"


@pytest.mark.parametrize("session_id", ["", "has space", "x" * 65, 7])
def test_a_malformed_session_id_is_400(client: FlaskClient, session_id: object) -> None:
    response = charge(client, 30, session_id=session_id)

    assert response.status_code == 400
    assert response.get_json()["field"] == "session_id"


def test_a_request_that_arrives_after_its_stop_is_refused(client: FlaskClient) -> None:
    stopped = client.delete("/charge/late-1")
    late = charge(client, 30, session_id="late-1")

    assert stopped.status_code == 404
    assert late.status_code == 409
    assert late.get_json()["error"] == "session_id_retired"
    assert client.get("/status").get_json()["load"] == 0


# ----- fair sharing, the limit and the operator's endpoints ------------------------------------

TOKEN = "operator-secret"


@pytest.fixture
def shared(clock: FakeClock) -> FlaskClient:
    settings = Settings(substation_id=SUBSTATION, capacity_kw=30.0, min_charge_kw=2.0, admin_token=TOKEN)
    return create_app(settings, start_background=False, clock=clock).test_client()


def operator(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_fair_share_curtails_instead_of_refusing(shared: FlaskClient) -> None:
    for index in range(3):
        assert charge(shared, 20, vehicle_id=f"ev-{index}").status_code == 201
    status = shared.get("/status").get_json()
    assert (status["load"], status["requested_load"], status["fair_share_kw"]) == (30.0, 60.0, 10.0)
    sessions = shared.get("/sessions").get_json()
    assert [s["allocated_kw"] for s in sessions["sessions"]] == [10.0, 10.0, 10.0]
    assert sessions["limit_kw"] == 30.0


def test_a_session_can_be_read_with_its_history_while_active_and_after_it_ended(
    shared: FlaskClient, clock: FakeClock
) -> None:
    first = charge(shared, 20, duration_seconds=60).get_json()
    clock.advance(10)
    charge(shared, 20, vehicle_id="ev-2")
    clock.advance(60)

    body = shared.get(f"/charge/{first['session_id']}").get_json()
    assert body["state"] == "ended" and body["end_reason"] == "completed"
    assert body["history"] == [[clock.now - 70, 20.0], [clock.now - 60, 15.0], [clock.now - 10, 0.0]]
    assert body["energy_kwh"] == pytest.approx((20 * 10 + 15 * 50) / 3600, abs=1e-6)
    assert shared.get("/charge/never-was").status_code == 404


def test_the_sessions_list_can_add_histories_and_ended_sessions(shared: FlaskClient, clock: FakeClock) -> None:
    charge(shared, 10, duration_seconds=5)
    clock.advance(6)
    charge(shared, 10, vehicle_id="ev-2")
    body = shared.get("/sessions?history=1&ended=1").get_json()
    assert [s["state"] for s in body["sessions"]] == ["ended", "charging"]
    assert all("history" in s for s in body["sessions"])
    assert shared.get("/sessions?history=maybe").status_code == 400


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("put", "/limit", {"limit_kw": 10}), ("delete", "/limit", None), ("put", "/allocation-policy", {"policy": "strict"})],
)
def test_operator_endpoints_need_the_operator_token(shared: FlaskClient, method: str, path: str, body) -> None:
    call = getattr(shared, method)
    for headers in ({}, operator("wrong"), {"Authorization": "Basic abc"}):
        response = call(path, json=body, headers=headers)
        assert response.status_code == 401, headers
        assert response.get_json()["error"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert call(path, json=body, headers=operator()).status_code == 200


def test_operator_endpoints_are_off_without_a_token(clock: FakeClock) -> None:
    client = create_app(Settings(substation_id=SUBSTATION), start_background=False, clock=clock).test_client()
    response = client.put("/limit", json={"limit_kw": 10}, headers=operator())
    assert response.status_code == 403
    assert "ADMIN_TOKEN" in response.get_json()["message"]
    assert client.get("/limit").status_code == 200  # reading the limit stays open


@pytest.mark.parametrize("value", [-1, "10", None, True, 1e7, float("nan")])
def test_a_bad_limit_is_400_and_changes_nothing(shared: FlaskClient, value) -> None:
    response = shared.put("/limit", data=f'{{"limit_kw": {_json(value)}}}', content_type="application/json",
                          headers=operator())
    assert response.status_code == 400, value
    assert response.get_json()["field"] == "limit_kw"
    assert shared.get("/limit").get_json()["limit_kw"] == 30.0


def _json(value) -> str:
    import json

    return "NaN" if isinstance(value, float) and value != value else json.dumps(value)


def test_an_operator_limit_reallocates_at_once_and_lifting_it_restores(shared: FlaskClient) -> None:
    for index in range(3):
        charge(shared, 20, vehicle_id=f"ev-{index}")
    body = shared.put("/limit", json={"limit_kw": 4.5}, headers=operator()).get_json()
    assert (body["limit_kw"], body["source"], body["load"]) == (4.5, "operator", 4.5)
    assert (body["charging"], body["suspended"]) == (2, 1)
    metrics = scrape(shared)
    assert metrics.value("substation_limit_source", substation=SUBSTATION, source="operator") == 1.0
    assert metrics.value("charging_sessions", substation=SUBSTATION, state="suspended") == 1.0
    body = shared.delete("/limit", headers=operator()).get_json()
    assert (body["limit_kw"], body["source"], body["load"], body["suspended"]) == (30.0, "substation", 30.0, 0)
    history = shared.get("/limit").get_json()["history"]
    assert [kw for _, kw, _ in history] == [30.0, 4.5, 30.0]


def test_the_allocation_policy_can_be_switched_by_the_operator(shared: FlaskClient) -> None:
    charge(shared, 20)
    charge(shared, 20, vehicle_id="ev-2")
    body = shared.put("/allocation-policy", json={"policy": "strict"}, headers=operator()).get_json()
    assert (body["policy"], body["previous"]) == ("strict", "deadline")  # the default
    assert shared.get("/status").get_json()["suspended"] == 1
    assert shared.put("/allocation-policy", json={"policy": "lottery"}, headers=operator()).status_code == 400
    assert shared.get("/allocation-policy").get_json()["policy"] == "strict"


def test_allocation_metrics_follow_the_ledger(shared: FlaskClient, clock: FakeClock) -> None:
    for index in range(3):
        charge(shared, 20, vehicle_id=f"ev-{index}")
    clock.advance(36)
    metrics = scrape(shared)
    value = lambda name: metrics.value(name, substation=SUBSTATION)  # noqa: E731
    assert (value("current_load"), value("requested_load_kw"), value("curtailed_kw")) == (30.0, 60.0, 30.0)
    assert (value("fair_share_kw"), value("curtailed_sessions"), value("minimum_load_kw")) == (10.0, 3.0, 6.0)
    assert value("energy_delivered_kwh_total") == pytest.approx(0.3)
    assert metrics.value("charging_sessions", substation=SUBSTATION, state="charging") == 3.0
