"""Console logins: random ids kept here, each expiring, in a table of bounded size.

The browser holds only the id (in an HttpOnly cookie); the operator token it was
exchanged for never leaves the server again. Each login has its own CSRF token,
which the page sends back in a header with every action. The login form has one too
(``FormTokens``), so no other site can log a browser in to a console of its choosing.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Login:
    csrf_token: str
    created_at: float
    used_at: float


class Logins:
    """At most ``capacity`` logins; past it the least recently used one is dropped."""

    def __init__(self, capacity: int, lifetime_seconds: float, idle_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.lifetime_seconds = lifetime_seconds
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._logins: OrderedDict[str, Login] = OrderedDict()
        self._lock = threading.Lock()

    def open(self) -> tuple[str, Login]:
        """A new login's id and record."""
        now = self._clock()
        login_id = secrets.token_urlsafe(32)
        login = Login(csrf_token=secrets.token_urlsafe(32), created_at=now, used_at=now)
        with self._lock:
            self._logins[login_id] = login
            while len(self._logins) > self.capacity:
                self._logins.popitem(last=False)
        return login_id, login

    def find(self, login_id: str | None) -> Login | None:
        """The login, its idle clock restarted; None when unknown or expired (which forgets it)."""
        if not login_id:
            return None
        now = self._clock()
        with self._lock:
            login = self._logins.get(login_id)
            if login is None:
                return None
            if now - login.created_at > self.lifetime_seconds or now - login.used_at > self.idle_seconds:
                del self._logins[login_id]
                return None
            login.used_at = now
            self._logins.move_to_end(login_id)
            return login

    def close(self, login_id: str | None) -> None:
        with self._lock:
            self._logins.pop(login_id or "", None)

    def __len__(self) -> int:
        return len(self._logins)


def csrf_matches(login: Login, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), login.csrf_token.encode())


class FormTokens:
    """Signed double-submit tokens of the login form: a random nonce in a cookie, its HMAC in the form.

    Another site can neither read the form's field nor, without this process's secret, make one
    that matches a cookie it managed to plant. The secret is new at every start (one process
    serves the console), which only makes forms opened before a restart stale.
    """

    def __init__(self) -> None:
        self._secret = secrets.token_bytes(32)

    def issue(self) -> tuple[str, str]:
        """A new nonce (for the cookie) and the form token that goes with it."""
        nonce = secrets.token_urlsafe(32)
        return nonce, self._sign(nonce)

    def matches(self, nonce: str | None, given: str | None) -> bool:
        if not nonce or not given:
            return False
        return hmac.compare_digest(given.encode(), self._sign(nonce).encode())

    def _sign(self, nonce: str) -> str:
        return hmac.new(self._secret, nonce.encode(), hashlib.sha256).hexdigest()
