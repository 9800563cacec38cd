"""The charging sessions this service started, which of them still run, and how the others ended.

Plain Python (no Flask) so it can be tested directly with a fake clock. A
session is active from its admission until its ``ends_at`` or until a client
stops it; sessions past their end move to the finished ones lazily whenever
the tracker is read, so every count is exact at the moment it is asked for.
Finished sessions (ended, stopped, expired in the queue, cancelled) are kept,
so a client can still read how its session ended: with a store, on disk for
its retention (``charge_request_service.store``) and the last ``FINISHED_CACHED``
in memory; without one, the last ``FINISHED_KEPT`` in memory.

``SessionTracker`` is one process's view, written through to its store.
``SharedSessionTracker`` is for a database replicas share: the database is the
truth, and every decision two replicas could race on (a vehicle's one session,
stopping or ending a session) is made there.
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

from charge_request_service.database import FINISHED_STATES
from charge_request_service.store import ChargeStore, OwnerQuotas, StoredSession
from gridcommon.timefmt import format_time, parse_time, utc_now
from gridcommon.validation import finite_number

Clock = Callable[[], datetime]

FINISHED_KEPT = 10_000
# Finished sessions held in memory when a store keeps them all.
FINISHED_CACHED = 1_000


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
    # Id of the client key that asked for it (charge_request_service.client_keys); None when none was sent.
    owner: str | None = None
    # The vehicle's need and what the substation expected at admission; None without a need.
    energy_kwh: float | None = None
    departure: datetime | None = None
    expected_energy_kwh: float | None = None
    feasible: bool | None = None

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
                **_need(body),
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

    def owned_by(self, owner: str | None) -> "ChargeSession":
        return replace(self, owner=owner)

    def to_record(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id, "vehicle_id": self.vehicle_id, "substation": self.substation,
            "amount_kw": self.amount_kw, "started_at": format_time(self.started_at),
            "ends_at": format_time(self.ends_at),
            "queued_at": format_time(self.queued_at) if self.queued_at else None, "token_digest": self.token_digest,
            "owner": self.owner, **self._need_json(),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "ChargeSession":
        return cls(
            record["session_id"], record["vehicle_id"], record["substation"], record["amount_kw"],
            parse_time(record["started_at"]), parse_time(record["ends_at"]),
            parse_time(record["queued_at"]) if record.get("queued_at") else None, record.get("token_digest"),
            record.get("owner"), **_need(record),
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
        return {**body, **self._need_json()}

    def _need_json(self) -> dict[str, Any]:
        """The need's fields that are set: a session without one answers as before."""
        fields = {
            "energy_kwh": self.energy_kwh,
            "departure": None if self.departure is None else format_time(self.departure),
            "expected_energy_kwh": self.expected_energy_kwh,
            "feasible": self.feasible,
        }
        return {name: value for name, value in fields.items() if value is not None}


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
    owner: str | None = None

    def to_record(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id, "vehicle_id": self.vehicle_id, "amount_kw": self.amount_kw,
            "state": self.state, "finished_at": format_time(self.finished_at),
            "session": self.session.to_record() if self.session else None,
            "queued_at": format_time(self.queued_at) if self.queued_at else None,
            "final": dict(self.final) if self.final is not None else None, "token_digest": self.token_digest,
            "owner": self.owner,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "FinishedSession":
        return cls(
            record["session_id"], record["vehicle_id"], record["amount_kw"], record["state"],
            parse_time(record["finished_at"]),
            ChargeSession.from_record(record["session"]) if record.get("session") else None,
            parse_time(record["queued_at"]) if record.get("queued_at") else None,
            record.get("final"), record.get("token_digest"), record.get("owner"),
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


def _need(body: Mapping[str, Any]) -> dict[str, Any]:
    """The need's fields of a substation's answer or a stored record, by ``ChargeSession``'s names.

    A substation's ``energy_kwh`` is the need only in the answer for a session with one (it then says
    whether it is ``feasible``); without one, the field is the energy delivered so far.
    """
    has_need = isinstance(body.get("feasible"), bool)
    departure = body.get("departure")
    return {
        "energy_kwh": finite_number(body.get("energy_kwh")) if has_need else None,
        "departure": parse_time(departure) if isinstance(departure, str) else None,
        "expected_energy_kwh": finite_number(body.get("expected_energy_kwh")) if has_need else None,
        "feasible": body["feasible"] if has_need else None,
    }


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
    owner: str | None = None

    def to_record(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "vehicle_id": self.vehicle_id, "amount_kw": self.amount_kw,
                "created_at": format_time(self.created_at), "owner": self.owner}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "PendingSession":
        return cls(record["session_id"], record["vehicle_id"], record["amount_kw"], parse_time(record["created_at"]),
                   record.get("owner"))


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
            self._put(session.session_id, session.vehicle_id, "active", session.to_record(), now,
                      session.ends_at.timestamp())

    def reserve(self, session_id: str, vehicle_id: str, amount_kw: float, owner: str | None = None,
                quotas: OwnerQuotas | None = None) -> PendingSession:
        """Note a request about to be forwarded; raises ``VehicleBusy`` if the vehicle has a session.

        ``quotas`` are for a database replicas share; one process books its keys' quotas in memory
        (``QuotaLedger``) and is never given any.
        """
        if quotas is not None:
            raise ValueError("a single process books client keys' quotas in its QuotaLedger, not here")
        with self._locked():
            now = self._clock()
            self._drop_expired(now)
            existing = self._vehicles.get(vehicle_id)
            if existing is not None:
                raise VehicleBusy(vehicle_id, existing)
            pending = PendingSession(session_id, vehicle_id, amount_kw, now, owner)
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
                    token_digest=session.token_digest, owner=session.owner,
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
            self._drop_expired(self._clock())
            return list(self._pending.values()), queued

    def _free_vehicle(self, vehicle_id: str, session_id: str) -> None:
        if self._vehicles.get(vehicle_id) == session_id:
            del self._vehicles[vehicle_id]

    def _put(self, session_id: str, vehicle_id: str, state: str, record: dict[str, Any], now: datetime,
             due_at: float | None = None) -> None:
        if self._store is not None:
            self._store.put_session(session_id, vehicle_id, state, record, now.timestamp(), due_at)

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
                    token_digest=session.token_digest, owner=session.owner,
                ))
            return session

    def finish_waiting(self, session_id: str, vehicle_id: str, amount_kw: float, state: str,
                       queued_at: datetime, token_digest: str | None, owner: str | None = None) -> None:
        """Record how a request that never started left the queue: ``expired`` or ``cancelled``."""
        with self._locked():
            self._keep_finished(FinishedSession(
                session_id, vehicle_id, amount_kw, state, self._clock(), queued_at=queued_at,
                token_digest=token_digest, owner=owner,
            ))

    def finished(self, session_id: str) -> FinishedSession | None:
        with self._locked():
            self._drop_expired(self._clock())
            entry = self._finished.get(session_id)
        if entry is None and self._store is not None:  # past the cache: read from disk
            entry = finished_from(self._store.session(session_id))
        return entry

    def remember_final(self, session_id: str, final: Mapping[str, Any]) -> None:
        """Keep the substation's last record of a finished session: it no longer changes."""
        stored = self.finished(session_id)
        with self._locked():
            entry = self._finished.get(session_id, stored)
            if entry is not None:
                entry = self._finished[session_id] = replace(entry, final=dict(final))
                self._put(session_id, entry.vehicle_id, entry.state, entry.to_record(), entry.finished_at)

    def _keep_finished(self, entry: FinishedSession) -> None:
        self._finished[entry.session_id] = entry
        self._free_vehicle(entry.vehicle_id, entry.session_id)
        self._put(entry.session_id, entry.vehicle_id, entry.state, entry.to_record(), entry.finished_at)
        while len(self._finished) > (FINISHED_KEPT if self._store is None else FINISHED_CACHED):
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
                    token_digest=session.token_digest, owner=session.owner,
                ))


