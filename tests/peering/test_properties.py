"""Properties of peer balancing over any group, any start, any delivery order and any message loss."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from substation_service.peering.machine import BalancingParams, Readings
from substation_service.peering.messages import NodeState
from tests.peering.bus import Bus

ROUNDS_PER_PHASE = 5


@dataclass(frozen=True)
class Start:
    readings: dict[str, Readings]
    step_kw: float
    # (sender, receiver, whole steps already exchanged before the test starts)
    exchanges: list[tuple[str, str, int]]
    seed: int
    victim: str | None
    kill_at_round: int


@st.composite
def starts(draw: st.DrawFn, with_victim: bool = False) -> Start:
    nets = draw(st.lists(st.floats(min_value=-40, max_value=40, allow_nan=False), min_size=2, max_size=5))
    names = [f"s{index}" for index in range(len(nets))]
    readings = {
        name: Readings(load_kw=round(max(0.0, -net), 2), generation_kw=round(max(0.0, net), 2))
        for name, net in zip(names, nets)
    }
    pairs = st.tuples(st.sampled_from(names), st.sampled_from(names), st.integers(-3, 3))
    exchanges = [(a, b, steps) for a, b, steps in draw(st.lists(pairs, max_size=4)) if a != b]
    return Start(
        readings=readings,
        step_kw=draw(st.sampled_from([1.0, 2.0, 2.5])),
        exchanges=exchanges,
        seed=draw(st.integers(0, 2**32 - 1)),
        victim=draw(st.sampled_from(names)) if with_victim else None,
        kill_at_round=draw(st.integers(0, 12)),
    )


def build(start: Start) -> Bus:
    params = BalancingParams(migration_step_kw=start.step_kw)
    bus = Bus(start.readings, params, shuffle=random.Random(start.seed), loss_seed=start.seed)
    for sender, receiver, steps in start.exchanges:
        bus.nodes[sender].peers[receiver].flow_kw += steps * start.step_kw
        bus.nodes[receiver].peers[sender].flow_kw -= steps * start.step_kw
    return bus


def imbalance(bus: Bus) -> float:
    return math.fsum(abs(bus.readings[node].net_generation_kw - bus.gateway(node)) for node in bus.alive)


def round_bound(bus: Bus, step_kw: float) -> int:
    """Every round with a supply and a demand node moves at least one step, which lowers the
    total |net - gateway| by two steps; one round more to learn who is in demand, one for slack."""
    return 2 + math.ceil(imbalance(bus) / (2 * step_kw))


def run_round(bus: Bus, round_number: int) -> None:
    round_ = round_number % ROUNDS_PER_PHASE
    bus.phase = round_number // ROUNDS_PER_PHASE
    bus.run_round(round_)


@settings(max_examples=150, deadline=None)
@given(starts())
def test_conservation_no_crossing_and_convergence(start: Start) -> None:
    bus = build(start)
    bound = round_bound(bus, start.step_kw)
    seen = {node: {bus.state_now(node)} for node in bus.alive}
    balanced_at = 0 if bus.balanced() else None

    for round_number in range(bound):
        run_round(bus, round_number)
        # No message is in flight between rounds: every gateway given is a gateway taken.
        assert abs(bus.total_gateway()) < 1e-9
        for node in bus.alive:
            seen[node].add(bus.state_now(node))
        if balanced_at is None and bus.balanced():
            balanced_at = round_number + 1

    # Readings never change here, so only a node's own migrations could move it across.
    for node, states in seen.items():
        assert not {NodeState.SUPPLY, NodeState.DEMAND} <= states, (node, states)
    assert balanced_at is not None, f"not balanced after {bound} rounds: {bus.states_now()}"
    assert bus.balanced()


@settings(max_examples=100, deadline=None)
@given(starts(with_victim=True))
def test_a_node_that_dies_leaves_the_rest_conserved_and_balancing(start: Start) -> None:
    bus = build(start)
    assert start.victim is not None
    for round_number in range(start.kill_at_round):
        run_round(bus, round_number)
    bus.kill(start.victim)
    bus.notice_losses()
    assert abs(bus.total_gateway()) < 1e-9

    first = start.kill_at_round
    bound = round_bound(bus, start.step_kw) + ROUNDS_PER_PHASE  # the next phase's collected state comes first
    for round_number in range(first, first + bound):
        run_round(bus, round_number)
        assert abs(bus.total_gateway()) < 1e-9
    assert bus.balanced(), bus.states_now()


@settings(max_examples=100, deadline=None)
@given(starts(), st.sampled_from([0.05, 0.2, 0.5]), st.integers(1, 3 * ROUNDS_PER_PHASE))
def test_lost_messages_leave_the_group_conserved_once_links_are_reconciled(
    start: Start, loss_rate: float, lossy_rounds: int
) -> None:
    bus = build(start)
    bus.loss_rate = loss_rate  # every peer stays in the group: only messages go missing
    for round_number in range(lossy_rounds):
        run_round(bus, round_number)
    bus.loss_rate = 0.0

    # Quiet now: no message in flight. The last round's poll saw each disagreement once; the next poll sees it
    # again and resets the link, and the peer adopts the new epoch in that poll or the one after.
    bus.connect()
    bus.connect()
    assert bus.links_agree()
    assert abs(bus.total_gateway()) < 1e-9

    # Offers left unanswered by the losses hold their peer until dropped, at the second collected state.
    bound = round_bound(bus, start.step_kw) + 2 * ROUNDS_PER_PHASE
    for round_number in range(lossy_rounds, lossy_rounds + bound):
        run_round(bus, round_number)
        assert abs(bus.total_gateway()) < 1e-9
    assert bus.balanced(), bus.states_now()
    assert bus.links_agree()
