"""The profile planner (charge_point_gateway.planner), driven directly with a clock of its own.

Besides the rules one by one, a simulation checks the invariant the planner exists for,
independently of its code: with stations that draw what they were last told (or the
higher of two limits while a profile is in flight), the sum of their draws never passes
the sum of the targets' envelope — the limit — whatever order the allocations come in.
"""
from __future__ import annotations

import random

import pytest

from charge_point_gateway.planner import ProfilePlanner, Send


def planner(deadband: float = 0.5, interval: float = 10.0, response: float = 2.0) -> ProfilePlanner:
    return ProfilePlanner(deadband_a=deadband, min_interval_seconds=interval, response_seconds=response)


def test_a_decrease_goes_at_once_whatever_its_size_or_the_last_profile() -> None:
    p = planner()
    p.track("a", 16.0)
    [first] = p.plan({"a": 15.9}, now=0.0)
    assert first == Send("a", 15.9, decrease=True)
    p.accepted(first, now=0.1)
    [second] = p.plan({"a": 15.8}, now=0.2)  # 0.1 A and 0.1 s later: still sent
    assert second.decrease and second.amps == 15.8


def test_an_increase_inside_the_deadband_is_not_sent() -> None:
    p = planner(deadband=0.5, response=0)
    p.track("a", 10.0)
    assert p.plan({"a": 10.4}, now=0.0) == []
    assert p.plan({"a": 10.5}, now=0.0) == [Send("a", 10.5, decrease=False)]


def test_increases_to_one_transaction_keep_the_minimum_interval() -> None:
    p = planner(interval=10.0, response=0)
    p.track("a", 6.0)
    [up] = p.plan({"a": 10.0}, now=0.0)
    p.accepted(up, now=0.1)
    assert p.plan({"a": 16.0}, now=5.0) == []
    assert p.wake_at == 10.0
    assert p.plan({"a": 16.0}, now=10.0) == [Send("a", 16.0, decrease=False)]


def test_a_decrease_is_never_held_by_the_interval() -> None:
    p = planner(interval=10.0, response=0)
    p.track("a", 6.0)
    [up] = p.plan({"a": 16.0}, now=0.0)
    p.accepted(up, now=0.1)
    assert p.plan({"a": 8.0}, now=0.5) == [Send("a", 8.0, decrease=True)]


def test_increases_wait_for_the_decreases_and_the_vehicle_response_time() -> None:
    p = planner(response=2.0)
    p.track("loser", 16.0)
    p.track("winner", 6.0)
    sends = p.plan({"loser": 6.0, "winner": 16.0}, now=0.0)
    assert sends == [Send("loser", 6.0, decrease=True)]  # the increase is not sent with it
    assert p.plan({"loser": 6.0, "winner": 16.0}, now=0.5) == []  # decrease still in flight
    p.accepted(sends[0], now=1.0)
    assert p.plan({"loser": 6.0, "winner": 16.0}, now=2.5) == []  # vehicle still slowing down
    assert p.wake_at == 3.0
    assert p.plan({"loser": 6.0, "winner": 16.0}, now=3.0) == [Send("winner", 16.0, decrease=False)]


def test_a_refused_decrease_blocks_the_increases_that_depend_on_it() -> None:
    p = planner(response=0)
    p.track("loser", 16.0)
    p.track("winner", 6.0)
    [down] = p.plan({"loser": 6.0, "winner": 16.0}, now=0.0)
    p.failed(down, now=0.1)
    assert p.blocked() == ["loser"]
    # Re-planned with the same allocation, the decrease is tried again, the increase still held.
    assert p.plan({"loser": 6.0, "winner": 16.0}, now=1.0) == [Send("loser", 6.0, decrease=True)]
    p.failed(Send("loser", 6.0, decrease=True), now=1.1)
    # The substation now counts the refusing station at what it holds: the block is resolved.
    assert p.plan({"loser": 16.0, "winner": 6.0}, now=2.0) == []
    assert p.blocked() == []


def test_a_refused_increase_blocks_nothing() -> None:
    p = planner(response=0)
    p.track("a", 6.0)
    p.track("b", 6.0)
    [up_a, up_b] = p.plan({"a": 10.0, "b": 10.0}, now=0.0)
    p.failed(up_a, now=0.1)
    p.accepted(up_b, now=0.1)
    assert p.blocked() == []
    # It may hold either limit: counted at the higher one, so a later lower target is a decrease.
    assert p.held("a") == 10.0
    assert p.plan({"a": 8.0, "b": 10.0}, now=0.2) == [Send("a", 8.0, decrease=True)]


