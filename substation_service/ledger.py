"""Admission control of one substation: who charges, how much, until when.

Plain Python, no web framework. One lock guards every read and change, so
concurrent requests can never together admit more power than the substation
has: a request is admitted only if ``load + amount <= admission capacity``,
where ``admission capacity = capacity + extra_capacity()``.

Sessions end by themselves at ``ends_at``. Nothing runs in the background for
that: every call first drops the sessions whose time is up ("lazy expiry"),
so whatever the ledger reports is exact at the moment it is asked. A session
counts while ``started_at <= now < ends_at``.
"""
from __future__ import annotations

import heapq
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

Clock = Callable[[], float]


def steady_wall_clock() -> Clock:
    """Seconds since the epoch that never go backwards.

    Wall time is read once and then advanced with the monotonic clock: a step of
    the system clock (NTP, a VM resume) cannot make a new session start before
    an older one ended, which the capacity guarantee relies on.
    """
    wall_at_start = time.time()
    monotonic_at_start = time.monotonic()
    return lambda: wall_at_start + (time.monotonic() - monotonic_at_start)


def no_extra_capacity() -> float:
    return 0.0


@dataclass(frozen=True)
class Session:
    session_id: str
    vehicle_id: str
    amount_kw: float
    started_at: float
    ends_at: float

    @property
    def duration_seconds(self) -> float:
        return self.ends_at - self.started_at


@dataclass(frozen=True)
class Snapshot:
    """The substation's state at one instant, as of ``state_version``."""

    taken_at: float
    load_kw: float
    admission_capacity_kw: float
    total_capacity_kw: float
    active_chargers: int
    state_version: int
    # Earliest moment an active session ends by itself; None when nothing charges.
    next_end_at: float | None

    @property
    def available_kw(self) -> float:
        # Extra capacity can shrink below the load already admitted; nothing is "negative available".
        return max(0.0, self.admission_capacity_kw - self.load_kw)

    @property
    def load_percentage(self) -> float:
        if self.admission_capacity_kw <= 0:
            # Nothing can be admitted at all: report the substation as full so nobody routes to it.
            return 100.0
        return self.load_kw / self.admission_capacity_kw * 100.0

    def seconds_until_next_end(self) -> int:
        """Whole seconds (at least 1) until an active session frees its power: a Retry-After."""
        if self.next_end_at is None:
            return 1
        return max(1, math.ceil(self.next_end_at - self.taken_at))


@dataclass(frozen=True)
class Admission:
    session: Session
    snapshot: Snapshot
    # True when the session was already active under the requested id: nothing new was admitted.
    replayed: bool = False


@dataclass(frozen=True)
class Release:
    session: Session
    ended_at: float
    snapshot: Snapshot


class CapacityExceeded(Exception):
    """The requested amount does not fit; ``snapshot`` is the state the decision saw."""

    def __init__(self, amount_kw: float, snapshot: Snapshot) -> None:
        super().__init__(
            f"{amount_kw:g} kW does not fit: {snapshot.available_kw:g} kW of "
            f"{snapshot.admission_capacity_kw:g} kW are available"
        )
        self.amount_kw = amount_kw
        self.snapshot = snapshot


class SessionIdInUse(Exception):
    """An active session already has the requested id, for another vehicle or amount."""

    def __init__(self, session: Session) -> None:
        super().__init__(
            f"session id {session.session_id!r} is in use by vehicle {session.vehicle_id} "
            f"({session.amount_kw:g} kW); choose another id or leave it out"
        )
        self.session = session


class SessionIdRetired(Exception):
    """The requested id belongs to a session that ended or was asked to stop: it is not used again."""

    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"session id {session_id!r} belongs to a session that already ended or was stopped; "
            "a late copy of its request is not admitted again"
        )
        self.session_id = session_id


