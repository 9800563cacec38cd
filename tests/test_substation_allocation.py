"""Sharing a substation's limit: the allocator directly, and the ledger's records of it.

The properties are checked against plain references written here (a slow
water-filling, a sweep over the recorded histories), never against the
numbers the code under test reports about itself.
"""
from __future__ import annotations

import math
from collections import defaultdict

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from substation_service.allocation import (
    AllocationPolicy,
    ChargingSet,
    Member,
    minimum_mw,
    to_kw,
    to_mw,
)
from substation_service.ledger import CapacityExceeded, Ledger, SessionState
from substation_service.peering.power import LocalPower, parse_profile
from tests.substation_support import FakeClock

MIN_MW = 1_400_000


def reference_level(amounts: list[int], limit: int) -> int | None:
    """Water-filling by raising one level until the limit is used: slow, obviously right."""
    if sum(amounts) <= limit:
        return None
    low, high = 0, max(amounts)
    while low < high:  # the largest L with sum(min(L, a)) <= limit
        middle = (low + high + 1) // 2
        if sum(min(middle, a) for a in amounts) <= limit:
            low = middle
        else:
            high = middle - 1
    return low


@given(st.lists(st.integers(1, 50_000_000), min_size=1, max_size=60), st.lists(st.integers(0, 2_000_000_000), min_size=1, max_size=5))
def test_the_fair_level_is_the_water_filling_level(amounts: list[int], limits: list[int]) -> None:
    charging = ChargingSet()
    charging.fit(2_000_000_000)
    for index, amount in enumerate(amounts):
        charging.add(Member(f"s{index}", amount, 1, index))
    for limit in limits:  # the level follows a moving limit, from wherever it was
        charging.fit(limit)
        kept = [a for index, a in enumerate(amounts) if charging.is_charging(f"s{index}")]
        level = charging.level_mw
        assert level == reference_level(kept, limit)
        assert charging.allocated_mw == sum(a if level is None else min(level, a) for a in kept)


def check_set(charging: ChargingSet, members: dict[str, Member]) -> None:
    """Every property the allocation promises, from the members' own amounts and minimums."""
    allocations = {key: charging.allocation_of(key) for key in members}
    total = sum(allocations.values())
    assert charging.level_mw == reference_level(
        [m.amount_mw for k, m in members.items() if charging.is_charging(k)], charging.limit_mw
    )
    assert total == charging.allocated_mw
    assert total <= charging.limit_mw, "the sum of allocations passed the limit"
    active = [key for key in members if charging.is_charging(key)]
    for key in active:
        member = members[key]
        assert member.minimum_mw <= allocations[key] <= member.amount_mw
    for key in members.keys() - set(active):
        assert allocations[key] == 0
    curtailed = [key for key in active if allocations[key] < members[key].amount_mw]
    if curtailed:
        # Work-conserving: the limit is used up, up to one milliwatt per session for whole-number shares.
        assert charging.limit_mw - total < max(1, len(active))
        # Max-min fair: nobody curtailed gets less than anyone else gets.
        lowest_curtailed = min(allocations[key] for key in curtailed)
        assert all(allocations[key] <= lowest_curtailed for key in active)
    # The minimums of the charging sessions fit.
    assert sum(members[key].minimum_mw for key in active) <= charging.limit_mw


