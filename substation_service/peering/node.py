"""One substation's balancing machine, shared safely by the round runner, the
membership poller and the HTTP handlers.

Every change of the power exchanged with peers is pushed to the ledger
(``on_peer_power``) before the node's lock is released and before any message
that follows from it is sent: a supplier lowers its own limit before it
offers a step, a receiver raises its own only once it has taken the step, so
neither side ever hands out power that is not there.

Lock order: this node's lock, then the ledger's. The ledger never calls the
node; readings of the ledger are taken before this node's lock.
"""
from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from substation_service.peering.machine import (
    BalancingMachine,
    Delivery,
    LinkReset,
    LoadTable,
    Outgoing,
    Readings,
    Rejection,
)
from substation_service.peering.messages import DraftAccept, parse_message

log = logging.getLogger("peering")


@dataclass(frozen=True)
class NodeReport:
    """Everything the load table, the JSON view and the metrics show, taken at one instant."""

    table: LoadTable
    sent: dict[str, int]
    received: dict[str, int]
    rejected: dict[str, int]
    ignored: dict[str, int]
    outcomes: dict[str, int]
    link_resets: dict[str, int]
    invariant_blocks: int
    send_failures: dict[str, int]


class PeeringNode:
    def __init__(
        self,
        machine: BalancingMachine,
        readings: Callable[[], Readings],
        clock: Callable[[], float],
        on_peer_power: Callable[[float], None] = lambda kw: None,
    ) -> None:
        self._machine = machine
        self._read = readings
        self._clock = clock
        self._on_peer_power = on_peer_power
        self._pushed_peer_kw = 0.0
        self._lock = threading.Lock()
        self._send_failures: Counter[str] = Counter()
        self._last_logged_table: tuple | None = None

    @property
    def node_id(self) -> str:
        return self._machine.node_id

    def readings(self) -> Readings:
        """Step 2 of a round: what the substation's devices read now."""
        return self._read()

    def _push_peer_power(self) -> None:
        """Tell the ledger the power taken from peers (+) or sent and offered to them (-).

        Called with the lock held, right after the machine changed: the ledger re-allocates at
        once. Power received relieves the transformer; power sent, or already offered to a peer
        (the larger of gateway and predicted gateway), is not handed out to local vehicles as well.
        """
        peer_kw = -max(self._machine.gateway_kw, self._machine.predicted_gateway_kw)
        if peer_kw != self._pushed_peer_kw:
            self._pushed_peer_kw = peer_kw
            self._on_peer_power(peer_kw)

    def begin_round(self, phase: int, round_: int) -> list[Outgoing]:
        readings = self.readings()
        with self._lock:
            outgoing = self._machine.begin_round(phase, round_, readings)
            self._push_peer_power()
            table = self._machine.load_table()
        self._log_load_table(table)
        return outgoing

    def close_draft(self) -> list[Outgoing]:
        readings = self.readings()
        with self._lock:
            outgoing = self._machine.close_draft(readings)
            self._push_peer_power()
            return outgoing

    def collect_state(self, phase: int, gateways: Mapping[str, float]) -> list[Outgoing]:
        with self._lock:
            outgoing = self._machine.collect_state(phase, gateways)
            self._push_peer_power()
            return outgoing

    def receive(self, document: Any, signed_by: str) -> Delivery:
        """Handle one received JSON document whose signature ``signed_by`` made (see ``auth.py``).

        Raises ``ValidationError`` when it is not a valid message. A message whose ``sender`` is not
        the signer is refused (``SENDER_MISMATCH``): a member must not speak for another.
        """
        try:
            message = parse_message(document)
        except ValueError:
            self.count_malformed()
            raise
        if message.sender != signed_by:
            self.count_rejection(Rejection.SENDER_MISMATCH)
            return Delivery(rejected=Rejection.SENDER_MISMATCH)
        readings = self.readings()
        with self._lock:
            delivery = self._machine.handle(message, readings, self._clock())
            # Every path, rejections included: the ledger learns at once whatever the machine did.
            self._push_peer_power()
        if delivery.link_reset is LinkReset.LATE_ACCEPT and isinstance(message, DraftAccept):
            log.warning(
                "%s accepted migration %s, which %s no longer offers (the answer came after the offer was "
                "dropped): the link is reset so both release the power between them; balancing moves it again",
                message.sender, message.migration, self.node_id,
            )
        return delivery

    def count_malformed(self) -> None:
        with self._lock:
            self._machine.reject_malformed()
            self._push_peer_power()

    def count_rejection(self, reason: Rejection) -> None:
        """A message or poll answer refused before the machine saw it (no key, bad signature...)."""
        with self._lock:
            self._machine.count_rejection(reason)
            self._push_peer_power()

    def peer_seen(self, peer_id: str, link_epoch: float | None) -> bool:
        """Record a peer that answered; True when it (re)joined the group just now."""
        with self._lock:
            was_member = peer_id in self._machine.members
            self._machine.peer_seen(peer_id, link_epoch, self._clock())
            self._push_peer_power()
            return not was_member and peer_id in self._machine.members

    def reconcile(self, peer_id: str, link_epoch: float | None, peer_flow_kw: float | None) -> bool:
        """Check this side of the link against the peer's /metrics; True when the link was reset."""
        with self._lock:
            view = self._machine.peers.get(peer_id)
            own_flow_kw = view.flow_kw if view else 0.0
            reset = self._machine.reconcile(peer_id, link_epoch, peer_flow_kw, self._clock())
            self._push_peer_power()
        if reset:
            log.warning(
                "%s counts %+.2f kW exchanged with %s, which counts %+.2f kW, on two polls in a row: a "
                "peer-balancing message between them was lost. The link is reset so both release the power "
                "between them; balancing moves it again",
                self.node_id, own_flow_kw, peer_id, peer_flow_kw,
            )
        return reset

    def peer_lost(self, peer_id: str) -> None:
        with self._lock:
            self._machine.peer_lost(peer_id, self._clock())
            self._push_peer_power()

    def is_leader(self) -> bool:
        with self._lock:
            return self._machine.leader == self.node_id

    def members(self) -> list[str]:
        with self._lock:
            return self._machine.members

    def record_send_failure(self, message_type: str) -> None:
        with self._lock:
            self._send_failures[message_type] += 1

    def report(self) -> NodeReport:
        with self._lock:
            machine = self._machine
            return NodeReport(
                table=machine.load_table(),
                sent=dict(machine.sent),
                received=dict(machine.received),
                rejected={reason.value: count for reason, count in machine.rejected.items()},
                ignored=dict(machine.ignored),
                outcomes={outcome.value: count for outcome, count in machine.outcomes.items()},
                link_resets={reason.value: count for reason, count in machine.link_resets.items()},
                invariant_blocks=machine.invariant_blocks,
                send_failures=dict(self._send_failures),
            )

    def _log_load_table(self, table: LoadTable) -> None:
        # Step 4: the table every round at DEBUG; at INFO only when a state, a member or a flow changed.
        signature = (table.state, table.gateway_kw, table.peers_signature())
        changed = signature != self._last_logged_table
        self._last_logged_table = signature
        level = logging.INFO if changed else logging.DEBUG
        if log.isEnabledFor(level):
            log.log(level, "\n    ".join(table.lines()))
