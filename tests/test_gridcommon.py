"""The shared package: charge-request validation, settings, time format, metrics parsing."""
from __future__ import annotations

import dataclasses
import datetime
import io
import json
import logging
import math
import socket
import sqlite3
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from flask import Flask, Response, jsonify, request

from charge_request_service.store import ChargeStore
from tests.postgres_support import PostgresServer
from gridcommon import jsonfast
from gridcommon.logs import SafeFormatter, escape_for_log
from gridcommon.promtext import parse_metrics
from gridcommon.request_context import choose_request_id
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
from gridcommon.validation import ValidationError, is_substation_id, parse_charge_request
from gridcommon.web import (
    MAX_JSON_DEPTH,
    InvalidJson,
    _write_server_refusal,
    install_common,
    json_object_body,
    loads_request_json,
)


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
        ({"vehicle_id": "EV-1", "amount": 11, "duration_seconds": 5e-324}, "duration_seconds"),
        ({"vehicle_id": "EV-1", "amount": 11, "duration_seconds": 0.0009}, "duration_seconds"),
        # "$" would match before a trailing newline; the newline would then reach logs and URLs.
        ({"vehicle_id": "EV-1\n", "amount": 11}, "vehicle_id"),
        ({"vehicle_id": "EV-1\r\n", "amount": 11}, "vehicle_id"),
        ({"vehicle_id": "\nEV-1", "amount": 11}, "vehicle_id"),
    ],
)
def test_each_bad_field_is_named(body: dict, field: str) -> None:
    with pytest.raises(ValidationError) as raised:
        parse_charge_request(body)
    assert raised.value.field == field


def test_ids_with_a_trailing_newline_are_refused_everywhere() -> None:
    with pytest.raises(ValidationError, match="session_id"):
        parse_charge_request({"vehicle_id": "EV-1", "amount": 11, "session_id": "abc\n"}, accept_session_id=True)
    assert is_substation_id("substation-1.a_b") and not is_substation_id("substation-1\n")
    assert not is_substation_id("x" * 65) and not is_substation_id(None)
    assert choose_request_id("trace-1:a.b") == "trace-1:a.b"
    for hostile in ("trace-1\n", "trace-1\nFORGED", "a b", "x" * 129, ""):
        chosen = choose_request_id(hostile)
        assert chosen != hostile and len(chosen) == 32


# Logs -------------------------------------------------------------------------------


def test_control_characters_cannot_start_a_log_line() -> None:
    assert escape_for_log("GET /a\nFORGED\r\x00\x1b[31m\x85\u2028\u202e\t") == (
        "GET /a\\nFORGED\\r\\x00\\x1b[31m\\x85\\u2028\\u202e\\t"
    )
    assert escape_for_log("plain é text") == "plain é text"


def test_the_formatter_keeps_every_record_on_lines_of_its_own() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(SafeFormatter("%(levelname)s %(message)s"))
    log = logging.getLogger("test-safe-formatter")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("path %s", "/x\n2026-01-01 INFO forged")
        try:
            raise ValueError("bad value\nFORGED line")
        except ValueError:
            log.exception("failed on %s", "/y\rFORGED")
    finally:
        log.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "WARNING path /x\\n2026-01-01 INFO forged"
    assert lines[1] == "ERROR failed on /y\\rFORGED"
    assert all(line.startswith("  | ") for line in lines[2:]), lines
    assert any("Traceback" in line for line in lines) and not any(line.startswith("FORGED") for line in lines)


# JSON bodies --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"[" * 5000 + b"]" * 5000, "nested"),  # RecursionError inside json
        (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), "nested"),
        (b'{"a":' * 40 + b"1" + b"}" * 40, "nested"),
        (b'{"amount": 1, "amount": 2}', "same key"),
        (b'{"a": {"b": 1, "b": 1}}', "same key"),
        (b'{"vehicle_id": "\xff\xfe"}', "UTF-8"),
        (b'{"vehicle_id": ', "line 1"),
        (b"", "line 1"),
        (b'{"amount": ' + b"9" * 5000 + b"}", "could not be read"),
    ],
)
def test_every_bad_json_body_is_an_invalid_json_saying_why(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidJson, match=reason):
        loads_request_json(raw)


