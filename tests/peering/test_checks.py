"""The checks every received message passes before the state machine acts on it (no HTTP here).

Each forged or replayed message is refused with its reason counted and moves no power.
"""
from __future__ import annotations

import pytest

from substation_service.peering.machine import BalancingMachine, BalancingParams, Readings, Rejection
from substation_service.peering.messages import (
    CollectedState,
    DraftAccept,
    DraftAge,
    DraftRequest,
    DraftSelect,
    StateChange,
    TooLate,
)
from substation_service.peering.schedule import PhaseSchedule

STEP = 2.0
NOW = 1_718_000_000.0
SCHEDULE = PhaseSchedule(phase_seconds=4.0, round_seconds=0.4)
PHASE = SCHEDULE.phase_at(NOW)


def demand() -> Readings:
    return Readings(load_kw=6.0)


def supply() -> Readings:
    return Readings(load_kw=0.0, generation_kw=6.0)


def node(node_id: str = "b", schedule: PhaseSchedule | None = None) -> BalancingMachine:
    """``node_id`` with peers a (the leader, lowest id) and c, all on the link epoch 0."""
    machine = BalancingMachine(node_id, BalancingParams(migration_step_kw=STEP), schedule=schedule)
    for peer in {"a", "b", "c"} - {node_id}:
        machine.peer_seen(peer)
    return machine


def solicit(machine: BalancingMachine, sender: str = "a", phase: int = 0, round_: int = 0) -> None:
    """``sender`` asks for Draft Ages and ``machine``, in demand, answers with its need."""
    delivery = machine.handle(DraftRequest(sender=sender, phase=phase, round=round_, epoch=0), demand())
    [answer] = delivery.outgoing
    assert isinstance(answer.message, DraftAge) and answer.message.age > 0


def select(sender: str = "a", phase: int = 0, round_: int = 0, amount: float = STEP, migration: str = "a:1",
           epoch: float = 0) -> DraftSelect:
    return DraftSelect(sender=sender, phase=phase, round=round_, epoch=epoch, migration=migration, amount=amount)


def assert_refused(machine: BalancingMachine, message, reason: Rejection, readings: Readings | None = None,
                   now: float | None = None) -> None:
    before = (machine.gateway_kw, machine.predicted_gateway_kw, dict(machine.received))
    delivery = machine.handle(message, readings or demand(), now)
    assert delivery.rejected is reason and delivery.outgoing == []
    assert machine.rejected[reason] == 1
    # Nothing moved, nothing was counted as received.
    assert (machine.gateway_kw, machine.predicted_gateway_kw, dict(machine.received)) == before


def test_a_select_after_this_nodes_draft_age_takes_one_step() -> None:
    machine = node()
    solicit(machine)
    delivery = machine.handle(select(), demand())
    assert [item.message.type for item in delivery.outgoing] == ["DraftAccept"]
    assert machine.gateway_kw == -STEP and machine.rejected == {}


def test_a_select_nobody_asked_for_is_refused() -> None:
    # Even a proper step is refused without a Draft Age first.
    assert_refused(node(), select(), Rejection.UNSOLICITED_SELECT)


@pytest.mark.parametrize(
    "forged",
    [
        select(sender="c", migration="c:1"),  # another supplier than the one told
        select(round_=1),  # another round than the request's
        select(phase=1),
    ],
    ids=["other-supplier", "other-round", "other-phase"],
)
def test_a_select_must_answer_this_very_draft_age(forged: DraftSelect) -> None:
    machine = node()
    solicit(machine)
    assert_refused(machine, forged, Rejection.UNSOLICITED_SELECT)


def test_one_draft_age_brings_one_offer() -> None:
    machine = node()
    solicit(machine)
    machine.handle(select(migration="a:1"), demand())
    delivery = machine.handle(select(migration="a:2"), demand())  # another offer for the same request
    assert delivery.rejected is Rejection.UNSOLICITED_SELECT and delivery.outgoing == []
    assert machine.gateway_kw == -STEP


