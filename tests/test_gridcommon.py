"""The shared package: charge-request validation, settings, time format, metrics parsing."""
from __future__ import annotations

import math

import pytest

from gridcommon.promtext import parse_metrics
from gridcommon.settings import (
    SettingsError,
    env_base_url,
    env_base_urls,
    env_bool,
    env_float,
    env_list,
    env_log_level,
)
from gridcommon.timefmt import format_time, parse_time
from gridcommon.validation import ValidationError, parse_charge_request


def test_a_public_request_cannot_choose_its_session_id() -> None:
    request = parse_charge_request({"vehicle_id": "EV-1", "amount": 11, "session_id": "someone-elses"})

    assert request.session_id is None
    assert "session_id" not in request.as_json()


def test_an_internal_hop_passes_the_session_id_on() -> None:
    body = {"vehicle_id": "EV-1", "amount": 11, "session_id": "abc-123"}
    request = parse_charge_request(body, accept_session_id=True)

    assert request.as_json() == {"vehicle_id": "EV-1", "amount": 11.0, "session_id": "abc-123"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"amount": 11}, "vehicle_id"),
        ({"vehicle_id": "EV 1", "amount": 11}, "vehicle_id"),
        ({"vehicle_id": "E" * 65, "amount": 11}, "vehicle_id"),
        ({"vehicle_id": "EV-1", "amount": True}, "amount"),
        ({"vehicle_id": "EV-1", "amount": math.nan}, "amount"),
        ({"vehicle_id": "EV-1", "amount": "11"}, "amount"),
        ({"vehicle_id": "EV-1", "amount": 10**400}, "amount"),
        ({"vehicle_id": "EV-1", "amount": 11, "duration_seconds": 10**400}, "duration_seconds"),
        ({"vehicle_id": "EV-1", "amount": 0}, "amount"),
        ({"vehicle_id": "EV-1", "amount": 350.01}, "amount"),
        ({"vehicle_id": "EV-1", "amount": 11, "duration_seconds": 0}, "duration_seconds"),
        ({"vehicle_id": "EV-1", "amount": 11, "duration_seconds": 3601}, "duration_seconds"),
    ],
)
def test_each_bad_field_is_named(body: dict, field: str) -> None:
    with pytest.raises(ValidationError) as raised:
        parse_charge_request(body)
    assert raised.value.field == field


def test_settings_read_typed_values_and_name_the_bad_variable() -> None:
    env = {"CAPACITY_KW": "80", "ENABLED": "off", "URLS": " a, ,b ", "LOG_LEVEL": "WARNING"}
    assert env_float(env, "CAPACITY_KW", 100.0, minimum=0) == 80.0
    assert env_bool(env, "ENABLED", True) is False
    assert env_list(env, "URLS") == ("a", "b")
    assert env_log_level(env) == "warning"
    with pytest.raises(SettingsError, match="CAPACITY_KW"):
        env_float({"CAPACITY_KW": "lots"}, "CAPACITY_KW", 100.0)
    with pytest.raises(SettingsError, match="LOG_LEVEL"):
        env_log_level({"LOG_LEVEL": "loud"})


def test_times_are_utc_with_milliseconds_and_read_back() -> None:
    text = format_time(1_800_000_000.25)

    assert text == "2027-01-15T08:00:00.250Z"
    assert parse_time(text).timestamp() == 1_800_000_000.25


def test_metrics_are_read_with_their_labels() -> None:
    scrape = parse_metrics(
        "# TYPE current_load gauge\n"
        'current_load{substation="substation-1"} 42.5\n'
        'current_load{substation="substation-2"} 7\n'
    )

    assert scrape.value("current_load", substation="substation-2") == 7.0
    assert scrape.value("missing", default=-1.0) == -1.0


def test_base_urls_are_normalised_and_bad_ones_named() -> None:
    env = {"LB": "http://load_balancer:5002/", "PEERS": "http://a:1, https://b:2/x/"}
    assert env_base_url(env, "LB", "http://127.0.0.1:5002") == "http://load_balancer:5002"
    assert env_base_urls(env, "PEERS", "http://substation_2:5012") == ("http://a:1", "https://b:2/x")
    for bad in ("load_balancer:5002", "http://:5002", "http://u:p@host:1", "http://host:99999", "http://h/?q=1"):
        with pytest.raises(SettingsError, match="LB"):
            env_base_url({"LB": bad}, "LB", "http://127.0.0.1:5002")