def test_json_bodies_that_are_merely_odd_are_still_read() -> None:
    nested = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert loads_request_json(nested)
    # The fields' own checks refuse these, naming the field.
    assert math.isnan(loads_request_json('{"amount": NaN}')["amount"])
    assert loads_request_json('{"amount": 1e999}')["amount"] == math.inf


@pytest.fixture
def hardened_app() -> Flask:
    app = Flask(__name__)
    install_common(app)

    @app.post("/object")
    def read_object():
        return jsonify(json_object_body())

    @app.post("/flask-json")
    def read_with_flask():
        return jsonify({"type": type(request.get_json()).__name__})

    @app.post("/peek")
    def peek():
        # What a rate limiter's key function does before the endpoint reads the body itself.
        peeked = request.get_json(silent=True)
        return jsonify({"peeked": peeked is not None, "body": json_object_body()})

    @app.get("/things/<thing_id>")
    def thing(thing_id: str):
        return jsonify({"id": thing_id})

    @app.delete("/things/<thing_id>")
    def forget_thing(thing_id: str):
        return jsonify({"forgotten": thing_id})

    @app.get("/boom")
    def boom():
        raise RuntimeError("secret internal detail at http://10.0.0.7:5011")

    return app


@pytest.mark.parametrize("path", ["/object", "/flask-json"])
def test_deep_json_is_a_400_on_every_way_of_reading_it(hardened_app: Flask, path: str) -> None:
    client = hardened_app.test_client()
    not_utf8 = ['{"a": 1}'.encode(encoding) for encoding in ("utf-16", "utf-16-be", "utf-32-le")]
    for body in (b"[" * 5000 + b"]" * 5000, b'{"a": 1, "a": 2}', b"\xff", *not_utf8):
        response = client.post(path, data=body, content_type="application/json")
        assert response.status_code == 400, response.get_data(as_text=True)
        assert response.get_json()["error"] == "invalid_json"
    response = client.post(path, data="x", content_type="text/plain")
    assert response.status_code == 415 and response.get_json()["error"] == "unsupported_media_type"


def test_a_silent_peek_at_a_bad_body_is_none_and_the_endpoint_still_refuses_it(hardened_app: Flask) -> None:
    client = hardened_app.test_client()
    assert client.post("/peek", json={"a": 1}).get_json() == {"peeked": True, "body": {"a": 1}}
    too_large = client.post("/peek", data=b'{"a": "' + b"x" * 20_000 + b'"}', content_type="application/json")
    assert too_large.status_code == 413 and too_large.get_json()["error"] == "request_entity_too_large"
    deep = client.post("/peek", data=b"[" * 5000 + b"]" * 5000, content_type="application/json")
    assert deep.status_code == 400 and deep.get_json()["error"] == "invalid_json"


def test_paths_with_control_characters_options_and_crashes_get_json_errors(hardened_app: Flask) -> None:
    client = hardened_app.test_client()
    assert client.get("/things/abc").get_json() == {"id": "abc"}
    for path in ("/things/abc%0A", "/things/a%00b", "/things/%E2%80%A8", "/things/%C2%85", "/things/.."):
        response = client.get(path)
        assert response.status_code == 400 and response.get_json()["error"] == "invalid_path", path
    options = client.options("/things/abc")
    assert options.status_code == 405 and options.get_json()["error"] == "method_not_allowed"
    assert options.headers["Allow"] == "DELETE, GET, HEAD", "every method of the path, from each of its rules"
    crash = client.get("/boom")
    assert crash.status_code == 500 and crash.get_json()["error"] == "internal_error"
    assert "10.0.0.7" not in crash.get_data(as_text=True) and "RuntimeError" not in crash.get_data(as_text=True)


def test_gunicorns_own_refusals_are_json_and_quote_nothing() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        _write_server_refusal(ours, 400, "Bad Request", "Invalid HTTP Header: 'X-REQUEST-ID\nFORGED'")
        ours.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := theirs.recv(4096):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"Content-Type: application/json" in head
    error = json.loads(body)
    assert error["error"] == "bad_request" and error["message"] and "FORGED" not in error["message"]


# Settings -----------------------------------------------------------------------------


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
    bad_urls = (
        "load_balancer:5002", "http://:5002", "http://u:p@host:1", "http://host:99999", "http://h/?q=1",
        "http://@host:1", "http://host:1?", "http://host:1/#",
    )
    for bad in bad_urls:
        with pytest.raises(SettingsError, match="LB"):
            env_base_url({"LB": bad}, "LB", "http://127.0.0.1:5002")


