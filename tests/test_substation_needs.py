"""Energy by departure in the ledger: the deadline policy, and needs under fair_share and strict, on a fake clock
(no processes).

Every check comes from the sessions' own records (their allocation histories,
the limit's history), integrated and summed here, never from the totals the
ledger reports about itself.
"""
from __future__ import annotations

import math
import random
import threading
from pathlib import Path

import pytest

from gridcommon.validation import ValidationError
from substation_service.allocation import AllocationPolicy
from substation_service.ledger import (
    CapacityExceeded,
    Ledger,
    SessionReport,
    SessionState,
    steady_wall_clock,
)
from substation_service.store import LedgerStore
from tests.allocation_audit import sweep
from tests.substation_support import FakeClock

DEADLINE = AllocationPolicy.DEADLINE
FAIR_SHARE = AllocationPolicy.FAIR_SHARE
STRICT = AllocationPolicy.STRICT
HOUR = 3600.0
ID = "substation-needs"


def records(ledger: Ledger) -> list[dict]:
    """Every session's allocation history, ended ones included, as an audit reads it."""
    _, reports = ledger.reports(history=True, include_ended=True)
    return [{"session_id": r.session.session_id, "history": [list(point) for point in r.history]} for r in reports]


def energy_from_history(report: SessionReport, until: float) -> float:
    """kWh under the session's allocation history, integrated here: step by step up to ``until``."""
    points = list(report.history)
    total = 0.0
    for index, (at, kw) in enumerate(points):
        end = points[index + 1][0] if index + 1 < len(points) else until
        total += kw * max(0.0, min(end, until) - at) / HOUR
    return total


def when_history_delivers(report: SessionReport, kwh: float) -> float | None:
    """The moment the integral of the session's allocation history reaches ``kwh`` (to within rounding); None if
    it never does."""
    points = list(report.history)
    total = 0.0
    for index, (at, kw) in enumerate(points[:-1]):
        step = kw * (points[index + 1][0] - at) / HOUR
        if kw > 0 and total + step >= kwh - 1e-9:
            return at + (kwh - total) / kw * HOUR
        total += step
    return None


def assert_never_over_the_limit(ledger: Ledger) -> int:
    breaches, points = sweep(ID, records(ledger), [list(entry) for entry in ledger.limit_history()])
    assert breaches == [], breaches[:3]
    return points


def test_the_most_urgent_need_is_served_first_and_each_session_ends_when_its_energy_is_delivered() -> None:
    clock = FakeClock()
    ledger = Ledger(20.0, 60.0, clock=clock, policy=DEADLINE)
    now = clock()
    late = ledger.admit("ev-late", 11.0, energy_kwh=10.0, departure=now + 4 * HOUR).report
    soon = ledger.admit("ev-soon", 11.0, energy_kwh=10.0, departure=now + 2 * HOUR).report
    free = ledger.admit("ev-free", 11.0, duration_seconds=6 * HOUR).report

    by_id = {r.session.session_id: r for r in ledger.reports()[1]}
    # The soonest to run out of time gets its maximum; the later one what is left above the minimums.
    assert by_id[soon.session.session_id].allocated_kw == 11.0
    assert by_id[late.session.session_id].allocated_kw == pytest.approx(20.0 - 11.0 - 1.4)
    assert by_id[free.session.session_id].allocated_kw == 1.4
    assert soon.feasible and late.feasible

    clock.advance(6 * HOUR)
    ended = {r.session.session_id: r for r in ledger.reports(history=True, include_ended=True)[1]}
    first, second = ended[soon.session.session_id], ended[late.session.session_id]
    assert (first.end_reason, second.end_reason) == ("energy_delivered", "energy_delivered")
    assert first.ended_at < second.ended_at <= late.departure
    for report in (first, second):
        assert report.need_met and report.energy_kwh == pytest.approx(10.0)
        assert energy_from_history(report, report.ended_at) == pytest.approx(10.0, abs=1e-3)
    # 10 kWh at 11 kW: 54 min 33 s.
    assert first.ended_at - first.session.started_at == pytest.approx(10.0 / 11.0 * HOUR, abs=0.01)
    assert assert_never_over_the_limit(ledger) > 6


