"""The charging sessions this service started, and which of them still run.

Plain Python (no Flask) so it can be tested directly with a fake clock. A
session is active from its admission until its ``ends_at`` or until a client
stops it; sessions past their end are dropped lazily whenever the tracker is
read, so every count is exact at the moment it is asked for.
"""
from __future__ import annotations

import heapq
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gridcommon.timefmt import format_time, parse_time, utc_now
from gridcommon.validation import finite_number

Clock = Callable[[], datetime]


class InvalidAdmission(ValueError):
    """The balancer's answer to an admitted charge request lacks what a session needs."""


@dataclass(frozen=True)
class ChargeSession:
    session_id: str
    vehicle_id: str
    substation: str
    amount_kw: float
    started_at: datetime
    ends_at: datetime

    @classmethod
    def from_admission(cls, body: Mapping[str, Any]) -> "ChargeSession":
        """Build the session from the balancer's 201 body; ``InvalidAdmission`` says what is missing."""
        try:
            session = cls(
                session_id=_text(body, "session_id"),
                vehicle_id=_text(body, "vehicle_id"),
                substation=_text(body, "substation"),
                amount_kw=_number(body, "amount"),
                started_at=parse_time(_text(body, "started_at")),
                ends_at=parse_time(_text(body, "ends_at")),
            )
        except (TypeError, ValueError) as exc:
            raise InvalidAdmission(str(exc)) from None
        if session.ends_at <= session.started_at:
            raise InvalidAdmission("ends_at is not after started_at")
        return session

    def remaining_seconds(self, now: datetime) -> float:
        return max(0.0, (self.ends_at - now).total_seconds())

    def as_json(self, now: datetime) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "vehicle_id": self.vehicle_id,
            "substation": self.substation,
            "amount": self.amount_kw,
            "started_at": format_time(self.started_at),
            "ends_at": format_time(self.ends_at),
            "remaining_seconds": round(self.remaining_seconds(now), 3),
        }


def _text(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidAdmission(f"{name} is missing or not a non-empty string")
    return value


def _number(body: Mapping[str, Any], name: str) -> float:
    value = finite_number(body.get(name))
    if value is None:
        raise InvalidAdmission(f"{name} is missing or not a finite number")
    return value


@dataclass(frozen=True)
class SessionCounts:
    """How many sessions were recorded, stopped by a client, expired, and run now."""

    recorded: int
    stopped: int
    expired: int
    active: int

    def as_json(self) -> dict[str, int]:
        return {"recorded": self.recorded, "stopped": self.stopped, "expired": self.expired, "active": self.active}


class SessionTracker:
    """Thread-safe record of active sessions, keyed by session id."""

    def __init__(self, clock: Clock = utc_now) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, ChargeSession] = {}
        # (ends_at, session_id): the next session to expire is always first, so expiry costs log n.
        self._endings: list[tuple[datetime, str]] = []
        self._recorded = 0
        self._stopped = 0
        self._expired = 0

    def now(self) -> datetime:
        return self._clock()

    def record(self, session: ChargeSession) -> None:
        with self._lock:
            self._drop_expired(self._clock())
            if session.session_id not in self._sessions:
                self._recorded += 1
            self._sessions[session.session_id] = session
            heapq.heappush(self._endings, (session.ends_at, session.session_id))

    def get(self, session_id: str) -> ChargeSession | None:
        """The session if it is still active, else ``None``."""
        with self._lock:
            self._drop_expired(self._clock())
            return self._sessions.get(session_id)

    def active(self) -> list[ChargeSession]:
        """Active sessions, oldest first."""
        with self._lock:
            self._drop_expired(self._clock())
            return sorted(self._sessions.values(), key=lambda session: (session.started_at, session.session_id))

    def active_count(self) -> int:
        with self._lock:
            self._drop_expired(self._clock())
            return len(self._sessions)

    def forget(self, session_id: str) -> ChargeSession | None:
        """Forget a session a client stopped; ``None`` if it was not active."""
        with self._lock:
            self._drop_expired(self._clock())
            session = self._sessions.pop(session_id, None)
            if session is not None:
                self._stopped += 1
            return session

    def counts(self) -> SessionCounts:
        with self._lock:
            self._drop_expired(self._clock())
            return SessionCounts(self._recorded, self._stopped, self._expired, len(self._sessions))

    def _drop_expired(self, now: datetime) -> None:
        while self._endings and self._endings[0][0] <= now:
            ends_at, session_id = heapq.heappop(self._endings)
            session = self._sessions.get(session_id)
            # The entry may be stale: the session was stopped, or recorded again with a new end.
            if session is not None and session.ends_at == ends_at:
                del self._sessions[session_id]
                self._expired += 1