operations = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.integers(100_000, 30_000_000)),
        st.tuples(st.just("end"), st.integers(0, 200)),
        st.tuples(st.just("limit"), st.integers(0, 150_000_000)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(operations, st.sampled_from(list(AllocationPolicy)))
def test_every_change_keeps_the_allocation_within_its_promises(steps, policy: AllocationPolicy) -> None:
    charging = ChargingSet()
    charging.fit(100_000_000)
    members: dict[str, Member] = {}
    order = 0
    suspended_order: list[str] = []  # the reference of who was suspended first
    for step, value in steps:
        if step == "admit":
            minimum = minimum_mw(policy, value, MIN_MW)
            admits = charging.admits(minimum)
            assert admits == (
                charging.suspended_count == 0
                and sum(m.minimum_mw for k, m in members.items() if charging.is_charging(k)) + minimum
                <= charging.limit_mw
            )
            if admits:
                order += 1
                member = Member(f"s{order}", value, minimum, order)
                members[member.key] = member
                charging.add(member)
        elif step == "end" and members:
            key = sorted(members)[value % len(members)]
            del members[key]
            if key in suspended_order:
                suspended_order.remove(key)
            suspended, resumed = charging.remove(key)
            # Room freed by an end goes to the longest suspended first; nobody is suspended by it.
            assert suspended == [] and resumed == suspended_order[: len(resumed)]
            suspended_order = suspended_order[len(resumed):]
        else:
            newest_first = sorted((m.order for k, m in members.items() if charging.is_charging(k)), reverse=True)
            suspended, resumed = charging.fit(value)
            # Suspended: the most recently started first.
            assert [members[k].order for k in suspended] == newest_first[: len(suspended)]
            # Resumed: the longest suspended first.
            assert resumed == suspended_order[: len(resumed)]
            suspended_order = [k for k in suspended_order if k not in resumed] + suspended
        check_set(charging, members)


def test_strict_gives_the_whole_amount_or_nothing() -> None:
    charging = ChargingSet()
    charging.fit(to_mw(30))
    for index, kw in enumerate((11, 11), start=1):
        minimum = minimum_mw(AllocationPolicy.STRICT, to_mw(kw), MIN_MW)
        assert charging.admits(minimum)
        charging.add(Member(f"s{index}", to_mw(kw), minimum, index))
    assert not charging.admits(minimum_mw(AllocationPolicy.STRICT, to_mw(11), MIN_MW))
    assert charging.level_mw is None and charging.allocated_mw == to_mw(22)
    suspended, _ = charging.fit(to_mw(15))
    assert suspended == ["s2"] and charging.allocation_of("s1") == to_mw(11)


# ----- the ledger's records ---------------------------------------------------------------------


def history_violations(ledger: Ledger) -> list[tuple[float, float, float]]:
    """Sweep every session's allocation history against the limit history: (time, sum, limit) over it."""
    _, reports = ledger.reports(history=True, include_ended=True)
    changes: dict[float, list[tuple[str, float]]] = defaultdict(list)
    for report in reports:
        for at, kw in report.history or ():
            changes[at].append((report.session.session_id, kw))
    limits = ledger.limit_history()
    current: dict[str, float] = {}
    violations = []
    for at in sorted(changes.keys() | {t for t, _, _ in limits}):
        for key, kw in changes.get(at, []):
            current[key] = kw
        limit = [kw for t, kw, _ in limits if t <= at][-1]
        total = math.fsum(current.values())
        if total > limit + 1e-6:
            violations.append((at, total, limit))
    return violations


def test_rush_hour_serves_everyone_fairly_within_the_limit() -> None:
    clock = FakeClock()
    ledger = Ledger(80.0, 60.0, clock=clock)
    for index in range(50):
        ledger.admit(f"ev-{index}", 5.0 + index % 16)
        clock.advance(0.01)
    snapshot = ledger.snapshot()
    assert snapshot.charging == 50 and snapshot.suspended == 0
    assert snapshot.load_kw == pytest.approx(80.0, abs=1e-3)
    _, reports = ledger.reports()
    assert {round(r.allocated_kw, 3) for r in reports} == {1.6}
    assert history_violations(ledger) == []


def test_a_request_whose_minimum_does_not_fit_is_refused() -> None:
    clock = FakeClock()
    ledger = Ledger(5.0, 60.0, clock=clock, min_charge_kw=1.4)
    for index in range(3):
        ledger.admit(f"ev-{index}", 10.0)
    with pytest.raises(CapacityExceeded, match="minimum of 1.4 kW does not fit"):
        ledger.admit("ev-late", 10.0)


def test_an_operator_limit_suspends_the_newest_and_resumes_the_longest_suspended() -> None:
    clock = FakeClock()
    ledger = Ledger(10.0, 60.0, clock=clock, min_charge_kw=2.0)
    ids = [ledger.admit(f"ev-{index}", 5.0).session.session_id for index in range(5)]
    clock.advance(1)
    ledger.set_operator_limit(4.0)  # room for two minimums
    states = {r.session.session_id: r.state for r in ledger.reports()[1]}
    assert [states[i] for i in ids] == [SessionState.CHARGING] * 2 + [SessionState.SUSPENDED] * 3
    clock.advance(2)
    ledger.set_operator_limit(6.0)  # room for a third: the first suspended (ev-4, newest) comes back
    states = {r.session.session_id: r.state for r in ledger.reports()[1]}
    assert states[ids[4]] is SessionState.CHARGING and states[ids[2]] is SessionState.SUSPENDED
    clock.advance(1)
    ledger.set_operator_limit(None)
    report = ledger.session(ids[2])
    assert report.state is SessionState.CHARGING and report.suspended_seconds == pytest.approx(3.0)
    assert [kw for _, kw in report.history] == [2.0, 0.0, 2.0]
    assert history_violations(ledger) == []


def test_new_sessions_do_not_overtake_suspended_ones() -> None:
    clock = FakeClock()
    ledger = Ledger(10.0, 60.0, clock=clock, min_charge_kw=2.0)
    for index in range(5):
        ledger.admit(f"ev-{index}", 2.0)
    ledger.set_operator_limit(8.0)
    with pytest.raises(CapacityExceeded, match="suspended and come first"):
        ledger.admit("ev-new", 1.0)


def test_a_generation_step_applies_at_its_own_time_not_when_someone_looks() -> None:
    clock = FakeClock(start=0.0)
    # A "day" of 240 s: 12 kW until hour 12 (120 s), then 0.
    power = LocalPower(profile=parse_profile("0:12,12:0", day_seconds=240.0))
    ledger = Ledger(10.0, 600.0, clock=clock, power=power, min_charge_kw=1.0)
    clock.advance(100)
    session_id = ledger.admit("ev-1", 22.0).session.session_id
    assert ledger.snapshot().load_kw == pytest.approx(22.0)
    clock.advance(100)  # 80 s past the step, nobody asked in between
    report = ledger.session(session_id)
    assert report.history == ((100.0, 22.0), (120.0, 10.0))
    expected_kwh = (22.0 * 20 + 10.0 * 80) / 3600
    assert report.energy_kwh == pytest.approx(expected_kwh)
    assert [(t, kw) for t, kw, _ in ledger.limit_history()] == [(0.0, 22.0), (120.0, 10.0)]
    assert history_violations(ledger) == []


def test_peer_power_moves_the_limit_atomically() -> None:
    clock = FakeClock()
    ledger = Ledger(20.0, 60.0, clock=clock)
    ledger.admit("ev-1", 30.0)
    ledger.set_peer_kw(6.0)
    assert ledger.snapshot().load_kw == pytest.approx(26.0)
    ledger.set_peer_kw(-4.0)
    assert ledger.snapshot().load_kw == pytest.approx(16.0)
    assert history_violations(ledger) == []


def test_energy_follows_the_allocation_over_time() -> None:
    clock = FakeClock()
    ledger = Ledger(10.0, 600.0, clock=clock)
    first = ledger.admit("ev-1", 10.0).session.session_id
    clock.advance(36)  # 10 kW for 36 s = 0.1 kWh
    ledger.admit("ev-2", 10.0)
    clock.advance(36)  # then 5 kW each for 36 s = 0.05 kWh
    assert ledger.session(first).energy_kwh == pytest.approx(0.15)
    assert ledger.snapshot().energy_kwh == pytest.approx(0.2)


def test_switching_to_strict_suspends_what_no_longer_fits_whole() -> None:
    clock = FakeClock()
    ledger = Ledger(20.0, 60.0, clock=clock)
    for index in range(3):
        ledger.admit(f"ev-{index}", 10.0)
    snapshot = ledger.set_policy(AllocationPolicy.STRICT)
    assert (snapshot.charging, snapshot.suspended, snapshot.load_kw) == (2, 1, 20.0)
    assert history_violations(ledger) == []


def test_a_vehicle_asking_less_than_the_minimum_gets_what_it_asks() -> None:
    clock = FakeClock()
    ledger = Ledger(2.0, 60.0, clock=clock, min_charge_kw=1.4)
    admission = ledger.admit("ev-1", 0.5)
    assert admission.report.minimum_kw == 0.5 and admission.report.allocated_kw == 0.5
    ledger.admit("ev-2", 5.0)
    assert ledger.snapshot().load_kw == pytest.approx(2.0)


ledger_steps = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.floats(0.5, 30.0)),
        st.tuples(st.just("wait"), st.floats(0.0, 20.0)),
        st.tuples(st.just("limit"), st.one_of(st.none(), st.floats(0.0, 120.0))),
        st.tuples(st.just("peer"), st.floats(-30.0, 30.0)),
        st.tuples(st.just("stop"), st.integers(0, 100)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ledger_steps)
