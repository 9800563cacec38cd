"""The group of a substation: its configured peers that answer, kept current by polling.

A peer that leaves unanswered ``missed_polls`` polls in a row leaves the
group; one that answers again rejoins, and its answer is checked against
this node's side of the link (``BalancingMachine.reconcile``). Peers are
configured by URL and known by id: the id is read from the ``substation``
label of the peer's /metrics.

Only answers signed with the group's key count (``transport.py``): an
unsigned or wrongly signed answer at a peer's URL is counted as a rejection
(``bad_signature``, ``sender_mismatch``) and as a missed poll. So the ids of
the group, and with them who may send messages at all, are learnt only from
the configured URLs and only from holders of the key; an answer forged at a
peer's URL adopts no epoch and resets no link. It does what silence would
do: after ``missed_polls`` of them the peer leaves the group, as anyone able
to intercept its traffic could make it do anyway.
"""
from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable

from substation_service.peering.node import PeeringNode
from substation_service.peering.transport import PeerReport, PeerUnauthenticated, PeerUnreachable

log = logging.getLogger("peering.membership")

Scraper = Callable[[Iterable[str]], dict[str, PeerReport | PeerUnreachable]]


class Membership:
    def __init__(self, node: PeeringNode, peer_urls: Iterable[str], scrape_all: Scraper, missed_polls: int) -> None:
        self._node = node
        self._urls = list(peer_urls)
        self._scrape_all = scrape_all
        self._missed_polls = missed_polls
        self._lock = threading.Lock()
        self._id_by_url: dict[str, str] = {}
        self._misses: Counter[str] = Counter()
        # URLs whose last answer failed its signature, so that is said once, not at every poll.
        self._unauthenticated: set[str] = set()

    def poll_once(self) -> None:
        for url, result in self._scrape_all(self._urls).items():
            if isinstance(result, PeerReport):
                self._answered(url, result)
            else:
                self._unanswered(url, result)

    def url_of(self, peer_id: str) -> str | None:
        with self._lock:
            return next((url for url, known in self._id_by_url.items() if known == peer_id), None)

    def directory(self) -> dict[str, str | None]:
        """Every configured URL and the id answering there (None until one has)."""
        with self._lock:
            return {url: self._id_by_url.get(url) for url in self._urls}

    def _answered(self, url: str, report: PeerReport) -> None:
        with self._lock:
            if report.substation == self._node.node_id:
                # PEERS may list every substation, this one included.
                self._urls.remove(url)
                return
            previous = self._id_by_url.get(url)
            self._id_by_url[url] = report.substation
            self._misses[url] = 0
            self._unauthenticated.discard(url)
        if previous is not None and previous != report.substation:
            log.warning("%s now answers as %s instead of %s; %s leaves the group", url, report.substation,
                        previous, previous)
            self._node.peer_lost(previous)
        if self._node.peer_seen(report.substation, report.link_epoch):
            log.info("%s at %s joined the peer-balancing group", report.substation, url)
        self._node.reconcile(report.substation, report.link_epoch, report.flow_kw)

    def _unanswered(self, url: str, error: PeerUnreachable) -> None:
        with self._lock:
            self._misses[url] += 1
            misses = self._misses[url]
            peer_id = self._id_by_url.get(url)
            first_refusal = isinstance(error, PeerUnauthenticated) and url not in self._unauthenticated
            if isinstance(error, PeerUnauthenticated):
                self._unauthenticated.add(url)
        if isinstance(error, PeerUnauthenticated):
            self._node.count_rejection(error.reason)
        if first_refusal:
            log.warning("the answer at %s is not signed by a substation of this group (%s); it counts as no "
                        "answer until it is. Give every substation of the group the same PEER_KEY", url, error)
        if peer_id is not None and misses == self._missed_polls:
            log.warning("%s at %s has not answered %d polls (%s): it leaves the peer-balancing group until it "
                        "answers again", peer_id, url, misses, error)
            self._node.peer_lost(peer_id)
        elif peer_id is None and misses == self._missed_polls:
            log.warning("peer %s does not answer (%s); check PEERS and that the substation runs", url, error)