def test_a_need_that_cannot_be_met_is_told_at_admission_and_ends_at_departure() -> None:
    clock = FakeClock()
    ledger = Ledger(50.0, 60.0, clock=clock, policy=DEADLINE)
    departure = clock() + HOUR
    admitted = ledger.admit("ev-1", 7.2, energy_kwh=30.0, departure=departure).report

    # 7.2 kW for an hour is 7.2 kWh of the 30 asked for: the driver is told so at once.
    assert admitted.feasible is False
    assert admitted.expected_kwh == pytest.approx(7.2)
    assert admitted.expected_shortfall_kwh == pytest.approx(22.8)
    clock.advance(HOUR / 2)
    halfway = ledger.session(admitted.session.session_id)
    assert (halfway.energy_kwh, halfway.still_needed_kwh) == (pytest.approx(3.6), pytest.approx(26.4))
    assert halfway.expected_kwh == pytest.approx(7.2)  # kept current, and what was said holds
    clock.advance(HOUR)
    ended = ledger.session(admitted.session.session_id)
    assert (ended.state, ended.end_reason, ended.ended_at) == (SessionState.ENDED, "departed", departure)
    assert ended.need_met is False and ended.energy_kwh == pytest.approx(7.2)


def test_what_drivers_are_told_is_what_the_plan_then_delivers() -> None:
    """Seeded busy hours, nothing arriving after them: the forecast after the last arrival against the outcome.

    The forecast keeps the order of the plan it is made from; sessions turning urgent later reorder
    it, so it is an estimate, and this measures how good: the verdict (feasible or not) against
    whether the need was met, and the kWh it was off by.
    """
    agree, errors = 0, []
    for seed in range(30):
        clock = FakeClock()
        ledger = Ledger(30.0, 60.0, clock=clock, policy=DEADLINE)
        rng = random.Random(seed)
        keys = [ledger.admit(f"ev-{index}", rng.choice([7.2, 11.0, 22.0]), energy_kwh=rng.uniform(5, 40),
                             departure=clock() + rng.uniform(1, 8) * HOUR).session.session_id for index in range(8)]
        told = {key: ledger.session(key) for key in keys}
        clock.advance(9 * HOUR)
        for key in keys:
            got = ledger.session(key)
            agree += told[key].feasible == got.need_met
            errors.append(abs(got.energy_kwh - told[key].expected_kwh))
        assert_never_over_the_limit(ledger)
    assert agree / len(errors) >= 0.9
    assert sum(errors) / len(errors) <= 1.5  # kWh, of needs from 5 to 40


def test_the_forecast_is_exact_while_the_order_holds() -> None:
    clock = FakeClock()
    ledger = Ledger(20.0, 60.0, clock=clock, policy=DEADLINE)
    first = ledger.admit("ev-1", 11.0, energy_kwh=11.0, departure=clock() + 5 * HOUR).session.session_id
    second = ledger.admit("ev-2", 11.0, energy_kwh=30.0, departure=clock() + 8 * HOUR).session.session_id
    told = ledger.session(second)
    # Least laxity: the first can start as late as 4 h, the second 8 - 30/11 = 5.3 h. So the second gets
    # 9 kW for the first hour (the first takes 11), then 11 kW: done at 1 + 21/11 = 2.9 h, well before 8.
    assert (told.expected_kwh, told.feasible) == (pytest.approx(30.0), True)
    assert ledger.session(first).allocated_kw == 11.0
    clock.advance(HOUR)
    assert ledger.session(first).end_reason == "energy_delivered"
    clock.advance(10 * HOUR)
    ended = ledger.session(second)
    assert ended.need_met
    assert ended.ended_at - ended.session.started_at == pytest.approx((1 + 21 / 11) * HOUR)


