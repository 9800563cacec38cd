"""Signatures of peer-balancing traffic: HMAC-SHA256 under the group's ``PEER_KEY``.

Every substation of a group holds the same key. A peer message (a POST to
``/peer-balancing/messages``) and a membership poll (a GET of ``/metrics``)
carry four headers:

| Header             | Value                                                         |
|--------------------|---------------------------------------------------------------|
| `X-Peer-Sender`    | the signing substation's id, e.g. `substation-2`              |
| `X-Peer-Timestamp` | the signer's clock, seconds since the Unix epoch, e.g. `1718000000.125` |
| `X-Peer-Nonce`     | 32 random hex digits, new for every request                   |
| `X-Peer-Signature` | 64 lowercase hex digits: HMAC-SHA256(key, the text below)     |

The signed text is these lines joined by ``\\n`` (no trailing newline), as UTF-8::

    peer-request-v1
    <METHOD, upper case>
    <path, and "?" with the query string exactly as sent when there is one:
     /peer-balancing/messages, or /metrics?name[]=current_load&... (see signed_path)>
    <X-Peer-Sender>
    <X-Peer-Timestamp, exactly as sent>
    <X-Peer-Nonce>
    <SHA-256 of the exact body bytes, lowercase hex (of b"" for a GET)>

A receiver checks the signature first (``hmac.compare_digest``), then that
the timestamp lies within the clock tolerance of its own clock: an old
message replayed later is refused even though its signature is good. Inside
the window, a replay is a duplicate the state machine acknowledges without
acting on it (``machine.py``).

The answer to a signed poll is signed too, since the poller acts on what it
reads there (link epochs and flows, the gateway the leader collects): headers
`X-Peer-Sender` (the answering substation's id) and `X-Peer-Signature`, an
HMAC-SHA256 of::

    peer-response-v1
    <the poll's X-Peer-Signature>
    <X-Peer-Sender of the answer>
    <HTTP status code>
    <SHA-256 of the exact body bytes, lowercase hex>

Binding the answer to the poll's own signature (fresh timestamp and nonce)
means an answer recorded earlier cannot be served again as a new one. Answers
to unsigned requests (Prometheus's scrapes) are left unsigned.

Plain module: no Flask, no clock of its own; the callers pass ``now``.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

from substation_service.peering.machine import Rejection
from substation_service.peering.messages import NODE_ID_PATTERN

SENDER_HEADER = "X-Peer-Sender"
TIMESTAMP_HEADER = "X-Peer-Timestamp"
NONCE_HEADER = "X-Peer-Nonce"
SIGNATURE_HEADER = "X-Peer-Signature"

REQUEST_SCHEME = "peer-request-v1"
RESPONSE_SCHEME = "peer-response-v1"

_SENDER = re.compile(NODE_ID_PATTERN)
# Plain decimal seconds: no exponent, no "nan"/"inf", nothing float() would take that a peer never sends.
_TIMESTAMP = re.compile(r"^[0-9]{1,12}(\.[0-9]{1,9})?$")
_NONCE = re.compile(r"^[0-9a-f]{16,64}$")
_SIGNATURE = re.compile(r"^[0-9a-f]{64}$")


class AuthError(Exception):
    """A request or an answer that does not prove it comes from a holder of the group's key."""

    def __init__(self, reason: Rejection, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class SignedRequest:
    """A request whose signature checked out."""

    sender: str
    signature: str


@dataclass(frozen=True)
class PeerKey:
    # repr=False: the key must never end up in a log line or a traceback.
    secret: bytes = field(repr=False)

    @classmethod
    def from_text(cls, text: str) -> "PeerKey":
        return cls(text.encode("utf-8"))

    def sign_request(
        self, method: str, path: str, sender: str, body: bytes, now: float, nonce: str | None = None
    ) -> dict[str, str]:
        """The headers that sign this request."""
        timestamp = f"{now:.3f}"
        nonce = nonce or secrets.token_hex(16)
        signature = self._mac(_request_text(method, path, sender, timestamp, nonce, body))
        return {
            SENDER_HEADER: sender,
            TIMESTAMP_HEADER: timestamp,
            NONCE_HEADER: nonce,
            SIGNATURE_HEADER: signature,
        }

    def verify_request(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes, now: float, tolerance_seconds: float
    ) -> SignedRequest:
        """The signer of a received request; ``AuthError`` when it is unsigned, forged or too old or new."""
        sender = headers.get(SENDER_HEADER, "")
        timestamp = headers.get(TIMESTAMP_HEADER, "")
        nonce = headers.get(NONCE_HEADER, "")
        signature = headers.get(SIGNATURE_HEADER, "")
        if not (sender or timestamp or nonce or signature):
            raise AuthError(
                Rejection.BAD_SIGNATURE,
                f"The request is not signed: peer-balancing traffic must carry the {SENDER_HEADER}, "
                f"{TIMESTAMP_HEADER}, {NONCE_HEADER} and {SIGNATURE_HEADER} headers made with the group's PEER_KEY.",
            )
        for name, value, pattern in (
            (SENDER_HEADER, sender, _SENDER),
            (TIMESTAMP_HEADER, timestamp, _TIMESTAMP),
            (NONCE_HEADER, nonce, _NONCE),
            (SIGNATURE_HEADER, signature, _SIGNATURE),
        ):
            if not pattern.match(value):
                raise AuthError(
                    Rejection.BAD_SIGNATURE,
                    f"The {name} header is missing or malformed, so the request's signature cannot be checked.",
                )
        expected = self._mac(_request_text(method, path, sender, timestamp, nonce, body))
        if not hmac.compare_digest(expected, signature):
            raise AuthError(
                Rejection.BAD_SIGNATURE,
                "The signature does not match the request: it was not made with this group's PEER_KEY, or the "
                "request was changed on the way. Every substation of the group must have the same PEER_KEY.",
            )
        sent_at = float(timestamp)
        if not (math.isfinite(now) and abs(now - sent_at) <= tolerance_seconds):
            raise AuthError(
                Rejection.STALE_TIMESTAMP,
                f"The request was signed at {timestamp}, {now - sent_at:+.1f} s from this substation's clock, outside "
                f"the {tolerance_seconds:g} s tolerance: a replay, or clocks that differ. Keep the substations' clocks "
                "synchronised (NTP); PEER_CLOCK_TOLERANCE_SECONDS sets the tolerance.",
            )
        return SignedRequest(sender=sender, signature=signature)

    def sign_response(self, request_signature: str, responder: str, status: int, body: bytes) -> dict[str, str]:
        """The headers that sign the answer to a signed request."""
        return {
            SENDER_HEADER: responder,
            SIGNATURE_HEADER: self._mac(_response_text(request_signature, responder, status, body)),
        }

    def verify_response(self, request_signature: str, headers: Mapping[str, str], status: int, body: bytes) -> str:
        """The id of the substation that signed this answer; ``AuthError`` when it did not come from the group."""
        responder = headers.get(SENDER_HEADER, "")
        signature = headers.get(SIGNATURE_HEADER, "")
        if not signature:
            raise AuthError(
                Rejection.BAD_SIGNATURE,
                "the answer is not signed: the peer has no PEER_KEY (its peer balancing is off), a different "
                "PEER_KEY, or something else answers at its URL",
            )
        if not (_SENDER.match(responder) and _SIGNATURE.match(signature)):
            raise AuthError(Rejection.BAD_SIGNATURE, "the answer's signature headers are malformed")
        expected = self._mac(_response_text(request_signature, responder, status, body))
        if not hmac.compare_digest(expected, signature):
            raise AuthError(
                Rejection.BAD_SIGNATURE,
                "the answer's signature does not match: the peer has a different PEER_KEY, or the answer was "
                "changed on the way",
            )
        return responder

    def _mac(self, text: bytes) -> str:
        return hmac.new(self.secret, text, hashlib.sha256).hexdigest()


def signed_path(path: str, query_string: bytes) -> str:
    """The request target as signed: the path, and the raw query string when there is one.

    A poll's query picks what the answer holds, so it is signed too: nobody on the way can
    strip a family from a peer's page without the signature failing.
    """
    return f"{path}?{query_string.decode('latin-1')}" if query_string else path


def _request_text(method: str, path: str, sender: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    lines = (REQUEST_SCHEME, method.upper(), path, sender, timestamp, nonce, hashlib.sha256(body).hexdigest())
    return "\n".join(lines).encode("utf-8")


def _response_text(request_signature: str, responder: str, status: int, body: bytes) -> bytes:
    lines = (RESPONSE_SCHEME, request_signature, responder, str(status), hashlib.sha256(body).hexdigest())
    return "\n".join(lines).encode("utf-8")
