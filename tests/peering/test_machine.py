"""The peer-balancing state machine, driven through the in-memory bus."""
from __future__ import annotations

import itertools

import pytest

from substation_service.peering.machine import (
    BalancingMachine,
    BalancingParams,
    LinkReset,
    Outcome,
    Readings,
    Rejection,
    classify,
)
from substation_service.peering.messages import (
    CollectedState,
    DraftAccept,
    DraftAge,
    DraftRequest,
    DraftSelect,
    NodeState,
    StateChange,
)
from tests.peering.bus import Bus

STEP = 2.0
SURPLUS = 6.0  # three steps each way


def supply(kw: float = SURPLUS) -> Readings:
    return Readings(load_kw=0.0, generation_kw=kw)


def demand(kw: float = SURPLUS) -> Readings:
    return Readings(load_kw=kw)


def normal() -> Readings:
    return Readings(load_kw=0.0)


READINGS = {"normal": normal(), "demand": demand(), "supply": supply()}


def test_states_have_a_hysteresis_band_of_one_step() -> None:
    assert classify(2.0, 0.0, STEP) is NodeState.SUPPLY
    assert classify(1.99, 0.0, STEP) is NodeState.NORMAL
    assert classify(-1.99, 0.0, STEP) is NodeState.NORMAL
    assert classify(-2.0, 0.0, STEP) is NodeState.DEMAND
    # Relative to the gateway: a node already sending 4 kW with 5 kW of net generation is no longer supply.
    assert classify(5.0, 4.0, STEP) is NodeState.NORMAL
    assert classify(-10.0, -9.0, STEP) is NodeState.NORMAL


@pytest.mark.parametrize("states", list(itertools.product(READINGS, repeat=3)), ids="-".join)
def test_every_combination_of_three_nodes(states: tuple[str, str, str]) -> None:
    names = [f"{state}-{index}" for index, state in enumerate(states)]
    bus = Bus({name: READINGS[state] for name, state in zip(names, states)})
    bus.run_phases(2)

    suppliers = [name for name in names if name.startswith("supply")]
    demanders = [name for name in names if name.startswith("demand")]
    selects = bus.sent("DraftSelect")
    accepts = bus.sent("DraftAccept")
    # A migration goes from a supply node to a demand node, never anywhere else.
    assert all(item.message.sender in suppliers and item.to in demanders for item in selects)
    assert all(item.message.sender in demanders and item.to in suppliers for item in accepts)
    for name in names:
        if name.startswith("normal"):
            assert bus.gateway(name) == 0
    if suppliers and demanders:
        moved = min(SURPLUS * len(suppliers), SURPLUS * len(demanders))
        assert sum(bus.gateway(name) for name in suppliers) == pytest.approx(moved)
        assert sum(bus.gateway(name) for name in demanders) == pytest.approx(-moved)
        assert all(bus.gateway(name) >= 0 for name in suppliers)
        assert all(bus.gateway(name) <= 0 for name in demanders)
        assert bus.balanced()
    else:
        assert selects == [] and accepts == []
        assert bus.sent("DraftRequest") == []
        assert all(bus.gateway(name) == 0 for name in names)
    assert bus.total_gateway() == pytest.approx(0.0)


def test_one_round_runs_request_age_select_accept() -> None:
    bus = Bus({"a-supply": supply(), "b-demand": demand()})
    bus.run_round(0)  # collected state; each announces its new state
    assert [(item.message.type, item.message.sender) for item in bus.delivered] == [
        ("CollectedState", "a-supply"),
        ("StateChange", "a-supply"),
        ("StateChange", "b-demand"),
    ]
    bus.delivered.clear()

    bus.run_round(1)

    assert [(item.message.type, item.message.sender) for item in bus.delivered] == [
        ("DraftRequest", "a-supply"),
        ("StateChange", "b-demand"),
        ("DraftAge", "b-demand"),
        ("DraftSelect", "a-supply"),
        ("DraftAccept", "b-demand"),
    ]
    age = bus.sent("DraftAge")[0].message
    assert isinstance(age, DraftAge) and age.age == SURPLUS  # gateway - net = 0 - (-6)
    assert bus.gateway("a-supply") == STEP and bus.gateway("b-demand") == -STEP
    assert bus.nodes["a-supply"].outcomes[Outcome.ACCEPTED] == 1


def test_supplier_picks_the_greatest_draft_age() -> None:
    bus = Bus({"a": supply(), "b": demand(4.0), "c": demand(8.0)})
    bus.run_round(0)
    bus.run_round(1)
    assert [item.to for item in bus.sent("DraftSelect")] == ["c"]