def test_a_forecast_asked_for_one_session_is_the_one_asked_for_all() -> None:
    """Each plan is forecast only as far along its queue as asked: in whatever order the sessions are
    asked about, each answer is what forecasting every session at once gives (the metrics' way)."""
    def busy_ledger() -> tuple[Ledger, list[str]]:
        clock = FakeClock()
        ledger = Ledger(40.0, 60.0, clock=clock, policy=DEADLINE)
        rng = random.Random(11)
        keys = [ledger.admit(f"ev-{index}", rng.choice([7.2, 11.0, 22.0]), energy_kwh=rng.uniform(5, 40),
                             departure=clock() + rng.uniform(1, 8) * HOUR).session.session_id for index in range(20)]
        clock.advance(HOUR / 3)
        return ledger, keys

    everyone, keys = busy_ledger()
    shortfall = everyone.snapshot(needs=True).needs.expected_shortfall_kwh
    at_once = [everyone.session(key).expected_kwh for key in keys]
    count = len(keys)
    for order in (range(count), range(count - 1, -1, -1), random.Random(2).sample(range(count), count)):
        ledger, its_keys = busy_ledger()  # the same day; its sessions have ids of their own
        one_by_one = {index: ledger.session(its_keys[index]).expected_kwh for index in order}
        assert [one_by_one[index] for index in range(count)] == pytest.approx(at_once, rel=1e-12)
    needs = [everyone.session(key).need_kwh for key in keys]
    assert shortfall == pytest.approx(sum(max(0.0, need - expected) for need, expected in zip(needs, at_once)))
    # Some are expected to fall short and some not: the forecast has something to tell.
    assert 0 < sum(expected < need - 0.1 for need, expected in zip(needs, at_once)) < count


def twin_step(ledgers: list[Ledger], clocks: tuple[FakeClock, ...], active: list[str], rng: random.Random,
              action: float, bounds: tuple[float, float, float],
              change_refusals: tuple[type[Exception], ...] = (KeyError,)) -> None:
    """One step of a seeded day played on twin ledgers, past its arrivals: below ``bounds[0]`` a random
    session leaves, below ``bounds[1]`` the operator limit moves, below ``bounds[2]`` a session's amount
    changes, else time passes."""
    release_below, limit_below, change_below = bounds
    if action < release_below and active:
        key = active.pop(rng.randrange(len(active)))
        for ledger in ledgers:
            try:
                ledger.release(key)
            except KeyError:
                pass
    elif action < limit_below:
        limit = rng.choice([None, 10.0, 20.0, 30.0])
        for ledger in ledgers:
            ledger.set_operator_limit(limit)
    elif action < change_below and active:
        key, amount = rng.choice(active), rng.choice([2.0, 7.2, 16.0])
        for ledger in ledgers:
            try:
                ledger.change(key, amount_kw=amount)
            except change_refusals:
                pass
    else:
        seconds = rng.uniform(0, 40)
        for clock in clocks:
            clock.advance(seconds)


def same_shares(ledgers: list[Ledger], step: int) -> dict[str, tuple]:
    """What every session has (state, allocation, energy), asserted the same on both twins."""
    shares = [{r.session.session_id: (r.state, r.allocated_kw, round(r.energy_kwh, 9)) for r in ledger.reports()[1]}
              for ledger in ledgers]
    assert shares[0] == shares[1], step
    return shares[0]


def test_without_needs_the_deadline_policy_shares_exactly_as_fair_share() -> None:
    """Why deadline can be the default: sessions without a need see no difference at any instant."""
    rng = random.Random(3)
    clocks = FakeClock(), FakeClock()
    ledgers = [Ledger(40.0, 60.0, clock=c, policy=p) for c, p in zip(clocks, (DEADLINE, AllocationPolicy.FAIR_SHARE))]
    active: list[str] = []
    busiest = 0
    for step in range(300):
        action = rng.random()
        if action < 0.45:
            amount, minimum = rng.choice([3.7, 7.2, 11.0, 22.0]), rng.choice([None, None, 4.14])
            duration = rng.uniform(10, 300)
            results = []
            for ledger in ledgers:
                try:
                    results.append(ledger.admit(f"ev-{step}", amount, session_id=f"s-{step}",
                                                duration_seconds=duration, minimum_kw=minimum).session.session_id)
                except (CapacityExceeded, ValidationError) as exc:  # compared below: both refuse alike
                    results.append(type(exc).__name__)
            assert results[0] == results[1]
            if results[0] == f"s-{step}":
                active.append(results[0])
        else:
            twin_step(ledgers, clocks, active, rng, action, (0.6, 0.75, 0.85))
        busiest = max(busiest, len(same_shares(ledgers, step)))
    assert busiest >= 5  # the day was busy: sessions shared the limit


