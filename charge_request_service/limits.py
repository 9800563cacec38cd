"""Rate limits of the public API: ``limits`` (Flask-Limiter's own core), in memory by default, Redis optional.

Per vehicle, on by default: a vehicle asking many times a second is broken or
hostile, whether its requests are valid or not. Per client address, off by
default: one charge-point backend may send for thousands of vehicles from
one address (and the load tester sends rush hour from one). A refused
request is a 429 with ``Retry-After`` and the usual JSON error.

The limits are checked with the ``limits`` library directly, the moving-window
strategy on the storage ``RATE_LIMIT_STORAGE_URI`` names. Flask-Limiter's
wrapper around it (resolving route limits, exemptions and filters for every
request) cost a seventh of the charge API's CPU for the two checks made here.
"""
from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, request
from limits import RateLimitItem, parse_many
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

# Registers the bounded-memory:// scheme, the default store.
import charge_request_service.rate_limit_store  # noqa: F401
from charge_request_service.config import Settings
from gridcommon.validation import VEHICLE_ID_PATTERN
from gridcommon.web import ApiError, json_object_body

log = logging.getLogger(__name__)

CHARGE_ENDPOINT = "charge.start_charging"


def vehicle_key() -> str:
    """The vehicle a charge request is for; requests too broken to name one share one bucket.

    The body is read as the endpoint reads it (and kept for it); what is wrong with it, the
    endpoint says after the limits.
    """
    try:
        vehicle_id = json_object_body().get("vehicle_id")
    except ApiError:
        vehicle_id = None
    if isinstance(vehicle_id, str) and VEHICLE_ID_PATTERN.fullmatch(vehicle_id):
        return vehicle_id
    return "(unnamed)"


def client_key() -> str:
    return request.remote_addr or "(unknown)"


class RateLimits:
    """The per-vehicle and per-client limits of ``POST /charge``."""

    def __init__(self, settings: Settings) -> None:
        self._limiter = MovingWindowRateLimiter(storage_from_string(settings.rate_limit_storage_uri))
        self._checks: list[tuple[str, str, Callable[[], str], list[RateLimitItem]]] = []
        if settings.rate_limit_per_vehicle:
            self._checks.append(("vehicle", "vehicle", vehicle_key, parse_many(settings.rate_limit_per_vehicle)))
        if settings.rate_limit_per_client:
            self._checks.append(("client", "client address", client_key, parse_many(settings.rate_limit_per_client)))
        self._store_failing = False

    def check(self) -> None:
        """Count this request; ``ApiError`` 429 when one of its limits is used up."""
        for scope, what, key_of, limits in self._checks:
            key = key_of()
            for limit in limits:
                if not self._hit(limit, scope, key):
                    raise self._refusal(limit, what, scope, key)

    def _hit(self, limit: RateLimitItem, scope: str, key: str) -> bool:
        try:
            allowed = self._limiter.hit(limit, scope, key)
        except Exception as exc:  # noqa: BLE001 - any store failure: limits are a guard, not a dependency
            if not self._store_failing:
                log.error("the rate-limit store failed (%s): charge requests pass unlimited until it answers "
                          "again; check RATE_LIMIT_STORAGE_URI", type(exc).__name__)
            self._store_failing = True
            return True
        if self._store_failing:
            log.warning("the rate-limit store answers again: the limits apply")
            self._store_failing = False
        return allowed

    def _refusal(self, limit: RateLimitItem, what: str, scope: str, key: str) -> ApiError:
        try:
            reset_at = self._limiter.get_window_stats(limit, scope, key).reset_time
        except Exception:  # noqa: BLE001 - the refusal stands; only its hint is unknown
            reset_at = time.time() + 1
        retry_after = max(1, math.ceil(reset_at - time.time()))
        return ApiError(
            429,
            "too_many_requests",
            f"Too many charge requests for this {what}: at most {limit} are accepted. "
            f"Wait {retry_after} s (Retry-After), then ask again.",
            retry_after_seconds=retry_after,
        ).with_header("Retry-After", str(retry_after))


def install_rate_limits(app: Flask, settings: Settings) -> RateLimits:
    """Check the limits before the charge endpoint runs."""
    limits = RateLimits(settings)
    # The blueprint's view is wrapped here rather than decorated where it is defined, so the limits
    # come from this app's settings.
    view = app.view_functions[CHARGE_ENDPOINT]

    @functools.wraps(view)
    def limited(*args: Any, **kwargs: Any) -> Any:
        limits.check()
        return view(*args, **kwargs)

    app.view_functions[CHARGE_ENDPOINT] = limited
    return limits
