"""Who may read or stop a session: the client that started it, or the operator.

``POST /charge`` hands out a ``session_token`` of 128 random bits with the
session; only its SHA-256 is kept, so neither a log nor a look at this
service's memory gives it away. ``GET``/``DELETE /sessions/<id>`` need it
(``Authorization: Bearer <session_token>``) or the operator's token; the list
of every session is the operator's alone.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets

from gridcommon.auth import bearer_token, token_matches
from gridcommon.web import ApiError

TOKEN_BYTES = 16


def new_session_token() -> tuple[str, str]:
    """``(token, digest)``: the token goes to the client once, the digest is what is kept."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    return token, token_digest(token)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def require_session_access(session_digest: str | None, admin_token: str) -> None:
    """Let the request through with the session's own token or the operator's; else 401 or 403."""
    require_some_credential()
    given = bearer_token()
    if token_matches(given, admin_token):
        return
    if session_digest is not None and hmac.compare_digest(token_digest(given), session_digest):
        return
    raise ApiError(
        403,
        "forbidden",
        "This token is not the one that came with this session. Use the session_token of the answer that "
        "started it.",
    )


def require_some_credential() -> None:
    """Before saying whether a session exists at all, ask for a credential like any other answer would."""
    if bearer_token() is None:
        raise ApiError(
            401,
            "unauthorized",
            "Send the session_token that came with the session: 'Authorization: Bearer <session_token>'.",
        ).with_header("WWW-Authenticate", 'Bearer realm="charge session"')
