"""Unit tests of the charge request service's plain modules: session tracking and settings."""
from __future__ import annotations

import threading
from dataclasses import asdict
from datetime import datetime, timedelta, timezone

import pytest

from charge_request_service.config import Settings
from charge_request_service.sessions import (
    ChargeSession,
    InvalidAdmission,
    SessionCounts,
    SessionTracker,
    format_time,
    parse_time,
)
from gridcommon.settings import SettingsError

START = datetime(2026, 11, 21, 14, 30, 0, 123000, tzinfo=timezone.utc)


class FakeClock:
    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def make_session(session_id: str, seconds: float = 60, started: datetime = START, **fields) -> ChargeSession:
    values = {
        "session_id": session_id,
        "vehicle_id": f"ev-{session_id}",
        "substation": "substation-1",
        "amount_kw": 22.0,
        "started_at": started,
        "ends_at": started + timedelta(seconds=seconds),
        **fields,
    }
    return ChargeSession(**values)


def admission_body(**overrides) -> dict:
    body = {
        "session_id": "a1",
        "substation": "substation-2",
        "vehicle_id": "EV-001",
        "amount": 22,
        "started_at": "2026-11-21T14:30:00.123Z",
        "ends_at": "2026-11-21T14:31:00.123Z",
        "duration_seconds": 60.0,
        "load": 22.0,
        "routing": {"policy": "least_loaded", "attempts": 1},
    }
    body.update(overrides)
    return body


# --- times -----------------------------------------------------------------------------------


def test_time_format_is_utc_with_milliseconds_and_z():
    assert format_time(START) == "2026-11-21T14:30:00.123Z"
    plus_two = START.astimezone(timezone(timedelta(hours=2)))
    assert format_time(plus_two) == "2026-11-21T14:30:00.123Z"


def test_parse_time_reads_z_and_takes_zoneless_times_as_utc():
    assert parse_time("2026-11-21T14:30:00.123Z") == START
    assert parse_time("2026-11-21T14:30:00.123") == START
    assert parse_time("2026-11-21T16:30:00.123+02:00") == START


# --- sessions from the balancer's answer -------------------------------------------------------


def test_session_from_admission_keeps_what_the_balancer_said():
    session = ChargeSession.from_admission(admission_body())
    assert session == ChargeSession(
        session_id="a1",
        vehicle_id="EV-001",
        substation="substation-2",
        amount_kw=22.0,
        started_at=START,
        ends_at=START + timedelta(seconds=60),
    )


def test_session_json_round_trips_times_and_reports_remaining_seconds():
    session = ChargeSession.from_admission(admission_body())
    shown = session.as_json(START + timedelta(seconds=15.5))
    assert shown == {
        "session_id": "a1",
        "vehicle_id": "EV-001",
        "substation": "substation-2",
        "amount": 22.0,
        "started_at": "2026-11-21T14:30:00.123Z",
        "ends_at": "2026-11-21T14:31:00.123Z",
        "remaining_seconds": 44.5,
    }
    assert session.as_json(START + timedelta(hours=1))["remaining_seconds"] == 0.0


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"session_id": None}, "session_id"),
        ({"session_id": ""}, "session_id"),
        ({"substation": 3}, "substation"),
        ({"vehicle_id": ["EV-001"]}, "vehicle_id"),
        ({"amount": "22"}, "amount"),
        ({"amount": True}, "amount"),
        ({"ends_at": "tomorrow"}, "tomorrow"),
        ({"started_at": None}, "started_at"),
        ({"ends_at": "2026-11-21T14:30:00.123Z"}, "ends_at is not after started_at"),
    ],
)
def test_unusable_admission_is_refused_with_the_reason(overrides, named):
    with pytest.raises(InvalidAdmission, match=named):
        ChargeSession.from_admission(admission_body(**overrides))


# --- the tracker -------------------------------------------------------------------------------


def test_recorded_session_is_active_until_it_ends_then_dropped():
    clock = FakeClock()
    tracker = SessionTracker(clock)
    session = make_session("s1", seconds=60)
    tracker.record(session)

    clock.advance(59.999)
    assert tracker.get("s1") == session
    assert tracker.active() == [session]
    assert tracker.active_count() == 1

    clock.advance(0.001)  # exactly at ends_at it no longer counts
    assert tracker.get("s1") is None
    assert tracker.active() == []
    assert tracker.active_count() == 0
    assert tracker.counts().as_json() == {"recorded": 1, "stopped": 0, "expired": 1, "active": 0}


def test_sessions_expire_independently_in_order_of_their_end():
    clock = FakeClock()
    tracker = SessionTracker(clock)
    for session_id, seconds in (("long", 300), ("short", 10), ("middle", 60)):
        tracker.record(make_session(session_id, seconds=seconds))

    clock.advance(30)
    assert [s.session_id for s in tracker.active()] == ["long", "middle"]
    clock.advance(60)
    assert [s.session_id for s in tracker.active()] == ["long"]
    assert tracker.counts().expired == 2


def test_active_lists_oldest_first():
    clock = FakeClock()
    tracker = SessionTracker(clock)
    tracker.record(make_session("later", started=START + timedelta(seconds=5)))
    tracker.record(make_session("earlier", started=START))
    assert [s.session_id for s in tracker.active()] == ["earlier", "later"]


def test_unknown_session_is_none():
    tracker = SessionTracker(FakeClock())
    assert tracker.get("nope") is None
    assert tracker.forget("nope") is None
    assert tracker.counts().stopped == 0