def test_a_draft_age_of_no_need_solicits_nothing() -> None:
    machine = node()
    machine.handle(DraftRequest(sender="a", phase=0, round=0, epoch=0), Readings(load_kw=0.0))  # not in demand
    assert_refused(machine, select(), Rejection.UNSOLICITED_SELECT)


def test_a_select_on_a_link_reset_since_the_draft_age_is_refused() -> None:
    machine = node()
    solicit(machine)
    machine.peer_lost("a", now=100.0)
    machine.peer_seen("a")
    assert_refused(machine, select(), Rejection.STALE_LINK)  # the old link's epoch
    # On the new link nothing was asked for yet.
    delivery = machine.handle(select(epoch=machine.peers["a"].epoch), demand())
    assert delivery.rejected is Rejection.UNSOLICITED_SELECT and machine.gateway_kw == 0


@pytest.mark.parametrize("amount", [30.0, STEP + 0.01])
def test_a_migration_of_more_than_one_step_is_refused(amount: float) -> None:
    machine = node()
    solicit(machine)
    assert_refused(machine, select(amount=amount), Rejection.AMOUNT_OUT_OF_BOUNDS)
    # The refused select used up nothing: the real offer for that request still goes through.
    machine.handle(select(), demand())
    assert machine.gateway_kw == -STEP


@pytest.mark.parametrize("kind", [DraftAccept, TooLate])
def test_answers_of_more_than_one_step_are_refused(kind: type) -> None:
    machine = node("a")
    assert_refused(machine, kind(sender="b", phase=0, round=0, epoch=0, migration="a:1", amount=30.0),
                   Rejection.AMOUNT_OUT_OF_BOUNDS, supply())
    assert machine.link_resets == {}


def test_a_collected_state_from_a_member_that_is_not_the_leader_is_refused() -> None:
    machine = node()
    assert machine.leader == "a"
    assert_refused(machine, CollectedState(sender="c", phase=0, round=0, epoch=0, gateway_total_kw=50.0),
                   Rejection.NOT_LEADER)
    assert not machine.synchronized and machine.collected_total_kw == 0


def test_a_collected_state_for_phase_10_to_the_12_is_refused_and_balancing_goes_on() -> None:
    machine = node()
    forged = CollectedState(sender="a", phase=10**12, round=0, epoch=0, gateway_total_kw=0.0)
    assert_refused(machine, forged, Rejection.IMPLAUSIBLE_PHASE)
    assert machine.synced_phase is None
    # Were it taken, no collected state of a real phase would ever be again; the next one is.
    machine.handle(CollectedState(sender="a", phase=0, round=0, epoch=0, gateway_total_kw=0.0), demand())
    assert machine.synchronized


def test_phases_and_rounds_are_checked_against_the_local_clocks_schedule() -> None:
    machine = node(schedule=SCHEDULE)
    for phase in (PHASE - 3, PHASE + 3, 0):
        delivery = machine.handle(DraftRequest(sender="a", phase=phase, round=0, epoch=0), demand(), NOW)
        assert delivery.rejected is Rejection.IMPLAUSIBLE_PHASE
    rounds = SCHEDULE.rounds_per_phase
    assert machine.handle(DraftRequest(sender="a", phase=PHASE, round=rounds, epoch=0), demand(), NOW).rejected is (
        Rejection.IMPLAUSIBLE_PHASE
    )
    for phase in (PHASE - 2, PHASE, PHASE + 2):  # clocks a little apart, a message a round late
        delivery = machine.handle(DraftRequest(sender="a", phase=phase, round=rounds - 1, epoch=0), demand(), NOW)
        assert delivery.rejected is None
    assert machine.rejected == {Rejection.IMPLAUSIBLE_PHASE: 4}


