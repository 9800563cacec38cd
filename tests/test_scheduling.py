"""The deadline policy: plans from scratch (plan) and kept event by event (DeadlineSet).

Every property is checked from the sessions' own figures (maximum, minimum, need,
departure) and a ChargingSet driven alongside, never from what the code under
test reports about itself.
"""
from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from substation_service.allocation import ChargingSet, Member, amount_to_mw
from substation_service.scheduling import (
    SECONDS_PER_HOUR,
    DeadlineSet,
    Need,
    Priority,
    Projected,
    Projection,
    is_urgent,
    plan,
)

MIN_KW = 1.4
WITHIN = 600.0


def cap_of(need: Need, period: float | None) -> int:
    """The most a session may get: its maximum, and no more than finishes its need within the period."""
    cap = amount_to_mw(need.max_kw)
    if need.remaining_kwh is not None:
        if need.remaining_kwh <= 0:
            return 0
        if period:
            cap = min(cap, max(1, math.floor(need.remaining_kwh * SECONDS_PER_HOUR / period * 1e6)))
    return cap


def order_of(need: Need, priority: Priority, now: float) -> tuple[bool, float]:
    """Who comes first, written out again: urgent ones, then by departure or by latest start at full power."""
    departure = math.inf if need.departure is None else need.departure
    hours = need.remaining_kwh / (amount_to_mw(need.max_kw) / 1e6)
    slack = departure - now - need.remaining_kwh / need.max_kw * SECONDS_PER_HOUR
    urgent = need.departure is not None and need.remaining_kwh > 0 and 0 <= slack < WITHIN
    value = departure if priority is Priority.EARLIEST_DEADLINE else departure - hours * SECONDS_PER_HOUR
    return not urgent, value


def check_plan(needs: list[Need], powers: dict[str, int], limit: int, charging: set[str], priority: Priority,
               now: float, period: float | None) -> None:
    """Every promise of the policy, for the sessions ``charging`` (the others must get nothing)."""
    assert set(powers) == {need.key for need in needs}
    assert sum(powers.values()) <= limit
    caps = {need.key: cap_of(need, period) for need in needs}
    floors = {need.key: min(caps[need.key], amount_to_mw(need.minimum_kw)) for need in needs}
    for need in needs:
        power = powers[need.key]
        if need.key not in charging:
            assert power == 0, f"{need.key} is suspended but gets {power}"
            continue
        assert floors[need.key] <= power <= caps[need.key], (need, power)
        if caps[need.key] > 0:
            assert power > 0, f"{need.key} starves"
        if period and need.remaining_kwh is not None:
            assert power * period / SECONDS_PER_HOUR / 1e6 <= need.remaining_kwh + 1e-6  # never more than it needs
    live = [need for need in needs if need.key in charging]
    with_need = [need for need in live if need.has_need]
    without_need = [need for need in live if not need.has_need]
    short = [need for need in live if powers[need.key] < caps[need.key]]
    if short:  # work-conserving: nobody is held back while power is left (less rounding, < 1 mW each)
        assert sum(powers.values()) >= limit - len(live)
    # Deadline order: a session gets more than its minimum only when every more urgent one has its maximum.
    for later in with_need:
        if powers[later.key] > floors[later.key]:
            for earlier in with_need:
                if order_of(earlier, priority, now) < order_of(later, priority, now):
                    assert powers[earlier.key] == caps[earlier.key], (earlier, later, powers)
    # Ties where the power runs out: one level for all of them, max-min fair.
    groups: dict[tuple[bool, float], list[Need]] = {}
    for need in with_need:
        groups.setdefault(order_of(need, priority, now), []).append(need)
    for group in [*groups.values(), without_need]:
        between = [n for n in group if floors[n.key] < powers[n.key] < caps[n.key]]
        if between:
            level = max(powers[n.key] for n in between)
            for n in group:
                assert powers[n.key] >= min(caps[n.key], level - 1), (n, powers[n.key], level)
                assert powers[n.key] <= max(floors[n.key], level), (n, powers[n.key], level)
    # Sessions without a need get more than their minimum only once every need is served in full.
    if any(powers[n.key] > floors[n.key] for n in without_need):
        assert all(powers[n.key] == caps[n.key] for n in with_need)