def finished_from(stored: StoredSession | None) -> FinishedSession | None:
    """The finished session a stored row holds; None for a row that is not finished (or no row)."""
    if stored is None or stored.state not in FINISHED_STATES:
        return None
    return FinishedSession.from_record(stored.record)


class SharedSessionTracker:
    """Sessions in a database other replicas share (``ChargeStore.shared``): ``SessionTracker``'s methods.

    Nothing but finished sessions is cached: another replica may stop, end or start any session
    at any moment. Whatever two replicas could race on is decided by the database — the vehicle's
    one open session by its unique index (the pending row is the claim), a stop or an end by a
    conditional update that only one of them wins. Sessions past their ``ends_at`` read as ended
    at once; the reconciler writes them so (``end_due``). The counts of stops and ends are this
    replica's; ``active`` counts are the database's.
    """

    def __init__(self, clock: Clock, store: ChargeStore) -> None:
        self._clock = clock
        self._store = store
        self._lock = threading.Lock()
        self._finished: OrderedDict[str, FinishedSession] = OrderedDict()
        self._recorded = 0
        self._stopped = 0
        self._expired = 0

    def now(self) -> datetime:
        return self._clock()

    def record(self, session: ChargeSession) -> None:
        now = self._clock()
        self._store.put_session(session.session_id, session.vehicle_id, "active", session.to_record(),
                                now.timestamp(), session.ends_at.timestamp())
        with self._lock:
            self._recorded += 1

    def record_started(self, session: ChargeSession) -> bool:
        """A queued request started as ``session``: its row moves from queued to active in one update;
        False if it had left the queue meanwhile (cancelled), and then nothing is recorded."""
        now = self._clock()
        if not self._store.change_session(session.session_id, ("queued",), "active", session.to_record(),
                                          now.timestamp(), session.ends_at.timestamp()):
            return False
        with self._lock:
            self._recorded += 1
        return True

    def reserve(self, session_id: str, vehicle_id: str, amount_kw: float, owner: str | None = None,
                quotas: OwnerQuotas | None = None) -> PendingSession:
        """Claim the vehicle with the request's pending row; ``VehicleBusy`` names the session that holds it.

        With ``quotas`` (its client key's), ``QuotaExceeded`` if the row would take the key past one,
        counted over every replica's sessions.
        """
        now = self._clock()
        pending = PendingSession(session_id, vehicle_id, amount_kw, now, owner)
        for _ in range(2):
            holder = self._store.claim_vehicle(session_id, vehicle_id, pending.to_record(), now.timestamp(), quotas)
            if holder is None:
                return pending
            if not (holder.state == "active" and holder.due_at is not None and holder.due_at <= now.timestamp()):
                break
            self._end(ChargeSession.from_record(holder.record), "ended", None)  # it ran its time: the vehicle is free
        raise VehicleBusy(vehicle_id, holder.session_id)

    def queued(self, session_id: str, record: dict[str, Any]) -> None:
        """Nothing to do: the shared queue moved the row to ``queued`` as it queued it."""

    def release(self, session_id: str) -> None:
        self._store.delete_session(session_id, "pending")

    def rekey(self, old_session_id: str, new_session_id: str) -> None:
        stored = self._store.session(old_session_id)
        if stored is None or stored.state != "pending":
            raise KeyError(old_session_id)
        renamed = replace(PendingSession.from_record(stored.record), session_id=new_session_id)
        self._store.rename_pending(old_session_id, new_session_id, renamed.to_record(), self._clock().timestamp())

    def end_unheld(self, session_id: str) -> ChargeSession | None:
        session = self._active(session_id)
        return session if session is not None and self._end(session, "ended", self._clock()) else None

    def pending(self) -> list[PendingSession]:
        """Every replica's pending requests: whichever replica reconciles settles them all."""
        return [PendingSession.from_record(row.record) for row in self._store.sessions_in("pending")]

    def load(self) -> tuple[list[PendingSession], list[dict[str, Any]]]:
        """Nothing to take back into memory: the database is read as it is."""
        return [], []

    def get(self, session_id: str) -> ChargeSession | None:
        """The session if it is still active, else ``None``; one past its end is marked ended now."""
        session = self._active(session_id)
        if session is None or session.ends_at > self._clock():
            return session
        self._end(session, "ended", None)
        return None

    def _active(self, session_id: str) -> ChargeSession | None:
        stored = self._store.session(session_id)
        return ChargeSession.from_record(stored.record) if stored is not None and stored.state == "active" else None

    def active(self) -> list[ChargeSession]:
        rows = self._store.sessions_in("active", due_after=self._clock().timestamp())
        sessions = [ChargeSession.from_record(row.record) for row in rows]
        return sorted(sessions, key=lambda session: (session.started_at, session.session_id))

    def active_count(self) -> int:
        return self._store.count_in("active", due_after=self._clock().timestamp())

    def forget(self, session_id: str) -> ChargeSession | None:
        """Stop a session for its client; ``None`` if it was not active (or another replica stopped it first)."""
        session = self._active(session_id)
        if session is None or not self._end(session, "stopped", self._clock()):
            return None
        with self._lock:
            self._stopped += 1
        return session

    def end_due(self, limit: int = 1_000) -> int:
        """Write ``ended`` on the sessions past their end; how many this call ended."""
        rows = self._store.sessions_in("active", due_by=self._clock().timestamp(), limit=limit)
        return sum(self._end(ChargeSession.from_record(row.record), "ended", None) for row in rows)

    def _end(self, session: ChargeSession, state: str, at: datetime | None) -> bool:
        """Move an active session to ``state`` (at its end, unless ``at``); whether this replica did it."""
        finished_at = at or session.ends_at
        entry = FinishedSession(session.session_id, session.vehicle_id, session.amount_kw, state, finished_at,
                                session, session.queued_at, token_digest=session.token_digest, owner=session.owner)
        if not self._store.change_session(session.session_id, ("active",), state, entry.to_record(),
                                          finished_at.timestamp()):
            return False
        with self._lock:
            if state != "stopped":
                self._expired += 1
            self._cache(entry)
        return True

    def finish_waiting(self, session_id: str, vehicle_id: str, amount_kw: float, state: str,
                       queued_at: datetime, token_digest: str | None, owner: str | None = None) -> bool:
        """How a request that never started left the queue, written in one update from ``queued``; whether this
        call wrote it (another replica may have started, expired or cancelled it first)."""
        entry = FinishedSession(session_id, vehicle_id, amount_kw, state, self._clock(), queued_at=queued_at,
                                token_digest=token_digest, owner=owner)
        if not self._store.change_session(session_id, ("queued",), state, entry.to_record(),
                                          entry.finished_at.timestamp()):
            return False
        with self._lock:
            self._cache(entry)
        return True

    def finished(self, session_id: str) -> FinishedSession | None:
        with self._lock:
            entry = self._finished.get(session_id)
        if entry is not None:
            return entry
        stored = self._store.session(session_id)
        if stored is not None and stored.state == "active":
            session = ChargeSession.from_record(stored.record)
            if session.ends_at <= self._clock():  # past its end, and nobody has marked it yet: marked now
                self._end(session, "ended", None)
                stored = self._store.session(session_id)
        return finished_from(stored)

    def remember_final(self, session_id: str, final: Mapping[str, Any]) -> None:
        entry = self.finished(session_id)
        if entry is None:
            return
        entry = replace(entry, final=dict(final))
        if self._store.change_session(session_id, (entry.state,), entry.state, entry.to_record(),
                                      entry.finished_at.timestamp()):
            with self._lock:
                self._cache(entry)

    def _cache(self, entry: FinishedSession) -> None:
        self._finished[entry.session_id] = entry
        self._finished.move_to_end(entry.session_id)
        while len(self._finished) > FINISHED_CACHED:
            self._finished.popitem(last=False)

    def counts(self) -> SessionCounts:
        with self._lock:
            recorded, stopped, expired = self._recorded, self._stopped, self._expired
        return SessionCounts(recorded, stopped, expired, self.active_count())
