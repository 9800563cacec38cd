"""Leased sessions, changes of a session's amount and minimum, and watching the state: the ledger itself.

What OCPP's central system (the gateway) relies on: a leased session charges until it is
stopped or its lease lapses unrenewed; a change re-allocates at once without the sum of the
allocations ever passing the limit; ``state_version`` grows with every change of anyone's
allocation, and a watcher hears of it at once. Plain Python with a clock the tests move,
and the real SQLite store for restarts and the migration of an older file.
"""
from __future__ import annotations

import json
import math
import random
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from gridcommon.settings import SettingsError
from gridcommon.validation import ValidationError
from substation_service.allocation import AllocationPolicy
from substation_service.config import Settings
from substation_service.ledger import (
    AMOUNT_CHANGES_KEPT,
    CapacityExceeded,
    Ledger,
    SessionState,
    TooManyChanges,
    UnknownSession,
    steady_wall_clock,
)
from substation_service.peering.power import LocalPower, parse_profile
from substation_service.store import LedgerStore
from tests.substation_support import FakeClock

ID = "substation-l"
FAIR = AllocationPolicy.FAIR_SHARE
STRICT = AllocationPolicy.STRICT
THREE_PHASE_MINIMUM_KW = 6 * 3 * 230 / 1000  # 4.14 kW: 6 A on three phases at 230 V


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def allocations(ledger: Ledger) -> dict[str, float]:
    _, reports = ledger.reports()
    return {report.session.session_id: report.allocated_kw for report in reports}


def energy_of(history: tuple[tuple[float, float], ...], until: float) -> float:
    """kWh of an allocation history ``((time, kW), ...)`` up to ``until``, summed independently of the ledger."""
    points = [*history, (until, 0.0)]
    return sum(kw * (points[index + 1][0] - at) for index, (at, kw) in enumerate(points[:-1])) / 3600.0


# ----- leases ---------------------------------------------------------------------------------


def test_a_leased_session_charges_past_any_duration_while_renewed(clock: FakeClock) -> None:
    ledger = Ledger(100.0, 60.0, clock=clock, policy=FAIR)
    admission = ledger.admit("ev-1", 11.0, session_id="tx-1", lease_seconds=30.0)
    report = admission.report
    assert report.session.ends_at is None and report.session.duration_seconds is None
    assert report.remaining_seconds is None
    assert report.lease_seconds == 30.0 and report.lease_expires_at == clock.now + 30.0

    for _ in range(20):  # 200 s: more than three default durations
        clock.advance(10)
        assert ledger.renew(["tx-1"], 30.0) == (["tx-1"], [])
    report = ledger.session("tx-1")
    assert report.state is SessionState.CHARGING
    assert report.lease_expires_at == clock.now + 30.0
    assert report.energy_kwh == pytest.approx(11.0 * 200 / 3600)


def test_an_unrenewed_lease_ends_the_session_at_its_expiry(clock: FakeClock) -> None:
    ledger = Ledger(100.0, 60.0, clock=clock, policy=FAIR)
    started = clock.now
    ledger.admit("ev-1", 11.0, session_id="tx-1", lease_seconds=30.0)
    clock.advance(20)
    ledger.renew(["tx-1"], 30.0)  # now lapses at started + 50; the entry for started + 30 is stale
    clock.advance(29.999)
    assert ledger.session("tx-1").state is SessionState.CHARGING  # the stale end was skipped
    version = ledger.snapshot().state_version
    clock.advance(100)

    report = ledger.session("tx-1")
    assert report.state is SessionState.ENDED
    assert report.end_reason == "lease_expired"
    assert report.ended_at == started + 50
    assert report.history[-1] == (started + 50, 0.0)
    assert report.energy_kwh == pytest.approx(11.0 * 50 / 3600)
    snapshot = ledger.snapshot()
    assert snapshot.state_version > version
    assert (snapshot.load_kw, snapshot.leased, snapshot.leases_expired) == (0.0, 0, 1)


