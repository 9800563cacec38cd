"""The console's plain parts: what limits a session, its logins, the shared feed, its HTTP answers."""
from __future__ import annotations

import threading
import time

import pytest

from charge_request_service import create_app
from charge_request_service.config import Settings
from charge_request_service.console.feed import Feed, StreamsFull
from charge_request_service.console.grid import limit_source_of, what_limits
from charge_request_service.console.logins import Logins, csrf_matches
from charge_request_service.console.routes import CONTENT_SECURITY_POLICY
from gridcommon.settings import SettingsError

# A port nothing listens on.
NOWHERE = "http://127.0.0.1:9"
SUBSTATION = {"id": "substation-1", "limit_kw": 100.0, "limit_source": "capacity"}


def session(**fields: object) -> dict[str, object]:
    return {"state": "charging", "allocated_kw": 5.0, "amount": 11.0, "minimum_kw": 1.4, **fields}


@pytest.mark.parametrize(
    ("fields", "substation", "rejected", "expected"),
    [
        ({"allocated_kw": 11.0}, SUBSTATION, False, "own_maximum"),
        ({"allocated_kw": 1.4}, SUBSTATION, False, "minimum_only"),
        ({"state": "suspended", "allocated_kw": 0.0}, SUBSTATION, False, "suspended"),
        ({}, SUBSTATION, False, "substation_limit"),
        ({}, {**SUBSTATION, "limit_source": "operator"}, False, "operator_limit"),
        ({"allocated_kw": 11.0}, SUBSTATION, True, "profile_rejected"),
    ],
)
def test_what_limits_a_session(fields: dict, substation: dict, rejected: bool, expected: str) -> None:
    code, sentence = what_limits(session(**fields), substation, rejected)
    assert code == expected and sentence


def test_the_source_of_a_limit_names_the_part_that_sets_it() -> None:
    parts = {"capacity_kw": 100.0, "generation_kw": 0.0, "storage_kw": 0.0, "peer_kw": 0.0}
    assert limit_source_of({"source": "operator", "parts": parts}, {}) == "operator"
    assert limit_source_of({"source": "substation", "parts": parts}, {}) == "capacity"
    assert limit_source_of({"source": "substation", "parts": {**parts, "generation_kw": 20.0}}, {}) == "generation"
    assert limit_source_of({"source": "substation", "parts": {**parts, "peer_kw": -5.0}}, {}) == "peers"


def test_logins_expire_when_idle_or_old_and_the_table_is_bounded() -> None:
    now = [0.0]
    logins = Logins(capacity=3, lifetime_seconds=100, idle_seconds=10, clock=lambda: now[0])
    first, login = logins.open()
    assert logins.find(first) is login and csrf_matches(login, login.csrf_token)
    assert not csrf_matches(login, "forged") and not csrf_matches(login, None)
    now[0] = 9.0
    assert logins.find(first) is login  # used: its idle clock starts again
    now[0] = 19.5
    assert logins.find(first) is None  # idle past 10 s
    kept, _ = logins.open()
    opened = now[0]
    while now[0] + 9 <= opened + 100:  # used every 9 s, never idle for long, until 99 s after it opened
        now[0] += 9
        assert logins.find(kept) is not None
    now[0] += 9  # past the 100 s lifetime
    assert logins.find(kept) is None
    ids = [logins.open()[0] for _ in range(5)]
    assert len(logins) == 3 and logins.find(ids[0]) is None and logins.find(ids[-1]) is not None


def test_one_gatherer_serves_every_stream_and_streams_are_bounded() -> None:
    taken = []

    def take() -> dict:
        taken.append(threading.current_thread().name)
        return {"n": len(taken)}

    feed = Feed(take, interval_seconds=0.05, max_streams=2)
    try:
        feed.open_stream()
        feed.open_stream()
        with pytest.raises(StreamsFull):
            feed.open_stream()
        results: list[list[int]] = [[], []]

        def follow(into: list[int]) -> None:
            number = 0
            for _ in range(5):
                number, _event = feed.next_event(number)
                into.append(number)

        readers = [threading.Thread(target=follow, args=(into,)) for into in results]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(timeout=5)
        assert all(len(into) == 5 for into in results)
        # Two streams, one snapshot per interval: the taker ran in one thread, not one per stream.
        assert set(taken) == {"console-feed"}
        started = time.monotonic()
        count = len(taken)
        time.sleep(0.5)
        assert len(taken) - count <= 0.5 / 0.05 + 2, "snapshots come no faster than the interval"
        assert time.monotonic() - started >= 0.5
        feed.close_stream()
        feed.open_stream()  # a closed stream's slot is free again
    finally:
        feed.stop()


def test_settings_refuse_a_gateway_url_that_is_not_one() -> None:
    with pytest.raises(SettingsError, match="GATEWAY_URL"):
        Settings.from_env({"GATEWAY_URL": "ftp://nowhere"})
    assert Settings.from_env({"PROMETHEUS_URL": "http://127.0.0.1:9090/"}).prometheus_url == "http://127.0.0.1:9090"


def test_answers_carry_a_strict_csp_and_bad_input_is_a_clear_4xx() -> None:
    # No balancer answers there: the console's picture of the grid is empty.
    app = create_app(Settings(admin_token="operator", load_balancer_url=NOWHERE), start_background=False)
    client = app.test_client()
    form = client.get("/console/")
    assert form.status_code == 200 and b'name="token"' in form.data
    assert form.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY and "default-src 'self'" in CONTENT_SECURITY_POLICY
    assert client.post("/console/login", data={"token": "operator"}).status_code == 303
    page = client.get("/console/")
    csrf = page.data.split(b'name="csrf-token" content="')[1].split(b'"')[0].decode()
    headers = {"X-CSRF-Token": csrf}
    bad_limit = client.post("/console/actions/limit", json={"substation": "x", "limit_kw": "lots"}, headers=headers)
    assert bad_limit.status_code == 400 and bad_limit.json["field"] == "limit_kw"
    unknown = client.post("/console/actions/limit", json={"substation": "x", "limit_kw": 5}, headers=headers)
    assert unknown.status_code == 404 and unknown.json["error"] == "substation_not_found"
    bad_id = client.post("/console/actions/stop", json={"substation": "x", "session_id": "<b>"}, headers=headers)
    assert bad_id.status_code == 400 and bad_id.json["field"] == "session_id"
    not_json = client.post("/console/actions/policy", data="policy=strict", headers=headers,
                           content_type="application/x-www-form-urlencoded")
    assert not_json.status_code == 415


def test_without_an_operator_token_the_console_is_off() -> None:
    client = create_app(Settings(admin_token="", load_balancer_url=NOWHERE), start_background=False).test_client()
    assert client.get("/console/").status_code == 403
    assert client.post("/console/login", data={"token": ""}).status_code == 403
    assert client.get("/console/snapshot").status_code == 401