class RetiredIds:
    """Ids of sessions that ended, were stopped, or were asked to stop before they existed.

    A copy of a request can arrive late (a resend after a lost answer, packets
    held up by a network cut), even after the balancer asked to stop the
    session it might have created. Remembering the id for as long as a session
    can last means such a copy is refused instead of charging a vehicle twice.
    Not thread-safe: the ledger calls it under its lock.
    """

    def __init__(self, keep_seconds: float, limit: int = 100_000) -> None:
        self._keep_seconds = keep_seconds
        self._limit = limit
        self._forget_at: OrderedDict[str, float] = OrderedDict()

    def add(self, session_id: str, now: float) -> None:
        self._forget_at.pop(session_id, None)
        self._forget_at[session_id] = now + self._keep_seconds
        while len(self._forget_at) > self._limit:
            self._forget_at.popitem(last=False)

    def holds(self, session_id: str, now: float) -> bool:
        # Entries were added in time order, so the expired ones are at the front.
        while self._forget_at and next(iter(self._forget_at.values())) <= now:
            self._forget_at.popitem(last=False)
        return session_id in self._forget_at


class UnknownSession(KeyError):
    """No active session has this id: it never existed, already ended or was stopped."""


SessionFinished = Callable[[Session, float], None]


class Ledger:
    """The active charging sessions of one substation.

    ``extra_capacity`` returns the kW that generation, storage and the peer
    gateway add to (or, when negative, take from) the transformer's capacity.
    It is called once per decision *outside* the lock, so it may take locks of
    its own and read ``sessions()`` without risk of deadlock.

    ``on_session_finished(session, charged_seconds)`` is called, also outside
    the lock, for every session that ends, by expiry or by stop.
    """

    def __init__(
        self,
        capacity_kw: float,
        default_duration_seconds: float,
        *,
        clock: Clock | None = None,
        extra_capacity: Callable[[], float] = no_extra_capacity,
        on_session_finished: SessionFinished | None = None,
        retire_ids_for_seconds: float = 3600.0,
    ) -> None:
        if capacity_kw < 0:
            raise ValueError(f"capacity_kw must be at least 0, got {capacity_kw}")
        if default_duration_seconds <= 0:
            raise ValueError(f"default_duration_seconds must be greater than 0, got {default_duration_seconds}")
        self.capacity_kw = capacity_kw
        self.default_duration_seconds = default_duration_seconds
        self._clock = clock or steady_wall_clock()
        self._extra_capacity = extra_capacity
        self._on_session_finished = on_session_finished
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        # (ends_at, session_id) of active sessions; entries of stopped ones are dropped when they surface.
        self._ends: list[tuple[float, str]] = []
        self._load_kw = 0.0
        self._state_version = 0
        self._retired = RetiredIds(retire_ids_for_seconds)
        # Sessions ended under the lock, reported once it is released.
        self._unreported: list[tuple[Session, float]] = []

    def admit(
        self,
        vehicle_id: str,
        amount_kw: float,
        duration_seconds: float | None = None,
        session_id: str | None = None,
    ) -> Admission:
        """Start a session if the amount fits, else raise ``CapacityExceeded``.

        Asking again with the ``session_id`` of an active session for the same
        vehicle and amount returns that session (``replayed``): a caller whose
        answer got lost can safely ask again. The id of a session that ended or
        was asked to stop raises ``SessionIdRetired``.
        """
        if not amount_kw > 0:
            raise ValueError(f"amount_kw must be greater than 0, got {amount_kw}")
        duration = self.default_duration_seconds if duration_seconds is None else duration_seconds
        if not duration > 0:
            raise ValueError(f"duration_seconds must be greater than 0, got {duration}")
        admission_capacity = self._admission_capacity()
        with self._current() as now:
            if session_id is not None and session_id in self._sessions:
                return self._replay(self._sessions[session_id], vehicle_id, amount_kw, now, admission_capacity)
            if session_id is not None and self._retired.holds(session_id, now):
                raise SessionIdRetired(session_id)
            # fsum: the exact sum of the amounts, so rounding can never let a session slip past capacity.
            load_after = math.fsum([*self._amounts(), amount_kw])
            if load_after > admission_capacity:
                raise CapacityExceeded(amount_kw, self._snapshot(now, admission_capacity))
            session = Session(session_id or uuid.uuid4().hex, vehicle_id, amount_kw, now, now + duration)
            self._sessions[session.session_id] = session
            heapq.heappush(self._ends, (session.ends_at, session.session_id))
            self._load_kw = load_after
            self._state_version += 1
            return Admission(session, self._snapshot(now, admission_capacity))

    def _replay(
        self, session: Session, vehicle_id: str, amount_kw: float, now: float, admission_capacity: float
    ) -> Admission:
        if (session.vehicle_id, session.amount_kw) != (vehicle_id, amount_kw):
            raise SessionIdInUse(session)
        return Admission(session, self._snapshot(now, admission_capacity), replayed=True)

    def release(self, session_id: str) -> Release:
        """Stop an active session early; raises ``UnknownSession`` if there is none with this id.

        Either way the id is retired: a request with it that arrives later is refused.
        """
        admission_capacity = self._admission_capacity()
        with self._current() as now:
            session = self._sessions.get(session_id)
            if session is None:
                self._retired.add(session_id, now)
                raise UnknownSession(session_id)
            self._finish(session, charged_seconds=now - session.started_at, now=now)
            return Release(session, now, self._snapshot(now, admission_capacity))

    def snapshot(self) -> Snapshot:
        admission_capacity = self._admission_capacity()
        with self._current() as now:
            return self._snapshot(now, admission_capacity)

    def sessions(self) -> list[Session]:
        """Active sessions, the one that started first first."""
        with self._current():
            return sorted(self._sessions.values(), key=lambda session: session.started_at)

    @contextmanager
    def _current(self) -> Iterator[float]:
        """Hold the lock over a state with the sessions whose time is up removed; yields now."""
        try:
            with self._lock:
                now = self._clock()
                self._expire(now)
                yield now
        finally:
            self._report_finished()

    def _admission_capacity(self) -> float:
        extra = float(self._extra_capacity())
        # A NaN would compare False against every load and so admit anything.
        if not math.isfinite(extra):
            raise ValueError(f"extra_capacity() must return a finite number of kW, got {extra}")
        return self.capacity_kw + extra

    def _amounts(self) -> list[float]:
        return [session.amount_kw for session in self._sessions.values()]

    def _expire(self, now: float) -> None:
        while self._ends and self._ends[0][0] <= now:
            _, session_id = heapq.heappop(self._ends)
            session = self._sessions.get(session_id)
            if session is not None:
                self._finish(session, charged_seconds=session.duration_seconds, now=now)

    def _finish(self, session: Session, charged_seconds: float, now: float) -> None:
        del self._sessions[session.session_id]
        self._retired.add(session.session_id, now)
        self._load_kw = math.fsum(self._amounts())
        self._state_version += 1
        self._unreported.append((session, charged_seconds))

    def _snapshot(self, now: float, admission_capacity: float) -> Snapshot:
        return Snapshot(
            taken_at=now,
            load_kw=self._load_kw,
            admission_capacity_kw=admission_capacity,
            total_capacity_kw=self.capacity_kw,
            active_chargers=len(self._sessions),
            state_version=self._state_version,
            next_end_at=self._next_end_at(),
        )

    def _next_end_at(self) -> float | None:
        # Stopped sessions leave their entry in the heap; drop those that reached the top.
        while self._ends and self._ends[0][1] not in self._sessions:
            heapq.heappop(self._ends)
        return self._ends[0][0] if self._ends else None

    def _report_finished(self) -> None:
        with self._lock:
            finished, self._unreported = self._unreported, []
        if self._on_session_finished is None:
            return
        for session, charged_seconds in finished:
            self._on_session_finished(session, charged_seconds)
