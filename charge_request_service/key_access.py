"""Who is asking, at the public API: a client key, the operator, or (``PUBLIC_API_AUTH=open``) anyone.

The key is checked in a ``before_request`` hook, before the body is read: a
flood of wrong keys costs a hash and a dictionary look-up each, and is
counted (``client_key_rejections_total``). The endpoints then ask this
module who the client is, book a request against its key's quotas, and
decide whether it may see a session.

With ``keys``, ``POST /charge`` and ``GET /status`` need a client key or the
operator token; ``GET``/``DELETE /sessions/<id>`` need the key that created
the session, the operator token, or the session's own ``session_token``.
A session another key created is answered 404, as if it did not exist.
With ``open``, a request without a key is served as before (anonymous);
one with a key is held to it, its quotas and its sessions.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, current_app, g, request

from charge_request_service.access import require_session_access, require_some_credential
from charge_request_service.client_keys import (
    API_KEY_HEADER,
    ClientKey,
    ClientKeys,
    RETRY_AFTER_DEFAULT_SECONDS,
    QuotaExceeded,
    QuotaLedger,
    Rejection,
    SharedQuotaLedger,
    looks_like_key,
)
from charge_request_service.limits import RateLimits
from charge_request_service.metrics import ChargeMetrics, KeyFigures
from charge_request_service.store import OwnerQuotas
from gridcommon.auth import bearer_token, token_matches
from gridcommon.validation import ChargeRequest
from gridcommon.web import ApiError

log = logging.getLogger("charge")

EXTENSION_KEY = "charge_request_service.client_access"
OPERATOR = "operator"
# Endpoints a client key (or the operator) must open with PUBLIC_API_AUTH=keys.
KEYED_ENDPOINTS = frozenset({"charge.start_charging", "charge.status"})
# Endpoints of one session: the key that created it, the operator or the session's own token.
SESSION_ENDPOINTS = frozenset({"charge.show_session", "charge.stop_session"})
REALM = 'Bearer realm="charge API client key"'


@dataclass(frozen=True)
class ClientAccess:
    """What the hook and the endpoints share: the mode, the keys, the ledger, the limits and the metrics."""

    mode: str
    keys: ClientKeys
    ledger: QuotaLedger | SharedQuotaLedger
    limits: RateLimits
    metrics: ChargeMetrics
    admin_token: str

    def figures(self) -> list[KeyFigures]:
        """Each active key's holdings, refusals and quotas, for the metrics and the console."""
        active = self.keys.active()
        usage = self.ledger.usage([key.key_id for key in active])
        return [KeyFigures(key.key_id, key.name, usage[key.key_id].sessions, usage[key.key_id].kw,
                           usage[key.key_id].queued, dict(usage[key.key_id].refusals), key.quotas.as_json())
                for key in active]


def client_access() -> ClientAccess:
    return current_app.extensions[EXTENSION_KEY]


def current_client() -> ClientKey | str | None:
    """The request's client key, ``OPERATOR``, or None (no key: anonymous, or a session token)."""
    return g.get("client")


def owner_id() -> str | None:
    """The id of the key the request came with, which owns what it creates; None without one."""
    client = current_client()
    return client.key_id if isinstance(client, ClientKey) else None


def install_client_access(app: Flask, access: ClientAccess) -> None:
    app.extensions[EXTENSION_KEY] = access
    app.before_request(_identify_client)
    app.after_request(_settle_booking)


def _identify_client() -> None:
    endpoint = request.endpoint
    if endpoint not in KEYED_ENDPOINTS and endpoint not in SESSION_ENDPOINTS:
        return
    access = client_access()
    bearer = bearer_token()
    presented = request.headers.get(API_KEY_HEADER)
    if presented is None and bearer is not None and looks_like_key(bearer):
        presented = bearer
    if presented is not None:
        try:
            g.client = access.keys.check(presented.strip())
        except Rejection as rejection:
            access.metrics.key_rejected(rejection.reason)
            raise _wrong_key(rejection.reason) from None
        return
    if token_matches(bearer, access.admin_token):
        g.client = OPERATOR
        return
    if endpoint in SESSION_ENDPOINTS or access.mode == "open":
        return  # a session's own token is checked by the endpoint; ``open`` serves anyone
    reason = "missing" if bearer is None else "unknown"
    access.metrics.key_rejected(reason)
    raise _wrong_key(reason)


def _wrong_key(reason: str) -> ApiError:
    if reason == "missing":
        error, message = "api_key_required", (
            f"This API needs a client key: send 'Authorization: Bearer <key>' or '{API_KEY_HEADER}: <key>'. "
            "The operator creates keys (POST /client-keys).")
    elif reason == "revoked":
        error, message = "api_key_revoked", (
            "This client key was revoked by the operator. Ask the operator for a new one.")
    else:
        error, message = "invalid_api_key", (
            "This client key is not one this service issued, or it was rotated. Check the key you send; the "
            "operator can rotate it (POST /client-keys/<key_id>/rotate) and give you the new one.")
    return ApiError(401, error, message).with_header("WWW-Authenticate", REALM)