def test_forget_stops_tracking_and_counts_it_once():
    clock = FakeClock()
    tracker = SessionTracker(clock)
    session = make_session("s1", seconds=60)
    tracker.record(session)

    assert tracker.forget("s1") == session
    assert tracker.forget("s1") is None
    assert tracker.get("s1") is None
    clock.advance(120)  # its old end passes: it must not count as expired as well
    assert tracker.counts().as_json() == {"recorded": 1, "stopped": 1, "expired": 0, "active": 0}


def test_recording_a_session_again_keeps_the_newest_end():
    clock = FakeClock()
    tracker = SessionTracker(clock)
    tracker.record(make_session("s1", seconds=10))
    extended = make_session("s1", seconds=100)
    tracker.record(extended)

    clock.advance(50)  # past the first end, before the second
    assert tracker.get("s1") == extended
    assert tracker.counts().as_json() == {"recorded": 1, "stopped": 0, "expired": 0, "active": 1}


def test_session_started_in_the_future_still_counts_while_it_has_not_ended():
    # The balancer's clock may run slightly ahead of this one; the session is active all the same.
    clock = FakeClock()
    tracker = SessionTracker(clock)
    tracker.record(make_session("ahead", started=START + timedelta(seconds=2), seconds=60))
    assert tracker.active_count() == 1


def test_concurrent_records_and_forgets_keep_exact_counts():
    clock = FakeClock()
    tracker = SessionTracker(clock)
    threads_count, per_thread = 8, 250

    def work(thread_index: int) -> None:
        for index in range(per_thread):
            session_id = f"{thread_index}-{index}"
            tracker.record(make_session(session_id, seconds=60))
            if index % 2:
                assert tracker.forget(session_id) is not None

    threads = [threading.Thread(target=work, args=(index,)) for index in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    total = threads_count * per_thread
    assert tracker.counts() == SessionCounts(recorded=total, stopped=total // 2, expired=0, active=total // 2)
    clock.advance(60)
    assert tracker.counts() == SessionCounts(recorded=total, stopped=total // 2, expired=total // 2, active=0)


# --- settings ----------------------------------------------------------------------------------


def test_settings_defaults_are_the_documented_ones():
    assert asdict(Settings.from_env({})) == {
        "load_balancer_url": "http://127.0.0.1:5002",
        "max_amount_kw": 350.0,
        "max_session_seconds": 3600.0,
        "connect_timeout_seconds": 1.0,
        "request_timeout_seconds": 10.0,
        "health_timeout_seconds": 2.0,
        "max_queued": 1000,
        "queue_timeout_seconds": 300.0,
        "queue_retry_seconds": 1.0,
        "admin_token": "",
        "public_api_auth": "keys",
        "max_client_keys": 1000,
        "rate_limit_per_vehicle": "2/second;30/minute",
        "rate_limit_per_client": "",
        "rate_limit_storage_uri": "bounded-memory://",
        "state_dir": "",
        "state_full_sync": False,
        "database_url": "",
        "finished_retention_days": 90.0,
        "finished_kept": 1_000_000,
        "reconcile_seconds": 30.0,
        "gateway_url": "",
        "prometheus_url": "",
        "console_max_streams": 4,
        "log_level": "info",
        "log_sampling": {"burst_per_second": 20, "every": 100},
    }


def test_several_load_balancers_are_listed_in_order():
    settings = Settings.from_env({"LOAD_BALANCER_URL": "http://lb-1:5002/, http://lb-2:5003"})
    assert settings.load_balancer_urls == ("http://lb-1:5002", "http://lb-2:5003")


def test_settings_read_from_the_environment():
    settings = Settings.from_env(
        {
            "LOAD_BALANCER_URL": "http://load_balancer:5002/",
            "MAX_AMOUNT_KW": "150",
            "MAX_SESSION_SECONDS": "600",
            "CONNECT_TIMEOUT_SECONDS": "0.5",
            "REQUEST_TIMEOUT_SECONDS": "3",
            "HEALTH_TIMEOUT_SECONDS": "1",
            "LOG_LEVEL": "WARNING",
        }
    )
    assert settings == Settings(
        load_balancer_url="http://load_balancer:5002",
        max_amount_kw=150.0,
        max_session_seconds=600.0,
        connect_timeout_seconds=0.5,
        request_timeout_seconds=3.0,
        health_timeout_seconds=1.0,
        log_level="warning",
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LOAD_BALANCER_URL", "load_balancer:5002"),
        ("LOAD_BALANCER_URL", "ftp://load_balancer"),
        ("MAX_AMOUNT_KW", "lots"),
        ("MAX_AMOUNT_KW", "0"),
        ("REQUEST_TIMEOUT_SECONDS", "0"),
        ("CONNECT_TIMEOUT_SECONDS", "nan"),
        ("LOG_LEVEL", "chatty"),
        ("RATE_LIMIT_PER_VEHICLE", "often"),
        ("STATE_SYNC", "sometimes"),
        ("MAX_QUEUED", "-1"),
        ("DATABASE_URL", "mysql://charge@db/charge"),
        ("DATABASE_URL", "charge.sqlite3"),
        ("FINISHED_RETENTION_DAYS", "0"),
        ("FINISHED_KEPT", "0"),
    ],
)
def test_bad_setting_is_refused_naming_the_variable(name, value):
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})