def random_day(ledger: Ledger, clock: FakeClock, rng: random.Random, switch_policies: bool = False) -> None:
    """Arrivals with and without needs (some with a minimum of their own), a limit halved and restored,
    needs stated again, amounts changed, stops; with ``switch_policies`` the operator switches policy too.
    Then the clock runs on until every session has ended."""
    ids: list[str] = []
    for step in range(400):
        action = rng.random()
        try:
            if action < 0.35:
                need, amount = rng.random() < 0.7, rng.choice([3.7, 7.2, 11.0, 22.0])
                admission = ledger.admit(
                    f"ev-{step}", amount,
                    energy_kwh=rng.uniform(0.5, 30) if need else None,
                    departure=clock() + rng.uniform(0.2, 6) * HOUR if need else None,
                    duration_seconds=None if need else rng.uniform(60, 3 * HOUR),
                    minimum_kw=rng.choice([None, 4.14]) if amount > 4.14 else None,
                )
                ids.append(admission.session.session_id)
            elif action < 0.45:
                ledger.set_operator_limit(rng.choice([None, 30.0, 15.0]))  # the limit halved, and more
            elif action < 0.5 and ids:
                key = rng.choice(ids)  # a vehicle reports its need again: more than it got so far
                more = ledger.session(key).energy_kwh + rng.uniform(1, 20)
                ledger.change(key, energy_kwh=more, departure=clock() + rng.uniform(0.5, 4) * HOUR)
            elif action < 0.55 and ids:
                ledger.release(rng.choice(ids))
            elif action < 0.6 and ids:
                ledger.change(rng.choice(ids), amount_kw=rng.choice([5.0, 7.2, 16.0, 22.0]))
            elif action < 0.63 and switch_policies:
                ledger.set_policy(rng.choice([DEADLINE, FAIR_SHARE, STRICT]))
            else:
                clock.advance(rng.expovariate(1 / 300))
        except (KeyError, ValueError, CapacityExceeded):
            pass  # a session already ended, a minimum that does not fit: refused, nothing changed
    clock.advance(12 * HOUR)


def assert_every_need_ended_as_it_should(ledger: Ledger, at_least: int) -> None:
    """From each session's own allocation history: never more than its need; ended ``energy_delivered``
    exactly when the history delivered it, else at its departure or stop; without a need, at its time."""
    ended = ledger.reports(history=True, include_ended=True)[1]
    assert all(report.state is SessionState.ENDED for report in ended)
    finished = [r for r in ended if r.need_kwh is not None]
    assert len(finished) > at_least
    reasons = set()
    for report in finished:
        got = energy_from_history(report, report.ended_at)
        assert got == pytest.approx(report.energy_kwh, abs=1e-6), report.session.session_id
        assert got <= report.need_kwh + 1e-6  # never more than it needed
        reasons.add(report.end_reason)
        if report.end_reason == "energy_delivered":
            assert report.need_met and got == pytest.approx(report.need_kwh, abs=1e-6)
            assert report.ended_at == pytest.approx(when_history_delivers(report, report.need_kwh), abs=1e-3)
        elif report.end_reason == "departed":
            assert report.ended_at == min(report.departure, report.session.ends_at)
    assert {"energy_delivered", "departed"} <= reasons
    # Sessions without a need run their time (or are stopped), whatever they got.
    for report in ended:
        if report.need_kwh is None:
            assert report.end_reason in ("completed", "stopped"), report.session.session_id
            if report.end_reason == "completed":
                assert report.ended_at == report.session.ends_at


@pytest.mark.parametrize("policy", [DEADLINE, FAIR_SHARE, STRICT])
@pytest.mark.parametrize("seed", range(6))
def test_random_days_never_pass_the_limit_and_every_need_ends_as_it_should(seed: int, policy: AllocationPolicy) -> None:
    clock = FakeClock()
    ledger = Ledger(60.0, 600.0, clock=clock, policy=policy)
    random_day(ledger, clock, random.Random(seed))
    assert_never_over_the_limit(ledger)
    assert_every_need_ended_as_it_should(ledger, 20 if policy is STRICT else 40)  # under strict fewer fit whole