def test_parsing_only_some_families_reads_the_same_samples_as_parsing_all() -> None:
    page = (
        "# HELP current_load Load, kW.\n# TYPE current_load gauge\n"
        'current_load{substation="s-1"} 12.5\n'
        "# HELP requests Requests.\n# TYPE requests counter\n"
        'requests_total{outcome="ok"} 7.0\nrequests_created{outcome="ok"} 1.7e9\n'
        "# HELP unrelated_seconds Something else.\n# TYPE unrelated_seconds histogram\n"
        'unrelated_seconds_bucket{le="+Inf"} 3.0\nunrelated_seconds_count 3.0\nunrelated_seconds_sum 0.5\n'
    )
    full = parse_metrics(page)
    some = parse_metrics(page, only=frozenset({"current_load", "requests"}))
    assert set(some.samples) == {"current_load", "requests_total"}
    assert some.samples["current_load"] == full.samples["current_load"]
    assert some.samples["requests_total"] == full.samples["requests_total"]


# ----- jsonfast and the JSON answers ------------------------------------------------------------


def test_fast_json_reads_back_as_the_standard_librarys_does() -> None:
    value = {"b": [1, 2.5, None, True], "a": "Zähler ⚡", 3: "integer key", "big": 2**70}

    encoded = jsonfast.dumps(value)  # an integer past 64 bits: the standard library's turn

    assert json.loads(encoded) == json.loads(json.dumps(value))
    assert jsonfast.dumps({"b": 1, "a": 2}, sort_keys=True) == b'{"a":2,"b":1}'
    assert jsonfast.loads(jsonfast.dumps({"x": [0.1, 1e16]})) == {"x": [0.1, 1e16]}
    with pytest.raises(ValueError):
        jsonfast.loads(b"{not json")


def test_json_kept_in_memory_takes_the_memory_of_its_length() -> None:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [jsonfast.dumps_to_keep({"session_id": f"s-{index}", "kw": 7.5}) for index in range(1_000)]
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 1_000 * 200, f"{grown / 1000:.0f} bytes each for records of {len(kept[0])} bytes"


def test_answers_keep_their_key_order_and_flasks_dates_and_dataclasses() -> None:
    @dataclasses.dataclass
    class Point:
        at: datetime.date
        kw: float

    app = Flask(__name__)
    install_common(app)
    with app.app_context():
        answer = jsonify({"z": 1, "a": Point(datetime.date(2026, 12, 2), 7.5)})
        app.json.sort_keys = True
        sorted_answer = jsonify({"z": 1, "a": 2})

    assert answer.mimetype == "application/json"
    assert answer.get_data(as_text=True) == '{"z":1,"a":{"at":"Wed, 02 Dec 2026 00:00:00 GMT","kw":7.5}}\n'
    assert sorted_answer.get_data(as_text=True) == '{"a":2,"z":1}\n'


def test_a_state_file_that_cannot_be_written_is_a_503_saying_so(tmp_path: Path) -> None:
    store = ChargeStore(tmp_path / "charge.sqlite3")
    assert_records_lost_are_a_503(store, lambda: sqlite3.connect(tmp_path / "charge.sqlite3"),
                                  "is the disk full?", "the state folder (STATE_DIR)")


def test_a_database_that_refuses_a_change_is_a_503_naming_the_database(postgres: PostgresServer) -> None:
    url = postgres.new_database()
    store = ChargeStore(url)
    assert_records_lost_are_a_503(store, lambda: psycopg.connect(url.replace("+psycopg", ""), autocommit=True),
                                  "refused a change", "the database (DATABASE_URL)")


def assert_records_lost_are_a_503(store: ChargeStore, connect: Callable[[], Any], says: str, check: str) -> None:
    app = Flask(__name__)
    install_common(app)

    @app.post("/record")
    def record() -> tuple[Response, int]:
        store.put_session("s-1", "ev-1", "pending", {"session_id": "s-1"}, 1.0)
        return jsonify(recorded=True), 201

    assert app.test_client().post("/record").status_code == 201
    other = connect()
    other.execute("DROP TABLE sessions")
    other.commit()
    other.close()
    answer = app.test_client().post("/record")

    assert answer.status_code == 503 and answer.headers["Retry-After"] == "5"
    body = answer.get_json()
    assert body["error"] == "state_unavailable" and says in body["message"] and check in body["message"], body