def test_renewal_answers_which_ids_are_no_active_leased_session(clock: FakeClock) -> None:
    ledger = Ledger(100.0, 60.0, clock=clock, policy=FAIR)
    ledger.admit("ev-1", 11.0, session_id="leased", lease_seconds=10.0)
    ledger.admit("ev-2", 11.0, session_id="stopped", lease_seconds=10.0)
    ledger.admit("ev-3", 11.0, session_id="lapsing", lease_seconds=5.0)
    ledger.admit("ev-4", 11.0, session_id="fixed", duration_seconds=100.0)
    ledger.release("stopped")
    clock.advance(6)  # "lapsing" lapsed a second ago
    version = ledger.snapshot().state_version

    renewed, unknown = ledger.renew(["leased", "stopped", "lapsing", "fixed", "never", "leased"], 20.0)

    assert renewed == ["leased"]
    assert unknown == ["stopped", "lapsing", "fixed", "never"]
    assert ledger.snapshot().state_version == version  # nobody's allocation changed
    assert ledger.session("leased").lease_expires_at == clock.now + 20.0


def test_renewals_do_not_pile_up_ends(clock: FakeClock) -> None:
    ledger = Ledger(100.0, 60.0, clock=clock, policy=FAIR)
    ids = [f"tx-{number}" for number in range(10)]
    for key in ids:
        ledger.admit(key, 5.0, session_id=key, lease_seconds=600.0)
    for _ in range(1000):
        clock.advance(0.01)
        ledger.renew(ids, 600.0)
    assert len(ledger._ends) <= 2 * len(ids) + 64 + len(ids)


def test_a_replayed_admission_renews_the_lease_and_admits_nothing_new(clock: FakeClock) -> None:
    ledger = Ledger(100.0, 60.0, clock=clock, policy=FAIR)
    ledger.admit("ev-1", 11.0, session_id="tx-1", lease_seconds=30.0)
    clock.advance(25)
    replay = ledger.admit("ev-1", 11.0, session_id="tx-1", lease_seconds=30.0)
    assert replay.replayed and replay.report.lease_expires_at == clock.now + 30.0
    assert ledger.snapshot().active_chargers == 1


def test_a_lease_and_a_duration_exclude_each_other(clock: FakeClock) -> None:
    ledger = Ledger(100.0, 60.0, clock=clock)
    with pytest.raises(ValueError, match="not both"):
        ledger.admit("ev-1", 11.0, duration_seconds=10.0, lease_seconds=10.0)


# ----- a session's own minimum ------------------------------------------------------------------


def test_a_sessions_own_minimum_is_kept_and_admission_counts_it(clock: FakeClock) -> None:
    ledger = Ledger(10.0, 60.0, clock=clock, policy=FAIR, min_charge_kw=1.4)
    ledger.admit("ev-1", 11.0, session_id="a", minimum_kw=THREE_PHASE_MINIMUM_KW, lease_seconds=60.0)
    ledger.admit("ev-2", 11.0, session_id="b", minimum_kw=THREE_PHASE_MINIMUM_KW, lease_seconds=60.0)
    assert ledger.session("a").minimum_kw == pytest.approx(4.14)
    assert sorted(allocations(ledger).values()) == [5.0, 5.0]
    # 2 x 4.14 = 8.28 of 10 kW are promised: 1.72 kW is left, a 1.4 kW minimum fits, another 4.14 does not.
    with pytest.raises(CapacityExceeded):
        ledger.admit("ev-3", 11.0, minimum_kw=THREE_PHASE_MINIMUM_KW)
    ledger.admit("ev-4", 11.0, session_id="c")
    shares = allocations(ledger)
    assert shares["a"] >= 4.14 and shares["b"] >= 4.14 and shares["c"] >= 1.4
    assert sum(shares.values()) <= 10.0