def test_supply_node_waits_for_the_collected_state() -> None:
    bus = Bus({"a": supply(), "b": demand()})
    # Rounds of a phase whose collected state never came: the supplier offers nothing.
    for round_ in range(3):
        bus.begin_round(round_ + 1)
        bus.close_draft()
    assert bus.sent("DraftRequest") == []
    assert not bus.nodes["a"].synchronized

    bus.collect_state(bus.phase)
    bus.begin_round(4)
    bus.close_draft()
    assert bus.nodes["a"].synchronized
    assert len(bus.sent("DraftAccept")) == 1


def test_too_late_rolls_back_the_suppliers_half() -> None:
    bus = Bus({"a": supply(), "b": demand(2.0)})
    bus.run_round(0)
    bus.begin_round(1)
    # Between Draft Age and Draft Select the demand's load goes away: it no longer needs the power.
    bus.readings["b"] = normal()
    supplier = bus.nodes["a"]
    bus.post(supplier.close_draft(bus.readings["a"]))
    assert supplier.predicted_gateway_kw == STEP  # the offer is open

    bus.deliver_all()

    assert [item.message.type for item in bus.delivered[-2:]] == ["DraftSelect", "TooLate"]
    assert supplier.predicted_gateway_kw == 0 and supplier.gateway_kw == 0
    assert bus.gateway("b") == 0
    assert supplier.outcomes[Outcome.TOO_LATE] == 1


def test_supplier_that_dies_mid_migration() -> None:
    bus = Bus({"a": demand(), "b": supply(), "c": supply()})
    bus.run_round(0)
    bus.begin_round(1)
    for supplier in ("b", "c"):
        bus.post(bus.nodes[supplier].close_draft(bus.readings[supplier]))
    # b's Draft Select is on the wire when b dies: a accepts it, but b never learns.
    bus.kill("b")
    bus.deliver_all()
    assert bus.nodes["a"].peers["b"].flow_kw == -STEP
    assert bus.total_gateway() == -STEP  # b's half can never happen

    bus.notice_losses()

    # a no longer counts on power from a dead substation; the live group is balanced again.
    assert bus.nodes["a"].peers["b"].flow_kw == 0
    assert bus.total_gateway() == pytest.approx(0)
    bus.run_phases(2)
    assert bus.gateway("a") == -SURPLUS and bus.gateway("c") == SURPLUS
    assert bus.balanced()


def test_demand_that_vanishes_mid_migration() -> None:
    bus = Bus({"a": supply(), "b": demand(8.0), "c": demand(4.0)})
    bus.run_round(0)
    bus.begin_round(1)
    supplier = bus.nodes["a"]
    bus.post(supplier.close_draft(bus.readings["a"]))
    bus.kill("b")  # the Draft Select to b is lost
    bus.deliver_all()
    assert supplier.predicted_gateway_kw == STEP and supplier.gateway_kw == 0

    bus.notice_losses()

    assert supplier.outcomes[Outcome.ROLLED_BACK] == 1
    assert supplier.predicted_gateway_kw == 0
    bus.run_phases(2)
    assert bus.gateway("c") == -4.0 and bus.gateway("a") == 4.0
    assert bus.total_gateway() == 0


def test_malicious_demand_drops_draft_select_silently() -> None:
    honest = BalancingParams()
    bus = Bus(
        {"a": supply(), "b": demand(10.0), "c": demand(4.0)},
        overrides={"b": BalancingParams(malicious=True)},
        params=honest,
    )
    bus.run_phase()

    selects_to_b = [item for item in bus.sent("DraftSelect") if item.to == "b"]
    assert len(selects_to_b) == 1  # not offered again while the first offer is unanswered
    assert not [item for item in bus.delivered if item.message.sender == "b" and item.message.type != "StateChange"
                and item.message.type != "DraftAge"]
    assert bus.nodes["b"].ignored["dropped_by_malicious_flag"] == 1
    assert bus.gateway("b") == 0
    # The honest demand is served meanwhile.
    assert bus.gateway("c") == -4.0 and bus.gateway("a") == 4.0
    assert bus.total_gateway() == 0

    bus.run_phases(2)
    # Unanswered for a whole phase after its release at a collected state: dropped.
    assert bus.nodes["a"].outcomes[Outcome.DROPPED] >= 1
    assert bus.gateway("b") == 0