@pytest.mark.parametrize("seed", range(6))
def test_random_days_switching_policies_end_every_need_as_it_should(seed: int) -> None:
    clock = FakeClock()
    ledger = Ledger(60.0, 600.0, clock=clock, policy=FAIR_SHARE)
    random_day(ledger, clock, random.Random(100 + seed), switch_policies=True)
    assert_never_over_the_limit(ledger)
    assert_every_need_ended_as_it_should(ledger, 30)


def test_a_leased_session_states_its_need_later_and_keeps_charging_once_it_is_met() -> None:
    clock = FakeClock()
    ledger = Ledger(20.0, 60.0, clock=clock, policy=DEADLINE)
    ledger.admit("ev-other", 11.0, session_id="other", duration_seconds=10 * HOUR)
    ledger.admit("ev-tx", 11.0, session_id="tx", lease_seconds=600)
    assert ledger.session("tx").allocated_kw == 10.0  # no need yet: shared fairly
    clock.advance(60)

    changed = ledger.change("tx", energy_kwh=5.0, departure=clock() + 2 * HOUR).report
    assert (changed.allocated_kw, changed.need_kwh, changed.feasible) == (11.0, 5.0, True)
    assert ledger.session("other").allocated_kw == pytest.approx(9.0)
    for _ in range(8):
        clock.advance(300)
        ledger.renew(["tx"], 600)
    met = ledger.session("tx")
    assert met.state is SessionState.CHARGING  # its holder ends it, not the need
    assert met.still_needed_kwh == 0.0 and met.energy_kwh >= 5.0
    ledger.release("tx")
    assert ledger.session("tx").need_met
    assert_never_over_the_limit(ledger)


def test_needs_and_their_powers_survive_a_restart(tmp_path: Path) -> None:
    path, clock = tmp_path / "needs.sqlite3", FakeClock()

    def open_ledger() -> Ledger:
        return Ledger(20.0, 60.0, clock=clock, policy=DEADLINE, store=LedgerStore(path, ID), substation_id=ID)

    before = open_ledger()
    key = before.admit("ev-1", 11.0, energy_kwh=11.0, departure=clock() + 3 * HOUR).session.session_id
    before.admit("ev-2", 11.0, energy_kwh=20.0, departure=clock() + 2 * HOUR)
    clock.advance(HOUR / 2)
    kept = before.session(key)

    after = open_ledger()
    again = after.session(key)
    assert (again.need_kwh, again.energy_kwh, again.allocated_kw) == (
        11.0, pytest.approx(kept.energy_kwh), kept.allocated_kw)
    clock.advance(10 * HOUR)
    ended = after.session(key)
    assert ended.end_reason == "energy_delivered" and ended.need_met
    figures = after.snapshot(needs=True).needs
    assert (figures.met, figures.requested_kwh) == (2, pytest.approx(31.0))


def test_a_switch_to_fair_share_and_back_keeps_every_need_and_its_energy() -> None:
    clock = FakeClock()
    ledger = Ledger(20.0, 60.0, clock=clock, policy=DEADLINE)
    key = ledger.admit("ev-1", 11.0, energy_kwh=8.0, departure=clock() + 3 * HOUR).session.session_id
    ledger.admit("ev-2", 11.0, duration_seconds=5 * HOUR)
    clock.advance(HOUR / 4)
    ledger.set_policy(AllocationPolicy.FAIR_SHARE)
    assert ledger.session(key).allocated_kw == 10.0
    clock.advance(HOUR / 4)
    ledger.set_policy(DEADLINE)
    clock.advance(HOUR / 4)
    report = ledger.session(key)
    assert report.energy_kwh == pytest.approx(11.0 / 4 + 10.0 / 4 + 11.0 / 4)
    assert energy_from_history(report, clock()) == pytest.approx(report.energy_kwh)
    clock.advance(5 * HOUR)
    assert ledger.session(key).end_reason == "energy_delivered"
    assert math.isclose(ledger.session(key).energy_kwh, 8.0, abs_tol=1e-6)
    assert_never_over_the_limit(ledger)


