"""The operator's bearer token, checked the same way by every service.

With no token configured the operator endpoints are off (403 saying how to
turn them on), never open. The comparison takes constant time, so the
answer's timing does not tell how much of a guess was right.
"""
from __future__ import annotations

import hmac

from flask import request

from gridcommon.web import ApiError


def bearer_token() -> str | None:
    """The token of an ``Authorization: Bearer …`` header, if the request has one."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return None
    return given.strip()


def token_matches(given: str | None, expected: str) -> bool:
    return given is not None and bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


def require_operator(admin_token: str, service: str) -> None:
    """Raise a 403 when the operator API is off, a 401 when the token is missing or wrong."""
    if not admin_token:
        raise ApiError(
            403,
            "admin_disabled",
            f"The operator API of the {service} is disabled. Start it with ADMIN_TOKEN set to enable it.",
        )
    if not token_matches(bearer_token(), admin_token):
        raise ApiError(
            401,
            "unauthorized",
            "Missing or wrong operator token. Send the header 'Authorization: Bearer <ADMIN_TOKEN>'.",
        ).with_header("WWW-Authenticate", f'Bearer realm="{service} operator"')