def test_invariant_check_counts_unanswered_offers_and_stops_migrations() -> None:
    # Two malicious demand nodes, neediest of all, swallow one offer each.
    readings = {"a": supply(20.0), "b": demand(10.0), "c": demand(14.0), "d": demand(12.0)}
    malicious = BalancingParams(malicious=True)
    checked = BalancingParams(invariant_check=True, invariant_limit_kw=5.0)
    bus = Bus(readings, params=checked, overrides={"c": malicious, "d": malicious})
    bus.run_phase(rounds=6)

    supplier = bus.nodes["a"]
    # 4 kW of offers are unanswered; one more step would pass the 5 kW bound.
    assert [item.to for item in bus.sent("DraftSelect")] == ["c", "d"]
    assert supplier.power_imbalance_kw == 4.0
    assert supplier.invariant_blocks > 0
    assert bus.gateway("b") == 0

    unchecked = Bus(readings, overrides={"c": malicious, "d": malicious})
    unchecked.run_phase(rounds=6)
    assert unchecked.gateway("b") < 0  # without the check (FREEDM's default) b is served regardless


def test_invariant_check_sees_a_collected_imbalance() -> None:
    machine = BalancingMachine("a", BalancingParams(invariant_check=True, invariant_limit_kw=5.0))
    machine.peer_seen("b")
    machine.handle(StateChange(sender="b", phase=0, round=0, epoch=0, state="demand"), supply())
    machine.collect_state(0, {"b": 4.0})  # the group's gateways do not sum to 0
    assert [item.message.type for item in machine.begin_round(0, 0, supply())] == ["StateChange"]
    assert machine.invariant_blocks == 1

    machine.params = BalancingParams()  # check off, as FREEDM's default
    assert [item.message.type for item in machine.begin_round(0, 1, supply())] == ["DraftRequest"]


def test_disabled_node_computes_and_reports_but_migrates_nothing() -> None:
    off = BalancingParams(enabled=False)
    bus = Bus({"a": supply(), "b": demand()}, overrides={"b": off})
    bus.run_phases(2)
    assert bus.nodes["b"].state is NodeState.DEMAND
    assert bus.nodes["b"].load_table().state == "demand"
    assert bus.sent("DraftSelect") == [] and bus.total_gateway() == 0
    assert [item for item in bus.delivered if item.message.sender == "b"] == []

    bus = Bus({"a": supply(), "b": demand()}, overrides={"a": off})
    bus.run_phases(2)
    assert bus.sent("DraftRequest") == [] and bus.gateway("b") == 0

    # A node switched off while a supplier still counts on it refuses the offer.
    machine = BalancingMachine("b", BalancingParams())
    machine.peer_seen("a")
    machine.handle(DraftRequest(sender="a", phase=0, round=0, epoch=0), demand())  # told its need while on
    machine.params = off
    delivery = machine.handle(DraftSelect(sender="a", phase=0, round=0, epoch=0, migration="a:1", amount=2), demand())
    assert [item.message.type for item in delivery.outgoing] == ["TooLate"]
    assert machine.gateway_kw == 0


def test_unknown_sender_and_stale_link_are_rejected_and_counted() -> None:
    machine = BalancingMachine("a", BalancingParams())
    select = DraftSelect(sender="x", phase=0, round=0, epoch=0, migration="x:1", amount=2)
    assert machine.handle(select, demand()).rejected is Rejection.UNKNOWN_SENDER

    machine.peer_seen("x")
    machine.peer_lost("x", now=50.0)
    machine.peer_seen("x")  # back, but it has not yet learnt that the link was reset
    delivery = machine.handle(select, demand())
    assert delivery.rejected is Rejection.STALE_LINK and delivery.outgoing == []
    assert machine.gateway_kw == 0
    assert machine.rejected == {Rejection.UNKNOWN_SENDER: 1, Rejection.STALE_LINK: 1}
    assert machine.received == {}


def test_one_sided_loss_releases_both_halves_of_the_link() -> None:
    bus = Bus({"a": supply(), "b": demand()})
    bus.run_phase()
    assert bus.gateway("a") == SURPLUS and bus.gateway("b") == -SURPLUS

    # a misses b's polls for a while; b never missed a.
    bus.nodes["a"].peer_lost("b", now=5000.0)
    assert bus.gateway("a") == 0 and bus.gateway("b") == -SURPLUS
    # b answers again, but its messages speak for the old link and are refused.
    bus.nodes["a"].peer_seen("b")
    bus.readings["b"] = demand(10.0)
    bus.post(bus.nodes["b"].begin_round(1, 0, bus.readings["b"]))
    bus.deliver_all()
    assert bus.nodes["a"].rejected[Rejection.STALE_LINK] == 1

    # b polls a's /metrics and adopts the newer epoch: its half goes too.
    bus.connect()
    assert bus.gateway("b") == 0 and bus.total_gateway() == 0
    bus.run_phases(2)
    assert bus.gateway("a") == SURPLUS and bus.gateway("b") == -SURPLUS


