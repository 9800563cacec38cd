"""Unit tests of the substation's admission ledger (no web framework, no processes).

Most run under ``strict`` allocation, where a session gets its whole amount or
is refused: the admission rules, expiry, ids and state versions they check
hold under both policies. Sharing under ``fair_share`` is tested in
test_substation_allocation.py.
"""
from __future__ import annotations

import itertools
import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from substation_service.allocation import AllocationPolicy
from substation_service.ledger import (
    CapacityExceeded,
    DeadlinePassed,
    Ledger,
    Session,
    SessionIdInUse,
    SessionIdRetired,
    UnknownSession,
    steady_wall_clock,
)
from substation_service.peering.power import LocalPower
from tests.substation_support import FakeClock, max_overlapping_load


class FinishedSessions:
    """Records what the ledger reports through ``on_session_finished``."""

    def __init__(self) -> None:
        self.entries: list[tuple[Session, float]] = []

    def __call__(self, session: Session, charged_seconds: float) -> None:
        self.entries.append((session, charged_seconds))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def finished() -> FinishedSessions:
    return FinishedSessions()


@pytest.fixture
def ledger(clock: FakeClock, finished: FinishedSessions) -> Ledger:
    return Ledger(100.0, 60.0, clock=clock, on_session_finished=finished, policy=STRICT)


STRICT = AllocationPolicy.STRICT


def test_admits_up_to_exactly_the_capacity(ledger: Ledger) -> None:
    ledger.admit("ev-1", 60.0)
    admission = ledger.admit("ev-2", 40.0)

    assert admission.snapshot.load_kw == 100.0
    assert admission.snapshot.available_kw == 0.0
    assert admission.snapshot.load_percentage == 100.0
    assert admission.snapshot.active_chargers == 2


def test_rejects_the_smallest_amount_past_capacity(ledger: Ledger) -> None:
    ledger.admit("ev-1", 100.0)

    with pytest.raises(CapacityExceeded) as rejected:
        ledger.admit("ev-2", 0.001)

    assert rejected.value.amount_kw == 0.001
    assert rejected.value.snapshot.load_kw == 100.0
    assert ledger.snapshot().active_chargers == 1


def test_rejection_changes_nothing(ledger: Ledger) -> None:
    ledger.admit("ev-1", 70.0)
    before = ledger.snapshot()

    with pytest.raises(CapacityExceeded):
        ledger.admit("ev-2", 31.0)
    with pytest.raises(CapacityExceeded):
        ledger.admit("ev-3", 101.0)

    after = ledger.snapshot()
    assert (after.load_kw, after.active_chargers, after.state_version) == (
        before.load_kw,
        before.active_chargers,
        before.state_version,
    )


def test_amounts_are_summed_exactly_not_in_binary_rounding(clock: FakeClock) -> None:
    # 0.1 + 0.1 + 0.1 is 0.30000000000000004 in floats; in the ledger's whole milliwatts it is 0.3.
    ledger = Ledger(0.3, 60.0, clock=clock, policy=STRICT)
    for vehicle in ("ev-1", "ev-2", "ev-3"):
        ledger.admit(vehicle, 0.1)

    assert ledger.snapshot().load_kw == 0.3
    with pytest.raises(CapacityExceeded):
        ledger.admit("ev-4", 0.001)


def test_session_counts_until_just_before_ends_at(ledger: Ledger, clock: FakeClock) -> None:
    session = ledger.admit("ev-1", 30.0, duration_seconds=10.0).session
    assert session.ends_at == session.started_at + 10.0

    clock.advance(9.999)
    assert ledger.snapshot().load_kw == 30.0

    clock.advance(0.001)
    snapshot = ledger.snapshot()
    assert snapshot.load_kw == 0.0
    assert snapshot.active_chargers == 0
    assert ledger.sessions() == []


def test_expired_session_frees_its_power_for_the_next_admission(ledger: Ledger, clock: FakeClock) -> None:
    ledger.admit("ev-1", 100.0, duration_seconds=5.0)
    with pytest.raises(CapacityExceeded):
        ledger.admit("ev-2", 100.0)

    clock.advance(5.0)

    assert ledger.admit("ev-2", 100.0).snapshot.load_kw == 100.0


def test_expiry_reports_the_full_duration(ledger: Ledger, clock: FakeClock, finished: FinishedSessions) -> None:
    session = ledger.admit("ev-1", 30.0, duration_seconds=10.0).session
    clock.advance(25.0)

    ledger.sessions()

    assert finished.entries == [(session, 10.0)]


def test_default_duration_applies_when_none_is_asked(ledger: Ledger) -> None:
    assert ledger.admit("ev-1", 10.0).session.duration_seconds == 60.0


