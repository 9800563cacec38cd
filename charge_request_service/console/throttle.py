"""Failed console logins, limited per client address and in all, so the operator token cannot be guessed.

Only failures count: an operator who types the token right is never slowed down by someone else's
guesses, except when the guesses from everywhere together use up the limit in all, which bounds
how fast a botnet can guess. The counts are kept by ``limits`` in the store the charge API's own
rate limits use (``RATE_LIMIT_STORAGE_URI``), so with Redis every replica counts together.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from limits import RateLimitItem, parse_many
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

# Registers the bounded-memory:// scheme, the default store.
import charge_request_service.rate_limit_store  # noqa: F401

log = logging.getLogger("charge.console")

SCOPE = "console-login"
# A typo or two a minute from the operator's own desk; past that, guessing.
PER_ADDRESS = "5/minute;20/hour"
# Every address together: a few operators' typos, far below what guessing a 32-byte token needs.
IN_ALL = "30/minute;200/hour"


@dataclass(frozen=True)
class Refusal:
    """Why a login is refused before its token is even compared, and when to try again."""

    what: str
    limit: str
    retry_after_seconds: int

    @property
    def message(self) -> str:
        return (f"Too many failed console logins {self.what}: at most {self.limit}. "
                f"Wait {self.retry_after_seconds} s, then log in again.")


class LoginThrottle:
    """Counts failed logins per client address and in all; ``refusal`` says whether one may be tried now."""

    def __init__(self, storage_uri: str, per_address: str = PER_ADDRESS, in_all: str = IN_ALL) -> None:
        self._limiter = MovingWindowRateLimiter(storage_from_string(storage_uri))
        self._checks: list[tuple[str, bool, list[RateLimitItem]]] = [
            ("from this address", True, parse_many(per_address)),
            ("from all addresses together", False, parse_many(in_all)),
        ]

    def refusal(self, address: str) -> Refusal | None:
        """A refusal when a limit is used up by earlier failures from ``address`` or from everyone."""
        for what, per_address, items in self._checks:
            key = self._key(address, per_address)
            for item in items:
                try:
                    if self._limiter.test(item, SCOPE, key):
                        continue
                    reset_at = self._limiter.get_window_stats(item, SCOPE, key).reset_time
                except Exception as exc:  # noqa: BLE001 - a guard, not a dependency: the login form stays usable
                    log.error("the rate-limit store failed (%s) checking console logins; check "
                              "RATE_LIMIT_STORAGE_URI", type(exc).__name__)
                    return None
                return Refusal(what, str(item), max(1, math.ceil(reset_at - time.time())))
        return None

    def failed(self, address: str) -> None:
        """Count one failed login from ``address``, in its own limits and in the ones of all addresses."""
        for _what, per_address, items in self._checks:
            for item in items:
                try:
                    self._limiter.hit(item, SCOPE, self._key(address, per_address))
                except Exception as exc:  # noqa: BLE001 - see refusal()
                    log.error("the rate-limit store failed (%s) counting a failed console login; check "
                              "RATE_LIMIT_STORAGE_URI", type(exc).__name__)
                    return

    @staticmethod
    def _key(address: str, per_address: bool) -> str:
        return f"address:{address}" if per_address else "all"