def test_restarted_peer_releases_the_old_exchanges() -> None:
    bus = Bus({"a": supply(), "b": demand()})
    bus.run_phase()
    # b restarts quickly, before a notices it gone: a new process knows nothing of the old flows.
    bus.nodes["b"] = BalancingMachine("b", BalancingParams(), epoch_origin=9000.0)
    bus.connect()  # the new b has not polled a yet, so a reads no epoch from it ...
    bus.connect()  # ... until the next poll, which shows the newer link
    assert bus.gateway("a") == 0 and bus.total_gateway() == 0


def test_late_accept_after_the_offer_was_released_still_counts() -> None:
    machine = BalancingMachine("a", BalancingParams())
    machine.peer_seen("b")
    machine.handle(StateChange(sender="b", phase=0, round=0, epoch=0, state="demand"), supply())
    machine.collect_state(0, {"b": 0.0})
    machine.begin_round(0, 0, supply())
    machine.handle(DraftAge(sender="b", phase=0, round=0, epoch=0, age=6.0), supply())
    [offer] = machine.close_draft(supply())
    assert machine.predicted_gateway_kw == STEP
    machine.collect_state(1, {"b": 0.0})  # next phase: the open offer is released
    assert machine.predicted_gateway_kw == 0

    migration = offer.message.migration
    machine.handle(DraftAccept(sender="b", phase=1, round=0, epoch=0, migration=migration, amount=STEP), supply())

    # b has taken the step, so a must send it: the group's gateways still sum to 0.
    assert machine.gateway_kw == STEP
    assert machine.outcomes[Outcome.ACCEPTED] == 1
    assert machine.link_resets == {}


def test_a_lost_draft_accept_is_found_by_the_poll_and_the_link_reset() -> None:
    bus = Bus({"a": supply(10.0), "b": demand(10.0)})
    bus.lose_next["DraftAccept"] = 1
    bus.run_round(0)
    bus.run_round(1)  # b takes the step, but its Draft Accept never reaches a (a failed POST)
    assert [item.message.type for item in bus.lost] == ["DraftAccept"]
    # b counts on power nobody sends. The poll after the round saw it once: it could be an answer on its way.
    assert bus.gateway("a") == 0 and bus.gateway("b") == -STEP

    bus.run_round(2)  # ... and its poll sees the same disagreement again: the link is reset on both sides

    assert bus.total_gateway() == 0 and bus.links_agree()
    assert bus.gateway("b") == 0
    # One side resets the link, the other follows the newer epoch.
    resets = bus.nodes["a"].link_resets + bus.nodes["b"].link_resets
    assert resets == {LinkReset.FLOWS_DISAGREE: 1}
    # a's unanswered offer goes with the link, so a does not keep promising power it never sends.
    assert bus.nodes["a"].outcomes[Outcome.ROLLED_BACK] == 1
    assert bus.nodes["a"].predicted_gateway_kw == 0

    for round_ in (3, 4):
        bus.run_round(round_)
    bus.phase += 1
    bus.run_phases(2)
    assert bus.gateway("a") == 10.0 and bus.gateway("b") == -10.0
    assert bus.balanced() and bus.links_agree()


def test_an_accept_for_an_offer_already_dropped_resets_the_link() -> None:
    bus = Bus({"a": supply(), "b": demand()})
    bus.collect_state(0)
    bus.begin_round(0)
    bus.lose_next["DraftAccept"] = 1
    bus.begin_round(1)
    bus.close_draft()
    # a releases the unanswered offer at the next collected state and drops it at the one after.
    bus.collect_state(1)
    bus.collect_state(2)
    supplier = bus.nodes["a"]
    assert supplier.outcomes[Outcome.DROPPED] == 1

    [late] = bus.lost
    bus.post([late])
    bus.deliver_all()

    # Ignoring it would leave b taking a step nobody sends; a resets the link instead ...
    assert supplier.link_resets[LinkReset.LATE_ACCEPT] == 1 and supplier.ignored == {}
    assert supplier.gateway_kw == 0 and supplier.peers["b"].epoch > late.message.epoch
    # ... and b drops its half when its next poll shows the newer epoch.
    bus.connect()
    assert bus.gateway("b") == 0 and bus.nodes["b"].peers["a"].epoch == supplier.peers["b"].epoch
    assert bus.total_gateway() == 0 and bus.links_agree()