def test_stop_early_frees_power_and_reports_time_charged(
    ledger: Ledger, clock: FakeClock, finished: FinishedSessions
) -> None:
    session = ledger.admit("ev-1", 80.0, duration_seconds=60.0).session
    ledger.admit("ev-2", 20.0)
    clock.advance(3.5)

    release = ledger.release(session.session_id)

    assert release.session == session
    assert release.ended_at == session.started_at + 3.5
    assert release.snapshot.load_kw == 20.0
    assert finished.entries == [(session, 3.5)]
    assert ledger.admit("ev-3", 80.0).snapshot.load_kw == 100.0


def test_stopping_an_unknown_or_ended_session_fails(ledger: Ledger, clock: FakeClock) -> None:
    stopped = ledger.admit("ev-1", 10.0).session
    expired = ledger.admit("ev-2", 10.0, duration_seconds=1.0).session
    ledger.release(stopped.session_id)
    clock.advance(1.0)

    for session_id in (stopped.session_id, expired.session_id, "no-such-session"):
        with pytest.raises(UnknownSession):
            ledger.release(session_id)


def test_a_stopped_session_is_not_reported_again_when_its_time_comes(
    ledger: Ledger, clock: FakeClock, finished: FinishedSessions
) -> None:
    session = ledger.admit("ev-1", 10.0, duration_seconds=10.0).session
    ledger.release(session.session_id)
    clock.advance(20.0)

    ledger.snapshot()

    assert len(finished.entries) == 1


def test_state_version_grows_with_every_change_and_only_then(ledger: Ledger, clock: FakeClock) -> None:
    versions = [ledger.snapshot().state_version]
    first = ledger.admit("ev-1", 50.0, duration_seconds=10.0)
    versions.append(first.snapshot.state_version)
    versions.append(ledger.admit("ev-2", 50.0, duration_seconds=20.0).snapshot.state_version)
    with pytest.raises(CapacityExceeded) as rejected:
        ledger.admit("ev-3", 1.0)
    assert rejected.value.snapshot.state_version == versions[-1]
    assert ledger.snapshot().state_version == versions[-1]
    clock.advance(10.0)
    versions.append(ledger.snapshot().state_version)  # ev-1 expired
    versions.append(ledger.release(ledger.sessions()[0].session_id).snapshot.state_version)

    assert versions == sorted(set(versions))
    assert len(versions) == 5


def test_every_expiry_counts_as_a_change(ledger: Ledger, clock: FakeClock) -> None:
    for vehicle in ("ev-1", "ev-2", "ev-3"):
        ledger.admit(vehicle, 10.0, duration_seconds=5.0)
    before = ledger.snapshot().state_version
    clock.advance(5.0)

    assert ledger.snapshot().state_version == before + 3


def test_power_from_peers_raises_and_lowers_the_headroom(clock: FakeClock) -> None:
    ledger = Ledger(100.0, 60.0, clock=clock, policy=STRICT)
    ledger.set_peer_kw(20.0)

    admission = ledger.admit("ev-1", 120.0)
    assert admission.snapshot.limit_kw == 120.0
    assert admission.snapshot.total_capacity_kw == 100.0
    assert admission.snapshot.load_percentage == 100.0

    ledger.set_peer_kw(-30.0)
    snapshot = ledger.snapshot()
    assert snapshot.limit_kw == 70.0
    # Strict: the session no longer fits whole, so it is suspended rather than carried past the limit.
    assert (snapshot.load_kw, snapshot.suspended) == (0.0, 1)
    with pytest.raises(CapacityExceeded):
        ledger.admit("ev-2", 1.0)


def test_the_limit_counts_at_every_decision(clock: FakeClock) -> None:
    ledger = Ledger(50.0, 60.0, clock=clock, policy=STRICT)
    ledger.admit("ev-1", 50.0)
    with pytest.raises(CapacityExceeded):
        ledger.admit("ev-2", 25.0)

    ledger.set_peer_kw(25.0)

    assert ledger.admit("ev-2", 25.0).snapshot.load_kw == 75.0


def test_local_power_adds_to_the_transformer(clock: FakeClock) -> None:
    ledger = Ledger(100.0, 60.0, clock=clock, power=LocalPower(generation_kw=30.0, storage_kw=20.0), policy=STRICT)

    assert ledger.admit("ev-1", 150.0).snapshot.limit_kw == 150.0


@pytest.mark.parametrize("kw", [math.nan, math.inf])
def test_peer_power_that_is_not_a_number_is_refused(clock: FakeClock, kw: float) -> None:
    ledger = Ledger(100.0, 60.0, clock=clock)

    with pytest.raises(ValueError, match="finite"):
        ledger.set_peer_kw(kw)


