"""Peer-to-peer power balancing of one substation, as a plain state machine.

After the Load Balancing module of the FREEDM DGI (Akella, "Distributed Load
Balancing for FREEDM system"), itself a drafting algorithm (Ni, Xu and
Gendreau, 1985). No web framework, no threads, no clock: the caller passes in
the device readings, the phase and round, and every received message; the
machine answers with the messages to send and changes its own state. The
substation processes and the tests run this same code.

Quantities, in kW:

* net generation = rating + generation + storage - load. For a substation
  charging vehicles, FREEDM's "load" is what its vehicles ask for (capped by
  an operator's limit, since power past that cannot be used) and "generation"
  includes the transformer's own rating: a substation whose vehicles are
  curtailed has a negative net generation and is in DEMAND; one with room to
  spare is in SUPPLY (see ``PeeringNode.readings``);
* gateway = power this substation sends to its peers (+) or takes from them
  (-): the sum of its exchanges with each peer (``PeerView.flow_kw``);
* predicted gateway = gateway + the migrations it has offered as a supplier
  and that are not yet answered. It is synchronised to the gateway at each
  collected state (offers still unanswered then are released).

State, with the migration step as hysteresis band: SUPPLY when
``net >= gateway + step``, DEMAND when ``net <= gateway - step``, NORMAL
otherwise.

Each round (``begin_round``): read devices, update the state, announce DEMAND
(and any change of state) to the group; a SUPPLY node that has this phase's
collected state sends Draft Request to the peers it knows in DEMAND. After
the request timeout (``close_draft``) it picks the greatest Draft Age and,
if that is at least one step and it is still SUPPLY counting its unanswered
offers, sends Draft Select(step) and raises its predicted gateway. The demand
node takes the step only if it still needs it (Draft Accept, lowering its
gateway), otherwise answers Too Late and the supplier drops its offer. The
supplier's gateway rises when Draft Accept arrives: between the two halves
the migration is "in flight", and at rest the gateways of a group sum to 0.

Deviations from FREEDM, each for a reason:

* A supplier does not offer a second step to a peer that has not answered
  the first, so one silent (``malicious``) peer cannot absorb every offer.
* Exchanges are kept per peer. When a peer leaves the group, the power
  exchanged with it is released on this side (a receiver no longer counts on
  a supplier that is gone, a supplier stops sending into the void) and its
  open migrations are rolled back. The link then gets a new ``epoch``; every
  message carries the sender's epoch for the receiver, and each side adopts
  the larger one (from messages and from the peer's ``/metrics``), releasing
  its own half of the older link. So both sides always forget the same
  exchanges, even when only one of them saw the other leave, or a peer
  restarted without being missed: a restarted node starts its links at its
  start time, newer than anything it had before.
* The two sides of a link are checked against each other. FREEDM trusts
  every Draft Accept to arrive; over HTTP one can be lost (a failed POST, a
  cut shorter than the missed polls that keep a peer in the group), and the
  receiver then counts on a step the supplier never sends, for good. So the
  membership poll, which reads the peer's ``/metrics`` anyway, compares this
  side's flow with the peer's ``peer_flow_kw`` for this node (``reconcile``):
  the same disagreement on two polls in a row is no answer still on its way,
  and the link is reset. A supplier that receives a Draft Accept for an offer
  it no longer has (dropped a phase after its release) resets the link too,
  instead of ignoring it. A reset releases the whole exchange on the link,
  not only the missing step: the epochs make both sides agree without either
  knowing which step went missing, and the next phases migrate the power
  again. A needless reset (an answer slower than two polls) costs only that.

Every received message is checked before it can change anything (``handle``),
since FREEDM trusts its peers and HTTP reaches anyone: the sender must be a
current member (``UNKNOWN_SENDER``); its phase within ``PHASE_WINDOW`` phases
of the local clock's phase and its round one the schedule has
(``IMPLAUSIBLE_PHASE``); its epoch finite and not ahead of the local clock by
more than the clock tolerance (``IMPLAUSIBLE_EPOCH``: an epoch of 1e17 would
never be passed again, so the link could never be reset); not for an older
link (``STALE_LINK``); not one already handled (``DUPLICATE``: same sender,
type, phase, round and migration; acknowledged, acted on once). Then, by
type: a Collected State only from the leader this node sees (``NOT_LEADER``);
a migration's amount above 0 and at most one step (``AMOUNT_OUT_OF_BOUNDS``);
a Draft Select only in answer to a Draft Age this node sent that supplier for
the same phase, round and link epoch, and only once (``UNSOLICITED_SELECT``).
The supplier selects within the round of its Draft Request (``close_draft``
runs before the next ``begin_round``), and the request's phase and round are
the supplier's own, so the select carries exactly those of the request the
Draft Age answered: no round of slack is needed. A rejected message changes
nothing, not even the link's epoch. Who may send at all (the signature under
the group's key, the sender named in it) is checked before the machine sees a
message (``auth.py``, ``routes.py``).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from substation_service.peering.messages import (
    CollectedState,
    DraftAccept,
    DraftAge,
    DraftRequest,
    DraftSelect,
    Message,
    NodeState,
    StateChange,
    TooLate,
)
from substation_service.peering.schedule import PhaseSchedule


@dataclass(frozen=True)
class Readings:
    """What the devices of a substation read at one moment, kW."""

    load_kw: float
    generation_kw: float = 0.0
    storage_kw: float = 0.0
    # What the substation supplies by itself before any generation: its transformer's rating.
    rating_kw: float = 0.0

    @property
    def net_generation_kw(self) -> float:
        return self.rating_kw + self.generation_kw + self.storage_kw - self.load_kw


@dataclass(frozen=True)
class BalancingParams:
    # FREEDM's documentation gives 2 kW, its code defaults to 1: the documented value is kept.
    migration_step_kw: float = 2.0
    # FREEDM's logger device `dgiEnable`: when off, compute and report but migrate nothing.
    enabled: bool = True
    # A demand node that silently drops every Draft Select (FREEDM's malicious flag), for experiments.
    malicious: bool = False
    # Off by default, as in FREEDM: when on, no migration starts once |imbalance + step| would exceed the limit.
    invariant_check: bool = False
    invariant_limit_kw: float = 5.0
    # How far the peers' clocks may be from this node's: bounds signed timestamps and link epochs.
    clock_tolerance_seconds: float = 5.0

    def __post_init__(self) -> None:
        if not self.migration_step_kw > 0:
            raise ValueError(f"migration_step_kw must be greater than 0, got {self.migration_step_kw}")
        if not self.clock_tolerance_seconds > 0:
            raise ValueError(f"clock_tolerance_seconds must be greater than 0, got {self.clock_tolerance_seconds}")
        if self.invariant_limit_kw < self.migration_step_kw:
            raise ValueError("invariant_limit_kw must be at least one migration step, or nothing could migrate")


def classify(net_generation_kw: float, gateway_kw: float, step_kw: float) -> NodeState:
    if net_generation_kw >= gateway_kw + step_kw:
        return NodeState.SUPPLY
    if net_generation_kw <= gateway_kw - step_kw:
        return NodeState.DEMAND
    return NodeState.NORMAL


# Flows are sums of the same steps on both sides; the tolerance only absorbs float rounding.
FLOW_TOLERANCE_KW = 1e-6
# How many phases a message's phase may be from the local clock's. Phases are wall-clock aligned and a
# message is delivered within a round, so a peer is at most a phase off; further is a bug or a forgery.
PHASE_WINDOW = 2
# Received messages remembered to spot duplicates; those older than the phase window are forgotten anyway.
MAX_REMEMBERED_MESSAGES = 4096


class Outcome(str, Enum):
    """How a migration offered by this node (as supplier) ended."""

    ACCEPTED = "accepted"
    TOO_LATE = "too_late"
    # The demand peer left the group (or reset the link) while the offer was open.
    ROLLED_BACK = "rolled_back"
    # No answer for a whole phase after the offer was released at a collected state.
    DROPPED = "dropped"


class LinkReset(str, Enum):
    """Why this node reset a link: released every exchange with the peer and moved to a newer epoch.

    The peer follows when it sees the newer epoch; following is not counted as a reset of its own.
    """

    PEER_LOST = "peer_lost"
    # This side and the peer's /metrics disagreed on the power exchanged, on two polls in a row.
    FLOWS_DISAGREE = "flows_disagree"
    # A Draft Accept came for an offer this node no longer had: the receiver takes power nobody sends.
    LATE_ACCEPT = "late_accept"


class Rejection(str, Enum):
    """Why a received message was refused without being acted on.

    The first group is decided before a message reaches the machine (the HTTP layer, ``auth.py``),
    the rest by ``BalancingMachine.handle``.
    """

    MALFORMED = "malformed"
    # This substation has no PEER_KEY: it can check no signature, so it takes no message.
    PEERING_OFF = "peering_off"
    # Unsigned, or not signed with the group's key, or changed on the way.
    BAD_SIGNATURE = "bad_signature"
    # Signed too long ago (or too far ahead) for this node's clock: a replay, or clocks apart.
    STALE_TIMESTAMP = "stale_timestamp"
    # The message's ``sender`` (or a poll answer's id) is not the one that signed it.
    SENDER_MISMATCH = "sender_mismatch"
    UNKNOWN_SENDER = "unknown_sender"
    IMPLAUSIBLE_PHASE = "implausible_phase"
    IMPLAUSIBLE_EPOCH = "implausible_epoch"
    # The sender still speaks for a link this node has since reset; it will learn the new epoch.
    STALE_LINK = "stale_link"
    # Handled once already: acknowledged, not acted on again.
    DUPLICATE = "duplicate"
    NOT_LEADER = "not_leader"
    AMOUNT_OUT_OF_BOUNDS = "amount_out_of_bounds"
    UNSOLICITED_SELECT = "unsolicited_select"


@dataclass(frozen=True)
class Outgoing:
    to: str
    message: Message


@dataclass(frozen=True)
class Delivery:
    """The result of handling one received message."""

    outgoing: list[Outgoing] = field(default_factory=list)
    rejected: Rejection | None = None
    # Set when the message was valid but had nothing to act on (a late answer, a dropped select...).
    ignored: str | None = None
    link_reset: LinkReset | None = None


@dataclass
class PeerView:
    """What this node knows of one peer."""

    epoch: float
    member: bool = True
    # As FREEDM, a peer counts as NORMAL until it says otherwise.
    state: NodeState = NodeState.NORMAL
    flow_kw: float = 0.0
    # (this side's flow, the peer's flow to this node) when the last poll found them not opposite.
    disagreement: tuple[float, float] | None = None


@dataclass(frozen=True)
class Migration:
    migration_id: str
    peer: str
    amount_kw: float


@dataclass(frozen=True)
class PeerRow:
    substation: str
    member: bool
    state: str | None
    flow_kw: float
    link_epoch: float


@dataclass(frozen=True)
class LoadTable:
    """This node and its peers as it knows them: FREEDM's load table."""

    substation: str
    enabled: bool
    state: str
    phase: int
    round: int
    synchronized: bool
    leader: str
    migration_step_kw: float
    load_kw: float
    rating_kw: float
    generation_kw: float
    storage_kw: float
    net_generation_kw: float
    gateway_kw: float
    predicted_gateway_kw: float
    power_imbalance_kw: float
    peers: tuple[PeerRow, ...]

    def peers_signature(self) -> tuple:
        return tuple((peer.substation, peer.member, peer.state, peer.flow_kw) for peer in self.peers)

    def lines(self) -> list[str]:
        rows = [f"({self.state.upper()}) {self.substation}"]
        for peer in self.peers:
            state = peer.state.upper() if peer.state else "GONE"
            rows.append(f"({state}) {peer.substation} flow {peer.flow_kw:+.2f} kW")
        return [
            f"load table phase {self.phase} round {self.round}: load {self.load_kw:.2f}, "
            f"rating {self.rating_kw:.2f}, generation {self.generation_kw:.2f}, storage {self.storage_kw:.2f}, "
            f"net {self.net_generation_kw:.2f}, gateway {self.gateway_kw:.2f} "
            f"(predicted {self.predicted_gateway_kw:.2f}) kW",
            *rows,
        ]