def test_reconcile_resets_only_a_disagreement_seen_twice_on_the_same_link() -> None:
    machine = BalancingMachine("b", BalancingParams())
    machine.peer_seen("a")
    machine.peers["a"].flow_kw = -4.0

    assert not machine.reconcile("a", 0.0, 2.0, now=100.0)  # seen once: an answer may be on its way
    assert not machine.reconcile("a", 0.0, 4.0, now=101.0)  # it arrived: the two sides agree
    assert not machine.reconcile("a", 0.0, 2.0, now=102.0)
    assert not machine.reconcile("a", 0.0, 0.0, now=103.0)  # another disagreement: the link is still moving
    assert not machine.reconcile("a", None, None, now=104.0)  # a restarted and has not seen b yet
    assert not machine.reconcile("a", 0.0, 0.0, now=105.0)
    assert machine.link_resets == {}

    assert machine.reconcile("a", 0.0, 0.0, now=106.0)

    assert machine.link_resets == {LinkReset.FLOWS_DISAGREE: 1}
    assert machine.peers["a"].flow_kw == 0 and machine.peers["a"].epoch == 106.0
    # a still speaks for the old link: b waits for a to adopt the new epoch instead of resetting again.
    assert not machine.reconcile("a", 0.0, 4.0, now=107.0)
    assert not machine.reconcile("a", 0.0, 4.0, now=108.0)
    assert not machine.reconcile("unknown", 0.0, 4.0, now=109.0)


def test_leader_is_the_lowest_live_id_and_is_replaced_when_it_dies() -> None:
    bus = Bus({"s1": normal(), "s2": demand(), "s3": supply()})
    assert bus.leaders() == {"s1"}
    bus.kill("s1")
    bus.run_phase()
    # The others still take s1 for their leader: no collected state, so nobody supplies.
    assert bus.sent("CollectedState") == []
    assert bus.gateway("s2") == 0

    bus.notice_losses()
    assert bus.leaders() == {"s2"}
    bus.run_phases(2)
    assert bus.gateway("s2") == -SURPLUS and bus.gateway("s3") == SURPLUS


def test_collected_state_for_an_old_or_synchronised_phase_is_ignored() -> None:
    machine = BalancingMachine("b", BalancingParams())
    machine.peer_seen("a")
    machine.begin_round(5, 0, normal())
    old = machine.handle(_collected(phase=4, total=1.0), normal())
    assert old.ignored == "old_phase" and not machine.synchronized
    assert machine.handle(_collected(phase=5, total=0.0), normal()).ignored is None
    # The same phase's collected state again is a duplicate; another one for it changes nothing either.
    assert machine.handle(_collected(phase=5, total=3.0), normal()).rejected is Rejection.DUPLICATE
    assert machine.handle(_collected(phase=5, total=3.0, round_=1), normal()).ignored == "already_synchronized"
    assert machine.collected_total_kw == 0.0


def test_draft_age_without_a_request_is_ignored() -> None:
    machine = BalancingMachine("a", BalancingParams())
    machine.peer_seen("b")
    assert machine.handle(DraftAge(sender="b", phase=0, round=0, epoch=0, age=4), supply()).ignored == (
        "no_open_request"
    )
    assert machine.close_draft(supply()) == []


def test_load_table_lists_this_node_and_its_peers() -> None:
    bus = Bus({"a": supply(), "b": demand(), "c": normal()})
    bus.run_round(0)
    bus.kill("c")
    bus.notice_losses()
    table = bus.nodes["a"].load_table()
    assert table.state == "supply" and table.leader == "a"
    assert [(peer.substation, peer.member, peer.state) for peer in table.peers] == [
        ("b", True, "demand"),
        ("c", False, None),
    ]
    lines = table.lines()
    assert lines[1:] == ["(SUPPLY) a", "(DEMAND) b flow +0.00 kW", "(GONE) c flow +0.00 kW"]


def _collected(phase: int, total: float, round_: int = 0) -> CollectedState:
    return CollectedState(sender="a", phase=phase, round=round_, epoch=0, gateway_total_kw=total)