# A session admitted at the instant a release undoes the level its admission set: its history once
# started from the level before its own point, which had been dropped.
@example([("admit", 21.0), ("admit", 25.0), ("wait", 6.0), ("admit", 25.0), ("stop", 1)])
def test_the_ledgers_histories_never_pass_the_limit(steps) -> None:
    clock = FakeClock(start=1_000.0)
    power = LocalPower(storage_kw=5.0, profile=parse_profile("0:0,6:30,12:10,18:0", day_seconds=60.0))
    ledger = Ledger(40.0, 25.0, clock=clock, power=power)
    admitted: list[str] = []
    for step, value in steps:
        if step == "admit":
            try:
                admitted.append(ledger.admit(f"ev-{len(admitted)}", value).session.session_id)
            except CapacityExceeded:
                pass
        elif step == "wait":
            clock.advance(value)
        elif step == "limit":
            ledger.set_operator_limit(value)
        elif step == "peer":
            ledger.set_peer_kw(value)
        elif admitted:
            try:
                ledger.release(admitted[value % len(admitted)])
            except KeyError:
                pass
    clock.advance(30)
    assert history_violations(ledger) == []
    # The substation's counter of energy agrees with the sessions' own integrals.
    _, reports = ledger.reports(include_ended=True)
    assert math.fsum(r.energy_kwh for r in reports) == pytest.approx(ledger.snapshot().energy_kwh, abs=1e-9)


def test_milliwatts_round_limits_down_and_back() -> None:
    assert to_mw(1.4) == 1_400_000 and to_kw(to_mw(80.0)) == 80.0
    assert to_mw(0.1 + 0.2) <= 300_000