@pytest.mark.parametrize("policy", [FAIR_SHARE, STRICT])
def test_under_fair_share_and_strict_a_need_ends_its_session_the_moment_its_history_delivers_it(
        policy: AllocationPolicy) -> None:
    """The policy alone sets the power, and it changes four times while the need is charged: each time the
    moment the need will be delivered is planned again. Checked from the session's own allocation history."""
    clock = FakeClock()
    ledger = Ledger(20.0, 60.0, clock=clock, policy=policy)
    need = ledger.admit("ev-need", 11.0, energy_kwh=6.0, departure=clock() + 4 * HOUR).session
    free = ledger.admit("ev-free", 7.2, duration_seconds=3 * HOUR).session
    for limit in (12.0, 8.0, None):
        clock.advance(HOUR / 4)
        ledger.set_operator_limit(limit)
    clock.advance(4 * HOUR)

    ended = ledger.session(need.session_id)
    assert (ended.state, ended.end_reason, ended.need_met) == (SessionState.ENDED, "energy_delivered", True)
    # Each quarter of an hour: under fair_share 11 kW, then 6 and 4 (the level at 12 and 8 kW), 11 again;
    # under strict 11, 11 (ev-free, the newest, is suspended at 12 kW), nothing (it no longer fits whole at
    # 8 kW), 11 again.
    if policy is FAIR_SHARE:
        powers, history, free_history = [11.0, 6.0, 4.0], [11.0, 6.0, 4.0, 11.0, 0.0], [7.2, 6.0, 4.0, 7.2, 0.0]
    else:
        powers, history, free_history = [11.0, 11.0, 0.0], [11.0, 0.0, 11.0, 0.0], [7.2, 0.0, 7.2, 0.0]
    assert [kw for _, kw in ended.history] == history
    before_the_last = sum(powers) / 4
    assert ended.ended_at - need.started_at == pytest.approx(0.75 * HOUR + (6.0 - before_the_last) / 11.0 * HOUR)
    assert energy_from_history(ended, ended.ended_at) == pytest.approx(6.0, abs=1e-6)
    assert ended.ended_at == pytest.approx(when_history_delivers(ended, 6.0), abs=1e-6)
    assert ended.ended_at < ended.departure

    # The session without a need gets what the policy gives it and runs its time.
    other = ledger.session(free.session_id)
    assert (other.end_reason, other.ended_at) == ("completed", free.ends_at)
    assert [kw for _, kw in other.history] == free_history
    assert assert_never_over_the_limit(ledger) > 6


@pytest.mark.parametrize("policy", [FAIR_SHARE, STRICT])
def test_under_fair_share_and_strict_a_need_not_yet_delivered_changes_nobodys_power(policy: AllocationPolicy) -> None:
    """Two ledgers, one seeded day: in one some vehicles state needs too large to be delivered before they
    leave, in the other the same vehicles state none and stay as long. Every session gets the same at every
    step; the ones with a need end at their departure, the others when their time is up."""
    rng = random.Random(5)
    clocks = FakeClock(), FakeClock()
    ledgers = [Ledger(40.0, 60.0, clock=c, policy=policy) for c in clocks]
    active: list[str] = []
    with_need: set[str] = set()
    busiest = 0
    for step in range(300):
        action = rng.random()
        if action < 0.4:
            amount, stay = rng.choice([3.7, 7.2, 11.0, 22.0]), rng.uniform(10, 300)
            need = rng.random() < 0.5
            results = []
            for index, ledger in enumerate(ledgers):
                stated = need and index == 0
                try:
                    results.append(ledger.admit(
                        f"ev-{step}", amount, session_id=f"s-{step}",
                        duration_seconds=None if stated else stay,
                        energy_kwh=500.0 if stated else None,  # more than 22 kW deliver in 300 s
                        departure=clocks[index]() + stay if stated else None).session.session_id)
                except CapacityExceeded as exc:
                    results.append(type(exc).__name__)
            assert results[0] == results[1]
            if results[0] == f"s-{step}":
                active.append(results[0])
                if need:
                    with_need.add(results[0])
        else:
            twin_step(ledgers, clocks, active, rng, action, (0.55, 0.7, 0.8),
                      change_refusals=(KeyError, CapacityExceeded))
        busiest = max(busiest, len(same_shares(ledgers, step)))
    for clock in clocks:
        clock.advance(HOUR)
    ends = [{r.session.session_id: (r.ended_at, r.end_reason) for r in ledger.reports(include_ended=True)[1]}
            for ledger in ledgers]
    assert busiest >= 5 and len(with_need) > 20
    for key, (ended_at, reason) in ends[1].items():
        assert ends[0][key][0] == ended_at
        expected = ("departed" if key in with_need else "completed") if reason == "completed" else reason
        assert ends[0][key][1] == expected, key
    for ledger in ledgers:
        assert_never_over_the_limit(ledger)


