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
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from charge_request_service.store import ChargeStore
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

    def to_record(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id, "vehicle_id": self.vehicle_id, "substation": self.substation,
            "amount_kw": self.amount_kw, "started_at": format_time(self.started_at),
            "ends_at": format_time(self.ends_at),
            "queued_at": format_time(self.queued_at) if self.queued_at else None, "token_digest": self.token_digest,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "ChargeSession":
        return cls(
            record["session_id"], record["vehicle_id"], record["substation"], record["amount_kw"],
            parse_time(record["started_at"]), parse_time(record["ends_at"]),
            parse_time(record["queued_at"]) if record.get("queued_at") else None, record.get("token_digest"),
        )

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

    def to_record(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id, "vehicle_id": self.vehicle_id, "amount_kw": self.amount_kw,
            "state": self.state, "finished_at": format_time(self.finished_at),
            "session": self.session.to_record() if self.session else None,
            "queued_at": format_time(self.queued_at) if self.queued_at else None,
            "final": dict(self.final) if self.final is not None else None, "token_digest": self.token_digest,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "FinishedSession":
        return cls(
            record["session_id"], record["vehicle_id"], record["amount_kw"], record["state"],
            parse_time(record["finished_at"]),
            ChargeSession.from_record(record["session"]) if record.get("session") else None,
            parse_time(record["queued_at"]) if record.get("queued_at") else None,
            record.get("final"), record.get("token_digest"),
        )

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


@dataclass(frozen=True)
class PendingSession:
    """A request forwarded whose answer has not come: a substation may hold it, no client knows of it."""

    session_id: str
    vehicle_id: str
    amount_kw: float
    created_at: datetime

    def to_record(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "vehicle_id": self.vehicle_id, "amount_kw": self.amount_kw,
                "created_at": format_time(self.created_at)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "PendingSession":
        return cls(record["session_id"], record["vehicle_id"], record["amount_kw"], parse_time(record["created_at"]))


class VehicleBusy(Exception):
    """The vehicle already has a session that is pending, queued or charging."""

    def __init__(self, vehicle_id: str, session_id: str) -> None:
        super().__init__(f"vehicle {vehicle_id} already has session {session_id}")
        self.vehicle_id = vehicle_id
        self.session_id = session_id


class SessionTracker:
    """Thread-safe record of active sessions, keyed by session id.

    It also knows which vehicles have a session (pending, queued or active):
    one vehicle has at most one at a time. With a ``store``, every change is
    written through before the caller answers anyone.
    """

    def __init__(self, clock: Clock = utc_now, store: ChargeStore | None = None) -> None:
        self._clock = clock
        self._store = store
        self._lock = threading.Lock()
        self._sessions: dict[str, ChargeSession] = {}
        self._pending: dict[str, PendingSession] = {}
        # vehicle id -> the session it has (pending, queued or active).
        self._vehicles: dict[str, str] = {}
        # (ends_at, session_id): the next session to expire is always first, so expiry costs log n.
        self._endings: list[tuple[datetime, str]] = []
        self._finished: OrderedDict[str, FinishedSession] = OrderedDict()
        self._recorded = 0
        self._stopped = 0
        self._expired = 0

    def now(self) -> datetime:
        return self._clock()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The tracker's lock. What is written to the store under it is committed after it is released
        (together with other threads' writes) and before the caller goes on."""
        with self._store.batch() if self._store is not None else nullcontext(), self._lock:
            yield

    def record(self, session: ChargeSession) -> None:
        with self._locked():
            now = self._clock()
            self._drop_expired(now)
            if session.session_id not in self._sessions:
                self._recorded += 1
            self._pending.pop(session.session_id, None)
            self._sessions[session.session_id] = session
            self._vehicles[session.vehicle_id] = session.session_id
            heapq.heappush(self._endings, (session.ends_at, session.session_id))
            self._put(session.session_id, session.vehicle_id, "active", session.to_record(), now)

    def reserve(self, session_id: str, vehicle_id: str, amount_kw: float) -> PendingSession:
        """Note a request about to be forwarded; raises ``VehicleBusy`` if the vehicle has a session."""
        with self._locked():
            now = self._clock()
            self._drop_expired(now)
            existing = self._vehicles.get(vehicle_id)
            if existing is not None:
                raise VehicleBusy(vehicle_id, existing)
            pending = PendingSession(session_id, vehicle_id, amount_kw, now)
            self._pending[session_id] = pending
            self._vehicles[vehicle_id] = session_id
            self._put(session_id, vehicle_id, "pending", pending.to_record(), now)
            return pending

    def queued(self, session_id: str, record: dict[str, Any]) -> None:
        """The pending request now waits in the queue; ``record`` is how to queue it again after a restart."""
        with self._locked():
            pending = self._pending.pop(session_id, None)
            if pending is not None:
                self._put(session_id, pending.vehicle_id, "queued", record, self._clock())

    def release(self, session_id: str) -> None:
        """The pending request was not admitted (refused, or stopped after no answer came)."""
        with self._locked():
            pending = self._pending.pop(session_id, None)
            if pending is not None:
                self._free_vehicle(pending.vehicle_id, session_id)
                if self._store is not None:
                    self._store.drop_session(session_id)

    def rekey(self, old_session_id: str, new_session_id: str) -> None:
        """A pending request is sent again under a new session id (the old one was stopped everywhere)."""
        with self._locked():
            pending = self._pending.pop(old_session_id)
            renamed = replace(pending, session_id=new_session_id)
            self._pending[new_session_id] = renamed
            self._vehicles[pending.vehicle_id] = new_session_id
            if self._store is not None:
                self._store.drop_session(old_session_id)
            self._put(new_session_id, pending.vehicle_id, "pending", renamed.to_record(), self._clock())

    def end_unheld(self, session_id: str) -> ChargeSession | None:
        """Its substation no longer holds it (it restarted without it, say): it ended."""
        with self._locked():
            now = self._clock()
            session = self._sessions.pop(session_id, None)
            if session is not None:
                self._expired += 1
                self._keep_finished(FinishedSession(
                    session_id, session.vehicle_id, session.amount_kw, "ended", now, session, session.queued_at,
                    token_digest=session.token_digest,
                ))
            return session

    def pending(self) -> list[PendingSession]:
        with self._locked():
            return list(self._pending.values())

    def load(self) -> tuple[list[PendingSession], list[dict[str, Any]]]:
        """Take back what the store holds; ``(pending, queued records)`` for the caller to settle."""
        if self._store is None:
            return [], []
        queued: list[dict[str, Any]] = []
        with self._locked():
            for session_id, state, record in self._store.sessions():
                if state == "active":
                    session = ChargeSession.from_record(record)
                    self._sessions[session_id] = session
                    self._vehicles[session.vehicle_id] = session_id
                    heapq.heappush(self._endings, (session.ends_at, session_id))
                elif state == "pending":
                    pending = PendingSession.from_record(record)
                    self._pending[session_id] = pending
                    self._vehicles[pending.vehicle_id] = session_id
                elif state == "queued":
                    queued.append(record)
                    self._vehicles[record["vehicle_id"]] = session_id
                else:
                    self._finished[session_id] = FinishedSession.from_record(record)
            self._drop_expired(self._clock())
            return list(self._pending.values()), queued

    def _free_vehicle(self, vehicle_id: str, session_id: str) -> None:
        if self._vehicles.get(vehicle_id) == session_id:
            del self._vehicles[vehicle_id]

    def _put(self, session_id: str, vehicle_id: str, state: str, record: dict[str, Any], now: datetime) -> None:
        if self._store is not None:
            self._store.put_session(session_id, vehicle_id, state, record, now.timestamp())

    def get(self, session_id: str) -> ChargeSession | None:
        """The session if it is still active, else ``None``."""
        with self._locked():
            self._drop_expired(self._clock())
            return self._sessions.get(session_id)

    def active(self) -> list[ChargeSession]:
        """Active sessions, oldest first."""
        with self._locked():
            self._drop_expired(self._clock())
            return sorted(self._sessions.values(), key=lambda session: (session.started_at, session.session_id))

    def active_count(self) -> int:
        with self._locked():
            self._drop_expired(self._clock())
            return len(self._sessions)

    def forget(self, session_id: str) -> ChargeSession | None:
        """Forget a session a client stopped; ``None`` if it was not active."""
        with self._locked():
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
        with self._locked():
            self._keep_finished(FinishedSession(
                session_id, vehicle_id, amount_kw, state, self._clock(), queued_at=queued_at,
                token_digest=token_digest,
            ))

    def finished(self, session_id: str) -> FinishedSession | None:
        with self._locked():
            self._drop_expired(self._clock())
            return self._finished.get(session_id)

    def remember_final(self, session_id: str, final: Mapping[str, Any]) -> None:
        """Keep the substation's last record of a finished session: it no longer changes."""
        with self._locked():
            entry = self._finished.get(session_id)
            if entry is not None:
                entry = self._finished[session_id] = replace(entry, final=dict(final))
                self._put(session_id, entry.vehicle_id, entry.state, entry.to_record(), entry.finished_at)

    def _keep_finished(self, entry: FinishedSession) -> None:
        self._finished[entry.session_id] = entry
        self._free_vehicle(entry.vehicle_id, entry.session_id)
        self._put(entry.session_id, entry.vehicle_id, entry.state, entry.to_record(), entry.finished_at)
        while len(self._finished) > FINISHED_KEPT:
            self._finished.popitem(last=False)

    def counts(self) -> SessionCounts:
        with self._locked():
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
