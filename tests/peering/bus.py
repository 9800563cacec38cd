"""An in-memory message bus that runs several ``BalancingMachine``s as a group.

The machines are the ones the substations run; only the network is replaced:
messages go into a queue and are delivered, in order or in an order a
``random.Random`` picks, until none is left. A killed node's messages are lost;
so are the next messages of a type named in ``lose_next``, and each message
with the probability ``loss_rate``, while the peers stay in the group.
"""
from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable

from substation_service.peering.machine import BalancingMachine, BalancingParams, Outgoing, Readings, classify
from substation_service.peering.messages import NodeState


class Bus:
    def __init__(
        self,
        readings: dict[str, Readings],
        params: BalancingParams | None = None,
        overrides: dict[str, BalancingParams] | None = None,
        shuffle: random.Random | None = None,
        loss_seed: int = 0,
    ) -> None:
        params = params or BalancingParams()
        overrides = overrides or {}
        self.readings = dict(readings)
        self.nodes = {node: BalancingMachine(node, overrides.get(node, params)) for node in readings}
        self.alive = set(self.nodes)
        self.queue: list[Outgoing] = []
        self.delivered: list[Outgoing] = []
        self.lost: list[Outgoing] = []
        self.lose_next: Counter[str] = Counter()
        self.loss_rate = 0.0
        self._losses = random.Random(loss_seed)
        self._shuffle = shuffle
        self.phase = 0
        self.clock = 1000.0
        self.connect()

    # ----- membership ---------------------------------------------------------------------

    def connect(self) -> None:
        """One membership poll: every live node reads every other live node's /metrics, which tell the
        peer's epoch of and flow on its link to the poller."""
        for node in sorted(self.alive):
            for peer in sorted(self.alive - {node}):
                their_view = self.nodes[peer].peers.get(node)
                epoch, flow = (their_view.epoch, their_view.flow_kw) if their_view else (None, None)
                self.nodes[node].peer_seen(peer, epoch)
                self.nodes[node].reconcile(peer, epoch, flow, self.clock)

    def kill(self, node: str) -> None:
        """The process dies: it stops handling messages; its peers notice only at ``notice_losses``."""
        self.alive.discard(node)

    def notice_losses(self) -> None:
        self.clock += 1
        for node in self.alive:
            for peer in set(self.nodes) - self.alive:
                self.nodes[node].peer_lost(peer, self.clock)

    # ----- rounds ---------------------------------------------------------------------------

    def post(self, outgoing: Iterable[Outgoing]) -> None:
        self.queue.extend(outgoing)

    def deliver_all(self, limit: int = 10_000) -> None:
        for _ in range(limit):
            if not self.queue:
                return
            index = self._shuffle.randrange(len(self.queue)) if self._shuffle else 0
            item = self.queue.pop(index)
            if self._is_lost(item):
                self.lost.append(item)
                continue
            self.delivered.append(item)
            if item.to in self.alive:
                self.post(self.nodes[item.to].handle(item.message, self.readings[item.to]).outgoing)
        raise AssertionError(f"messages still flowing after {limit} deliveries")

    def _is_lost(self, item: Outgoing) -> bool:
        if self.lose_next[item.message.type] > 0:
            self.lose_next[item.message.type] -= 1
            return True
        return self.loss_rate > 0 and self._losses.random() < self.loss_rate

    def leaders(self) -> set[str]:
        return {node for node in self.alive if self.nodes[node].leader == node}

    def collect_state(self, phase: int) -> None:
        """The leader reads every member's gateway (as state collection would) and sends the sum."""
        for leader in self.leaders():
            machine = self.nodes[leader]
            gateways = {peer: self.nodes[peer].gateway_kw for peer in machine.members if peer in self.alive}
            self.post(machine.collect_state(phase, gateways))
        self.deliver_all()

    def begin_round(self, round_: int) -> None:
        for node in sorted(self.alive):
            self.post(self.nodes[node].begin_round(self.phase, round_, self.readings[node]))
        self.deliver_all()

    def close_draft(self) -> None:
        for node in sorted(self.alive):
            self.post(self.nodes[node].close_draft(self.readings[node]))
        self.deliver_all()

    def run_round(self, round_: int) -> None:
        """A round, then a membership poll (the substations poll alongside their rounds)."""
        if round_ == 0:
            self.collect_state(self.phase)
        self.begin_round(round_)
        self.close_draft()
        self.connect()

    def run_phase(self, rounds: int = 5) -> None:
        for round_ in range(rounds):
            self.run_round(round_)
        self.phase += 1

    def run_phases(self, phases: int, rounds: int = 5) -> None:
        for _ in range(phases):
            self.run_phase(rounds)

    # ----- what the tests look at ---------------------------------------------------------

    def gateway(self, node: str) -> float:
        return self.nodes[node].gateway_kw

    def total_gateway(self, nodes: Iterable[str] | None = None) -> float:
        return math.fsum(self.gateway(node) for node in (self.alive if nodes is None else nodes))

    def state_now(self, node: str) -> NodeState:
        step = self.nodes[node].step_kw
        return classify(self.readings[node].net_generation_kw, self.gateway(node), step)

    def states_now(self) -> dict[str, NodeState]:
        return {node: self.state_now(node) for node in self.alive}

    def balanced(self) -> bool:
        """FREEDM's end state: no SUPPLY and DEMAND node at the same time."""
        states = set(self.states_now().values())
        return not {NodeState.SUPPLY, NodeState.DEMAND} <= states

    def links_agree(self) -> bool:
        """Both sides of every link between live nodes count the same power, on the same epoch."""
        for node in self.alive:
            for peer in self.alive - {node}:
                mine, theirs = self.nodes[node].peers[peer], self.nodes[peer].peers[node]
                if mine.epoch != theirs.epoch or not math.isclose(mine.flow_kw, -theirs.flow_kw, abs_tol=1e-9):
                    return False
        return True

    def sent(self, message_type: str) -> list[Outgoing]:
        return [item for item in self.delivered if item.message.type == message_type]