@pytest.mark.parametrize("policy", [FAIR_SHARE, STRICT])
def test_under_fair_share_and_strict_a_leased_session_keeps_charging_once_its_need_is_met(
        policy: AllocationPolicy) -> None:
    """As under deadline: its holder ends it, not the need (OCPP's open-ended transaction)."""
    clock = FakeClock()
    ledger = Ledger(20.0, 60.0, clock=clock, policy=policy)
    ledger.admit("ev-other", 8.0, session_id="other", duration_seconds=10 * HOUR)
    ledger.admit("ev-tx", 11.0, session_id="tx", lease_seconds=600)
    ledger.change("tx", energy_kwh=2.0, departure=clock() + 2 * HOUR)
    for _ in range(6):
        clock.advance(300)
        ledger.renew(["tx"], 600)
    met = ledger.session("tx")
    assert (met.state, met.allocated_kw, met.still_needed_kwh) == (SessionState.CHARGING, 11.0, 0.0)
    ledger.release("tx")
    ended = ledger.session("tx")
    assert ended.end_reason == "stopped" and ended.need_met
    assert energy_from_history(ended, ended.ended_at) == pytest.approx(11.0 / 2)  # 30 min at 11 kW, past its need


@pytest.mark.parametrize("policy", [FAIR_SHARE, STRICT])
def test_under_fair_share_and_strict_a_need_stated_later_ends_its_session_when_delivered(
        policy: AllocationPolicy) -> None:
    # Two vehicles of 10 kW: held at a level of 7.5 kW under fair_share (15 kW), each whole under strict (20 kW).
    power = 7.5 if policy is FAIR_SHARE else 10.0
    clock = FakeClock()
    ledger = Ledger(15.0 if policy is FAIR_SHARE else 20.0, 60.0, clock=clock, policy=policy)
    first = ledger.admit("ev-1", 10.0, duration_seconds=5 * HOUR).session
    ledger.admit("ev-2", 10.0, duration_seconds=5 * HOUR)
    clock.advance(HOUR / 2)
    ledger.change(first.session_id, energy_kwh=8.0, departure=clock() + 4 * HOUR)  # nothing else happens
    clock.advance(5 * HOUR)
    ended = ledger.session(first.session_id)
    assert ended.end_reason == "energy_delivered"
    assert ended.ended_at - first.started_at == pytest.approx(8.0 / power * HOUR)
    assert energy_from_history(ended, ended.ended_at) == pytest.approx(8.0, abs=1e-6)


@pytest.mark.parametrize("policy", [FAIR_SHARE, STRICT])
def test_under_fair_share_and_strict_a_need_lowered_below_what_was_delivered_ends_its_session_at_once(
        policy: AllocationPolicy) -> None:
    clock = FakeClock()
    ledger = Ledger(20.0, 60.0, clock=clock, policy=policy)
    key = ledger.admit("ev-1", 10.0, energy_kwh=20.0, departure=clock() + 4 * HOUR).session.session_id
    clock.advance(HOUR)
    ledger.change(key, energy_kwh=9.0)  # 10 kWh so far: more than it now needs
    ended = ledger.session(key)  # at the next look at the ledger, at the moment of the change
    assert (ended.end_reason, ended.ended_at) == ("energy_delivered", ended.session.started_at + HOUR)
    assert energy_from_history(ended, ended.ended_at) == pytest.approx(10.0, abs=1e-6)


