"""Peer-balancing traffic over HTTP: messages POSTed as JSON, peers read from their /metrics."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests

from gridcommon.httpclient import HttpClient
from gridcommon.promtext import parse_metrics
from substation_service.peering.messages import Message, message_json

MESSAGES_PATH = "/peer-balancing/messages"
# Every substation exports its load with its id as label, peering or not: that is how peers learn ids.
ID_METRIC = "current_load"

log = logging.getLogger("peering.transport")


class PeerUnreachable(Exception):
    """A peer did not answer, or answered something that is not a substation's /metrics."""


@dataclass(frozen=True)
class PeerReport:
    """What one poll of a peer's /metrics tells."""

    substation: str
    gateway_kw: float | None
    # The peer's epoch for its link to the polling node; None until it has seen the poller.
    link_epoch: float | None
    # What the peer sends to (+) or takes from (-) the polling node, kW; None until it has seen the poller.
    flow_kw: float | None


def peer_report(source: str, metrics_text: str, own_id: str) -> PeerReport:
    """What a peer's /metrics page (read from ``source``) tells the node ``own_id``."""
    try:
        scrape = parse_metrics(metrics_text)
    except ValueError as exc:
        raise PeerUnreachable(f"{source}: {exc}") from None
    labels = scrape.labels_of(ID_METRIC)
    if not labels or "substation" not in labels:
        raise PeerUnreachable(f"{source} has no {ID_METRIC}{{substation=...}}: is it a substation?")
    peer_id = labels["substation"]
    return PeerReport(
        substation=peer_id,
        gateway_kw=scrape.value("peer_gateway_kw", substation=peer_id),
        link_epoch=scrape.value("peer_link_epoch", substation=peer_id, peer=own_id),
        flow_kw=scrape.value("peer_flow_kw", substation=peer_id, peer=own_id),
    )


class PeerTransport:
    def __init__(self, own_id: str, timeout_seconds: float, workers: int = 8) -> None:
        self._own_id = own_id
        self._client = HttpClient(f"substation-peering/{own_id}", timeout=(timeout_seconds, timeout_seconds))
        # Sends never wait for each other: one silent peer must not delay the messages to the others.
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="peer-http")

    def send_async(self, url: str, message: Message, on_failure: Callable[[], None]) -> None:
        self._pool.submit(self._send, url, message, on_failure)

    def scrape_all(self, urls: Iterable[str]) -> dict[str, PeerReport | PeerUnreachable]:
        """Poll the peers at once; each URL maps to its report or to why it could not be read."""
        urls = list(urls)
        return dict(zip(urls, self._pool.map(self._scrape_or_error, urls)))

    def scrape(self, url: str) -> PeerReport:
        try:
            response = self._client.get(f"{url}/metrics")
            response.raise_for_status()
        except requests.RequestException as exc:
            raise PeerUnreachable(f"{url}/metrics: {exc}") from None
        return peer_report(f"{url}/metrics", response.text, self._own_id)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    def _scrape_or_error(self, url: str) -> PeerReport | PeerUnreachable:
        try:
            return self.scrape(url)
        except PeerUnreachable as exc:
            return exc

    def _send(self, url: str, message: Message, on_failure: Callable[[], None]) -> None:
        try:
            response = self._client.post(f"{url}{MESSAGES_PATH}", json=message_json(message))
        except requests.RequestException as exc:
            on_failure()
            log.info("could not deliver %s to %s: %s (the peer leaves the group if it stays silent)",
                     message.type, url, exc)
            return
        if response.status_code != 202:
            on_failure()
            log.info("%s refused %s with %s: %s", url, message.type, response.status_code, response.text[:300])