def test_no_capacity_at_all_reads_as_full(clock: FakeClock) -> None:
    snapshot = Ledger(0.0, 60.0, clock=clock).snapshot()

    assert snapshot.load_percentage == 100.0
    assert snapshot.available_kw == 0.0


@pytest.mark.parametrize("amount", [0.0, -5.0, math.nan])
def test_amount_must_be_positive(ledger: Ledger, amount: float) -> None:
    with pytest.raises(ValueError):
        ledger.admit("ev-1", amount)


def test_retry_after_is_the_whole_seconds_until_the_earliest_end(ledger: Ledger, clock: FakeClock) -> None:
    assert ledger.snapshot().seconds_until_next_end() == 1  # nothing charging: nothing to wait for
    ledger.admit("ev-1", 10.0, duration_seconds=30.0)
    stopped = ledger.admit("ev-2", 10.0, duration_seconds=5.0).session
    ledger.admit("ev-3", 10.0, duration_seconds=12.5)

    assert ledger.snapshot().seconds_until_next_end() == 5
    ledger.release(stopped.session_id)
    assert ledger.snapshot().seconds_until_next_end() == 13
    clock.advance(12.2)
    assert ledger.snapshot().seconds_until_next_end() == 1


def test_sessions_are_listed_oldest_first(ledger: Ledger, clock: FakeClock) -> None:
    first = ledger.admit("ev-1", 10.0).session
    clock.advance(1.0)
    second = ledger.admit("ev-2", 10.0).session

    assert ledger.sessions() == [first, second]


def test_steady_wall_clock_follows_wall_time_and_never_goes_back() -> None:
    clock = steady_wall_clock()
    readings = [clock() for _ in range(1000)]

    assert readings == sorted(readings)
    assert abs(readings[-1] - time.time()) < 1.0


def test_concurrent_admissions_never_exceed_capacity() -> None:
    capacity = 100.0
    ticks = itertools.count()
    # Each reading of the clock is one millisecond later, so sessions expire while the threads race.
    ledger = Ledger(capacity, 0.05, clock=lambda: next(ticks) * 0.001, policy=STRICT)
    intervals: list[tuple[float, float, float]] = []
    intervals_lock = threading.Lock()
    start = threading.Barrier(8)
    rejections = []

    def hammer(seed: int) -> None:
        rng = random.Random(seed)
        start.wait()
        for _ in range(400):
            try:
                admission = ledger.admit(f"ev-{seed}", rng.choice([3.0, 7.5, 11.0, 22.0, 50.0]))
            except CapacityExceeded as rejection:
                rejections.append(rejection)
                continue
            assert admission.snapshot.load_kw <= capacity
            session = admission.session
            ended_at = session.ends_at
            if rng.random() < 0.2:
                try:
                    ended_at = ledger.release(session.session_id).ended_at
                except UnknownSession:
                    pass  # its time ran out first: it ended at ends_at
            with intervals_lock:
                intervals.append((session.started_at, ended_at, session.amount_kw))

    with ThreadPoolExecutor(max_workers=8) as pool:
        for worker in [pool.submit(hammer, seed) for seed in range(8)]:
            worker.result(timeout=30)  # re-raises a failed assertion of the worker

    assert rejections, "the threads asked for far more than the capacity, some must have been refused"
    assert math.fsum(amount for _, _, amount in intervals) > 10 * capacity  # sessions did come and go
    assert max_overlapping_load(intervals) <= capacity