def check_request_rate() -> None:
    """The key's requests-per-second quota and the per-address limit; both before the body is read."""
    access = client_access()
    client = current_client()
    key = client if isinstance(client, ClientKey) else None
    try:
        access.limits.check_client(key)
    except ApiError:
        if key is not None:
            access.ledger.refused(key.key_id, "requests_per_second")
        raise


def check_vehicle_rate(vehicle_id: str) -> None:
    """The vehicle's limit, counted per client and vehicle, and only for a valid request."""
    access = client_access()
    try:
        access.limits.check_vehicle(owner_id(), vehicle_id)
    except ApiError:
        if (key := owner_id()) is not None:
            access.ledger.refused(key, "vehicle_rate")
        raise


def idempotency_scope(idempotency_key: str) -> str:
    """The key under which an answer is kept: one client's ``Idempotency-Key`` never finds another's."""
    client = current_client()
    scope = client.key_id if isinstance(client, ClientKey) else (OPERATOR if client == OPERATOR else "anonymous")
    return f"{scope}:{idempotency_key}"


def book_session(charge: ChargeRequest) -> None:
    """Count the request against its key's session and kW quotas before it goes anywhere; 429 if over."""
    client = current_client()
    if not isinstance(client, ClientKey):
        return
    assert charge.session_id is not None
    try:
        client_access().ledger.book(client, charge.session_id, charge.amount_kw)
    except QuotaExceeded as exc:
        raise quota_refusal(client, exc) from None
    g.booking = (client.key_id, charge.session_id)


def database_quotas() -> OwnerQuotas | None:
    """The request's key's quotas, for a database replicas share to count as it claims or queues; else None."""
    client = current_client()
    return client_access().ledger.database_quotas(client) if isinstance(client, ClientKey) else None


def over_database_quota(exc: QuotaExceeded, retry_after: int = RETRY_AFTER_DEFAULT_SECONDS) -> ApiError:
    """The 429 for a quota the database found passed (``database_quotas``), counted as the key's refusal."""
    client = current_client()
    assert isinstance(client, ClientKey)
    client_access().ledger.refused(client.key_id, exc.quota)
    if exc.retry_after is None:
        exc.retry_after = retry_after
    return quota_refusal(client, exc)


def book_queued(retry_after: int) -> None:
    """The booked request is about to wait in the queue: 429 past the key's queued quota."""
    client = current_client()
    booking = g.get("booking")
    if not isinstance(client, ClientKey) or booking is None:
        return
    try:
        # Under the id it was booked with: a retry after a lost answer may have renamed the session since.
        client_access().ledger.queue(client, booking[1], retry_after)
    except QuotaExceeded as exc:
        raise quota_refusal(client, exc) from None


def quota_refusal(key: ClientKey, exc: QuotaExceeded) -> ApiError:
    what = {
        "sessions": "sessions at once (waiting, starting or charging)",
        "kw": "kW asked for at once by its sessions",
        "queued": "requests waiting in the queue",
    }[exc.quota]
    return ApiError(
        429, "quota_exceeded",
        f"Client key {key.name!r} may hold {exc.limit:g} {what}; {exc.used:g} are in use, so this request "
        f"would pass its {exc.quota} quota. Stop a session or wait for one to end (Retry-After), or ask the "
        "operator for a larger quota.",
        quota=exc.quota, limit=exc.limit, in_use=exc.used, retry_after_seconds=exc.retry_after,
    ).with_header("Retry-After", str(exc.retry_after))


def _settle_booking(response: Response) -> Response:
    booking = g.pop("booking", None)
    if booking is not None:
        key_id, session_id = booking
        final = session_id
        if response.status_code in (201, 202):
            # A retry after a lost answer renames the session: the answer carries the name it kept.
            body: Any = response.get_json(silent=True)
            if isinstance(body, dict) and isinstance(body.get("session_id"), str):
                final = body["session_id"]
        # Otherwise the booking lasts as long as the service still holds its session, if at all.
        client_access().ledger.settle(key_id, session_id, final)
    return response


def may_see(owner: str | None) -> bool | None:
    """True: the operator, or the key that owns it; False: another key (answer 404); None: no key, check the token."""
    client = current_client()
    if client == OPERATOR:
        return True
    if isinstance(client, ClientKey):
        return owner is not None and owner == client.key_id
    return None


def require_session_owner(owner: str | None, token_digest: str | None, not_found: ApiError) -> None:
    """Let through the session's key, the operator or its token; to another key, ``not_found``: the very
    answer a session that does not exist gets, since it is not theirs to know of."""
    seen = may_see(owner)
    if seen:
        return
    if seen is False:
        raise not_found
    require_session_access(token_digest, client_access().admin_token)


def require_credential() -> None:
    """Before saying whether a session exists at all, ask for a key or a token like any other answer would."""
    if current_client() is None:
        require_some_credential()