@pytest.mark.parametrize("minimum_kw", [1.0, 12.0, math.nan, math.inf])
def test_a_minimum_out_of_bounds_is_refused_naming_the_field(clock: FakeClock, minimum_kw: float) -> None:
    ledger = Ledger(100.0, 60.0, clock=clock, policy=FAIR, min_charge_kw=1.4)
    with pytest.raises(ValidationError) as refused:
        ledger.admit("ev-1", 11.0, minimum_kw=minimum_kw)
    assert refused.value.field == "minimum_kw"
    assert ledger.snapshot().active_chargers == 0


def test_under_strict_the_minimum_is_the_whole_amount(clock: FakeClock) -> None:
    ledger = Ledger(100.0, 60.0, clock=clock, policy=STRICT)
    assert ledger.admit("ev-1", 11.0, minimum_kw=4.14).report.minimum_kw == 11.0


def test_a_policy_switch_keeps_each_sessions_own_minimum(clock: FakeClock) -> None:
    ledger = Ledger(100.0, 60.0, clock=clock, policy=FAIR)
    ledger.admit("ev-1", 11.0, session_id="a", minimum_kw=4.14)
    ledger.set_policy(STRICT)
    assert ledger.session("a").minimum_kw == 11.0
    ledger.set_policy(FAIR)
    assert ledger.session("a").minimum_kw == 4.14


# ----- changes ------------------------------------------------------------------------------------


def test_a_lower_amount_frees_power_for_the_others_at_once(clock: FakeClock) -> None:
    ledger = Ledger(30.0, 60.0, clock=clock, policy=FAIR)
    started = clock.now
    for key in ("a", "b", "c"):
        ledger.admit(f"ev-{key}", 22.0, session_id=key, lease_seconds=600.0)
    assert allocations(ledger) == {"a": 10.0, "b": 10.0, "c": 10.0}
    version = ledger.snapshot().state_version
    clock.advance(60)

    change = ledger.change("a", amount_kw=4.0)  # a vehicle tapering near full

    assert change.report.session.amount_kw == 4.0 and change.report.allocated_kw == 4.0
    assert allocations(ledger) == {"a": 4.0, "b": 13.0, "c": 13.0}
    assert change.snapshot.state_version > version
    assert change.snapshot.requested_kw == 48.0
    clock.advance(60)
    history = ledger.session("a").history
    assert history == ((started, 10.0), (started + 60, 4.0))
    assert ledger.session("a").energy_kwh == pytest.approx(energy_of(history, clock.now))
    assert ledger.session("b").history == ((started, 10.0), (started + 60, 13.0))


def test_an_amount_below_its_minimum_takes_the_minimum_down_with_it(clock: FakeClock) -> None:
    ledger = Ledger(30.0, 60.0, clock=clock, policy=FAIR)
    ledger.admit("ev-1", 11.0, session_id="a", minimum_kw=4.14)
    report = ledger.change("a", amount_kw=2.0).report
    assert (report.allocated_kw, report.minimum_kw) == (2.0, 2.0)
    report = ledger.change("a", amount_kw=11.0).report  # its own minimum holds again
    assert report.minimum_kw == 4.14


def test_a_raised_minimum_that_does_not_fit_changes_nothing(clock: FakeClock) -> None:
    ledger = Ledger(10.0, 60.0, clock=clock, policy=FAIR)
    for key in ("a", "b"):
        ledger.admit(f"ev-{key}", 11.0, session_id=key, minimum_kw=4.14)
    version = ledger.snapshot().state_version
    with pytest.raises(CapacityExceeded, match="nothing was changed"):
        ledger.change("a", minimum_kw=6.0)
    with pytest.raises(ValidationError) as refused:
        ledger.change("a", minimum_kw=12.0)  # above its amount
    assert refused.value.field == "minimum_kw"
    assert ledger.session("a").minimum_kw == 4.14
    assert ledger.snapshot().state_version == version
    assert ledger.change("a", minimum_kw=5.5).report.minimum_kw == 5.5  # 5.5 + 4.14 fits in 10


