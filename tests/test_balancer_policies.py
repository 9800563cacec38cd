"""Unit tests of the routing policies: which substations they offer and in what order."""
from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from load_balancer.policies import (
    POLICY_NAMES,
    LeastConnections,
    LeastLoaded,
    PowerOfTwo,
    RandomChoice,
    RoundRobin,
    make_policy,
)
from load_balancer.view import SubstationSnapshot


def substation(
    substation_id: str,
    load: float = 0.0,
    capacity: float = 100.0,
    reserved: float = 0.0,
    chargers: int = 0,
    in_flight: int = 0,
    up: bool = True,
) -> SubstationSnapshot:
    return SubstationSnapshot(
        url=f"http://127.0.0.1/{substation_id}",
        substation_id=substation_id,
        up=up,
        load_kw=load,
        capacity_kw=capacity,
        total_capacity_kw=capacity,
        active_chargers=chargers,
        reserved_kw=reserved,
        in_flight=in_flight,
        last_poll_at=0.0,
    )


def ids(substations: list[SubstationSnapshot]) -> list[str]:
    return [s.substation_id or "" for s in substations]


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_offers_only_substations_that_are_up_and_have_room(name: str) -> None:
    grid = [
        substation("full", load=95.0),
        substation("reserved-full", load=50.0, reserved=45.0),
        substation("down", up=False),
        substation("room", load=90.0),
        substation("empty"),
    ]
    assert sorted(ids(make_policy(name, random.Random(1)).order(grid, 10.0))) == ["empty", "room"]


def test_least_loaded_orders_by_load_plus_reservations_over_capacity() -> None:
    grid = [
        substation("a", load=50.0, capacity=100.0),  # 0.5
        substation("b", load=10.0, capacity=100.0, reserved=30.0),  # 0.4
        substation("c", load=30.0, capacity=200.0),  # 0.15
    ]
    assert ids(LeastLoaded().order(grid, 10.0)) == ["c", "b", "a"]


def test_least_loaded_breaks_ties_by_id() -> None:
    grid = [substation("c", load=20.0), substation("a", load=20.0), substation("b", load=20.0)]
    assert ids(LeastLoaded().order(grid, 10.0)) == ["a", "b", "c"]


def test_least_connections_counts_sessions_and_requests_in_flight() -> None:
    grid = [
        substation("a", chargers=3),
        substation("b", chargers=1, in_flight=1),
        substation("c", chargers=1, load=40.0),
        substation("d", chargers=0, in_flight=1, load=60.0),
    ]
    # c and d have one connection each (d's is a request in flight); the less loaded goes first.
    assert ids(LeastConnections().order(grid, 10.0)) == ["c", "d", "b", "a"]


def test_round_robin_starts_one_further_each_time() -> None:
    policy = RoundRobin()
    grid = [substation("b"), substation("a"), substation("c")]
    firsts = [ids(policy.order(grid, 10.0)) for _ in range(4)]
    assert firsts == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_random_is_driven_by_the_injected_generator() -> None:
    grid = [substation(name) for name in "abcdef"]
    first = ids(RandomChoice(random.Random(42)).order(grid, 10.0))
    again = ids(RandomChoice(random.Random(42)).order(grid, 10.0))
    assert first == again
    assert sorted(first) == list("abcdef")
    orders = {tuple(ids(RandomChoice(random.Random(seed)).order(grid, 10.0))) for seed in range(20)}
    assert len(orders) > 1, "different seeds give different orders"


@given(seed=st.integers(min_value=0, max_value=2**32))
def test_power_of_two_puts_the_less_loaded_of_its_two_picks_first(seed: int) -> None:
    grid = [substation(name, load=load) for name, load in zip("abcde", (10.0, 20.0, 30.0, 40.0, 50.0))]
    order = PowerOfTwo(random.Random(seed)).order(grid, 10.0)
    assert order[0].load_kw < order[1].load_kw
    rest = order[2:]
    assert ids(rest) == ids(sorted(rest, key=lambda s: s.load_kw)), "the others follow, least loaded first"
    assert sorted(ids(order)) == list("abcde")


def test_power_of_two_never_puts_the_most_loaded_first() -> None:
    grid = [substation("a", load=10.0), substation("b", load=89.0), substation("c", load=50.0)]
    firsts = {ids(PowerOfTwo(random.Random(seed)).order(grid, 10.0))[0] for seed in range(50)}
    # c comes first whenever the pair is (b, c): unlike least_loaded, not always the emptiest.
    assert firsts == {"a", "c"}


def test_power_of_two_with_one_candidate_offers_it() -> None:
    assert ids(PowerOfTwo(random.Random(0)).order([substation("a")], 10.0)) == ["a"]


def test_unknown_policy_names_are_rejected_with_the_choices() -> None:
    with pytest.raises(ValueError, match="least_loaded"):
        make_policy("fastest")