def need_of(index: int, max_kw: float, remaining: float | None, departure: float | None) -> Need:
    return Need(f"s{index}", max_kw, MIN_KW, remaining, departure, index)


def test_least_laxity_and_earliest_deadline_order_differently() -> None:
    # A leaves first but needs little; B leaves later but needs much more than it can take at full power soon.
    a = need_of(1, 7.0, 3.5, 3 * 3600.0)  # half an hour of charging in three hours: laxity 2.5 h
    b = need_of(2, 7.0, 28.0, 5 * 3600.0)  # four hours in five: laxity 1 h
    limit = amount_to_mw(7.0 + MIN_KW)
    edf = plan([a, b], limit, 0.0, Priority.EARLIEST_DEADLINE, urgent_within_seconds=WITHIN)
    llf = plan([a, b], limit, 0.0, Priority.LEAST_LAXITY, urgent_within_seconds=WITHIN)
    assert edf == {"s1": amount_to_mw(7.0), "s2": amount_to_mw(MIN_KW)}
    assert llf == {"s1": amount_to_mw(MIN_KW), "s2": amount_to_mw(7.0)}


def test_a_session_that_must_charge_now_comes_before_any_deadline() -> None:
    early = need_of(1, 7.0, 3.5, 3600.0)  # laxity 30 min
    urgent = need_of(2, 7.0, 14.0 - 0.1, 2 * 3600.0)  # laxity under a minute: full power or it misses
    for priority in Priority:
        powers = plan([early, urgent], amount_to_mw(7.0 + MIN_KW), 0.0, priority, urgent_within_seconds=WITHIN)
        assert powers == {"s1": amount_to_mw(MIN_KW), "s2": amount_to_mw(7.0)}


def test_equal_priorities_share_what_is_left_max_min_fairly() -> None:
    needs = [need_of(index, kw, 20.0, 8 * 3600.0) for index, kw in enumerate((3.0, 7.0, 7.0))]
    powers = plan(needs, amount_to_mw(3 * MIN_KW + 6.0), 0.0, Priority.EARLIEST_DEADLINE)
    # 10.2 kW among three of equal deadline: 3.0 served whole, the other two 3.6 each.
    assert powers == {"s0": 3_000_000, "s1": 3_600_000, "s2": 3_600_000}


def test_sessions_without_a_need_share_what_the_needs_leave_as_fair_share_would() -> None:
    needs = [need_of(0, 7.0, 10.0, 4 * 3600.0), need_of(1, 11.0, None, None), need_of(2, 3.0, None, None)]
    powers = plan(needs, amount_to_mw(7.0 + 5.0 + MIN_KW), 0.0)
    # The need takes 7; what is left (5 + one minimum, 6.4 kW) is water-filled: 3 whole, 3.4 for the other.
    assert powers == {"s0": 7_000_000, "s1": 3_400_000, "s2": 3_000_000}


def test_never_more_than_the_need_within_the_period() -> None:
    powers = plan([need_of(0, 11.0, 0.5, 3600.0)], amount_to_mw(50.0), 0.0, period_seconds=300.0)
    assert powers["s0"] == 6_000_000  # 0.5 kWh in 5 min is 6 kW, not the 11 it could take
    assert plan([need_of(0, 11.0, 0.0, 3600.0)], amount_to_mw(50.0), 0.0)["s0"] == 0  # done: nothing


def test_minimums_that_do_not_fit_suspend_the_newest_as_fair_share_does() -> None:
    needs = [need_of(index, 7.0, 10.0, 3600.0 * (5 - index)) for index in range(5)]
    powers = plan(needs, amount_to_mw(3 * MIN_KW + 0.5), 0.0)
    assert [key for key, power in powers.items() if power == 0] == ["s3", "s4"]