def test_a_lowered_minimum_lets_a_suspended_session_resume(clock: FakeClock) -> None:
    ledger = Ledger(10.0, 60.0, clock=clock, policy=FAIR)
    ledger.admit("ev-a", 11.0, session_id="a", minimum_kw=4.5)
    ledger.admit("ev-b", 11.0, session_id="b", minimum_kw=4.5)
    ledger.set_operator_limit(8.0)  # 9 kW of minimums do not fit: the newest is suspended
    assert ledger.session("b").state is SessionState.SUSPENDED
    ledger.change("a", minimum_kw=3.0)
    assert ledger.session("b").state is SessionState.CHARGING
    assert sum(allocations(ledger).values()) <= 8.0


def test_raising_the_amount_under_strict_needs_room(clock: FakeClock) -> None:
    ledger = Ledger(30.0, 60.0, clock=clock, policy=STRICT)
    ledger.admit("ev-a", 10.0, session_id="a")
    ledger.admit("ev-b", 10.0, session_id="b")
    assert ledger.change("a", amount_kw=20.0).report.allocated_kw == 20.0
    with pytest.raises(CapacityExceeded):
        ledger.change("b", amount_kw=11.0)
    assert allocations(ledger) == {"a": 20.0, "b": 10.0}


def test_changing_an_unknown_or_ended_session_is_refused(clock: FakeClock) -> None:
    ledger = Ledger(30.0, 60.0, clock=clock)
    ledger.admit("ev-a", 10.0, session_id="a", duration_seconds=5.0)
    clock.advance(6)
    for key in ("a", "never"):
        with pytest.raises(UnknownSession):
            ledger.change(key, amount_kw=5.0)


def test_a_session_changed_too_often_is_refused(clock: FakeClock) -> None:
    ledger = Ledger(30.0, 60.0, clock=clock, policy=FAIR)
    ledger.admit("ev-a", 10.0, session_id="a", lease_seconds=600.0)
    for number in range(AMOUNT_CHANGES_KEPT - 1):
        ledger.change("a", amount_kw=5.0 + number % 2)
    with pytest.raises(TooManyChanges):
        ledger.change("a", amount_kw=7.0)


# ----- state_version: every change of anyone's allocation -------------------------------------------


