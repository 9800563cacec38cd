"""Rate limits of the public API: ``limits`` (Flask-Limiter's own core), in memory by default, Redis optional.

Per client key, its ``requests_per_second`` quota (``charge_request_service.client_keys``).
Per vehicle, on by default, counted per client key and vehicle, so one
client's requests never lock another's vehicle out, and only for valid
requests, so a broken request never counts against the vehicle it names.
Per client address, off by default: one charge-point backend may send for
thousands of vehicles from one address (and the load tester sends rush hour
from one). The key's and the address's limits are checked before the body is
read. A refused request is a 429 with ``Retry-After`` and the usual JSON error.

The limits are checked with the ``limits`` library directly, the moving-window
strategy on the storage ``RATE_LIMIT_STORAGE_URI`` names. Flask-Limiter's
wrapper around it (resolving route limits, exemptions and filters for every
request) cost a seventh of the charge API's CPU for the two checks made here.
"""
from __future__ import annotations

import logging
import math
import time

from flask import request
from limits import RateLimitItem, RateLimitItemPerSecond, parse_many
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

# Registers the bounded-memory:// scheme, the default store.
import charge_request_service.rate_limit_store  # noqa: F401
from charge_request_service.client_keys import ClientKey
from charge_request_service.config import Settings
from gridcommon.web import ApiError

log = logging.getLogger(__name__)


def client_address() -> str:
    return request.remote_addr or "(unknown)"


class RateLimits:
    """The per-key, per-vehicle and per-address limits of ``POST /charge``."""

    def __init__(self, settings: Settings) -> None:
        self._limiter = MovingWindowRateLimiter(storage_from_string(settings.rate_limit_storage_uri))
        self._per_vehicle = parse_many(settings.rate_limit_per_vehicle) if settings.rate_limit_per_vehicle else []
        self._per_address = parse_many(settings.rate_limit_per_client) if settings.rate_limit_per_client else []
        self._store_failing = False

    def check_client(self, key: ClientKey | None) -> None:
        """Count the request against its address and its key; ``ApiError`` 429 when a limit is used up."""
        if self._per_address:
            self._check("client", "client address", client_address(), self._per_address)
        if key is not None:
            limit = RateLimitItemPerSecond(key.quotas.requests_per_second)
            if not self._hit(limit, "key", key.key_id):
                refusal = self._refusal(limit, f"client key ({key.name!r})", "key", key.key_id)
                refusal.error = "quota_exceeded"
                refusal.extra.update(quota="requests_per_second", limit=key.quotas.requests_per_second)
                raise refusal

    def check_vehicle(self, owner: str | None, vehicle_id: str) -> None:
        """Count a valid request against its vehicle, as this client sees it: one client's requests never
        lock out the vehicle for another."""
        if self._per_vehicle:
            self._check("vehicle", "vehicle", f"{owner or '-'}/{vehicle_id}", self._per_vehicle)

    def _check(self, scope: str, what: str, key: str, limits: list[RateLimitItem]) -> None:
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