def test_a_decrease_waiting_behind_an_increase_in_flight_holds_other_increases() -> None:
    p = planner(response=0)
    p.track("a", 6.0)
    p.track("b", 16.0)
    [up] = p.plan({"a": 16.0, "b": 16.0}, now=0.0)
    # Re-shared while a's increase is in flight: a must come down first, so b must wait.
    assert p.plan({"a": 6.0, "b": 26.0}, now=0.1) == []
    p.accepted(up, now=0.2)
    assert p.plan({"a": 6.0, "b": 26.0}, now=0.3) == [Send("a", 6.0, decrease=True)]


def test_one_profile_in_flight_per_transaction() -> None:
    p = planner(response=0)
    p.track("a", 16.0)
    [down] = p.plan({"a": 10.0}, now=0.0)
    assert p.plan({"a": 8.0}, now=0.1) == []
    p.accepted(down, now=0.2)
    assert p.plan({"a": 8.0}, now=0.3) == [Send("a", 8.0, decrease=True)]


def test_forgotten_transactions_are_ignored_and_answers_for_them_harmless() -> None:
    p = planner()
    p.track("a", 16.0)
    [down] = p.plan({"a": 6.0}, now=0.0)
    p.forget("a")
    p.accepted(down, now=0.1)
    assert p.plan({"a": 6.0}, now=0.2) == [] and p.held("a") is None


def _worst_draw(seed: int, ordered: bool) -> tuple[float, float]:
    """Random re-sharings of one limit among stations; the worst sum of what they draw, and the limit.

    A station draws a higher limit from the moment it is sent (it may apply it before it
    answers) and a lower one only once it accepted it; a refused profile changes nothing.
    ``ordered=False`` sends every change at once, as a gateway without the planner would.
    """
    rng = random.Random(seed)
    limit = 96.0
    keys = [f"s{i}" for i in range(6)]
    p = planner(deadband=0.5, interval=3.0, response=1.0)
    draw = {key: limit / len(keys) for key in keys}
    for key in keys:
        p.track(key, draw[key])
    targets = dict(draw)
    inflight: list[tuple[float, Send]] = []
    worst = 0.0
    now = 0.0
    while now < 300.0:
        now += 0.05
        changed = rng.random() < 0.05
        if changed:  # a new allocation: the same limit shared another way
            weights = [rng.random() for _ in keys]
            targets = {key: max(0.0, round(limit * w / sum(weights) - 0.05, 1)) for key, w in zip(keys, weights)}
        for due, send in [item for item in inflight if item[0] <= now]:
            inflight.remove((due, send))
            if ordered and rng.random() < 0.1:
                p.failed(send, now)
                if send.decrease:
                    # The caller resolves a refusal: the substation counts that station at what it holds.
                    held = p.held(send.key) or 0.0
                    share = (limit - held) / (len(keys) - 1)
                    targets = {k: (held if k == send.key else round(share - 0.05, 1)) for k in keys}
            else:
                if ordered:
                    p.accepted(send, now)
                draw[send.key] = send.amps
        if ordered:
            sends = p.plan(targets, now)
        else:
            sends = [Send(k, v, v < draw[k]) for k, v in targets.items() if changed and v != draw[k]]
        for send in sends:
            if not send.decrease:
                draw[send.key] = send.amps
            inflight.append((now + rng.uniform(0.05, 0.8), send))
        worst = max(worst, sum(draw.values()))
    return worst, limit


@pytest.mark.parametrize("seed", range(5))
def test_stations_never_draw_more_than_the_limit_between_allocations(seed: int) -> None:
    worst, limit = _worst_draw(seed, ordered=True)
    assert worst <= limit + 1e-6, f"stations drew {worst:.1f} A of a {limit:.1f} A limit"


def test_the_check_fails_without_the_ordering() -> None:
    # Stations that take increases and decreases in whatever order they arrive overshoot.
    worst, limit = max(_worst_draw(seed, ordered=False) for seed in range(5))
    assert worst > limit
