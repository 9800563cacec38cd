"""Peer-balancing traffic over HTTP: messages POSTed as JSON, peers read from their /metrics.

Both are signed with the group's key (``auth.py``): a message's body is sent
as the exact bytes that were signed, and a poll of /metrics is a signed GET
whose answer must come back signed by the peer. What a poll reads (the peer's
id, its link epoch and flow towards this node, its gateway) is trusted only
from such an answer; any other answer at a peer's URL, however well formed,
is a ``PeerUnauthenticated`` and counts as no answer at all.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests

from gridcommon.httpclient import HttpClient
from gridcommon.promtext import families_query, parse_metrics
from substation_service.peering.auth import SIGNATURE_HEADER, AuthError, PeerKey
from substation_service.peering.machine import Rejection
from substation_service.peering.messages import Message, message_json

MESSAGES_PATH = "/peer-balancing/messages"
METRICS_PATH = "/metrics"
# Set on a /metrics answer whose poll carried a signature this substation refused: says why, unsigned.
POLL_REFUSED_HEADER = "X-Peer-Refused"
# Every substation exports its load with its id as label, peering or not: that is how peers learn ids.
ID_METRIC = "current_load"

log = logging.getLogger("peering.transport")


class PeerUnreachable(Exception):
    """A peer did not answer, or answered something that is not a substation's /metrics."""


class PeerUnauthenticated(PeerUnreachable):
    """An answer at a peer's URL that does not prove it comes from a substation of the group."""

    def __init__(self, message: str, reason: Rejection) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PeerReport:
    """What one poll of a peer's /metrics tells."""

    substation: str
    gateway_kw: float | None
    # The peer's epoch for its link to the polling node; None until it has seen the poller.
    link_epoch: float | None
    # What the peer sends to (+) or takes from (-) the polling node, kW; None until it has seen the poller.
    flow_kw: float | None


# What peer_report reads of a peer's page.
PEER_FAMILIES = frozenset({ID_METRIC, "peer_gateway_kw", "peer_link_epoch", "peer_flow_kw"})
# What a membership poll asks for (and signs): only the families it reads.
PEER_POLL_PATH = f"{METRICS_PATH}?{families_query(PEER_FAMILIES)}"


def peer_report(source: str, metrics_text: str, own_id: str) -> PeerReport:
    """What a peer's /metrics page (read from ``source``) tells the node ``own_id``."""
    try:
        scrape = parse_metrics(metrics_text, only=PEER_FAMILIES)
    except ValueError as exc:
        raise PeerUnreachable(f"{source}: {exc}") from None
    labels = scrape.labels_of(ID_METRIC)
    if not labels or "substation" not in labels:
        raise PeerUnreachable(f"{source} has no {ID_METRIC}{{substation=...}}: is it a substation?")
    peer_id = labels["substation"]
    return PeerReport(
        substation=peer_id,
        gateway_kw=_finite(scrape.value("peer_gateway_kw", substation=peer_id)),
        link_epoch=_finite(scrape.value("peer_link_epoch", substation=peer_id, peer=own_id)),
        flow_kw=_finite(scrape.value("peer_flow_kw", substation=peer_id, peer=own_id)),
    )


def signed_peer_report(
    source: str,
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    poll_signature: str,
    key: PeerKey,
    own_id: str,
) -> PeerReport:
    """What the answer to a signed poll tells, once its signature is checked; ``PeerUnauthenticated`` if it fails.

    ``poll_signature`` is the poll's own ``X-Peer-Signature``: the answer is signed over it.
    """
    try:
        responder = key.verify_response(poll_signature, headers, status, body)
    except AuthError as exc:
        refused = headers.get(POLL_REFUSED_HEADER)
        why = f"the peer refused this poll's signature ({refused}): {exc.message}" if refused else exc.message
        raise PeerUnauthenticated(f"{source}: {why}", exc.reason) from None
    report = peer_report(source, body.decode("utf-8", errors="replace"), own_id)
    if report.substation != responder:
        raise PeerUnauthenticated(
            f"{source} signed its answer as {responder}, but the metrics in it are {report.substation}'s",
            Rejection.SENDER_MISMATCH,
        )
    return report


def _finite(value: float | None) -> float | None:
    # NaN or infinity in a peer's page is no reading: a flow or epoch of inf must not reach the machine.
    return value if value is not None and math.isfinite(value) else None


class PeerTransport:
    def __init__(
        self,
        own_id: str,
        timeout_seconds: float,
        key: PeerKey | None,
        clock: Callable[[], float],
        workers: int = 8,
    ) -> None:
        self._own_id = own_id
        self._key = key
        self._clock = clock
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
        """A signed poll of the peer's /metrics; what it tells, if the peer signed its answer."""
        source = f"{url}{PEER_POLL_PATH}"
        if self._key is None:
            raise PeerUnauthenticated(
                f"{source}: this substation has no PEER_KEY to sign its poll", Rejection.PEERING_OFF
            )
        headers = self._key.sign_request("GET", PEER_POLL_PATH, self._own_id, b"", self._clock())
        try:
            response = self._client.get(source, headers=headers)
            response.raise_for_status()
        except requests.RequestException as exc:
            raise PeerUnreachable(f"{source}: {exc}") from None
        return signed_peer_report(
            source, response.status_code, response.headers, response.content, headers[SIGNATURE_HEADER], self._key,
            self._own_id,
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    def _scrape_or_error(self, url: str) -> PeerReport | PeerUnreachable:
        try:
            return self.scrape(url)
        except PeerUnreachable as exc:
            return exc

    def _send(self, url: str, message: Message, on_failure: Callable[[], None]) -> None:
        if self._key is None:
            on_failure()
            return
        # The exact bytes signed are the bytes sent: the receiver checks the signature over its body as received.
        body = json.dumps(message_json(message), separators=(",", ":")).encode("utf-8")
        headers = {
            "Content-Type": "application/json",
            **self._key.sign_request("POST", MESSAGES_PATH, self._own_id, body, self._clock()),
        }
        try:
            response = self._client.post(f"{url}{MESSAGES_PATH}", data=body, headers=headers)
        except requests.RequestException as exc:
            on_failure()
            log.info("could not deliver %s to %s: %s (the peer leaves the group if it stays silent)",
                     message.type, url, exc)
            return
        if response.status_code != 202:
            on_failure()
            log.info("%s refused %s with %s: %s", url, message.type, response.status_code, response.text[:300])