operations = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.floats(0.5, 60.0), st.floats(0.5, 30.0)),
        st.tuples(st.just("stop"), st.integers(0, 50), st.just(0.0)),
        st.tuples(st.just("wait"), st.floats(0.0, 20.0), st.just(0.0)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(operations)
def test_ledger_agrees_with_a_plain_model(steps: list[tuple[str, float, float]]) -> None:
    """Any sequence of admissions, stops and waits: the ledger matches a list filtered by time."""
    clock = FakeClock()
    ledger = Ledger(100.0, 60.0, clock=clock, policy=STRICT)
    model: dict[str, Session] = {}
    admitted: list[str] = []
    for action, value, duration in steps:
        model = {key: s for key, s in model.items() if s.ends_at > clock.now}
        if action == "admit":
            fits = math.fsum([*(s.amount_kw for s in model.values()), value]) <= 100.0
            try:
                session = ledger.admit("ev", value, duration).session
            except CapacityExceeded:
                assert not fits
            else:
                assert fits
                model[session.session_id] = session
                admitted.append(session.session_id)
        elif action == "stop" and admitted:
            session_id = admitted[int(value) % len(admitted)]
            if session_id in model:
                ledger.release(session_id)
                del model[session_id]
            else:
                with pytest.raises(UnknownSession):
                    ledger.release(session_id)
        elif action == "wait":
            clock.advance(value)
        model = {key: s for key, s in model.items() if s.ends_at > clock.now}
        snapshot = ledger.snapshot()
        assert snapshot.load_kw == pytest.approx(math.fsum(s.amount_kw for s in model.values()))
        assert snapshot.load_kw <= 100.0
        assert {s.session_id for s in ledger.sessions()} == set(model)


def test_asking_again_with_an_active_session_id_admits_nothing_new(ledger: Ledger) -> None:
    first = ledger.admit("ev-1", 30.0, session_id="s-1")
    again = ledger.admit("ev-1", 30.0, session_id="s-1")

    assert first.session.session_id == "s-1"
    assert again.replayed and again.session == first.session
    assert again.snapshot.load_kw == 30.0
    assert again.snapshot.state_version == first.snapshot.state_version


def test_an_active_session_id_for_another_vehicle_is_refused(ledger: Ledger) -> None:
    ledger.admit("ev-1", 30.0, session_id="s-1")

    with pytest.raises(SessionIdInUse):
        ledger.admit("ev-2", 30.0, session_id="s-1")
    assert ledger.snapshot().load_kw == 30.0


def test_the_id_of_an_ended_or_stopped_session_is_not_admitted_again(ledger: Ledger, clock: FakeClock) -> None:
    ledger.admit("ev-1", 30.0, duration_seconds=10, session_id="ended")
    ledger.admit("ev-2", 30.0, session_id="stopped")
    ledger.release("stopped")
    clock.advance(10)

    for session_id in ("ended", "stopped"):
        with pytest.raises(SessionIdRetired):
            ledger.admit("ev-1", 30.0, session_id=session_id)
    assert ledger.snapshot().load_kw == 0.0


def test_a_request_arriving_after_its_stop_is_refused(ledger: Ledger) -> None:
    with pytest.raises(UnknownSession):
        ledger.release("not-yet-arrived")

    with pytest.raises(SessionIdRetired):
        ledger.admit("ev-1", 30.0, session_id="not-yet-arrived")
    assert ledger.snapshot().load_kw == 0.0


def test_retired_ids_are_forgotten_once_no_session_could_still_last(clock: FakeClock) -> None:
    ledger = Ledger(100.0, 60.0, clock=clock, retire_ids_for_seconds=600, policy=STRICT)
    with pytest.raises(UnknownSession):
        ledger.release("s-1")

    clock.advance(600)

    assert ledger.admit("ev-1", 30.0, session_id="s-1").session.session_id == "s-1"


def test_a_request_past_its_deadline_is_refused_and_admits_nothing(ledger: Ledger, clock: FakeClock) -> None:
    with pytest.raises(DeadlinePassed) as late:
        ledger.admit("ev-1", 30.0, session_id="late", deadline=clock.now - 0.5)

    assert late.value.late_seconds == pytest.approx(0.5)
    assert late.value.snapshot.load_kw == 0.0
    assert ledger.admit("ev-1", 30.0, session_id="in-time", deadline=clock.now + 0.001).session.amount_kw == 30.0


def test_a_stopped_session_is_refused_until_its_copies_deadline_then_by_the_deadline(
    ledger: Ledger, clock: FakeClock
) -> None:
    deadline = clock.now + 5
    ledger.admit("ev-1", 30.0, session_id="hedged", deadline=deadline)
    ledger.release("hedged")  # the balancer stops the copy it did not use

    clock.advance(4)  # a second copy held up on the way, still within its deadline
    with pytest.raises(SessionIdRetired):
        ledger.admit("ev-1", 30.0, session_id="hedged", deadline=deadline)
    clock.advance(2)
    with pytest.raises(DeadlinePassed):
        ledger.admit("ev-1", 30.0, session_id="hedged", deadline=deadline)
    assert ledger.snapshot().load_kw == 0.0


def test_a_copy_sent_without_deadline_keeps_the_id_retired_for_the_whole_window(clock: FakeClock) -> None:
    ledger = Ledger(100.0, 60.0, clock=clock, retire_ids_for_seconds=600, policy=STRICT)
    ledger.admit("ev-1", 30.0, session_id="mixed", deadline=clock.now + 5)
    assert ledger.admit("ev-1", 30.0, session_id="mixed").replayed  # a copy with no deadline at all
    ledger.release("mixed")

    clock.advance(599)
    with pytest.raises(SessionIdRetired):
        ledger.admit("ev-1", 30.0, session_id="mixed")

