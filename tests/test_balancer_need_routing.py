"""Routing a request with an energy need: where it is expected to be met first, then the most power.

The plain function (``order_for_need``) on hand-made snapshots, whose expected energy is
recomputed here from the snapshot's figures rather than taken from the code under test; and
the wrapper the router uses (``with_need``), around policies that would pick otherwise.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from gridcommon.validation import ChargeRequest
from load_balancer.policies import (
    LeastLoaded,
    NeedFirst,
    RoundRobin,
    expected_energy_kwh,
    order_for_need,
    seconds_to_deliver,
    with_need,
)
from load_balancer.view import SubstationSnapshot

NOW = 1_800_000_000.0


def substation(substation_id: str, load: float = 0.0, capacity: float = 100.0, chargers: int = 0) -> SubstationSnapshot:
    return SubstationSnapshot(
        url=f"http://127.0.0.1/{substation_id}", substation_id=substation_id, up=True, load_kw=load,
        capacity_kw=capacity, total_capacity_kw=capacity, active_chargers=chargers, last_poll_at=0.0,
        # Fair sharing: a new session needs only the minimum to fit, so a 50 kW request fits under 20 kW.
        min_charge_kw=1.4, minimum_load_kw=1.4 * chargers,
    )


def ids(substations: list[SubstationSnapshot]) -> list[str]:
    return [s.polled_id for s in substations]


def need(energy_kwh: float, hours: float, duration_seconds: float | None = None) -> ChargeRequest:
    departure = datetime.fromtimestamp(NOW, timezone.utc) + timedelta(hours=hours)
    return ChargeRequest("EV-1", 50.0, duration_seconds, energy_kwh=energy_kwh, departure=departure)


# "small" is the least loaded (0 %) but has only 20 kW; "busy" is 60 % loaded and has 40 kW free.
SMALL = substation("small", load=0.0, capacity=20.0)
BUSY = substation("busy", load=60.0, capacity=100.0, chargers=3)


def test_least_loaded_alone_would_send_the_request_where_its_need_cannot_be_met() -> None:
    # The premise of the tests below: without the need, the configured policy picks "small".
    assert ids(LeastLoaded().order([SMALL, BUSY], 50.0)) == ["small", "busy"]


def test_the_need_goes_first_where_the_expected_energy_covers_it() -> None:
    # 30 kWh within an hour: 20 kW x 1 h falls short at "small"; 40 kW x 1 h covers it at "busy".
    assert (SMALL.capacity_kw - SMALL.load_kw) * 1.0 < 30.0 - 0.1 <= (BUSY.capacity_kw - BUSY.load_kw) * 1.0
    assert ids(order_for_need([SMALL, BUSY], 50.0, energy_kwh=30.0, seconds_left=3600.0)) == ["busy", "small"]


def test_among_feasible_substations_the_most_power_goes_first() -> None:
    roomy = substation("roomy", load=0.0, capacity=100.0)
    # 5 kWh in an hour is met everywhere; the most power (50 kW at "roomy", 40 at "busy", 20 at "small") leads.
    assert ids(order_for_need([SMALL, BUSY, roomy], 50.0, energy_kwh=5.0, seconds_left=3600.0)) == [
        "roomy", "busy", "small"]


def test_where_no_substation_meets_the_need_the_most_power_still_goes_first() -> None:
    assert ids(order_for_need([SMALL, BUSY], 50.0, energy_kwh=400.0, seconds_left=3600.0)) == ["busy", "small"]


def test_equal_substations_keep_the_configured_policys_order() -> None:
    twins = [substation("b"), substation("a")]
    assert ids(order_for_need(twins, 10.0, energy_kwh=1.0, seconds_left=3600.0)) == ["b", "a"]


def test_the_expected_energy_is_the_predicted_power_held_until_departure() -> None:
    assert expected_energy_kwh(BUSY, 50.0, 1800.0) == pytest.approx(40.0 * 0.5)
    assert expected_energy_kwh(BUSY, 50.0, -5.0) == 0.0  # a departure already past brings nothing


def test_the_time_to_deliver_is_until_departure_or_the_end_of_the_duration() -> None:
    assert seconds_to_deliver(need(10.0, hours=2.0), NOW) == pytest.approx(7200.0)
    assert seconds_to_deliver(need(10.0, hours=2.0, duration_seconds=600.0), NOW) == pytest.approx(600.0)
    assert seconds_to_deliver(ChargeRequest("EV-1", 11.0, 60.0), NOW) is None


def test_the_router_wraps_its_policy_only_for_a_request_with_a_need() -> None:
    policy = LeastLoaded()
    assert with_need(policy, ChargeRequest("EV-1", 50.0, 60.0)) is policy
    wrapped = with_need(policy, need(30.0, hours=1.0))
    assert isinstance(wrapped, NeedFirst) and wrapped.name == "least_loaded"


@pytest.mark.parametrize("base", [LeastLoaded, RoundRobin])
def test_a_request_with_a_need_is_offered_the_feasible_substation_first(base: type) -> None:
    wrapped = NeedFirst(base(), need(30.0, hours=1.0), clock=lambda: NOW)
    for _ in range(3):  # round robin starts elsewhere each time; the need still decides
        assert ids(wrapped.order([SMALL, BUSY], 50.0)) == ["busy", "small"]


def test_a_departure_closer_makes_the_same_need_infeasible_everywhere() -> None:
    # 30 kWh in 30 minutes needs 60 kW: neither has it, so the most power (busy, 40 kW) still leads.
    wrapped = NeedFirst(LeastLoaded(), need(30.0, hours=0.5), clock=lambda: NOW)
    assert ids(wrapped.order([SMALL, BUSY], 50.0)) == ["busy", "small"]
