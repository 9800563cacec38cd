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


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


OPERATOR = bearer(TOKEN)


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
    body = assert_json_error(response, 503, "substations_unreachable")
    assert response.headers["Retry-After"] == "7"
    assert body["retry_after_seconds"] == 7
    assert "none is registered" in body["message"]
    assert requests_counted(client, "unreachable") == 1


def test_stopping_a_session_at_an_unknown_substation_is_404(client: FlaskClient) -> None:
    assert_json_error(client.delete("/charge/substation-9/abc"), 404, "unknown_substation")


# Registry ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [{}, {"url": ""}, {"url": 5}, {"url": "ftp://127.0.0.1:21"}, {"url": "127.0.0.1:5011"}, {"url": "http://h:99999"}],
)
def test_registering_needs_a_valid_url(client: FlaskClient, body: dict) -> None:
    error = assert_json_error(client.post("/substations", json=body, headers=OPERATOR), 400, "invalid_field")
    assert error["field"] == "url"


@pytest.mark.parametrize(
    "url",
    [
        "http://@127.0.0.1:5011",  # an empty user is still credentials
        "http://127.0.0.1:5011?",
        "http://127.0.0.1:5011/#",
        "http://127.0.0.1:5011\\@evil.example",  # a backslash: parsers disagree on the host
        "http://127.0.0.1:5011/a b",
        "http://127.0.0.1:5011/\x1b[31m",
        "http://127.1:5011",  # inet_aton would read it as 127.0.0.1
        "http://2130706433:5011",
        "http://0x7f000001:5011",
        "http://sub*:5011",
        "http://127.0.0.1:0",
    ],
)
def test_registering_refuses_urls_that_hide_what_they_point_at(client: FlaskClient, url: str) -> None:
    error = assert_json_error(client.post("/substations", json={"url": url}, headers=OPERATOR), 400, "invalid_field")
    assert error["field"] == "url"


@pytest.mark.parametrize("headers", [{}, bearer("wrong"), {"Authorization": TOKEN}])
def test_registering_and_deregistering_need_the_operator_token(client: FlaskClient, headers: dict) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    response = client.post("/substations", json={"url": url}, headers=headers)
    assert_json_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert_json_error(client.delete("/substations/substation-1", headers=headers), 401, "unauthorized")


def test_registration_is_off_without_an_admin_token() -> None:
    client = create_app(Settings(admin_token=""), start_background=False).test_client()
    for response in (
        client.post("/substations", json={"url": "http://127.0.0.1:5011"}, headers=bearer("")),
        client.delete("/substations/substation-1"),
    ):
        error = assert_json_error(response, 403, "admin_disabled")
        assert "ADMIN_TOKEN" in error["message"]


def test_registering_an_unreachable_substation_is_502_and_adds_nothing(client: FlaskClient) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    response = client.post("/substations", json={"url": url}, headers=OPERATOR)
    error = assert_json_error(response, 502, "substation_unreachable")
    assert url in error["message"]
    assert client.get("/substations").get_json() == {"substations": []}


def test_registering_needs_a_json_body(client: FlaskClient) -> None:
    response = client.post("/substations", data="url", content_type="text/plain", headers=OPERATOR)
    assert_json_error(response, 415, "unsupported_media_type")


def test_deregistering_an_unknown_substation_is_404(client: FlaskClient) -> None:
    assert_json_error(client.delete("/substations/substation-9", headers=OPERATOR), 404, "unknown_substation")


def test_by_default_only_the_configured_hosts_and_loopback_may_be_registered() -> None:
    settings = Settings(admin_token=TOKEN, substations=("http://substation_1:5011", "http://10.1.2.3:5012"))
    app = create_app(settings, start_background=False)
    client = app.test_client()
    for url in ("http://substation_9:5011", "http://10.1.2.4:5012", "http://[::1]:5011", "http://metadata.internal"):
        response = client.post("/substations", json={"url": url}, headers=OPERATOR)
        error = assert_json_error(response, 403, "url_not_allowed")
        assert error["field"] == "url" and "SUBSTATION_URL_ALLOW" in error["message"]
    allow = settings.url_allow_list()
    for url in ("http://substation_1:9999", "http://10.1.2.3:1", "http://127.0.0.1:5011", "http://LOCALHOST:1"):
        assert allow.allows(url), url
    assert client.get("/substations").get_json()["substations"][0]["url"] == "http://10.1.2.3:5012"
    app.extensions["load_balancer"].stop()


