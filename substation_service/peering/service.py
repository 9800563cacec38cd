"""Peer balancing of one substation at work: the round runner, the membership
poller and the delivery of messages, around one ``PeeringNode``.

Two daemon threads run while the service is started, both stopped by one
Event: the runner (phases and rounds, see ``schedule.py``) and the poller
(group membership, see ``membership.py``). Received messages are handled on
the HTTP request's thread; every message out leaves through the transport's
pool, so no thread waits for a peer's answer.

Without ``PEER_KEY`` nothing can be signed or checked, so peer balancing stays
off even when ``PEERS`` lists peers: no thread starts, every message is
refused (``peering_off``), and the substation says so once at start and in
``/peer-balancing``'s ``off_reason``.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from substation_service.peering.auth import PeerKey
from substation_service.peering.config import GENERATE_KEY_HINT, PeeringSettings
from substation_service.peering.machine import Delivery, Outgoing
from substation_service.peering.membership import Membership
from substation_service.peering.node import PeeringNode
from substation_service.peering.schedule import Slot
from substation_service.peering.transport import PeerReport, PeerTransport

log = logging.getLogger("peering")


class PeeringService:
    def __init__(
        self,
        node: PeeringNode,
        settings: PeeringSettings,
        own_url: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.node = node
        self.settings = settings
        self.own_url = own_url
        self._clock = clock
        self.key = PeerKey.from_text(settings.peer_key) if settings.peer_key else None
        self._transport = PeerTransport(node.node_id, settings.peer_timeout_seconds, self.key, clock)
        peer_urls = [url for url in settings.peers if url != own_url]
        self.membership = Membership(node, peer_urls, self._transport.scrape_all, settings.peer_missed_polls)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._said_off = False

    @property
    def configured(self) -> bool:
        """``PEERS`` lists peers to balance with."""
        return bool(self.settings.peers)

    @property
    def off_reason(self) -> str | None:
        """Why peer balancing does not run although peers are listed; None when nothing stops it."""
        if self.configured and self.key is None:
            return (
                f"PEERS lists peers but PEER_KEY is not set, so {self.node.node_id} cannot sign or check peer "
                "messages and peer balancing is off. Give every substation of the group the same PEER_KEY "
                f"(at least 32 random characters, e.g. from {GENERATE_KEY_HINT}) and restart them."
            )
        return None

    @property
    def clock_tolerance_seconds(self) -> float:
        return self.settings.balancing.clock_tolerance_seconds

    def now(self) -> float:
        return self._clock()

    @property
    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def start(self) -> None:
        if not self.configured or self._threads:
            return
        if self.off_reason is not None:
            if not self._said_off:  # start() may be called again: say it once
                self._said_off = True
                log.warning("%s", self.off_reason)
            return
        for name, target in (("peer-rounds", self._run_rounds), ("peer-membership", self._poll_membership)):
            thread = threading.Thread(target=target, name=f"{name}-{self.node.node_id}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("peer balancing started with peers %s; every message and poll is signed with PEER_KEY",
                 ", ".join(self.settings.peers))

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._transport.close()

    def receive(self, document: Any, signed_by: str) -> Delivery:
        """Handle a message POSTed by a peer, signed by ``signed_by``, and send the answers it calls for."""
        delivery = self.node.receive(document, signed_by)
        self._dispatch(delivery.outgoing)
        return delivery

    def _run_rounds(self) -> None:
        schedule = self.settings.schedule
        slot = schedule.first_slot_at_or_after(self._clock())
        while not self._stop.wait(max(0.0, slot.starts_at - self._clock())):
            try:
                self._run_round(slot)
            except Exception:
                log.exception("peer-balancing round %d of phase %d failed; the next round runs as scheduled",
                              slot.round, slot.phase)
            slot = schedule.next_slot(slot, self._clock())

    def _run_round(self, slot: Slot) -> None:
        if slot.round == 0 and self.node.is_leader():
            self._dispatch(self.node.collect_state(slot.phase, self._gather_gateways()))
        self._dispatch(self.node.begin_round(slot.phase, slot.round))
        if self._stop.wait(self.settings.draft_request_timeout_seconds):
            return
        self._dispatch(self.node.close_draft())

    def _gather_gateways(self) -> dict[str, float]:
        """The leader's state collection: every member's gateway as it reports it now."""
        urls = {peer: self.membership.url_of(peer) for peer in self.node.members()}
        reports = self._transport.scrape_all(url for url in urls.values() if url is not None)
        return {
            report.substation: report.gateway_kw
            for report in reports.values()
            if isinstance(report, PeerReport) and report.gateway_kw is not None
        }

    def _poll_membership(self) -> None:
        while not self._stop.is_set():
            try:
                self.membership.poll_once()
            except Exception:
                log.exception("polling the peers failed; retrying in %g s", self.settings.membership_poll_seconds)
            self._stop.wait(self.settings.membership_poll_seconds)

    def _dispatch(self, outgoing: list[Outgoing]) -> None:
        for item in outgoing:
            message_type = item.message.type
            url = self.membership.url_of(item.to)
            if url is None:
                self.node.record_send_failure(message_type)
                continue
            self._transport.send_async(url, item.message, lambda kind=message_type: self.node.record_send_failure(kind))
