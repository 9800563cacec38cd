"""Rate limits of the public API, with Flask-Limiter (in memory by default, Redis optional).

Per vehicle, on by default: a vehicle asking many times a second is broken or
hostile, whether its requests are valid or not. Per client address, off by
default: one charge-point backend may send for thousands of vehicles from
one address (and the load tester sends rush hour from one). A refused
request is a 429 with ``Retry-After`` and the usual JSON error.
"""
from __future__ import annotations

import math
import time

from flask import Flask, Response, request
from flask_limiter import Limiter, RateLimitExceeded
from flask_limiter.util import get_remote_address

# Registers the bounded-memory:// scheme, the default store.
import charge_request_service.rate_limit_store  # noqa: F401
from charge_request_service.config import Settings
from gridcommon.validation import VEHICLE_ID_PATTERN
from gridcommon.web import error_response

CHARGE_ENDPOINT = "charge.start_charging"


def vehicle_key() -> str:
    """The vehicle a charge request is for; requests too broken to name one share one bucket."""
    body = request.get_json(silent=True)
    vehicle_id = body.get("vehicle_id") if isinstance(body, dict) else None
    if isinstance(vehicle_id, str) and VEHICLE_ID_PATTERN.fullmatch(vehicle_id):
        return f"vehicle:{vehicle_id}"
    return "vehicle:(unnamed)"


def install_rate_limits(app: Flask, settings: Settings) -> Limiter:
    limiter = Limiter(
        get_remote_address,
        app=app,
        storage_uri=settings.rate_limit_storage_uri,
        strategy="moving-window",
        # Its headers would go on every answer (a Retry-After on a 201 misleads): the 429 sets its own.
        headers_enabled=False,
        # Limits are a guard, not a dependency: with the store unreachable, requests pass and it is logged.
        swallow_errors=True,
    )
    # The blueprint's view is wrapped here rather than decorated where it is defined, so the limits
    # come from this app's settings.
    view = app.view_functions[CHARGE_ENDPOINT]
    if settings.rate_limit_per_vehicle:
        view = limiter.limit(settings.rate_limit_per_vehicle, key_func=vehicle_key, scope="vehicle")(view)
    if settings.rate_limit_per_client:
        view = limiter.limit(settings.rate_limit_per_client, key_func=get_remote_address, scope="client")(view)
    app.view_functions[CHARGE_ENDPOINT] = view

    @app.errorhandler(RateLimitExceeded)
    def _too_many(exc: RateLimitExceeded) -> Response:
        per = "vehicle" if exc.limit.key_func is vehicle_key else "client address"
        current = limiter.current_limit
        retry_after = max(1, math.ceil(current.reset_at - time.time())) if current else 1
        response = error_response(
            429,
            "too_many_requests",
            f"Too many charge requests for this {per}: at most {exc.limit.limit} are accepted. "
            f"Wait {retry_after} s (Retry-After), then ask again.",
            retry_after_seconds=retry_after,
        )
        response.headers["Retry-After"] = str(retry_after)
        return response

    return limiter