needs_strategy = st.lists(
    st.tuples(
        st.sampled_from([3.3, 6.6, 7.2, 11.0, 0.5]),
        st.one_of(st.none(), st.floats(0, 40)),
        st.one_of(st.none(), st.floats(0, 36_000), st.sampled_from([3600.0, 7200.0])),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(needs_strategy, st.floats(0, 150), st.sampled_from(list(Priority)), st.sampled_from([None, 60.0, 300.0]),
       st.floats(0, 3600))
def test_a_plan_keeps_every_promise(raw: list, limit_kw: float, priority: Priority, period: float | None,
                                    now: float) -> None:
    needs = [need_of(index, kw, remaining, departure) for index, (kw, remaining, departure) in enumerate(raw)]
    powers = plan(needs, math.floor(limit_kw * 1e6), now, priority, period, urgent_within_seconds=WITHIN)
    reference = ChargingSet()  # who charges: fair_share's set, admitted in order, then the limit
    members = [Member(n.key, cap_of(n, period), min(cap_of(n, period), amount_to_mw(n.minimum_kw)), n.order)
               for n in needs]
    reference.restore(members, [], 0)
    reference.fit(math.floor(limit_kw * 1e6))
    charging = {n.key for n in needs if reference.is_charging(n.key)}
    check_plan(needs, powers, math.floor(limit_kw * 1e6), charging, priority, now, period)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("arrive"), st.sampled_from([3.3, 7.2, 11.0]), st.one_of(st.none(), st.floats(0.1, 40)),
                  st.one_of(st.none(), st.floats(0, 20_000))),
        st.tuples(st.just("leave"), st.integers(0, 40)),
        st.tuples(st.just("limit"), st.floats(0, 80)),
        st.tuples(st.just("taper"), st.integers(0, 40), st.floats(0.5, 11.0)),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(operations, st.sampled_from(list(Priority)))
def test_kept_event_by_event_it_plans_as_from_scratch(steps: list, priority: Priority) -> None:
    """DeadlineSet after any events equals plan() on the same sessions; who charges follows a ChargingSet."""
    kept = DeadlineSet(0, priority)
    reference = ChargingSet()
    reference.fit(0)
    needs: dict[str, Need] = {}
    limit = 0
    for index, step in enumerate(steps):
        if step[0] == "arrive":
            _, kw, remaining, departure = step
            key = f"s{index}"
            minimum = min(amount_to_mw(kw), amount_to_mw(MIN_KW))
            if not kept.admits(minimum):
                assert not reference.admits(minimum)
                continue
            kept.add(key, amount_to_mw(kw), amount_to_mw(MIN_KW), departure, remaining)
            reference.add(Member(key, amount_to_mw(kw), minimum, index))
            needs[key] = Need(key, kw, MIN_KW, remaining, departure, index)
        elif step[0] == "leave" and needs:
            key = sorted(needs)[step[1] % len(needs)]
            kept.remove(key)
            reference.remove(key)
            del needs[key]
        elif step[0] == "limit":
            limit = math.floor(step[1] * 1e6)
            kept.fit(limit)
            reference.fit(limit)
        elif step[0] == "taper" and needs:
            key = sorted(needs)[step[1] % len(needs)]
            amount = amount_to_mw(step[2])
            minimum = min(amount, amount_to_mw(MIN_KW))
            # A session with a need keeps the key it was admitted with, which plan() would take
            # from the new maximum under least laxity: taper only those without a need here.
            if needs[key].has_need or not kept.fits_change(key, minimum):
                continue
            kept.change(key, amount, minimum)
            reference.change(key, amount, minimum)
            needs[key] = Need(key, step[2], MIN_KW, None, needs[key].departure, needs[key].order)
        for key, need in needs.items():  # the owner marks who must charge at full power now
            kept.set_urgent(key, need.has_need and is_urgent(need.remaining_kwh, need.max_kw, need.departure, 0.0,
                                                             WITHIN))
        charging = {key for key in needs if reference.is_charging(key)}
        assert charging == {key for key in needs if kept.is_charging(key)}
        powers = kept.allocations()
        expected = {key: 0 for key in needs} | plan(
            [need for need in needs.values() if need.key in charging], limit, 0.0, priority,
            urgent_within_seconds=WITHIN,
        )
        assert powers == expected
        check_plan(list(needs.values()), powers, limit, charging, priority, 0.0, None)


def test_a_change_of_limit_moves_the_plan_and_never_passes_the_limit() -> None:
    kept = DeadlineSet(amount_to_mw(100.0), Priority.LEAST_LAXITY)
    for index in range(20):
        kept.add(f"s{index}", amount_to_mw(7.2), amount_to_mw(MIN_KW), 3600.0 * (1 + index), 5.0 + index)
    for limit_kw in (100.0, 50.0, 25.0, 12.0, 100.0):
        kept.fit(math.floor(limit_kw * 1e6))
        powers = kept.allocations()
        assert sum(powers.values()) <= math.floor(limit_kw * 1e6)
        charging = [key for key in powers if kept.is_charging(key)]
        assert all(powers[key] >= amount_to_mw(MIN_KW) for key in charging)
    # At 12 kW only eight minimums fit: the newest twelve wait, and all come back when room returns.
    kept.fit(math.floor(12.0 * 1e6))
    assert [kept.is_charging(f"s{index}") for index in range(20)] == [True] * 8 + [False] * 12
    kept.fit(amount_to_mw(200.0))
    assert all(kept.is_charging(f"s{index}") for index in range(20))


@pytest.mark.parametrize("priority", list(Priority))
def test_a_late_session_keeps_its_place(priority: Priority) -> None:
    # Its need cannot be met any more (laxity < 0): what it still gets counts, so it is not pushed last.
    late = need_of(1, 7.0, 30.0, 3600.0)
    later = need_of(2, 7.0, 5.0, 9 * 3600.0)
    powers = plan([late, later], amount_to_mw(7.0 + MIN_KW), 0.0, priority, urgent_within_seconds=WITHIN)
    assert powers["s1"] == amount_to_mw(7.0)


@pytest.mark.parametrize("seed", range(20))
def test_a_forecast_asked_one_session_at_a_time_is_the_whole_forecast(seed: int) -> None:
    """The fold stops where it is asked to; what it answers is what folding the whole queue answers."""
    rng = random.Random(seed)
    count = rng.randint(1, 60)
    limit = amount_to_mw(count * rng.uniform(MIN_KW, 8.0))
    plan_set = DeadlineSet(limit, rng.choice(list(Priority)))
    sessions: dict[str, Projected] = {}
    for index in range(count):
        key, max_kw = f"s{index}", rng.choice([3.7, 7.2, 11.0, 22.0])
        if not plan_set.admits(amount_to_mw(MIN_KW)):
            break
        remaining_kwh, departure = rng.uniform(0.5, 40), rng.uniform(600, 36_000)
        plan_set.add(key, amount_to_mw(max_kw), amount_to_mw(MIN_KW), departure, remaining_kwh)
        sessions[key] = Projected(key, amount_to_mw(MIN_KW), amount_to_mw(max_kw), remaining_kwh * 3.6e9, departure)
    keys = plan_set.queue_keys()
    budget = plan_set.limit_mw - plan_set.charging_minimum_total_mw

    def projection() -> Projection:
        return Projection(keys, plan_set.served_in_full, budget, 0.0, sessions.get)

    whole = projection().expected_all()
    assert set(whole) == set(keys)
    asked = projection()
    for key in rng.sample(keys, len(keys)):
        position = plan_set.position(key)
        assert keys[position] == key
        assert asked.expected(key, position) == pytest.approx(whole[key], rel=1e-12)
    for position, key in enumerate(keys):
        session = sessions[key]
        # Never more than it still needs, never less than its minimum to the end (or its need).
        assert whole[key] <= session.remaining_mws
        assert whole[key] >= min(session.remaining_mws, session.minimum_mw * session.deadline) * (1 - 1e-12)
        if position < plan_set.served_in_full:  # served in full now: at its maximum to the end
            assert plan_set.allocation_of(key) == session.maximum_mw
            assert whole[key] == pytest.approx(min(session.remaining_mws, session.maximum_mw * session.deadline))