class BalancingMachine:
    """The peer-balancing state of one substation; see the module docstring."""

    def __init__(
        self,
        node_id: str,
        params: BalancingParams,
        epoch_origin: float = 0.0,
        schedule: PhaseSchedule | None = None,
    ) -> None:
        """``schedule`` tells the phase the local clock is in, to check received phases against."""
        self.node_id = node_id
        self.params = params
        self.schedule = schedule
        # Links to peers first seen get this epoch: a restarted node's start time beats its old links.
        self.epoch_origin = epoch_origin
        self.state = NodeState.NORMAL
        self.readings = Readings(load_kw=0.0)
        self.phase = 0
        self.round = 0
        self.synced_phase: int | None = None
        self.collected_total_kw = 0.0
        self.peers: dict[str, PeerView] = {}
        self._outstanding: dict[str, Migration] = {}
        # Offers released at the last collected state; an answer may still come for them.
        self._expired: dict[str, Migration] = {}
        self._draft_ages: dict[str, float] | None = None
        # The demand peers the open Draft Request went to: only they may answer it.
        self._draft_requested: set[str] = set()
        self._migrations_offered = 0
        # (supplier, phase, round) of each Draft Request this node answered with a need -> the link's epoch then.
        self._solicited: dict[tuple[str, int, int], float] = {}
        # Messages handled, by duplicate key -> their phase (to forget them once out of the window).
        self._seen: dict[tuple, int] = {}
        # The local clock at the message being handled, when the caller gave it.
        self._now: float | None = None
        self.sent: Counter[str] = Counter()
        self.received: Counter[str] = Counter()
        self.rejected: Counter[Rejection] = Counter()
        self.ignored: Counter[str] = Counter()
        self.outcomes: Counter[Outcome] = Counter()
        self.link_resets: Counter[LinkReset] = Counter()
        self.invariant_blocks = 0

    # ----- what the node knows -------------------------------------------------------------

    @property
    def step_kw(self) -> float:
        return self.params.migration_step_kw

    @property
    def gateway_kw(self) -> float:
        return math.fsum(view.flow_kw for view in self.peers.values())

    @property
    def predicted_gateway_kw(self) -> float:
        return self.gateway_kw + self._offered_kw

    @property
    def power_imbalance_kw(self) -> float:
        """FREEDM's power differential: the collected sum of gateways plus this node's open offers."""
        return self.collected_total_kw + self._offered_kw

    @property
    def _offered_kw(self) -> float:
        return math.fsum(migration.amount_kw for migration in self._outstanding.values())

    @property
    def members(self) -> list[str]:
        return sorted(peer for peer, view in self.peers.items() if view.member)

    @property
    def leader(self) -> str:
        # Deterministic: every node that sees the same live members picks the same leader.
        return min([self.node_id, *self.members])

    @property
    def synchronized(self) -> bool:
        return self.synced_phase is not None and self.synced_phase >= self.phase

    def open_migrations(self) -> list[Migration]:
        return [*self._outstanding.values(), *self._expired.values()]

    def load_table(self) -> LoadTable:
        readings = self.readings
        return LoadTable(
            substation=self.node_id,
            enabled=self.params.enabled,
            state=self.state.value,
            phase=self.phase,
            round=self.round,
            synchronized=self.synchronized,
            leader=self.leader,
            migration_step_kw=self.step_kw,
            load_kw=readings.load_kw,
            rating_kw=readings.rating_kw,
            generation_kw=readings.generation_kw,
            storage_kw=readings.storage_kw,
            net_generation_kw=readings.net_generation_kw,
            gateway_kw=self.gateway_kw,
            predicted_gateway_kw=self.predicted_gateway_kw,
            power_imbalance_kw=self.power_imbalance_kw,
            peers=tuple(
                PeerRow(peer, view.member, view.state.value if view.member else None, view.flow_kw, view.epoch)
                for peer, view in sorted(self.peers.items())
            ),
        )

    # ----- group membership ----------------------------------------------------------------

    def peer_seen(self, peer_id: str, link_epoch: float | None = None, now: float | None = None) -> None:
        """The peer answered; ``link_epoch`` is its epoch for the link to this node, if it has one.

        An epoch that is not finite or ahead of ``now`` (the local clock) by more than the clock
        tolerance is not adopted, and counted: adopting it would end the link's resets for good.
        """
        if peer_id == self.node_id:
            return
        if link_epoch is not None and not self._plausible_epoch(link_epoch, now):
            self.rejected[Rejection.IMPLAUSIBLE_EPOCH] += 1
            link_epoch = None
        view = self.peers.get(peer_id)
        if view is None:
            view = self.peers[peer_id] = PeerView(epoch=self.epoch_origin)
        elif not view.member:
            view.member = True
            view.state = NodeState.NORMAL
        if link_epoch is not None and link_epoch > view.epoch:
            self._reset_link(peer_id, link_epoch)

    def peer_lost(self, peer_id: str, now: float) -> None:
        """The peer stopped answering: it leaves the group and the link to it is reset."""
        view = self.peers.get(peer_id)
        if view is None or not view.member:
            return
        view.member = False
        self._bump_link(peer_id, LinkReset.PEER_LOST, now)

    def reconcile(self, peer_id: str, link_epoch: float | None, peer_flow_kw: float | None, now: float) -> bool:
        """Compare this side of the link with the peer's, as a poll of its /metrics found them.

        ``link_epoch`` and ``peer_flow_kw`` are the peer's epoch of, and flow on, its link to this
        node. At rest the two flows are opposite. A disagreement on one poll may be an answer on its
        way; the same one on the next poll is a lost message, and the link is reset (True).
        """
        view = self.peers.get(peer_id)
        if view is None:
            return False
        if link_epoch is not None and not self._plausible_epoch(link_epoch, now):
            return False  # peer_seen counted it; an epoch nobody adopts says nothing about this link
        if peer_flow_kw is not None and not math.isfinite(peer_flow_kw):
            peer_flow_kw = None
        agree = (
            not view.member
            or link_epoch != view.epoch  # the older side adopts the newer epoch first
            or peer_flow_kw is None
            or math.isclose(view.flow_kw, -peer_flow_kw, abs_tol=FLOW_TOLERANCE_KW)
        )
        sides = (view.flow_kw, peer_flow_kw)
        if agree or view.disagreement != sides:
            view.disagreement = None if agree else sides
            return False
        self._bump_link(peer_id, LinkReset.FLOWS_DISAGREE, now)
        return True

    def _bump_link(self, peer_id: str, reason: LinkReset, now: float | None = None) -> None:
        """Reset the link at a newer epoch: past ``now`` when the caller reads a clock."""
        view = self.peers[peer_id]
        epoch = view.epoch + 1.0 if now is None else max(view.epoch + 1.0, now)
        self.link_resets[reason] += 1
        self._reset_link(peer_id, epoch)

    def _reset_link(self, peer_id: str, epoch: float) -> None:
        view = self.peers[peer_id]
        view.epoch = epoch
        view.flow_kw = 0.0
        view.disagreement = None
        for store in (self._outstanding, self._expired):
            for migration_id, migration in list(store.items()):
                if migration.peer == peer_id:
                    del store[migration_id]
                    self.outcomes[Outcome.ROLLED_BACK] += 1
        if self._draft_ages is not None:
            self._draft_ages.pop(peer_id, None)
        # Draft Ages sent on the old link solicit nothing on the new one.
        for key in [key for key in self._solicited if key[0] == peer_id]:
            del self._solicited[key]

    # ----- the rounds of a phase -----------------------------------------------------------

    def collect_state(self, phase: int, gateways: Mapping[str, float]) -> list[Outgoing]:
        """As leader at the start of a phase: sum the members' gateways and send the total to all."""
        if self.synced_phase is not None and phase <= self.synced_phase:
            return []
        total = math.fsum([self.gateway_kw, *(kw for peer, kw in gateways.items() if peer in self.members)])
        self._synchronize(phase, total)
        return self._broadcast(lambda header: CollectedState(**header, gateway_total_kw=total), phase=phase, round_=0)

    def begin_round(self, phase: int, round_: int, readings: Readings) -> list[Outgoing]:
        """Steps 2 to 7 of a round: read devices, update the state, announce, request drafts."""
        self.phase, self.round = phase, round_
        self.readings = readings
        # An offer round not closed by now is abandoned: its ages are a round old.
        self._draft_ages = None
        self._draft_requested = set()
        self._forget_before(phase - PHASE_WINDOW)
        previous = self.state
        self.state = classify(readings.net_generation_kw, self.gateway_kw, self.step_kw)
        if not self.params.enabled:
            return []
        outgoing: list[Outgoing] = []
        if self.state is NodeState.DEMAND or self.state is not previous:
            state = self.state
            outgoing += self._broadcast(lambda header: StateChange(**header, state=state))
        if self.state is NodeState.SUPPLY and self.synchronized:
            outgoing += self._draft_request()
        return outgoing

    def close_draft(self, readings: Readings) -> list[Outgoing]:
        """After the request timeout: select the neediest demand peer and offer it one step."""
        ages, self._draft_ages = self._draft_ages, None
        if ages is None:
            return []
        self.readings = readings
        for peer, age in ages.items():
            if age == 0 and self.peers[peer].member:
                self.peers[peer].state = NodeState.NORMAL
        busy = {migration.peer for migration in self.open_migrations()}
        candidates = sorted(
            (-age, peer)
            for peer, age in ages.items()
            if age >= self.step_kw and self.peers[peer].member and peer not in busy
        )
        if not candidates or not self._still_supply() or not self._invariant_allows():
            return []
        peer = candidates[0][1]
        self._migrations_offered += 1
        migration = Migration(f"{self.node_id}:{self._migrations_offered}", peer, self.step_kw)
        self._outstanding[migration.migration_id] = migration
        return [self._to(peer, lambda h: DraftSelect(**h, migration=migration.migration_id, amount=migration.amount_kw))]

    def _still_supply(self) -> bool:
        # Counting the offers still open, so a supplier never promises itself into deficit.
        predicted = classify(self.readings.net_generation_kw, self.predicted_gateway_kw, self.step_kw)
        return self.params.enabled and predicted is NodeState.SUPPLY

    def _draft_request(self) -> list[Outgoing]:
        demand = [peer for peer in self.members if self.peers[peer].state is NodeState.DEMAND]
        if not demand or not self._invariant_allows():
            return []
        self._draft_ages = {}
        self._draft_requested = set(demand)
        return [self._to(peer, lambda header: DraftRequest(**header)) for peer in demand]

    def _invariant_allows(self) -> bool:
        if not self.params.invariant_check:
            return True
        if abs(self.power_imbalance_kw + self.step_kw) <= self.params.invariant_limit_kw:
            return True
        self.invariant_blocks += 1
        return False

    def _synchronize(self, phase: int, total_kw: float) -> None:
        self.outcomes[Outcome.DROPPED] += len(self._expired)
        self._expired, self._outstanding = self._outstanding, {}
        self.collected_total_kw = total_kw
        self.synced_phase = phase

    # ----- received messages ---------------------------------------------------------------

    def reject_malformed(self) -> None:
        self.rejected[Rejection.MALFORMED] += 1

    def count_rejection(self, reason: Rejection) -> None:
        """A message refused before it reached the machine (no key, bad signature...)."""
        self.rejected[reason] += 1

    def handle(self, message: Message, readings: Readings, now: float | None = None) -> Delivery:
        """Check a received message (see the module docstring) and act on it if it passes.

        ``now`` is the local clock, seconds since the epoch. Without it (the in-memory tests) the
        phase is checked against the last round begun and the epoch only for being finite.
        """
        view = self.peers.get(message.sender)
        if view is None or not view.member:
            return self._reject(Rejection.UNKNOWN_SENDER)
        if not self._plausible_slot(message.phase, message.round, now):
            return self._reject(Rejection.IMPLAUSIBLE_PHASE)
        if not self._plausible_epoch(message.epoch, now):
            return self._reject(Rejection.IMPLAUSIBLE_EPOCH)
        if message.epoch < view.epoch:
            return self._reject(Rejection.STALE_LINK)
        key = _duplicate_key(message)
        if key in self._seen:
            return self._reject(Rejection.DUPLICATE)
        violation = self._violation(message)
        if violation is not None:
            return self._reject(violation)
        if message.epoch > view.epoch:
            self._reset_link(message.sender, message.epoch)
        self._remember(key, message.phase)
        self.received[message.type] += 1
        self.readings = readings
        self._now = now
        delivery = self._HANDLERS[message.type](self, message, view)
        if delivery.ignored:
            self.ignored[delivery.ignored] += 1
        return delivery

    def _reject(self, reason: Rejection) -> Delivery:
        self.rejected[reason] += 1
        return Delivery(rejected=reason)

    def _plausible_slot(self, phase: int, round_: int, now: float | None) -> bool:
        reference = self.phase
        if self.schedule is not None:
            if round_ >= self.schedule.rounds_per_phase:
                return False
            if now is not None:
                reference = self.schedule.phase_at(now)
        return abs(phase - reference) <= PHASE_WINDOW

    def _plausible_epoch(self, epoch: float, now: float | None) -> bool:
        # Epochs are start times and reset times read from the clock: never far ahead of a peer's clock.
        if not math.isfinite(epoch) or epoch < 0:
            return False
        return now is None or epoch <= now + self.params.clock_tolerance_seconds

    def _violation(self, message: Message) -> Rejection | None:
        if isinstance(message, CollectedState) and message.sender != self.leader:
            return Rejection.NOT_LEADER
        if isinstance(message, (DraftSelect, DraftAccept, TooLate)):
            if not 0 < message.amount <= self.step_kw + FLOW_TOLERANCE_KW:
                return Rejection.AMOUNT_OUT_OF_BOUNDS
        if isinstance(message, DraftSelect):
            # Only a supplier this node told its need, for that very request and link, may offer it power.
            if self._solicited.get((message.sender, message.phase, message.round)) != message.epoch:
                return Rejection.UNSOLICITED_SELECT
        return None

    def _remember(self, key: tuple, phase: int) -> None:
        self._seen[key] = phase
        while len(self._seen) > MAX_REMEMBERED_MESSAGES:
            del self._seen[next(iter(self._seen))]

    def _forget_before(self, phase: int) -> None:
        """Messages older than this phase are refused as implausible: no need to remember them."""
        self._seen = {key: seen for key, seen in self._seen.items() if seen >= phase}
        self._solicited = {key: epoch for key, epoch in self._solicited.items() if key[1] >= phase}

    def _on_state_change(self, message: StateChange, view: PeerView) -> Delivery:
        view.state = message.state
        return Delivery()

    def _on_draft_request(self, message: DraftRequest, view: PeerView) -> Delivery:
        view.state = NodeState.SUPPLY
        age = 0.0
        state_now = classify(self.readings.net_generation_kw, self.gateway_kw, self.step_kw)
        if self.params.enabled and state_now is NodeState.DEMAND:
            age = self.gateway_kw - self.readings.net_generation_kw
        if age > 0:
            # The supplier may now offer one step for this request (see _violation).
            self._solicited[(message.sender, message.phase, message.round)] = view.epoch
        return Delivery([self._to(message.sender, lambda header: DraftAge(**header, age=age))])

    def _on_draft_age(self, message: DraftAge, view: PeerView) -> Delivery:
        if self._draft_ages is None:
            return Delivery(ignored="no_open_request")
        if message.sender not in self._draft_requested:
            # A peer this round's request did not go to must not draw the offer to itself.
            return Delivery(ignored="not_requested")
        self._draft_ages[message.sender] = message.age
        return Delivery()

    def _on_draft_select(self, message: DraftSelect, view: PeerView) -> Delivery:
        # One Draft Age, one offer: a second select for the same request is unsolicited.
        self._solicited.pop((message.sender, message.phase, message.round), None)
        if self.params.malicious:
            return Delivery(ignored="dropped_by_malicious_flag")
        amount = message.amount
        answer = {"migration": message.migration, "amount": amount}
        still_needed = self.readings.net_generation_kw <= self.predicted_gateway_kw - amount
        if self.params.enabled and still_needed:
            view.flow_kw -= amount
            return Delivery([self._to(message.sender, lambda header: DraftAccept(**header, **answer))])
        return Delivery([self._to(message.sender, lambda header: TooLate(**header, **answer))])

    def _on_draft_accept(self, message: DraftAccept, view: PeerView) -> Delivery:
        migration = self._resolve(message)
        if migration is None:
            # The receiver has taken a step this node does not send; ignoring it would leave it so for good.
            self._bump_link(message.sender, LinkReset.LATE_ACCEPT, self._now)
            return Delivery(link_reset=LinkReset.LATE_ACCEPT)
        view.flow_kw += migration.amount_kw
        self.outcomes[Outcome.ACCEPTED] += 1
        return Delivery()

    def _on_too_late(self, message: TooLate, view: PeerView) -> Delivery:
        if self._resolve(message) is None:
            return Delivery(ignored="unknown_migration")
        self.outcomes[Outcome.TOO_LATE] += 1
        return Delivery()

    def _on_collected_state(self, message: CollectedState, view: PeerView) -> Delivery:
        if self.synced_phase is not None and message.phase <= self.synced_phase:
            return Delivery(ignored="already_synchronized")
        if message.phase < self.phase:
            return Delivery(ignored="old_phase")
        self._synchronize(message.phase, message.gateway_total_kw)
        return Delivery()

    _HANDLERS: dict[str, Callable[["BalancingMachine", Message, PeerView], Delivery]] = {
        "StateChange": _on_state_change,
        "DraftRequest": _on_draft_request,
        "DraftAge": _on_draft_age,
        "DraftSelect": _on_draft_select,
        "DraftAccept": _on_draft_accept,
        "TooLate": _on_too_late,
        "CollectedState": _on_collected_state,
    }  # type: ignore[dict-item]

    def _resolve(self, message: DraftAccept | TooLate) -> Migration | None:
        """The open offer this answer is about, removed from the open ones; None if there is none."""
        for store in (self._outstanding, self._expired):
            migration = store.get(message.migration)
            if migration is not None and migration.peer == message.sender:
                del store[message.migration]
                return migration
        return None

    # ----- sending ---------------------------------------------------------------------------

    def _to(
        self, peer: str, build: Callable[[dict], Message], phase: int | None = None, round_: int | None = None
    ) -> Outgoing:
        header = {
            "sender": self.node_id,
            "phase": self.phase if phase is None else phase,
            "round": self.round if round_ is None else round_,
            "epoch": self.peers[peer].epoch,
        }
        message = build(header)
        self.sent[message.type] += 1
        return Outgoing(peer, message)

    def _broadcast(
        self, build: Callable[[dict], Message], phase: int | None = None, round_: int | None = None
    ) -> list[Outgoing]:
        return [self._to(peer, build, phase, round_) for peer in self.members]


def _duplicate_key(message: Message) -> tuple:
    """What makes a message the same one again: a peer sends each at most once per round."""
    return (message.sender, message.type, message.phase, message.round, getattr(message, "migration", None))
