"""An in-memory message bus that runs several ``BalancingMachine``s as a group.

The machines are the ones the substations run; only the network is replaced:
messages go into a queue and are delivered, in order or in an order a
``random.Random`` picks, until none is left. A killed node's messages are lost.
"""
from __future__ import annotations

import math
import random
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
    ) -> None:
        params = params or BalancingParams()
        overrides = overrides or {}
        self.readings = dict(readings)
        self.nodes = {node: BalancingMachine(node, overrides.get(node, params)) for node in readings}
        self.alive = set(self.nodes)
        self.queue: list[Outgoing] = []
        self.delivered: list[Outgoing] = []
        self._shuffle = shuffle
        self.phase = 0
        self.clock = 1000.0
        self.connect()

    # ----- membership ---------------------------------------------------------------------

    def connect(self) -> None:
        """Every live node sees every other live node answer its poll."""
        for node in self.alive:
            for peer in self.alive - {node}:
                their_view = self.nodes[peer].peers.get(node)
                self.nodes[node].peer_seen(peer, their_view.epoch if their_view else None)

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
            self.delivered.append(item)
            if item.to in self.alive:
                self.post(self.nodes[item.to].handle(item.message, self.readings[item.to]).outgoing)
        raise AssertionError(f"messages still flowing after {limit} deliveries")

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
        if round_ == 0:
            self.collect_state(self.phase)
        self.begin_round(round_)
        self.close_draft()

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

    def sent(self, message_type: str) -> list[Outgoing]:
        return [item for item in self.delivered if item.message.type == message_type]