def test_an_epoch_far_in_the_future_is_refused_and_the_link_keeps_its_epoch() -> None:
    machine = node(schedule=SCHEDULE)
    forged = StateChange(sender="a", phase=PHASE, round=0, epoch=1e17, state="supply")
    assert_refused(machine, forged, Rejection.IMPLAUSIBLE_EPOCH, now=NOW)
    assert machine.peers["a"].epoch == 0 and machine.peers["a"].state.value == "normal"
    # Within the clock tolerance: a peer whose clock runs a little ahead.
    ahead = StateChange(sender="a", phase=PHASE, round=0, epoch=NOW + 4, state="supply")
    assert machine.handle(ahead, demand(), NOW).rejected is None
    assert machine.peers["a"].epoch == NOW + 4


def test_a_poll_showing_an_epoch_far_in_the_future_is_not_adopted() -> None:
    machine = node()
    machine.peers["a"].flow_kw = -STEP
    machine.peer_seen("a", link_epoch=1e17, now=NOW)
    assert machine.peers["a"].epoch == 0 and machine.peers["a"].flow_kw == -STEP
    assert machine.rejected == {Rejection.IMPLAUSIBLE_EPOCH: 1}
    for _ in range(3):  # nor does it count as a disagreement of the two sides
        assert not machine.reconcile("a", 1e17, 0.0, now=NOW)
    assert machine.peers["a"].flow_kw == -STEP and machine.link_resets == {}


def test_a_refused_message_does_not_even_move_the_link_to_its_epoch() -> None:
    machine = node()
    assert_refused(machine, select(epoch=50.0), Rejection.UNSOLICITED_SELECT)
    assert machine.peers["a"].epoch == 0


def test_a_duplicated_select_takes_power_once() -> None:
    machine = node()
    solicit(machine)
    first = machine.handle(select(), demand())
    assert [item.message.type for item in first.outgoing] == ["DraftAccept"]

    again = machine.handle(select(), demand())

    assert again.rejected is Rejection.DUPLICATE and again.outgoing == []
    assert machine.gateway_kw == -STEP and machine.rejected == {Rejection.DUPLICATE: 1}
    assert machine.received["DraftSelect"] == 1


def test_a_duplicated_accept_adds_flow_once() -> None:
    supplier = node("a")
    supplier.handle(StateChange(sender="b", phase=0, round=0, epoch=0, state="demand"), supply())
    supplier.collect_state(0, {})
    supplier.begin_round(0, 0, supply())
    supplier.handle(DraftAge(sender="b", phase=0, round=0, epoch=0, age=6.0), supply())
    [offer] = supplier.close_draft(supply())
    accept = DraftAccept(sender="b", phase=0, round=0, epoch=0, migration=offer.message.migration, amount=STEP)
    supplier.handle(accept, supply())
    assert supplier.gateway_kw == STEP

    again = supplier.handle(accept, supply())

    # Without the check, the second accept (no open offer left) would reset the link and release the step.
    assert again.rejected is Rejection.DUPLICATE
    assert supplier.gateway_kw == STEP and supplier.link_resets == {}
    assert supplier.peers["b"].epoch == 0


def test_a_draft_age_from_a_peer_not_asked_is_ignored() -> None:
    supplier = node("a")
    supplier.handle(StateChange(sender="b", phase=0, round=0, epoch=0, state="demand"), supply())
    supplier.collect_state(0, {})
    supplier.begin_round(0, 0, supply())  # asks b only
    delivery = supplier.handle(DraftAge(sender="c", phase=0, round=0, epoch=0, age=50.0), supply())
    assert delivery.ignored == "not_requested"
    assert supplier.close_draft(supply()) == []


def test_remembered_messages_are_forgotten_once_out_of_the_phase_window() -> None:
    machine = node()
    machine.handle(StateChange(sender="a", phase=0, round=0, epoch=0, state="supply"), demand())
    machine.begin_round(3, 0, demand())
    # Phase 0 is now too old to be taken at all, so it need not be remembered either.
    assert machine.handle(StateChange(sender="a", phase=0, round=0, epoch=0, state="supply"), demand()).rejected is (
        Rejection.IMPLAUSIBLE_PHASE
    )
    assert not machine._seen
