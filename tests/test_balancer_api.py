"""The balancer's HTTP API through Flask's test client: validation, registration
errors, admin auth and JSON errors. Routing to real substations is covered by
tests/test_balancer_integration.py."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient

from gridcommon.promtext import parse_metrics
from gridcommon.settings import SettingsError
from load_balancer import create_app
from load_balancer.config import Settings
from tests.harness import free_port

TOKEN = "s3cret-admin-token"


@pytest.fixture
def app() -> Iterator[Flask]:
    app = create_app(
        Settings(admin_token=TOKEN, poll_interval_seconds=7.0, max_amount_kw=100.0), start_background=False
    )
    yield app
    app.extensions["load_balancer"].stop()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def assert_json_error(response, status: int, error: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json
    body = response.get_json()
    assert body["error"] == error
    assert body["message"]
    return body


def requests_counted(client: FlaskClient, outcome: str) -> float:
    scrape = parse_metrics(client.get("/metrics").get_data(as_text=True))
    return scrape.value("load_balancer_requests_total", outcome=outcome)


# Charge requests ------------------------------------------------------------


@pytest.mark.parametrize(
    "body, field",
    [
        ({"amount": 10}, "vehicle_id"),
        ({"vehicle_id": "bad id!", "amount": 10}, "vehicle_id"),
        ({"vehicle_id": "ev-1"}, "amount"),
        ({"vehicle_id": "ev-1", "amount": -5}, "amount"),
        ({"vehicle_id": "ev-1", "amount": True}, "amount"),
        ({"vehicle_id": "ev-1", "amount": 100.5}, "amount"),  # above MAX_AMOUNT_KW
        ({"vehicle_id": "ev-1", "amount": 10, "duration_seconds": 0}, "duration_seconds"),
        ({"vehicle_id": "ev-1", "amount": 10, "duration_seconds": 3601}, "duration_seconds"),
    ],
)
def test_invalid_charge_requests_name_the_field(client: FlaskClient, body: dict, field: str) -> None:
    error = assert_json_error(client.post("/charge", json=body), 400, "invalid_field")
    assert error["field"] == field
    assert requests_counted(client, "invalid") == 1


def test_charge_body_must_be_json(client: FlaskClient) -> None:
    assert_json_error(client.post("/charge", data="vehicle_id=1", content_type="text/plain"), 415, "unsupported_media_type")
    assert_json_error(client.post("/charge", data="{not json", content_type="application/json"), 400, "invalid_json")
    assert_json_error(client.post("/charge", json=[1, 2]), 400, "invalid_json")
    assert requests_counted(client, "invalid") == 3


def test_oversized_charge_body_is_refused(client: FlaskClient) -> None:
    body = '{"vehicle_id": "ev-1", "amount": 1, "pad": "' + "x" * 20_000 + '"}'
    assert_json_error(client.post("/charge", data=body, content_type="application/json"), 413, "request_entity_too_large")


def test_no_substation_means_503_with_retry_after_of_the_poll_interval(client: FlaskClient) -> None:
    response = client.post("/charge", json={"vehicle_id": "ev-1", "amount": 10})
    body = assert_json_error(response, 503, "no_capacity")
    assert response.headers["Retry-After"] == "7"
    assert body["retry_after_seconds"] == 7
    assert "reachable" in body["message"]
    assert requests_counted(client, "no_capacity") == 1


def test_stopping_a_session_at_an_unknown_substation_is_404(client: FlaskClient) -> None:
    assert_json_error(client.delete("/charge/substation-9/abc"), 404, "unknown_substation")


# Registry ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [{}, {"url": ""}, {"url": 5}, {"url": "ftp://127.0.0.1:21"}, {"url": "127.0.0.1:5011"}, {"url": "http://h:99999"}],
)
def test_registering_needs_a_valid_url(client: FlaskClient, body: dict) -> None:
    error = assert_json_error(client.post("/substations", json=body), 400, "invalid_field")
    assert error["field"] == "url"


def test_registering_an_unreachable_substation_is_502_and_adds_nothing(client: FlaskClient) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    error = assert_json_error(client.post("/substations", json={"url": url}), 502, "substation_unreachable")
    assert url in error["message"]
    assert client.get("/substations").get_json() == {"substations": []}


def test_registering_needs_a_json_body(client: FlaskClient) -> None:
    assert_json_error(client.post("/substations", data="url", content_type="text/plain"), 415, "unsupported_media_type")


def test_deregistering_an_unknown_substation_is_404(client: FlaskClient) -> None:
    assert_json_error(client.delete("/substations/substation-9"), 404, "unknown_substation")


def test_configured_substations_wait_for_their_first_poll() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    app = create_app(Settings(substations=(url,)), start_background=False)
    (entry,) = app.test_client().get("/status").get_json()["substations"]
    assert entry["url"] == url
    assert entry["id"] is None and entry["up"] is False and entry["last_poll_age_seconds"] is None


# Admin ----------------------------------------------------------------------------


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_admin_api_is_forbidden_without_admin_token_setting() -> None:
    client = create_app(Settings(admin_token=""), start_background=False).test_client()
    assert_json_error(client.get("/admin/policy", headers=bearer("")), 403, "admin_disabled")
    assert_json_error(client.put("/admin/policy", json={"policy": "random"}), 403, "admin_disabled")


@pytest.mark.parametrize(
    "headers",
    [{}, bearer("wrong"), bearer(TOKEN + "x"), {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN}],
)
def test_admin_api_needs_the_right_bearer_token(client: FlaskClient, headers: dict[str, str]) -> None:
    response = client.put("/admin/policy", json={"policy": "random"}, headers=headers)
    assert_json_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/status").get_json()["policy"] == "fair_share"


def test_admin_can_read_and_switch_the_policy(client: FlaskClient) -> None:
    current = client.get("/admin/policy", headers=bearer(TOKEN))
    assert current.status_code == 200
    assert current.get_json()["policy"] == "fair_share"
    assert "power_of_two" in current.get_json()["available"]

    switched = client.put("/admin/policy", json={"policy": "power_of_two"}, headers=bearer(TOKEN))
    assert switched.status_code == 200
    assert switched.get_json()["policy"] == "power_of_two"
    assert switched.get_json()["previous"] == "fair_share"
    assert client.get("/status").get_json()["policy"] == "power_of_two"


@pytest.mark.parametrize("body", [{"policy": "fastest"}, {"policy": 3}, {}])
def test_admin_rejects_unknown_policies(client: FlaskClient, body: dict) -> None:
    error = assert_json_error(client.put("/admin/policy", json=body, headers=bearer(TOKEN)), 400, "invalid_field")
    assert error["field"] == "policy"
    assert "least_connections" in error["message"]


# Errors, status, metrics ---------------------------------------------------------


def test_unknown_paths_and_methods_get_json_errors(client: FlaskClient) -> None:
    assert_json_error(client.get("/nowhere"), 404, "not_found")
    response = client.get("/charge")
    assert_json_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]
    assert_json_error(client.patch("/substations"), 405, "method_not_allowed")


def test_health_and_status(client: FlaskClient) -> None:
    assert client.get("/health").get_json() == {"status": "ok", "service": "load_balancer"}
    assert client.get("/status").get_json() == {
        "policy": "fair_share",
        "poll_interval_seconds": 7.0,
        "healthy_substations": 0,
        "substations": [],
    }


def test_metrics_page_has_the_documented_metrics(client: FlaskClient) -> None:
    scrape = parse_metrics(client.get("/metrics").get_data(as_text=True))
    for outcome in ("routed", "no_capacity", "invalid", "error"):
        assert scrape.value("load_balancer_requests_total", outcome=outcome) == 0
    assert scrape.value("load_balancer_poll_interval_seconds") == 7.0
    assert scrape.value("healthy_substations") == 0
    assert scrape.value("polling_duration_seconds_count") == 0


# Settings -----------------------------------------------------------------------------


def test_settings_from_env_normalise_urls_and_read_every_value() -> None:
    settings = Settings.from_env(
        {
            "SUBSTATIONS": "http://127.0.0.1:5011/, http://127.0.0.1:5012,http://127.0.0.1:5011",
            "ROUTING_POLICY": "round_robin",
            "POLL_INTERVAL_SECONDS": "1.5",
            "FAILURE_THRESHOLD": "2",
            "ROUTE_DEADLINE_SECONDS": "4.5",
            "LOG_LEVEL": "debug",
        }
    )
    assert settings.substations == ("http://127.0.0.1:5011", "http://127.0.0.1:5012")
    assert settings.routing_policy == "round_robin"
    assert settings.poll_interval_seconds == 1.5
    assert settings.failure_threshold == 2
    assert settings.route_deadline_seconds == 4.5
    assert settings.log_level == "debug"
    assert Settings.from_env({}) == Settings()


@pytest.mark.parametrize(
    "env, variable",
    [
        ({"SUBSTATIONS": "127.0.0.1:5011"}, "SUBSTATIONS"),
        ({"ROUTING_POLICY": "fastest"}, "ROUTING_POLICY"),
        ({"POLL_INTERVAL_SECONDS": "soon"}, "POLL_INTERVAL_SECONDS"),
        ({"FAILURE_THRESHOLD": "0"}, "FAILURE_THRESHOLD"),
        ({"ROUTE_DEADLINE_SECONDS": "never"}, "ROUTE_DEADLINE_SECONDS"),
        # No time for even one forward: connecting may take 1 s, and the answer needs a moment.
        ({"ROUTE_DEADLINE_SECONDS": "1.2"}, "ROUTE_DEADLINE_SECONDS"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env(env)