def test_the_cap_on_substations_counts_the_configured_ones() -> None:
    urls = tuple(f"http://127.0.0.1:{free_port()}" for _ in range(2))
    app = create_app(Settings(admin_token=TOKEN, substations=urls, max_substations=2), start_background=False)
    client = app.test_client()
    response = client.post("/substations", json={"url": f"http://127.0.0.1:{free_port()}"}, headers=OPERATOR)
    error = assert_json_error(response, 409, "too_many_substations")
    assert error["max_substations"] == 2 and "MAX_SUBSTATIONS" in error["message"]
    # A URL already tracked is polled again, not counted again: unreachable, so 502, not 409.
    again = client.post("/substations", json={"url": urls[0]}, headers=OPERATOR)
    assert_json_error(again, 502, "substation_unreachable")
    app.extensions["load_balancer"].stop()


def test_configured_substations_wait_for_their_first_poll() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    app = create_app(Settings(substations=(url,)), start_background=False)
    (entry,) = app.test_client().get("/status").get_json()["substations"]
    assert entry["url"] == url
    assert entry["id"] is None and entry["up"] is False and entry["last_poll_age_seconds"] is None


# Admin ----------------------------------------------------------------------------


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
    for outcome in ("routed", "no_capacity", "unreachable", "too_slow", "no_time", "too_large", "invalid", "error"):
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


def test_the_registration_limits_are_read_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "SUBSTATIONS": "http://substation_1:5011",
            "SUBSTATION_URL_ALLOW": "substation_*, 10.0.0.0/8, [fd00::1]:5011, localhost:5011",
            "MAX_SUBSTATIONS": "3",
            "MAX_METRICS_BYTES": "65536",
        }
    )
    assert (settings.max_substations, settings.max_metrics_bytes) == (3, 65536)
    allow = settings.url_allow_list()
    assert allow.entries == ("substation_*", "10.0.0.0/8", "[fd00::1]:5011", "localhost:5011")
    for url in ("http://substation_2:5012", "http://SUBSTATION_X", "https://10.200.0.1:8443", "http://[fd00::1]:5011",
                "http://localhost:5011", "http://[::ffff:10.0.0.9]:1"):
        assert allow.allows(url), url
    for url in ("http://substation_2.evil.example:5012", "http://x.substation_2:1", "http://11.0.0.1:5011",
                "http://[fd00::1]:5012", "http://localhost:5012", "http://127.0.0.1:5011", "http://substation:1"):
        assert not allow.allows(url), url
    defaults = Settings.from_env({})
    assert (defaults.max_substations, defaults.max_metrics_bytes, defaults.substation_url_allow) == (64, 1 << 20, None)


@pytest.mark.parametrize(
    "value",
    ["http://substation_1", "10.0.0.1/8", "10.0.0.0/33", "substation_*:99999", "[::1", "sub station", "127.1", "a/b"],
)
def test_a_bad_allow_list_entry_stops_the_balancer_naming_it(value: str) -> None:
    with pytest.raises(SettingsError, match="SUBSTATION_URL_ALLOW"):
        Settings.from_env({"SUBSTATION_URL_ALLOW": value})


def test_more_configured_substations_than_the_cap_stop_the_balancer() -> None:
    with pytest.raises(SettingsError, match="MAX_SUBSTATIONS"):
        Settings.from_env({"SUBSTATIONS": "http://a:1,http://b:1", "MAX_SUBSTATIONS": "1"})


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
        ({"MAX_SUBSTATIONS": "0"}, "MAX_SUBSTATIONS"),
        ({"MAX_METRICS_BYTES": "lots"}, "MAX_METRICS_BYTES"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env(env)
