"""The charging sessions this service started, which of them still run, and how the others ended.

Plain Python (no Flask) so it can be tested directly with a fake clock. A
session is active from its admission until its ``ends_at`` or until a client
stops it; sessions past their end move to the finished ones lazily whenever
the tracker is read, so every count is exact at the moment it is asked for.
Finished sessions (ended, stopped, expired in the queue, cancelled) are kept,
the last ``FINISHED_KEPT`` of them, so a client can still read how its
session ended.
"""
from __future__ import annotations

import heapq
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from gridcommon.timefmt import format_time, parse_time, utc_now
from gridcommon.validation import finite_number

Clock = Callable[[], datetime]

FINISHED_KEPT = 10_000


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
    # When it joined the queue, for a session that waited for power.
    queued_at: datetime | None = None
    # SHA-256 of the session_token its client got (charge_request_service.access).
    token_digest: str | None = None

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

    def waited(self, queued_at: datetime) -> "ChargeSession":
        return replace(self, queued_at=queued_at)

    def with_token(self, token_digest: str) -> "ChargeSession":
        return replace(self, token_digest=token_digest)

    @property
    def queue_wait_seconds(self) -> float | None:
        return None if self.queued_at is None else max(0.0, (self.started_at - self.queued_at).total_seconds())

    def as_json(self, now: datetime) -> dict[str, Any]:
        body: dict[str, Any] = {
            "session_id": self.session_id,
            "vehicle_id": self.vehicle_id,
            "substation": self.substation,
            "amount": self.amount_kw,
            "started_at": format_time(self.started_at),
            "ends_at": format_time(self.ends_at),
            "remaining_seconds": round(self.remaining_seconds(now), 3),
        }
        if self.queued_at is not None:
            body["queued_at"] = format_time(self.queued_at)
            body["queue_wait_seconds"] = round(self.queue_wait_seconds or 0.0, 3)
        return body


@dataclass(frozen=True)
class FinishedSession:
    """How a session, or a request that waited for one, ended.

    ``state`` is ``ended`` (ran its time), ``stopped`` (a client stopped it; reported as ended),
    ``expired`` (waited in the queue past its time) or ``cancelled`` (left the queue on request).
    ``session`` is None for a request that never started; ``final`` is the substation's last
    record of the session, once read.
    """

    session_id: str
    vehicle_id: str
    amount_kw: float
    state: str
    finished_at: datetime
    session: ChargeSession | None = None
    queued_at: datetime | None = None
    final: Mapping[str, Any] | None = None
    token_digest: str | None = None

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"session_id": self.session_id, "vehicle_id": self.vehicle_id, "amount": self.amount_kw}
        if self.session is not None:
            body.update(self.session.as_json(self.finished_at))
            body.pop("remaining_seconds")
        body["state"] = "ended" if self.state == "stopped" else self.state
        if self.state == "stopped":
            body["end_reason"] = "stopped"
        body["finished_at"] = format_time(self.finished_at)
        if self.queued_at is not None and self.session is None:
            body["queued_at"] = format_time(self.queued_at)
        return body


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
        self._finished: OrderedDict[str, FinishedSession] = OrderedDict()
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
            now = self._clock()
            self._drop_expired(now)
            session = self._sessions.pop(session_id, None)
            if session is not None:
                self._stopped += 1
                self._keep_finished(FinishedSession(
                    session.session_id, session.vehicle_id, session.amount_kw, "stopped", now, session,
                    session.queued_at,
                    token_digest=session.token_digest,
                ))
            return session

    def finish_waiting(self, session_id: str, vehicle_id: str, amount_kw: float, state: str,
                       queued_at: datetime, token_digest: str | None) -> None:
        """Record how a request that never started left the queue: ``expired`` or ``cancelled``."""
        with self._lock:
            self._keep_finished(FinishedSession(
                session_id, vehicle_id, amount_kw, state, self._clock(), queued_at=queued_at,
                token_digest=token_digest,
            ))

    def finished(self, session_id: str) -> FinishedSession | None:
        with self._lock:
            self._drop_expired(self._clock())
            return self._finished.get(session_id)

    def remember_final(self, session_id: str, final: Mapping[str, Any]) -> None:
        """Keep the substation's last record of a finished session: it no longer changes."""
        with self._lock:
            entry = self._finished.get(session_id)
            if entry is not None:
                self._finished[session_id] = replace(entry, final=dict(final))

    def _keep_finished(self, entry: FinishedSession) -> None:
        self._finished[entry.session_id] = entry
        while len(self._finished) > FINISHED_KEPT:
            self._finished.popitem(last=False)

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
                self._keep_finished(FinishedSession(
                    session_id, session.vehicle_id, session.amount_kw, "ended", ends_at, session, session.queued_at,
                    token_digest=session.token_digest,
                ))