def test_a_need_under_fair_share_survives_a_restart_and_ends_when_delivered(tmp_path: Path) -> None:
    path, clock = tmp_path / "needs.sqlite3", FakeClock()

    def open_ledger() -> Ledger:
        return Ledger(20.0, 60.0, clock=clock, policy=FAIR_SHARE, store=LedgerStore(path, ID), substation_id=ID)

    before = open_ledger()
    key = before.admit("ev-1", 11.0, energy_kwh=11.0, departure=clock() + 3 * HOUR).session.session_id
    before.admit("ev-2", 11.0, duration_seconds=5 * HOUR)
    clock.advance(HOUR / 2)
    kept = before.session(key)

    after = open_ledger()
    again = after.session(key)
    assert (again.need_kwh, again.energy_kwh, again.allocated_kw) == (11.0, pytest.approx(5.0), 10.0)
    clock.advance(3 * HOUR)
    ended = after.session(key)
    assert ended.end_reason == "energy_delivered" and ended.need_met
    assert energy_from_history(ended, ended.ended_at) == pytest.approx(11.0, abs=1e-6)
    assert ended.ended_at == pytest.approx(
        ended.session.started_at + HOUR / 2 + (11.0 - kept.energy_kwh) / 10.0 * HOUR)


@pytest.mark.parametrize("policy", [DEADLINE, FAIR_SHARE, STRICT])
def test_a_watcher_wakes_when_a_need_is_delivered_with_nobody_else_calling(policy: AllocationPolicy) -> None:
    """A long poll (GET /sessions, the OCPP gateway's) hears of the end when it happens: the watcher plays it."""
    clock = steady_wall_clock()
    ledger = Ledger(30.0, 60.0, clock=clock, policy=policy)
    admitted = ledger.admit("ev-1", 11.0, energy_kwh=11.0 * 0.3 / HOUR, departure=clock() + 10 * HOUR)
    heard: list[bool] = []
    watcher = threading.Thread(daemon=True, target=lambda: heard.append(
        ledger.wait_for_change(admitted.snapshot.state_version, 10 * HOUR)))
    watcher.start()
    watcher.join(60)  # it would sleep until the departure, 10 h away, if it did not wake for the need
    assert heard == [True]
    ended = ledger.session(admitted.session.session_id)
    assert ended.end_reason == "energy_delivered"
    assert ended.ended_at == pytest.approx(admitted.session.started_at + 0.3)


def test_under_fair_share_sessions_held_at_the_level_end_in_turn_and_a_met_lease_charges_on() -> None:
    """Three sessions held at one level, each need delivered at its own moment; the leased one's met first."""
    clock = FakeClock()
    ledger = Ledger(30.0, 60.0, clock=clock, policy=FAIR_SHARE)
    ledger.admit("ev-tx", 22.0, session_id="tx", lease_seconds=2 * HOUR)
    small = ledger.admit("ev-small", 22.0, energy_kwh=4.0, departure=clock() + 4 * HOUR).session
    large = ledger.admit("ev-large", 22.0, energy_kwh=7.0, departure=clock() + 4 * HOUR).session
    ledger.change("tx", energy_kwh=1.0, departure=clock() + 2 * HOUR)
    assert {r.allocated_kw for r in ledger.reports()[1]} == {10.0}
    clock.advance(HOUR)
    # 10 kW each: the lease's 1 kWh at 6 min (it charges on), 4 kWh at 24 min; then 15 kW each: the other's
    # 7 kWh at 24 min + 3 kWh / 15 kW = 36 min; then the lease alone at 22 kW.
    first, second = ledger.session(small.session_id), ledger.session(large.session_id)
    assert (first.end_reason, second.end_reason) == ("energy_delivered", "energy_delivered")
    assert first.ended_at - small.started_at == pytest.approx(0.4 * HOUR)
    assert second.ended_at - large.started_at == pytest.approx(0.6 * HOUR)
    for report in (first, second):
        assert energy_from_history(report, report.ended_at) == pytest.approx(report.need_kwh, abs=1e-6)
    lease = ledger.session("tx")
    assert (lease.state, lease.allocated_kw) == (SessionState.CHARGING, 22.0)
    assert [kw for _, kw in lease.history] == [10.0, 15.0, 22.0]
    assert energy_from_history(lease, clock()) == pytest.approx(10.0 * 0.4 + 15.0 * 0.2 + 22.0 * 0.4)
    assert_never_over_the_limit(ledger)