def test_every_change_of_an_allocation_moves_the_state_version(clock: FakeClock) -> None:
    """A random run through every path that can change an allocation, checked from the reports alone."""
    power = LocalPower(profile=parse_profile("0:0,6:20,12:5,18:0", day_seconds=120.0))
    ledger = Ledger(30.0, 20.0, clock=clock, power=power, policy=FAIR, min_charge_kw=1.4)
    rng = random.Random(7)
    seen_paths: set[str] = set()
    before_state = (allocations(ledger), ledger.snapshot())
    for step in range(1500):
        action = rng.choice(["admit", "admit_leased", "release", "change", "renew", "operator", "peer",
                             "policy", "time"])
        active = list(before_state[0])
        try:
            if action == "admit":
                ledger.admit(f"ev-{step}", rng.choice([3.0, 7.0, 11.0, 22.0]), duration_seconds=rng.uniform(1, 30))
            elif action == "admit_leased":
                ledger.admit(f"ev-{step}", rng.choice([7.0, 11.0]), lease_seconds=rng.uniform(5, 15),
                             minimum_kw=rng.choice([None, 1.4, 4.14]))
            elif action == "release" and active:
                ledger.release(rng.choice(active))
            elif action == "change" and active:
                ledger.change(rng.choice(active), amount_kw=rng.choice([2.0, 5.0, 11.0, 22.0]),
                              minimum_kw=rng.choice([None, 1.4]))
            elif action == "renew" and active:
                ledger.renew(rng.sample(active, k=max(1, len(active) // 2)), rng.uniform(5, 15))
            elif action == "operator":
                ledger.set_operator_limit(rng.choice([None, None, 10.0, 25.0, 4.0]))
            elif action == "peer":
                ledger.set_peer_kw(rng.choice([0.0, -8.0, 6.0]))
            elif action == "policy":
                ledger.set_policy(rng.choice([FAIR, FAIR, STRICT]))
            else:
                clock.advance(rng.uniform(0, 6))
        except (CapacityExceeded, ValidationError):
            pass
        snapshot, reports = ledger.reports()
        after = {report.session.session_id: report.allocated_kw for report in reports}
        assert sum(after.values()) <= snapshot.limit_kw + 1e-9, (step, action)
        for report in reports:
            if report.state is SessionState.CHARGING:
                assert report.minimum_kw - 1e-9 <= report.allocated_kw <= report.session.amount_kw, (step, report)
        if any(report.state is SessionState.CHARGING and report.allocated_kw < report.session.amount_kw
               for report in reports):
            # Work-conserving: nobody is curtailed while power is left (a few mW of rounding aside).
            assert snapshot.limit_kw - sum(after.values()) < 1e-5 * max(1, len(reports)), (step, action)
        before, before_snapshot = before_state
        if after != before or snapshot.limit_kw != before_snapshot.limit_kw:
            assert snapshot.state_version > before_snapshot.state_version, (step, action, before, after)
            seen_paths.add(action)
        before_state = (after, snapshot)
    # Every path that can change an allocation did so at least once in the run.
    assert seen_paths >= {"admit", "admit_leased", "release", "change", "operator", "peer", "policy", "time"}


@pytest.mark.parametrize("path", ["generation step", "peer power", "operator limit", "policy switch",
                                  "suspension", "lease lapse"])
def test_each_path_that_moves_the_limit_or_the_sharing_moves_the_state_version(clock: FakeClock, path: str) -> None:
    power = LocalPower(profile=parse_profile("0:0,12:10", day_seconds=240.0))  # +10 kW from 120 s of each 240 s
    clock.now = 1_800_000_000.0 - 1_800_000_000.0 % 240.0 + 10.0  # 10 s into a day of the profile
    ledger = Ledger(20.0, 60.0, clock=clock, power=power, policy=FAIR)
    ledger.admit("ev-a", 22.0, session_id="a", lease_seconds=600.0)
    ledger.admit("ev-b", 22.0, session_id="b", lease_seconds=30.0, minimum_kw=4.14)
    before, version = allocations(ledger), ledger.snapshot().state_version
    assert before == {"a": 10.0, "b": 10.0}
    if path == "generation step":
        for _ in range(4):
            clock.advance(25)
            ledger.renew(["b"], 30.0)  # keeps b; renewing alone changes no allocation
        assert ledger.snapshot().state_version == version
        clock.advance(15)  # past the step at 120 s
    elif path == "peer power":
        ledger.set_peer_kw(-6.0)
    elif path == "operator limit":
        ledger.set_operator_limit(12.0)
    elif path == "policy switch":
        ledger.set_policy(STRICT)
    elif path == "suspension":
        ledger.set_operator_limit(5.0)  # 1.4 + 4.14 kW of minimums do not fit: b is suspended
        assert ledger.session("b").state is SessionState.SUSPENDED
    else:
        clock.advance(31)
    assert allocations(ledger) != before
    assert ledger.snapshot().state_version > version


# ----- watching: wait_for_change ---------------------------------------------------------------------


def test_a_watcher_wakes_for_a_generation_step_with_nobody_else_calling() -> None:
    power = LocalPower(profile=parse_profile("0:0,12:10", day_seconds=1.0))  # a step every half second
    ledger = Ledger(10.0, 60.0, clock=steady_wall_clock(), power=power, policy=FAIR)
    admitted = ledger.admit("ev-1", 22.0, lease_seconds=60.0)
    started = time.monotonic()
    assert ledger.wait_for_change(admitted.snapshot.state_version, 5.0)
    assert time.monotonic() - started < 1.0
    assert ledger.reports()[1][0].allocated_kw != admitted.report.allocated_kw


def test_a_watcher_hears_of_a_change_made_by_another_thread_at_once() -> None:
    ledger = Ledger(30.0, 60.0, policy=FAIR)
    version = ledger.snapshot().state_version
    heard: list[float] = []

    def watch() -> None:
        assert ledger.wait_for_change(version, 10.0)
        heard.append(time.monotonic())

    watcher = threading.Thread(target=watch)
    watcher.start()
    time.sleep(0.2)
    assert not heard
    changed_at = time.monotonic()
    ledger.admit("ev-1", 11.0)
    watcher.join(5)
    assert heard and heard[0] - changed_at < 0.1


def test_a_watcher_gives_up_after_its_wait_when_nothing_changes() -> None:
    ledger = Ledger(30.0, 60.0, policy=FAIR)
    ledger.admit("ev-1", 11.0, lease_seconds=60.0)
    version = ledger.snapshot().state_version
    started = time.monotonic()
    assert not ledger.wait_for_change(version, 0.5)
    assert 0.5 <= time.monotonic() - started < 0.7
    assert ledger.wait_for_change(version - 1, 10.0)  # already past: at once


def test_a_watcher_wakes_for_a_lapsing_lease_with_nobody_else_calling() -> None:
    clock = steady_wall_clock()
    ledger = Ledger(30.0, 60.0, clock=clock, policy=FAIR)
    admitted = ledger.admit("ev-1", 11.0, session_id="tx-1", lease_seconds=0.3)
    expires_at = admitted.report.lease_expires_at
    version = admitted.snapshot.state_version
    assert ledger.wait_for_change(version, 5.0)
    # At the lease's end, not at the wait's 5 s (the margin is for a loaded machine's thread wake-up).
    woke_late = clock() - expires_at
    assert 0 <= woke_late < 0.5
    ended = ledger.session("tx-1")
    assert (ended.end_reason, ended.ended_at) == ("lease_expired", expires_at)


# ----- the store: restarts and the older schema ---------------------------------------------------


def open_ledger(path: Path, clock: FakeClock, **options) -> Ledger:
    return Ledger(20.0, 60.0, clock=clock, store=LedgerStore(path, ID), substation_id=ID, policy=FAIR, **options)


def test_a_leased_session_survives_a_restart_and_its_lease_runs_from_the_restart(tmp_path: Path) -> None:
    path, clock = tmp_path / "ledger.sqlite3", FakeClock()
    before = open_ledger(path, clock)
    started = clock.now
    before.admit("ev-1", 11.0, session_id="tx-1", lease_seconds=30.0, minimum_kw=4.14)
    before.admit("ev-2", 11.0, session_id="tx-2", lease_seconds=30.0)
    clock.advance(10)
    before.change("tx-1", amount_kw=6.0)
    history = before.session("tx-1").history
    clock.advance(50)  # down past both leases: they run again from the restart

    after = open_ledger(path, clock)

    restarted = clock.now
    report = after.session("tx-1")
    assert report.state is SessionState.CHARGING
    assert (report.session.amount_kw, report.minimum_kw, report.lease_seconds) == (6.0, 4.14, 30.0)
    assert report.lease_expires_at == restarted + 30.0
    assert report.history == history
    assert report.energy_kwh == pytest.approx(energy_of(history, clock.now))
    assert after.snapshot().leased == 2
    assert after.admit("ev-1", 11.0, session_id="tx-1", lease_seconds=30.0).replayed  # the admitted amount
    clock.advance(20)
    assert after.renew(["tx-1"], 30.0) == (["tx-1"], [])
    clock.advance(15)  # tx-2 was not renewed: it lapses 30 s after the restart
    ended = after.session("tx-2")
    assert (ended.end_reason, ended.ended_at) == ("lease_expired", restarted + 30.0)
    assert after.session("tx-1").state is SessionState.CHARGING
    assert started < restarted


# The substation's state file as schema 1 wrote it, before leases.
SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE sessions (
    session_id TEXT PRIMARY KEY, vehicle_id TEXT NOT NULL, amount_kw REAL NOT NULL, started_at REAL NOT NULL,
    ends_at REAL NOT NULL, admitted INTEGER NOT NULL, start_position INTEGER NOT NULL, state_changes TEXT NOT NULL,
    ended_at REAL, report TEXT
);
CREATE INDEX sessions_by_end ON sessions (ended_at);
CREATE TABLE levels (position INTEGER PRIMARY KEY, at REAL NOT NULL, level_mw INTEGER);
CREATE TABLE limits (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, limit_kw REAL NOT NULL,
                     source TEXT NOT NULL);
CREATE TABLE retired (session_id TEXT PRIMARY KEY, forget_at REAL NOT NULL);
"""


def write_schema_1_file(path: Path, at: float) -> None:
    """One active session (8 kW since ``at``, 100 s) and one ended, as schema 1 kept them."""
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_1)
    meta = {"schema_version": 1, "substation_id": ID, "state_version": 5, "time": at, "energy_mws": 0.0,
            "admitted": 2, "operator_limit_kw": None, "peer_kw": 0.0}
    ended = {"session_id": "old", "vehicle_id": "ev-0", "amount_kw": 5.0, "started_at": at - 50, "ends_at": at - 40,
             "minimum_kw": 1.4, "energy_kwh": 5.0 * 10 / 3600, "suspended_seconds": 0.0,
             "history": [[at - 50, 5.0], [at - 40, 0.0]], "ended_at": at - 40, "end_reason": "completed"}
    db.executescript("BEGIN")
    db.execute("INSERT INTO meta VALUES ('state', ?)", (json.dumps(meta),))
    db.execute("INSERT INTO sessions VALUES ('old', 'ev-0', 5.0, ?, ?, 1, 0, ?, ?, ?)",
               (at - 50, at - 40, json.dumps([[at - 50, True]]), at - 40, json.dumps(ended)))
    db.execute("INSERT INTO sessions VALUES ('s-1', 'ev-1', 8.0, ?, ?, 2, 1, ?, NULL, NULL)",
               (at, at + 100, json.dumps([[at, True]])))
    db.execute("INSERT INTO levels VALUES (1, ?, NULL)", (at,))
    db.execute("INSERT INTO limits (at, limit_kw, source) VALUES (?, 20.0, 'substation')", (at - 60,))
    db.commit()
    db.close()


def test_a_file_of_schema_1_is_migrated_and_keeps_every_session(tmp_path: Path) -> None:
    path, clock = tmp_path / "ledger.sqlite3", FakeClock()
    at = clock.now
    write_schema_1_file(path, at)
    clock.advance(10)

    ledger = open_ledger(path, clock)

    report = ledger.session("s-1")
    assert (report.state, report.session.amount_kw, report.session.ends_at) == (SessionState.CHARGING, 8.0, at + 100)
    assert report.history == ((at, 8.0),)
    assert report.remaining_seconds == pytest.approx(90.0)
    old = ledger.session("old")
    assert (old.end_reason, old.lease_seconds, old.remaining_seconds) == ("completed", None, 0.0)
    ledger.admit("ev-2", 5.0, session_id="tx-1", lease_seconds=30.0, minimum_kw=4.14)
    ledger.change("s-1", amount_kw=6.0)
    db = sqlite3.connect(path)
    columns = {row[1]: row for row in db.execute("PRAGMA table_info(sessions)")}
    assert {"lease_seconds", "minimum_kw", "amounts"} <= set(columns)
    assert columns["ends_at"][3] == 0  # nullable: a leased session has no end
    assert json.loads(db.execute("SELECT value FROM meta").fetchone()[0])["schema_version"] == 3
    db.close()

    again = open_ledger(path, clock)
    assert again.session("tx-1").lease_seconds == 30.0 and again.session("tx-1").minimum_kw == 4.14
    assert again.session("s-1").history == ((at, 8.0), (at + 10, 6.0))


def test_long_polls_must_leave_server_threads_free() -> None:
    assert Settings.from_env({}).max_long_polls == 4
    assert Settings.from_env({"THREADS": "32", "MAX_LONG_POLLS": "16"}).max_long_polls == 16
    with pytest.raises(SettingsError, match="MAX_LONG_POLLS .16. must be below THREADS .16."):
        Settings.from_env({"MAX_LONG_POLLS": "16"})
