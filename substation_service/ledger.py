"""The charging sessions of one substation and the power each one gets. Plain Python, no web framework.

One lock guards every read and change. The limit is an input that moves:

    limit = min(operator limit, CAPACITY_KW + generation + storage + power from peers)

(power sent to peers counts negative). Every change of any part of it
re-allocates in the same atomic step, under that lock, so at no instant does
the sum of the allocations pass the limit: the operator's ``PUT /limit``, a
peer-balancing migration (pushed by the peering node), and a step of the
generation profile, which is applied at its own time, not when someone next
looks.

Nothing runs in the background for time. Every call first plays the events
whose time has come, in time order ("lazy expiry"): sessions ending at
``ends_at``, leases lapsing, and steps of the generation profile, each at the
moment it happens. So whatever the ledger reports is exact at the moment it is
asked, and the allocation history records every change at its true time.

A session has a fixed end (``duration_seconds``) or is held by a lease
(``lease_seconds``, OCPP's open-ended transactions): it ends when it is
stopped or when its lease lapses without renewal. Its caller may change what
it asks for (``change``) while it charges. ``state_version`` grows with every
change of anyone's allocation, and ``wait_for_change`` lets a watcher hear of
it at once.

How the limit is shared is :mod:`substation_service.allocation`'s business
(and under the ``deadline`` policy :mod:`substation_service.scheduling`'s).
The ledger keeps the records: per session its allocation history (time, kW),
the energy it got, how long it was suspended; per substation the limit's
history and the energy delivered.

A session may state an energy need (``energy_kwh`` by ``departure``). Under
``deadline`` its power is its own, not a fair-share level's: the ledger follows
each change the plan makes to it (O(sessions whose power changed)), integrates
its energy, and plays its planning events like any other event, at their
time: its need delivered (it ends, ``energy_delivered``), its laxity reaching
``URGENT_WITHIN_SECONDS`` (it must charge at full power) or 0 (it can no
longer be met). Each report of such a session carries the energy it is
expected to have by its departure under the current plan
(:class:`substation_service.scheduling.Projection`). The plan never reads it:
only a report asks for it (an admission's answer, a session looked up, the
metrics), and each plan is forecast once, only as far along its queue as the
sessions asked about.
Under ``fair_share`` and ``strict`` the policy alone decides every session's
power, and a session with a need ends as under ``deadline``:
``energy_delivered`` at the moment its need is delivered (a leased one stays,
``met``, and charges on). The ledger integrates each one's power from every
change of it and plays that moment as an event, planned again whenever its
power changes. The sessions held at the fair-share level all gain the level's
integral, so they are ordered once by the integral at which each need is
delivered and only the first has an event; the others' powers change only
when they are suspended, resumed or changed, or when the level crosses their
amount or floor (found by bisection): O(log n + the sessions whose power
changed otherwise than with the level) per event.

With a state file, finished sessions are records kept on disk for a retention
and up to a row bound; memory keeps only the newest (``ENDED_SESSIONS_KEPT``).
"""
from __future__ import annotations

import bisect
import dataclasses
import heapq
import math
import operator
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum

from gridcommon import jsonfast
from gridcommon.validation import ValidationError
from substation_service.allocation import (
    AllocationPolicy,
    ChargingSet,
    Member,
    allocation_mw,
    amount_to_mw,
    minimum_mw,
    to_kw,
    to_mw,
)
from substation_service.peering.power import LocalPower
from substation_service.scheduling import URGENT_WITHIN_SECONDS, DeadlineSet, Projected, Projection
from substation_service.store import SCHEMA_VERSION, LedgerStore, StoredSession, StoredState

Clock = Callable[[], float]

# A step of the generation profile is applied with the value that holds just after it, so float
# rounding of the step's time can never leave the old, higher value in force past the step.
PROFILE_STEP_EPSILON_SECONDS = 1e-3
# Bounds of what is kept in memory: ended sessions (for GET /charge/<id> and audits) and points per
# history. With a state file, ended sessions are records kept on disk far longer (RECORDS_*), and a
# lookup of an older one reads the file.
ENDED_SESSIONS_KEPT = 10_000
# With a state file, the reports of only the newest ended sessions stay in memory too; older ones are
# read from the file when asked for, so memory does not grow with the sessions seen.
ENDED_REPORTS_IN_MEMORY = 1_000
HISTORY_POINTS_KEPT = 1_000
LIMIT_HISTORY_KEPT = 10_000
# How often the store forgets what no longer needs keeping (ended sessions past the last kept, ...).
TRIM_EVERY_FINISHES = 1_000
SECONDS_PER_HOUR = 3600.0
# An ended session's id stays retired this long past its copies' latest deadline. The ledger judges
# deadlines by its own clock, so this is room for rounding, not for clocks that disagree.
RETIRE_MARGIN_SECONDS = 1.0
# Changes of one session's amount kept for its history and energy; a caller changing it more often
# than this is refused (a vehicle tapering changes it a few dozen times per charge at most).
AMOUNT_CHANGES_KEPT = 1_000
# A watcher wakes this long after an event's time, so the event is due when it looks again.
EVENT_WAKE_MARGIN_SECONDS = 0.001
# A need counts as met with less than this still missing (ACN-Sim's definition).
NEED_MET_MARGIN_KWH = 0.1
# Finished records stay in the state file this long, and at most this many of them (the oldest go first).
DEFAULT_RECORDS_RETENTION_SECONDS = 90 * 86400.0
DEFAULT_RECORDS_MAX_ROWS = 1_000_000
MWS_PER_KWH = 1_000_000 * SECONDS_PER_HOUR
_FIRST = operator.itemgetter(0)


def steady_wall_clock() -> Clock:
    """Seconds since the epoch that never go backwards.

    Wall time is read once and then advanced with the monotonic clock: a step of
    the system clock (NTP, a VM resume) cannot make a new session start before
    an older one ended, which the capacity guarantee relies on.
    """
    wall_at_start = time.time()
    monotonic_at_start = time.monotonic()
    return lambda: wall_at_start + (time.monotonic() - monotonic_at_start)


class SessionState(str, Enum):
    CHARGING = "charging"
    SUSPENDED = "suspended"
    ENDED = "ended"


class LimitSource(str, Enum):
    # The substation's own supply: transformer rating, local generation and storage, peers.
    SUBSTATION = "substation"
    # An operator's limit (PUT /limit) is lower than that.
    OPERATOR = "operator"


@dataclass(frozen=True)
class Session:
    session_id: str
    vehicle_id: str
    # What it asks for now (a change replaces the record).
    amount_kw: float
    started_at: float
    # None for a session held by a lease: it has no fixed end.
    ends_at: float | None

    @property
    def duration_seconds(self) -> float | None:
        return None if self.ends_at is None else self.ends_at - self.started_at

    @property
    def leased(self) -> bool:
        return self.ends_at is None


@dataclass(frozen=True)
class SessionReport:
    """One session at one instant: what it asked for, what it gets, what it got."""

    session: Session
    state: SessionState
    allocated_kw: float
    minimum_kw: float
    energy_kwh: float
    suspended_seconds: float
    # (seconds since the epoch, kW) at every change of its allocation; only when asked for.
    history: tuple[tuple[float, float], ...] | None = None
    ended_at: float | None = None
    # "completed" (ran its time), "stopped" (DELETE) or "lease_expired"; None while active.
    end_reason: str | None = None
    # A leased session's lease: its length, and when it lapses unless renewed (None once ended).
    lease_seconds: float | None = None
    lease_expires_at: float | None = None
    # Seconds until a session with a fixed end ends; None for a leased one.
    remaining_seconds: float | None = None
    # An energy need: ``need_kwh`` by ``departure`` (seconds since the epoch); None without one.
    need_kwh: float | None = None
    departure: float | None = None
    # What it is expected to have by its departure under the current plan (scheduling.Projection);
    # for an ended session, what it got.
    expected_kwh: float | None = None

    @property
    def has_need(self) -> bool:
        return self.need_kwh is not None

    @property
    def still_needed_kwh(self) -> float | None:
        return None if self.need_kwh is None else max(0.0, self.need_kwh - self.energy_kwh)

    @property
    def expected_shortfall_kwh(self) -> float | None:
        if self.need_kwh is None or self.expected_kwh is None:
            return None
        return max(0.0, self.need_kwh - self.expected_kwh)

    @property
    def feasible(self) -> bool | None:
        if self.need_kwh is None or self.expected_kwh is None:
            return None
        return self.expected_kwh >= self.need_kwh - NEED_MET_MARGIN_KWH

    @property
    def need_met(self) -> bool | None:
        """Less than ``NEED_MET_MARGIN_KWH`` missing; None without a need."""
        return None if self.need_kwh is None else self.need_kwh - self.energy_kwh < NEED_MET_MARGIN_KWH


@dataclass(frozen=True)
class NeedFigures:
    """The substation's energy needs: of the sessions that finished, and the ones running now."""

    # Of finished sessions with a need, since the state file began (or this process, without one).
    requested_kwh: float
    delivered_kwh: float
    met: int
    missed: int
    # Sum over the running sessions with a need of what they are expected to miss.
    expected_shortfall_kwh: float


@dataclass(frozen=True)
class LimitParts:
    capacity_kw: float
    generation_kw: float
    storage_kw: float
    # Power received from peers (+) or sent to them (-), counting offers not yet answered as sent.
    peer_kw: float
    operator_limit_kw: float | None

    @property
    def substation_kw(self) -> float:
        return self.capacity_kw + self.generation_kw + self.storage_kw + self.peer_kw

    @property
    def limit_kw(self) -> float:
        own = max(0.0, self.substation_kw)
        return own if self.operator_limit_kw is None else min(own, self.operator_limit_kw)

    @property
    def source(self) -> LimitSource:
        if self.operator_limit_kw is not None and self.operator_limit_kw < max(0.0, self.substation_kw):
            return LimitSource.OPERATOR
        return LimitSource.SUBSTATION


@dataclass(frozen=True)
class Snapshot:
    """The substation's state at one instant, as of ``state_version``."""

    taken_at: float
    # What the charging sessions draw together: the sum of the allocations.
    load_kw: float
    # What the active sessions ask for together (suspended ones included).
    requested_kw: float
    # Sum of the minimums of every active session: what a new session must fit beside.
    minimum_load_kw: float
    limit_kw: float
    limit_source: LimitSource
    parts: LimitParts
    total_capacity_kw: float
    # The most a charging session may draw now; None when nobody is curtailed.
    fair_share_kw: float | None
    charging: int
    suspended: int
    # Charging sessions that get less than they ask for.
    curtailed: int
    # The least a new session needs: MIN_CHARGE_KW, or its whole amount under strict.
    min_charge_kw: float | None
    energy_kwh: float
    state_version: int
    # Earliest moment an active session ends by itself; None when nothing charges.
    next_end_at: float | None
    # Active sessions held by a lease, and leases that lapsed since this process started.
    leased: int = 0
    leases_expired: int = 0
    # Only when asked for: its forecast of every session costs O(n log n).
    needs: NeedFigures | None = None

    @property
    def active_chargers(self) -> int:
        return self.charging + self.suspended

    @property
    def curtailed_kw(self) -> float:
        return max(0.0, self.requested_kw - self.load_kw)

    @property
    def available_kw(self) -> float:
        # The limit can fall below the minimums for a moment (sessions are then suspended).
        return max(0.0, self.limit_kw - self.load_kw)

    @property
    def load_percentage(self) -> float:
        if self.limit_kw <= 0:
            # Nothing can be admitted at all: report the substation as full so nobody routes to it.
            return 100.0
        return self.load_kw / self.limit_kw * 100.0

    def seconds_until_next_end(self) -> int:
        """Whole seconds (at least 1) until an active session frees its power: a Retry-After."""
        if self.next_end_at is None:
            return 1
        return max(1, math.ceil(self.next_end_at - self.taken_at))


@dataclass(frozen=True)
class Admission:
    report: SessionReport
    snapshot: Snapshot
    # True when the session was already active under the requested id: nothing new was admitted.
    replayed: bool = False

    @property
    def session(self) -> Session:
        return self.report.session


@dataclass(frozen=True)
class Release:
    report: SessionReport
    ended_at: float
    snapshot: Snapshot

    @property
    def session(self) -> Session:
        return self.report.session


class CapacityExceeded(Exception):
    """The new session's minimum does not fit; ``snapshot`` is the state the decision saw."""

    def __init__(self, amount_kw: float, minimum_kw: float, snapshot: Snapshot, message: str | None = None) -> None:
        if message is not None:
            reason = ""
        elif minimum_kw > snapshot.limit_kw:
            reason = f"its minimum of {minimum_kw:g} kW is more than the whole limit of {snapshot.limit_kw:g} kW"
        elif snapshot.suspended:
            reason = f"{snapshot.suspended} session(s) here are suspended and come first"
        else:
            room = max(0.0, snapshot.limit_kw - snapshot.minimum_load_kw)
            reason = (
                f"its minimum of {minimum_kw:g} kW does not fit: the sessions here need "
                f"{snapshot.minimum_load_kw:g} of {snapshot.limit_kw:g} kW at least, {room:g} kW are left"
            )
        super().__init__(message or f"{amount_kw:g} kW cannot be admitted: {reason}")
        self.amount_kw = amount_kw
        self.minimum_kw = minimum_kw
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


class DeadlinePassed(Exception):
    """The request's caller stopped waiting for the answer (X-Request-Deadline): nothing is admitted."""

    def __init__(self, session_id: str | None, late_seconds: float, snapshot: Snapshot) -> None:
        super().__init__(
            f"the deadline of the request for session {session_id or '(unnamed)'} passed {late_seconds:.3f} s ago; "
            "its caller no longer waits for the answer, so nothing was admitted"
        )
        self.session_id = session_id
        self.late_seconds = late_seconds
        self.snapshot = snapshot


class RetiredIds:
    """Ids of sessions that ended, were stopped, or were asked to stop before they existed.

    A copy of a request can arrive late (a resend after a lost answer, packets
    held up by a network cut), even after the balancer asked to stop the
    session it might have created. Remembering the id means such a copy is
    refused instead of charging a vehicle twice. How long: until the latest
    deadline any copy of the request carried (a copy is refused after its
    deadline anyway), or, for a request sent without a deadline or an id never
    seen here, for as long as a session can last. So ids do not pile up with
    traffic: the balancer's copies all carry deadlines of a few seconds.
    Not thread-safe: the ledger calls it under its lock.
    """

    def __init__(self, keep_seconds: float, limit: int = 100_000) -> None:
        self._keep_seconds = keep_seconds
        self._limit = limit
        self._forget_at: dict[str, float] = {}
        # (forget_at, id), soonest first; an entry whose id was retired again since is skipped when it surfaces.
        self._queue: list[tuple[float, str]] = []

    def add(self, session_id: str, now: float, until: float | None = None) -> float | None:
        """Retire the id until ``until`` (at most the full window; None: the full window).

        Returns when it will be forgotten, or None when ``until`` has already passed.
        """
        forget_at = now + self._keep_seconds if until is None else min(until, now + self._keep_seconds)
        forget_at = max(forget_at, self._forget_at.get(session_id, forget_at))
        if forget_at <= now:
            return None
        self._forget_at[session_id] = forget_at
        heapq.heappush(self._queue, (forget_at, session_id))
        while len(self._forget_at) > self._limit:
            # Full: the id that would be forgotten soonest goes first.
            self._pop_soonest()
        if len(self._queue) > 2 * len(self._forget_at) + 64:
            self._queue = [(at, key) for key, at in self._forget_at.items()]
            heapq.heapify(self._queue)
        return forget_at

    def restore(self, entries: list[tuple[str, float]]) -> None:
        for session_id, forget_at in entries:
            self._forget_at[session_id] = forget_at
        self._queue = [(at, key) for key, at in self._forget_at.items()]
        heapq.heapify(self._queue)

    def holds(self, session_id: str, now: float) -> bool:
        while self._queue and self._queue[0][0] <= now:
            self._pop_soonest()
        return session_id in self._forget_at

    def _pop_soonest(self) -> None:
        forget_at, session_id = heapq.heappop(self._queue)
        if self._forget_at.get(session_id) == forget_at:
            del self._forget_at[session_id]


class UnknownSession(KeyError):
    """No active session has this id: it never existed, already ended or was stopped."""


class TooManyChanges(Exception):
    """A session's amount changed ``AMOUNT_CHANGES_KEPT`` times already: its record would grow without bound."""

    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"session {session_id!r} changed what it asks for {AMOUNT_CHANGES_KEPT} times already; send changes "
            "only when they matter (a deadband), or stop it and start a new session"
        )
        self.session_id = session_id


@dataclass(frozen=True)
class Change:
    """A session after a change of its amount or minimum, and the substation after it."""

    report: SessionReport
    snapshot: Snapshot


SessionFinished = Callable[[Session, float], None]


@dataclass
class _Entry:
    """An active session and the bookkeeping behind its report."""

    session: Session
    member: Member
    # Index (absolute) of the level history point in force when it started.
    start_position: int
    # (time, charging?) at every suspension and resumption.
    state_changes: list[tuple[float, bool]] = field(default_factory=list)
    # The latest deadline any copy of its request carried; None when one had none (or after a restart).
    copies_until: float | None = None
    # (time, kW asked for, own minimum kW or None) at admission and at every change of either.
    amounts: list[tuple[float, float, float | None]] = field(default_factory=list)
    # Its own minimum as asked for (None: the substation's MIN_CHARGE_KW), before policy and amount cap it.
    minimum_kw: float | None = None
    # A leased session's lease length; None for one with a fixed end.
    lease_seconds: float | None = None
    # When it ends unless something happens first: its fixed end, or when its lease lapses.
    end_at: float = 0.0
    # An energy need (kWh since it started) by ``departure`` as the driver stated it; ``due`` is when the
    # plan must have delivered it: the departure, or the session's fixed end when that comes first.
    need_kwh: float | None = None
    departure: float | None = None
    due: float | None = None
    # What was counted before ``base_at`` (a switch of policy, a need stated later): energy, suspended
    # seconds and history points; the energy after it is counted the way the session is counted now.
    base_at: float | None = None
    base_mws: float = 0.0
    base_suspended: float = 0.0
    base_points: list[tuple[float, float]] = field(default_factory=list)
    # Under the deadline policy a session with a need has a power of its own, not a fair-share level:
    # its energy up to ``power_since`` and its history points are kept here (``tracked``).
    tracked: bool = False
    power_mw: int = 0
    power_since: float = 0.0
    delivered_mws: float = 0.0
    points: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=HISTORY_POINTS_KEPT))
    # Under fair_share and strict, while it is held at the fair-share level: the level's integral (mW·s) when
    # it came to be held there and when its need is delivered (Ledger._follow_needs); its (amount, floor) as
    # sorted there.
    water_since: float | None = None
    water_due: float | None = None
    followed_terms: tuple[int, int] | None = None
    # Its next planning event: "done" (need delivered), "urgent", "hopeless" (can no longer be met), or
    # "met" (a leased session's need delivered: it stays, behind every need); None when none is due.
    mark_at: float | None = None
    mark_kind: str = ""
    hopeless: bool = False
    # A leased session whose need was delivered: it stays, behind every need, until its holder ends it.
    met: bool = False


class _LevelHistory:
    """(time, fair-share level in mW or None) at every change of the level, pruned from the front.

    Positions are absolute, so entries keep pointing at the right point after pruning.
    """

    def __init__(self, at: float) -> None:
        self._points: deque[tuple[float, int | None]] = deque([(at, None)])
        self._base = 0
        # The first position changed since the store was last told (None: nothing changed), and
        # whether points after the last were dropped meanwhile (a change undone at the same instant).
        self.dirty_from: int | None = 0
        self.dropped_past = False

    def restore(self, points: list[tuple[int, float, int | None]]) -> None:
        self._base = points[0][0]
        self._points = deque((at, level) for _, at, level in points)
        self.dirty_from = None

    def changed_points(self) -> tuple[int, list[tuple[int, float, int | None]]] | None:
        """``(from, points)`` changed since the last call, for the store; None when nothing did."""
        if self.dirty_from is None:
            return None
        start = max(self.dirty_from, self._base)
        points = [(position, *self._points[position - self._base]) for position in range(start, self.last_position + 1)]
        self.dirty_from = None
        return start, points

    def take_dropped_past(self) -> bool:
        dropped, self.dropped_past = self.dropped_past, False
        return dropped

    def _touch(self, position: int) -> None:
        self.dirty_from = position if self.dirty_from is None else min(self.dirty_from, position)

    @property
    def last_position(self) -> int:
        return self._base + len(self._points) - 1

    def record(self, at: float, level_mw: int | None) -> None:
        last_at, last_level = self._points[-1]
        if last_level == level_mw:
            return
        if last_at == at:
            self._touch(self.last_position)
            self._points[-1] = (at, level_mw)  # several changes at one instant: the last one holds
            if len(self._points) > 1 and self._points[-2][1] == level_mw:
                self._points.pop()
                self.dropped_past = True
            return
        self._points.append((at, level_mw))
        self._touch(self.last_position)

    def prune_before(self, position: int) -> None:
        while self._base < position and len(self._points) > 1:
            self._points.popleft()
            self._base += 1

    def since(self, position: int) -> Iterator[tuple[float, int | None]]:
        """Points from ``position`` (clamped to what is kept) to the last."""
        start = max(0, position - self._base)
        for index in range(start, len(self._points)):
            yield self._points[index]


class Ledger:
    """The active charging sessions of one substation and their allocations.

    ``on_session_finished(session, charged_seconds)`` is called outside the
    lock for every session that ends, by expiry or by stop.
    """

    def __init__(
        self,
        capacity_kw: float,
        default_duration_seconds: float,
        *,
        clock: Clock | None = None,
        power: LocalPower | None = None,
        policy: AllocationPolicy = AllocationPolicy.DEADLINE,
        min_charge_kw: float = 1.4,
        on_session_finished: SessionFinished | None = None,
        retire_ids_for_seconds: float = 3600.0,
        store: LedgerStore | None = None,
        substation_id: str = "",
        records_retention_seconds: float = DEFAULT_RECORDS_RETENTION_SECONDS,
        records_max_rows: int = DEFAULT_RECORDS_MAX_ROWS,
    ) -> None:
        """With a ``store`` every change is committed to it before the ledger answers, and a ledger
        opened on a store that holds state carries on where that one stopped (see ``_restore``).
        Finished sessions stay in it as records for ``records_retention_seconds``, at most
        ``records_max_rows`` of them."""
        if capacity_kw < 0:
            raise ValueError(f"capacity_kw must be at least 0, got {capacity_kw}")
        if default_duration_seconds <= 0:
            raise ValueError(f"default_duration_seconds must be greater than 0, got {default_duration_seconds}")
        if not min_charge_kw > 0:
            raise ValueError(f"min_charge_kw must be greater than 0, got {min_charge_kw}")
        self.capacity_kw = capacity_kw
        self.default_duration_seconds = default_duration_seconds
        self.policy = policy
        self.min_charge_kw = min_charge_kw
        self._min_charge_mw = to_mw(min_charge_kw)
        self._clock = clock or steady_wall_clock()
        self._power = power or LocalPower()
        self._on_session_finished = on_session_finished
        self._lock = threading.Lock()
        # Signalled under the lock whenever state_version grows: long polls wait on it.
        self._changed = threading.Condition(self._lock)
        now = self._clock()
        self._time = now
        self._generation_kw = self._power.generation_at(now)
        self._next_step_at = self._power.next_change_after(now)
        self._peer_kw = 0.0
        self._operator_limit_kw: float | None = None
        self._set: ChargingSet | DeadlineSet = self._new_set(policy)
        self._levels = _LevelHistory(now)
        self._sessions: dict[str, _Entry] = {}
        self._requested_mw = 0
        # (end_at, session_id) of active sessions; entries of stopped sessions and of leases renewed since
        # are dropped when they surface.
        self._ends: list[tuple[float, str]] = []
        self._leased = 0
        self._leases_expired = 0
        self._admitted = 0
        self._state_version = 0
        self._energy_mws = 0.0  # milliwatt-seconds delivered by this ledger since it started
        self._retired = RetiredIds(retire_ids_for_seconds)
        # Ended sessions, oldest first: their reports as compact JSON (a third of the memory of the
        # objects), or None for one that only the state file keeps (see ENDED_REPORTS_IN_MEMORY).
        self._ended: OrderedDict[str, bytes | None] = OrderedDict()
        self._reports_in_memory: deque[str] = deque()
        self._limit_history: deque[tuple[float, float, str]] = deque(maxlen=LIMIT_HISTORY_KEPT)
        # Sessions ended under the lock, reported once it is released.
        self._unreported: list[tuple[Session, float]] = []
        self._store = store
        self._substation_id = substation_id
        self._records_retention_seconds = records_retention_seconds
        self._records_max_rows = records_max_rows
        # (time, session id) of the sessions' next planning events (Entry.mark_at); stale ones are skipped.
        self._marks: list[tuple[float, str]] = []
        # The active sessions with a need. Under fair_share and strict (see _follow_needs): the level
        # their powers were last followed at and its integral (mW·s) up to ``_water_at``; (amount, id)
        # and (floor, id) of each, sorted; (the level's integral at which its need is delivered, id) of
        # those held at the level, first first (stale ones are skipped), and which of them has a mark.
        self._with_need: dict[str, _Entry] = {}
        self._followed_level: int | None = None
        self._water_mws = 0.0
        self._water_at = now
        self._need_amounts: list[tuple[int, str]] = []
        self._need_floors: list[tuple[int, str]] = []
        self._level_dues: list[tuple[float, str]] = []
        self._level_marked: str | None = None
        # Of finished sessions with a need: kWh asked, kWh delivered, needs met and missed.
        self._needs = {"requested_kwh": 0.0, "delivered_kwh": 0.0, "met": 0, "missed": 0}
        # (state_version, the forecast of that version's plan): see _expected_mws.
        self._projection: tuple[int, Projection | None] = (-1, None)
        self._finished_since_trim = 0
        self._flushed_version = -1
        state = store.load(ENDED_SESSIONS_KEPT) if store is not None else None
        if state is not None and not state.empty:
            self._restore(state, now)
        else:
            self._apply_limit(now)
            self._state_version = 0  # the first limit is where the ledger starts, not a change
        sealed = self._flush(now)
        if sealed is not None:
            self._store.commit_through(sealed)

    # ----- sessions --------------------------------------------------------------------------

    def admit(
        self,
        vehicle_id: str,
        amount_kw: float,
        duration_seconds: float | None = None,
        session_id: str | None = None,
        deadline: float | None = None,
        *,
        lease_seconds: float | None = None,
        minimum_kw: float | None = None,
        energy_kwh: float | None = None,
        departure: float | None = None,
    ) -> Admission:
        """Start a session if its minimum fits beside everyone's, else raise ``CapacityExceeded``.

        With ``lease_seconds`` the session has no fixed end: it charges until stopped, or until
        its lease lapses unrenewed (``renew``). ``minimum_kw`` is its own minimum, at least
        ``min_charge_kw`` (a three-phase vehicle needs about 4.14 kW); under strict the minimum
        is the whole amount anyway.

        Asking again with the ``session_id`` of an active session for the same
        vehicle and amount returns that session (``replayed``; a leased one's
        lease is renewed): a caller whose answer got lost can safely ask again.
        The id of a session that ended or was asked to stop raises
        ``SessionIdRetired``.

        ``deadline`` (seconds since the epoch) is when the caller stops waiting:
        from then on the request raises ``DeadlinePassed``, judged by the
        ledger's clock under its lock, so the id of a session that ends needs
        retiring only until the latest deadline of its copies.

        ``energy_kwh`` by ``departure`` (seconds since the epoch) is the vehicle's need. A
        session with a need and no duration ends when its need is delivered, at departure, or
        when stopped (a leased one only when stopped or its lease lapses); ``departure`` alone
        ends it then. A departure not after now raises ``ValidationError`` naming it.
        """
        if not amount_kw > 0 or not math.isfinite(amount_kw):
            raise ValueError(f"amount_kw must be a finite number greater than 0, got {amount_kw}")
        if lease_seconds is not None and duration_seconds is not None:
            raise ValueError("a session has a duration_seconds or a lease_seconds, not both")
        if energy_kwh is not None and not (energy_kwh > 0 and math.isfinite(energy_kwh)):
            raise ValidationError("energy_kwh", f"energy_kwh must be a finite number greater than 0, got {energy_kwh}")
        if energy_kwh is not None and departure is None and duration_seconds is None:
            raise ValidationError("departure", "energy_kwh needs a departure (or a duration_seconds): by when?")
        duration = self.default_duration_seconds if duration_seconds is None else duration_seconds
        if not duration > 0:
            raise ValueError(f"duration_seconds must be greater than 0, got {duration}")
        if lease_seconds is not None and not (lease_seconds > 0 and math.isfinite(lease_seconds)):
            raise ValueError(f"lease_seconds must be a finite number greater than 0, got {lease_seconds}")
        self._check_minimum(minimum_kw, amount_kw)
        amount_mw = amount_to_mw(amount_kw)
        minimum = self._minimum_of(amount_mw, minimum_kw)
        # The id of a finished record is never used again (its row would be replaced). Read before the lock:
        # a record is in the file once committed, and the newest ones are in memory (_ended) anyway.
        on_record = session_id is not None and self._store is not None and (
            session_id not in self._ended and self._store.ended_report(session_id) is not None)
        with self._current() as now:
            if deadline is not None and now >= deadline:
                raise DeadlinePassed(session_id, now - deadline, self._snapshot(now))
            if session_id is not None and session_id in self._sessions:
                return self._replay(self._sessions[session_id], vehicle_id, amount_kw, now, deadline)
            if session_id is not None and (on_record or session_id in self._ended
                                           or self._retired.holds(session_id, now)):
                raise SessionIdRetired(session_id)
            if departure is not None and not departure > now:
                raise ValidationError("departure", "departure must be after now (by this substation's clock).")
            if not self._set.admits(minimum):
                raise CapacityExceeded(amount_kw, to_kw(minimum), self._snapshot(now))
            if lease_seconds is not None:
                ends_at = None
            elif departure is not None and duration_seconds is None:
                ends_at = departure
            else:
                ends_at = now + duration if departure is None else min(now + duration, departure)
            session = Session(session_id or uuid.uuid4().hex, vehicle_id, amount_kw, now, ends_at)
            self._admitted += 1
            member = Member(session.session_id, amount_mw, minimum, self._admitted)
            due = None
            if energy_kwh is not None:
                due = departure if ends_at is None else ends_at
            entry = _Entry(session, member, self._levels.last_position, [(now, True)], deadline,
                           amounts=[(now, amount_kw, minimum_kw)], minimum_kw=minimum_kw, lease_seconds=lease_seconds,
                           end_at=ends_at if lease_seconds is None else now + lease_seconds,
                           need_kwh=energy_kwh, departure=departure, due=due)
            entry.tracked = self._tracks(entry)
            entry.power_since = now
            if isinstance(self._set, DeadlineSet):
                self._set.add(member.key, amount_mw, minimum, due, energy_kwh, order=member.order)
            else:
                self._set.add(member)
            self._sessions[session.session_id] = entry
            if energy_kwh is not None:
                self._with_need[session.session_id] = entry
                if not isinstance(self._set, DeadlineSet):
                    self._start_following(entry, now, 0.0)
            self._track_powers(now, [session.session_id])
            self._levels.record(now, self._set.level_mw)
            entry.start_position = self._levels.last_position
            if self._store is not None:
                self._store.admit(StoredSession(
                    session.session_id, vehicle_id, amount_kw, session.started_at, session.ends_at,
                    member.order, entry.start_position, entry.state_changes,
                    lease_seconds=lease_seconds, minimum_kw=minimum_kw, amounts=entry.amounts,
                    need=_need_json(entry),
                ))
            self._requested_mw += amount_mw
            self._leased += lease_seconds is not None
            self._push_end(entry)
            self._state_version += 1
            return Admission(self._report(entry, now), self._snapshot(now))

    def _replay(
        self, entry: _Entry, vehicle_id: str, amount_kw: float, now: float, deadline: float | None
    ) -> Admission:
        session = entry.session
        # The amount it was admitted with: a copy of the request may arrive after a change of it.
        if session.vehicle_id != vehicle_id or amount_kw not in (session.amount_kw, entry.amounts[0][1]):
            raise SessionIdInUse(session)
        if entry.copies_until is not None:
            entry.copies_until = None if deadline is None else max(entry.copies_until, deadline)
        if entry.lease_seconds is not None:
            self._renew(entry, now, entry.lease_seconds)
        return Admission(self._report(entry, now), self._snapshot(now), replayed=True)

    def renew(self, session_ids: Iterable[str], lease_seconds: float) -> tuple[list[str], list[str]]:
        """Renew the leases of these sessions: each lapses ``lease_seconds`` from now unless renewed again.

        Returns ``(renewed, unknown)``: unknown are the ids of no active leased session here (never
        admitted, ended, stopped, lapsed already, or admitted with a fixed end). Nobody's allocation
        changes, so ``state_version`` does not move.
        """
        if not (lease_seconds > 0 and math.isfinite(lease_seconds)):
            raise ValueError(f"lease_seconds must be a finite number greater than 0, got {lease_seconds}")
        renewed: list[str] = []
        unknown: list[str] = []
        with self._current() as now:
            for session_id in dict.fromkeys(session_ids):
                entry = self._sessions.get(session_id)
                if entry is None or entry.lease_seconds is None:
                    unknown.append(session_id)
                    continue
                self._renew(entry, now, lease_seconds)
                renewed.append(session_id)
        return renewed, unknown

    def _renew(self, entry: _Entry, now: float, lease_seconds: float) -> None:
        if lease_seconds != entry.lease_seconds:
            entry.lease_seconds = lease_seconds
            if self._store is not None:
                self._store.lease_changed(entry.session.session_id, lease_seconds)
        # The old end stays in the heap and is skipped when it surfaces.
        entry.end_at = now + lease_seconds
        self._push_end(entry)

    def change(self, session_id: str, amount_kw: float | None = None, minimum_kw: float | None = None, *,
               energy_kwh: float | None = None, departure: float | None = None) -> Change:
        """Change what an active session asks for: its amount, its own minimum, or both; re-allocate at once.

        A minimum above the new amount, or below ``min_charge_kw``, raises ``ValidationError``
        naming the field. An amount alone that falls below the session's minimum caps the
        minimum, as for any session asking less than the minimum. A raised minimum that does
        not fit beside the other charging sessions' raises ``CapacityExceeded`` and changes
        nothing; ``UnknownSession`` when no session with this id is active.

        ``energy_kwh`` (the session's whole need, counted from its start) and ``departure`` state
        or change its need (OCPP's NotifyEVChargingNeeds); a session without a need must be given
        both, and the plan is made again at once. A fixed end stays: it is the latest the need can be due.
        """
        if amount_kw is not None and (not amount_kw > 0 or not math.isfinite(amount_kw)):
            raise ValidationError("amount", f"amount must be a finite number greater than 0, got {amount_kw}")
        if energy_kwh is not None and not (energy_kwh > 0 and math.isfinite(energy_kwh)):
            raise ValidationError("energy_kwh", f"energy_kwh must be a finite number greater than 0, got {energy_kwh}")
        with self._current() as now:
            entry = self._sessions.get(session_id)
            if entry is None:
                raise UnknownSession(session_id)
            if energy_kwh is not None or departure is not None:
                self._change_need(entry, now, energy_kwh, departure)
                if amount_kw is None and minimum_kw is None:
                    return Change(self._report(entry, now), self._snapshot(now))
            new_amount = entry.session.amount_kw if amount_kw is None else amount_kw
            new_minimum = entry.minimum_kw if minimum_kw is None else minimum_kw
            if minimum_kw is not None:
                self._check_minimum(minimum_kw, new_amount)
            amount_mw = amount_to_mw(new_amount)
            minimum = self._minimum_of(amount_mw, new_minimum)
            member = entry.member
            if (amount_mw, minimum, new_minimum) == (member.amount_mw, member.minimum_mw, entry.minimum_kw):
                return Change(self._report(entry, now), self._snapshot(now))
            if not self._set.fits_change(session_id, minimum):
                others = to_kw(self._set.charging_minimum_total_mw - member.minimum_mw)
                raise CapacityExceeded(new_amount, to_kw(minimum), self._snapshot(now), message=(
                    f"session {session_id!r} cannot change to {new_amount:g} kW with a minimum of "
                    f"{to_kw(minimum):g} kW: the other sessions here need {others:g} of "
                    f"{to_kw(self._set.limit_mw):g} kW at least; nothing was changed"
                ))
            if len(entry.amounts) >= AMOUNT_CHANGES_KEPT:
                raise TooManyChanges(session_id)
            entry.amounts.append((now, new_amount, new_minimum))
            entry.session = dataclasses.replace(entry.session, amount_kw=new_amount)
            self._requested_mw += amount_mw - member.amount_mw
            entry.minimum_kw = new_minimum
            suspended, resumed = self._set.change(session_id, amount_mw, minimum)
            member.amount_mw, member.minimum_mw = amount_mw, minimum  # a DeadlineSet keeps members of its own
            self._record_state_changes(now, suspended, resumed, changed=session_id)
            if self._store is not None:
                self._store.amount_changed(session_id, new_amount, new_minimum, entry.amounts)
            self._state_version += 1
            return Change(self._report(entry, now), self._snapshot(now))

    def _check_minimum(self, minimum_kw: float | None, amount_kw: float) -> None:
        if minimum_kw is not None and not (
            math.isfinite(minimum_kw) and self.min_charge_kw <= minimum_kw <= amount_kw
        ):
            raise ValidationError(
                "minimum_kw",
                f"minimum_kw must be a number of kW from this substation's MIN_CHARGE_KW ({self.min_charge_kw:g}) "
                f"to the session's amount ({amount_kw:g}), got {minimum_kw:g}.",
            )

    def _minimum_of(self, amount_mw: int, minimum_kw: float | None, policy: AllocationPolicy | None = None) -> int:
        """The least a session gets under ``policy`` (the ledger's): its whole amount under strict, else its
        own minimum or MIN_CHARGE_KW, capped by its amount."""
        floor = self._min_charge_mw if minimum_kw is None else amount_to_mw(minimum_kw)
        return minimum_mw(policy or self.policy, amount_mw, floor)

    def _push_end(self, entry: _Entry) -> None:
        heapq.heappush(self._ends, (entry.end_at, entry.session.session_id))
        if len(self._ends) > 2 * len(self._sessions) + 64:
            # Renewals leave their old ends behind: keep the heap to one entry per session.
            self._ends = [(other.end_at, key) for key, other in self._sessions.items()]
            heapq.heapify(self._ends)

    def release(self, session_id: str) -> Release:
        """Stop an active session early; raises ``UnknownSession`` if there is none with this id.

        Either way the id is retired: a request with it that arrives later is refused.
        """
        with self._current() as now:
            entry = self._sessions.get(session_id)
            if entry is None:
                self._retire(session_id, now)
                raise UnknownSession(session_id)
            report = self._finish(entry, now, reason="stopped")
            return Release(report, now, self._snapshot(now))

    def session(self, session_id: str, history: bool = True) -> SessionReport:
        """An active session, or the record of a finished one (kept on disk with a state file);
        raises ``UnknownSession``."""
        with self._current() as now:
            entry = self._sessions.get(session_id)
            if entry is not None:
                return self._report(entry, now, with_history=history)
            if session_id in self._ended:
                return self._ended_report(session_id)
        packed = self._store.ended_report(session_id) if self._store is not None else None
        if packed is None:
            raise UnknownSession(session_id)
        return _unpacked(packed)

    def records(self, since: float | None = None, after: tuple[float, str] | None = None,
                limit: int = 100) -> list[SessionReport]:
        """Finished sessions' records, by end time (then id), ended at or after ``since`` and past the
        cursor ``after`` (the ``(ended_at, session_id)`` of the last one read): a page of at most ``limit``.

        From the state file when there is one (every record kept), else from memory (the newest).
        """
        if self._store is not None:
            return [_unpacked(packed) for packed in self._store.records(since, after, limit)]
        with self._current():
            reports = [_unpacked(packed) for packed in self._ended.values() if packed is not None]
        reports.sort(key=lambda report: (report.ended_at, report.session.session_id))
        return [report for report in reports
                if (since is None or report.ended_at >= since)
                and (after is None or (report.ended_at, report.session.session_id) > after)][:limit]

    def now(self) -> float:
        """The ledger's time now: what it judges deadlines and departures by."""
        return max(self._clock(), self._time)

    def snapshot(self, needs: bool = False) -> Snapshot:
        """The state now; ``needs`` adds the energy needs' figures (a forecast of every need: O(n log n))."""
        with self._current() as now:
            snapshot = self._snapshot(now)
            if needs:
                shortfall = math.fsum(report.expected_shortfall_kwh or 0.0 for report in (
                    self._report(entry, now) for entry in self._sessions.values() if entry.need_kwh is not None))
                snapshot = dataclasses.replace(snapshot, needs=NeedFigures(
                    self._needs["requested_kwh"], self._needs["delivered_kwh"], self._needs["met"],
                    self._needs["missed"], shortfall))
            return snapshot

    def sessions(self) -> list[Session]:
        """Active sessions, the one that started first first."""
        with self._current():
            return [entry.session for entry in self._sessions.values()]

    def reports(self, history: bool = False, include_ended: bool = False) -> tuple[Snapshot, list[SessionReport]]:
        """The state and every active session (oldest first), read at one instant.

        ``include_ended`` adds the sessions that ended and are still kept, before the active ones.
        """
        with self._current() as now:
            reports = [self._report(entry, now, with_history=history) for entry in self._sessions.values()]
            if include_ended:
                stored = (self._store.ended_reports(list(self._ended)) if self._store is not None
                          and None in self._ended.values() else {})
                reports = [*(_unpacked(packed or stored[key]) for key, packed in self._ended.items()
                             if packed or key in stored), *reports]
            return self._snapshot(now), reports

    # ----- the limit -------------------------------------------------------------------------

    def set_operator_limit(self, limit_kw: float | None) -> Snapshot:
        """An operator's limit on this substation (OCPP's external constraint); None lifts it."""
        if limit_kw is not None and (not math.isfinite(limit_kw) or limit_kw < 0):
            raise ValueError(f"limit_kw must be a finite number of at least 0, got {limit_kw}")
        with self._current() as now:
            self._operator_limit_kw = limit_kw
            self._apply_limit(now)
            return self._snapshot(now)

    def set_peer_kw(self, peer_kw: float) -> None:
        """Power received from peers (+) or committed to them (-), as peer balancing now counts it."""
        if not math.isfinite(peer_kw):
            raise ValueError(f"peer_kw must be a finite number, got {peer_kw}")
        with self._current() as now:
            if peer_kw != self._peer_kw:
                self._peer_kw = peer_kw
                self._apply_limit(now)

    def set_policy(self, policy: AllocationPolicy) -> Snapshot:
        """Switch how the limit is shared; every session's minimum follows, and the set is fitted again.

        Switching to strict may suspend sessions whose whole amounts no longer fit together.
        """
        with self._current() as now:
            previous, self.policy = self.policy, policy
            for entry in self._sessions.values():
                entry.member.minimum_mw = self._minimum_of(entry.member.amount_mw, entry.minimum_kw)
            if AllocationPolicy.DEADLINE in (previous, policy):
                self._rebuild_set(now)
            else:
                self._set.rebuild_minimums()
            self._apply_limit(now)
            if not isinstance(self._set, DeadlineSet):
                self._follow_needs(now, list(self._with_need))  # every floor moved with the policy
            self._state_version += 1
            return self._snapshot(now)

    def wait_for_change(self, after_version: int, timeout_seconds: float) -> bool:
        """Block until ``state_version`` passes ``after_version`` or ``timeout_seconds`` pass; True if it did.

        Every change is signalled under the lock, so a waiter hears of it as soon as the change is
        made. Events that fall due meanwhile (a session's end, a lapsed lease, a profile step) are
        played by the waiter itself at their time: nothing else in the ledger runs in the background.
        """
        give_up_at = time.monotonic() + timeout_seconds
        while True:
            with self._current() as now:
                if self._state_version > after_version:
                    return True
                left = give_up_at - time.monotonic()
                if left <= 0:
                    return False
                next_event = self._next_event_at()
                if next_event is not None:
                    left = min(left, max(0.0, next_event - now) + EVENT_WAKE_MARGIN_SECONDS)
                seen = self._state_version
            with self._lock:
                if self._state_version == seen:
                    self._changed.wait(left)

    def limit_history(self) -> list[tuple[float, float, str]]:
        """(time, limit kW, source) at every change of the limit, oldest first (the last ones kept)."""
        with self._current():
            return list(self._limit_history)

    # ----- time ------------------------------------------------------------------------------

    @contextmanager
    def _current(self) -> Iterator[float]:
        """Hold the lock over a state with every event up to now played; yields now.

        What changed is committed once the lock is released (group commit: one transaction for
        the changes of every thread waiting then) and before the caller goes on, whether the
        change succeeded or was refused.
        """
        sealed = None
        try:
            with self._lock:
                version = self._state_version
                now = max(self._clock(), self._time)
                self._play_events_until(now)
                self._advance_energy(now)
                try:
                    yield now
                finally:
                    sealed = self._flush(now)
                    if self._state_version != version:
                        self._changed.notify_all()
        finally:
            try:
                if sealed is not None:
                    self._store.commit_through(sealed)
            finally:
                self._report_finished()

    def _play_events_until(self, now: float) -> None:
        """Sessions ending, profile steps and planning events up to ``now``, each at its own time, in time order."""
        while True:
            next_end = self._next_end_at()
            next_step = self._next_step_at
            next_mark = self._next_mark_at()
            if next_mark is not None and next_mark <= now and all(
                    at is None or next_mark < at for at in (next_end, next_step)):
                _, session_id = heapq.heappop(self._marks)
                self._advance_energy(next_mark)
                self._play_mark(self._sessions[session_id], next_mark)
            elif next_end is not None and next_end <= now and (next_step is None or next_end <= next_step):
                _, session_id = heapq.heappop(self._ends)
                entry = self._sessions[session_id]
                self._advance_energy(next_end)
                if entry.lease_seconds is None:
                    departed = entry.departure is not None and next_end == entry.departure
                    self._finish(entry, next_end, reason="departed" if departed else "completed")
                else:
                    self._leases_expired += 1
                    self._finish(entry, next_end, reason="lease_expired")
            elif next_step is not None and next_step <= now:
                self._advance_energy(next_step)
                self._generation_kw = self._power.generation_at(next_step + PROFILE_STEP_EPSILON_SECONDS)
                self._next_step_at = self._power.next_change_after(next_step + PROFILE_STEP_EPSILON_SECONDS)
                self._apply_limit(next_step)
            else:
                return

    def _advance_energy(self, until: float) -> None:
        if until > self._time:
            self._energy_mws += self._set.allocated_mw * (until - self._time)
            self._time = until

    def _parts(self) -> LimitParts:
        return LimitParts(
            capacity_kw=self.capacity_kw,
            generation_kw=self._generation_kw,
            storage_kw=self._power.storage_kw,
            peer_kw=self._peer_kw,
            operator_limit_kw=self._operator_limit_kw,
        )

    def _apply_limit(self, at: float) -> None:
        """Re-allocate for the limit now in force; suspend or resume sessions as it needs."""
        parts = self._parts()
        previous_level, previous_limit = self._set.level_mw, self._set.limit_mw
        suspended, resumed = self._set.fit(to_mw(parts.limit_kw))
        replanned = self._record_state_changes(at, suspended, resumed)
        if not self._limit_history or self._limit_history[-1][1:] != (parts.limit_kw, parts.source.value):
            self._limit_history.append((at, parts.limit_kw, parts.source.value))
            if self._store is not None:
                self._store.limit(at, parts.limit_kw, parts.source.value)
        if (suspended or resumed or replanned
                or (previous_level, previous_limit) != (self._set.level_mw, self._set.limit_mw)):
            self._state_version += 1

    def _finish(self, entry: _Entry, now: float, reason: str) -> SessionReport:
        session = entry.session
        del self._sessions[session.session_id]
        self._with_need.pop(session.session_id, None)
        if entry.followed_terms is not None:
            self._unsort_terms(entry)
        self._requested_mw -= entry.member.amount_mw
        self._leased -= entry.lease_seconds is not None
        ended = self._report(entry, now, with_history=True, ended_at=now, end_reason=reason)
        if ended.need_kwh is not None:
            self._needs["requested_kwh"] += ended.need_kwh
            self._needs["delivered_kwh"] += ended.energy_kwh
            self._needs["met" if ended.need_met else "missed"] += 1
        suspended, resumed = self._set.remove(session.session_id)
        self._record_state_changes(now, suspended, resumed)
        packed = _packed(report_to_json(ended))
        self._keep_ended(session.session_id, packed)
        until = None if entry.copies_until is None else entry.copies_until + RETIRE_MARGIN_SECONDS
        self._retire(session.session_id, now, until)
        if self._store is not None:
            self._store.ended(session.session_id, now, packed.decode())
            self._finished_since_trim += 1
        self._state_version += 1
        self._unreported.append((session, now - session.started_at))
        self._prune_levels()
        return ended

    def _record_state_changes(self, at: float, suspended: list[str], resumed: list[str],
                              changed: str | None = None) -> bool:
        """Record suspensions, resumptions and the powers they leave (``changed``: the session whose amount or
        minimum changed); True when a tracked power changed."""
        for key, charging in [*((key, False) for key in suspended), *((key, True) for key in resumed)]:
            entry = self._sessions[key]
            entry.state_changes.append((at, charging))
            if self._store is not None:
                self._store.state_changed(key, entry.state_changes)
        replanned = self._track_powers(at, [*suspended, *resumed, *([changed] if changed else [])])
        self._levels.record(at, self._set.level_mw)
        return replanned

    # ----- the deadline policy ---------------------------------------------------------------

    def _new_set(self, policy: AllocationPolicy) -> ChargingSet | DeadlineSet:
        return DeadlineSet() if policy is AllocationPolicy.DEADLINE else ChargingSet()

    def _tracks(self, entry: _Entry) -> bool:
        """Whether the session's power is its own (deadline policy, with a need) rather than a level's."""
        return self.policy is AllocationPolicy.DEADLINE and entry.need_kwh is not None

    def _delivered_mws(self, entry: _Entry, at: float) -> float:
        """A tracked session's energy up to ``at`` (not before its last change of power)."""
        return entry.delivered_mws + entry.power_mw * max(0.0, at - entry.power_since)

    def _track_powers(self, at: float, touched: Iterable[str] = ()) -> bool:
        """Follow the deadline plan's changes: each tracked session's power, energy, history and next
        planning event. O(sessions whose power changed). True when any power changed.

        Under fair_share and strict, follow the sessions with a need instead (``touched``: the sessions
        suspended, resumed, admitted or changed by the event); their powers are the level's, already
        counted in the level's history, so this returns False.
        """
        if not isinstance(self._set, DeadlineSet):
            self._follow_needs(at, touched)
            return False
        moved = False
        while changed := self._set.take_changed():
            for key in changed:
                entry = self._sessions.get(key)
                if entry is None or not entry.tracked:
                    continue
                power = self._set.allocation_of(key)
                if power != entry.power_mw:
                    moved = True
                    entry.delivered_mws = self._delivered_mws(entry, at)
                    entry.power_mw, entry.power_since = power, at
                    if entry.points and entry.points[-1][0] == at:
                        entry.points.pop()  # several changes at one instant: the last one holds
                    entry.points.append((at, to_kw(power)))
                    if self._store is not None:
                        self._store.need_changed(key, _need_json(entry))
                self._plan_mark(entry, at)  # may turn it urgent at once: then it is in the next round
        return moved

    def _plan_mark(self, entry: _Entry, at: float) -> None:
        """When the session's plan next needs looking at, from its power now, and what happens then.

        Laxity (time to spare at full power) shrinks at ``1 - power/maximum``: it reaches
        ``URGENT_WITHIN_SECONDS`` (the session must charge at full power), then 0 (it can no longer
        be met: it keeps its place, without the urgency). Or its need is delivered first.
        """
        key = entry.session.session_id
        assert isinstance(self._set, DeadlineSet)
        remaining = entry.need_kwh * MWS_PER_KWH - self._delivered_mws(entry, at)
        maximum, power = entry.member.amount_mw, entry.power_mw
        candidates: list[tuple[float, str]] = []
        if entry.met:
            pass  # nothing more to plan: it takes what is left after every need
        elif remaining <= 0:
            candidates.append((at, "done" if entry.lease_seconds is None else "met"))
        else:
            if power > 0:
                candidates.append((at + remaining / power, "done" if entry.lease_seconds is None else "met"))
            if entry.due is not None and not entry.hopeless:
                laxity = (entry.due - at) - remaining / maximum
                shrinking = 1.0 - power / maximum
                if self._set.is_urgent(key):
                    if laxity <= 0:
                        candidates.append((at, "hopeless"))
                    elif shrinking > 0:
                        candidates.append((at + laxity / shrinking, "hopeless"))
                elif laxity < 0:
                    entry.hopeless = True
                elif laxity < URGENT_WITHIN_SECONDS:
                    candidates.append((at, "urgent"))
                elif shrinking > 0:
                    candidates.append((at + (laxity - URGENT_WITHIN_SECONDS) / shrinking, "urgent"))
        mark = min(candidates, default=None)
        if mark is not None and mark[0] <= at and mark[1] in ("urgent", "hopeless"):
            self._apply_mark(entry, mark[1])  # due now: its power changes, and it is planned again
            return
        self._set_mark(entry, mark)

    def _set_mark(self, entry: _Entry, mark: tuple[float, str] | None) -> None:
        """Make ``mark`` (time, kind) the session's next planning event; None: it has none."""
        entry.mark_at, entry.mark_kind = (None, "") if mark is None else mark
        if mark is not None:
            heapq.heappush(self._marks, (mark[0], entry.session.session_id))
            if len(self._marks) > 2 * len(self._sessions) + 64:
                self._marks = [(other.mark_at, k) for k, other in self._sessions.items() if other.mark_at is not None]
                heapq.heapify(self._marks)

    def _next_mark_at(self) -> float | None:
        while self._marks:
            at, key = self._marks[0]
            entry = self._sessions.get(key)
            if entry is not None and entry.mark_at == at:
                return at
            heapq.heappop(self._marks)
        return None

    def _play_mark(self, entry: _Entry, at: float) -> None:
        entry.mark_at = None
        if entry.mark_kind == "done":
            self._finish(entry, at, reason="energy_delivered")
            return
        self._apply_mark(entry, entry.mark_kind)
        if isinstance(self._set, DeadlineSet):
            self._record_state_changes(at, [], [])
            self._state_version += 1
        else:
            # A leased session's need met under fair_share or strict: nobody's power changes, only its record;
            # if it was held at the level, the next one there whose need is delivered first gets the mark.
            self._advance_water(at)
            self._mark_the_first_at_level(at)
            if self._store is not None:
                self._store.need_changed(entry.session.session_id, _need_json(entry))

    def _apply_mark(self, entry: _Entry, kind: str) -> None:
        key = entry.session.session_id
        entry.mark_at = None
        if kind == "met":
            # A leased session's need is delivered but its holder keeps it: under deadline it comes after
            # every need now; under fair_share and strict it charges on as the policy shares the limit.
            entry.met = True
            if isinstance(self._set, DeadlineSet):
                self._set.set_urgent(key, False)
                self._set.set_need(key, None, 0.0)  # a need without a departure: after every departure
            return
        assert isinstance(self._set, DeadlineSet)
        if kind == "urgent":
            self._set.set_urgent(key, True)
        elif kind == "hopeless":
            entry.hopeless = True
            self._set.set_urgent(key, False)

    # ----- needs under fair_share and strict -------------------------------------------------

    def _follow_needs(self, at: float, touched: Iterable[str]) -> None:
        """Each session with a need whose power changed: its energy so far, and when its need is delivered.

        A charging session's power is ``min(amount, max(floor, level))``. Held at the level, it gains
        what every session held there gains: the ledger integrates the level once (``_water_mws``) and
        orders those sessions by the level's integral at which each need is delivered, so only the first
        of them has a mark. A session's power changes otherwise only when it is suspended, resumed,
        admitted or changes its amount (``touched``), or when the level crosses its amount or floor: those
        are found by bisection. O(log n + sessions whose power changed in another way than the level's).
        Its report counts its energy from the level's history; the same powers are integrated here.
        """
        self._advance_water(at)
        level, previous = self._set.level_mw, self._followed_level
        self._followed_level = level
        keys = list(touched)
        if level != previous:
            low, high = sorted(math.inf if value is None else value for value in (level, previous))
            for terms in (self._need_amounts, self._need_floors):
                first = bisect.bisect_right(terms, low, key=_FIRST)
                keys += (key for _, key in terms[first:bisect.bisect_right(terms, high, key=_FIRST)])
        for key in keys:
            entry = self._with_need.get(key)
            if entry is not None:
                self._refollow(entry, at)
        self._mark_the_first_at_level(at)

    def _advance_water(self, at: float) -> None:
        self._water_mws, self._water_at = self._water_until(at), at

    def _water_until(self, at: float) -> float:
        """The integral of the fair-share level up to ``at`` (mW·s): what a session held at it gains."""
        level = self._followed_level
        return self._water_mws + (0.0 if level is None else level * max(0.0, at - self._water_at))

    def _followed_mws(self, entry: _Entry, at: float) -> float:
        if entry.water_since is not None:
            return entry.delivered_mws + self._water_until(at) - entry.water_since
        return self._delivered_mws(entry, at)

    def _refollow(self, entry: _Entry, at: float) -> None:
        """The session's power now: held at the level, or a power of its own (whole amount, floor, nothing)."""
        self._sort_terms(entry)
        if entry.met:
            return  # a leased session's need delivered: nothing more to plan
        key, member, level = entry.session.session_id, entry.member, self._set.level_mw
        at_level = (self._set.is_charging(key) and level is not None
                    and member.minimum_mw <= level < member.amount_mw)
        power = self._set.allocation_of(key)
        if at_level:
            if entry.water_since is not None:
                return  # held there already: the level's integral counts for it
        elif entry.water_since is None and power == entry.power_mw:
            return
        energy = self._followed_mws(entry, at)
        entry.delivered_mws = energy
        if at_level:
            entry.water_since = self._water_mws
            entry.water_due = self._water_mws + entry.need_kwh * MWS_PER_KWH - energy
            heapq.heappush(self._level_dues, (entry.water_due, key))
            if len(self._level_dues) > 2 * len(self._with_need) + 64:
                self._level_dues = [(other.water_due, k) for k, other in self._with_need.items()
                                    if other.water_due is not None]
                heapq.heapify(self._level_dues)
            self._set_mark(entry, None)  # the first of those at the level has the mark
        else:
            entry.water_since = entry.water_due = None
            entry.power_mw, entry.power_since = power, at
            self._plan_delivery(entry, at)

    def _mark_the_first_at_level(self, at: float) -> None:
        """The session held at the level whose need is delivered first gets the mark: at the level now, when."""
        dues = self._level_dues
        while dues:
            due, key = dues[0]
            entry = self._with_need.get(key)
            if entry is not None and not entry.met and entry.water_due == due:
                break
            heapq.heappop(dues)
        first = self._with_need[dues[0][1]] if dues else None
        marked = self._with_need.get(self._level_marked) if self._level_marked is not None else None
        if marked is not None and marked is not first and marked.water_since is not None:
            self._set_mark(marked, None)
        self._level_marked = None
        level = self._set.level_mw
        if first is None or not level:  # held at the level means a level of at least its floor: never 0
            return
        mark_at = at + max(0.0, first.water_due - self._water_mws) / level
        if first.mark_at != mark_at:
            self._set_mark(first, (mark_at, "done" if first.lease_seconds is None else "met"))
        self._level_marked = first.session.session_id

    def _sort_terms(self, entry: _Entry) -> None:
        """Keep the session's amount and floor in the sorted lists the level's crossings are found in."""
        terms = (entry.member.amount_mw, entry.member.minimum_mw)
        if entry.followed_terms == terms:
            return
        key = entry.session.session_id
        if entry.followed_terms is not None:
            self._unsort_terms(entry)
        bisect.insort(self._need_amounts, (terms[0], key))
        bisect.insort(self._need_floors, (terms[1], key))
        entry.followed_terms = terms

    def _unsort_terms(self, entry: _Entry) -> None:
        key = entry.session.session_id
        for terms, value in zip((self._need_amounts, self._need_floors), entry.followed_terms):
            del terms[bisect.bisect_left(terms, (value, key))]
        entry.followed_terms = None

    def _start_following(self, entry: _Entry, at: float, energy_mws: float | None = None) -> None:
        """Under fair_share and strict, from ``at`` on: the session's energy (``energy_mws``, else counted
        from its records) and power now, and when its need is delivered."""
        if energy_mws is None:
            energy_mws = self._integrate(entry, at)[1]
        self._advance_water(at)
        entry.delivered_mws, entry.power_since = energy_mws, at
        entry.power_mw = -1  # no power yet: it is planned from whatever it gets now
        entry.water_since = entry.water_due = None
        self._refollow(entry, at)
        self._mark_the_first_at_level(at)

    def _stop_following(self) -> None:
        """A switch of policy: every session is counted afresh under the new one."""
        for entry in self._with_need.values():
            entry.water_since = entry.water_due = entry.followed_terms = None
        self._need_amounts, self._need_floors, self._level_dues = [], [], []
        self._level_marked = self._followed_level = None

    def _plan_delivery(self, entry: _Entry, at: float) -> None:
        """The moment the session's need is delivered at the power of its own it gets now: it ends then
        ("done"), or for a leased one it is "met" and charges on. None while it gets nothing."""
        mark = None
        if not entry.met:
            remaining = entry.need_kwh * MWS_PER_KWH - self._delivered_mws(entry, at)
            kind = "done" if entry.lease_seconds is None else "met"
            if remaining <= 0:
                mark = (at, kind)
            elif entry.power_mw > 0:
                mark = (at + remaining / entry.power_mw, kind)
        self._set_mark(entry, mark)

    def _checkpoint(self, entry: _Entry, at: float) -> None:
        """Count what the session got up to ``at`` as it is counted now, then count on from there."""
        if entry.tracked:
            energy, points = self._delivered_mws(entry, at), list(entry.points)
            suspended = _suspended_between(entry.state_changes, entry.session.started_at, at)
        else:
            points, energy, suspended = self._integrate(entry, at)
            points = _merge_points(points)
        entry.base_at, entry.base_mws, entry.base_suspended = at, energy, suspended
        entry.base_points = points[-HISTORY_POINTS_KEPT:]
        entry.tracked = False
        entry.mark_at, entry.mark_kind = None, ""

    def _start_tracking(self, entry: _Entry, at: float) -> None:
        """From ``at`` on, the session's power is its own (the deadline plan's): checkpoint, then follow it."""
        self._checkpoint(entry, at)
        entry.tracked = True
        entry.delivered_mws, entry.power_mw, entry.power_since = entry.base_mws, 0, at
        entry.points = deque(entry.base_points, maxlen=HISTORY_POINTS_KEPT)
        if entry.points and entry.points[-1][0] < at:
            entry.points.append((at, 0.0))  # replaced by its power at ``at`` when tracking records it

    def _change_need(self, entry: _Entry, at: float, energy_kwh: float | None, departure: float | None) -> None:
        if entry.need_kwh is None and (energy_kwh is None or departure is None):
            raise ValidationError("energy_kwh" if energy_kwh is None else "departure",
                                  "a session without a need must be given both energy_kwh and departure")
        if departure is not None and not departure > at:
            raise ValidationError("departure", "departure must be after now (by this substation's clock).")
        entry.need_kwh = entry.need_kwh if energy_kwh is None else energy_kwh
        entry.departure = entry.departure if departure is None else departure
        ends_at = entry.session.ends_at
        entry.due = entry.departure if ends_at is None else min(ends_at, entry.departure)
        entry.hopeless = entry.met = False
        self._with_need[entry.session.session_id] = entry
        if self.policy is AllocationPolicy.DEADLINE:
            assert isinstance(self._set, DeadlineSet)
            key = entry.session.session_id
            if entry.tracked:
                entry.delivered_mws = self._delivered_mws(entry, at)
                entry.power_since = at
            else:
                self._start_tracking(entry, at)
            entry.mark_at, entry.mark_kind = None, ""
            self._set.set_urgent(key, False)
            remaining = max(0.0, entry.need_kwh - entry.delivered_mws / MWS_PER_KWH)
            self._set.set_need(key, entry.due, remaining)
            self._record_state_changes(at, [], [])
        else:
            self._start_following(entry, at)
        if self._store is not None:
            self._store.need_changed(entry.session.session_id, _need_json(entry))
        self._state_version += 1

    def _rebuild_set(self, at: float) -> None:
        """A switch to or from the deadline policy: the sessions go into a new set as they are."""
        suspended = self._set.suspended_in_order
        self._stop_following()
        for entry in self._sessions.values():
            self._checkpoint(entry, at)
        self._set = self._new_set(self.policy)
        members = [entry.member for entry in self._sessions.values()]
        limit = to_mw(self._parts().limit_kw)
        if isinstance(self._set, DeadlineSet):
            needs = []
            for entry in self._sessions.values():
                remaining = None
                if entry.need_kwh is not None:
                    self._start_tracking(entry, at)
                    remaining = max(0.0, entry.need_kwh - entry.delivered_mws / MWS_PER_KWH)
                needs.append((entry.member, None if entry.met else entry.due, remaining))
            self._set.restore(needs, suspended, limit)
        else:
            self._set.restore(members, suspended, limit)
            for entry in self._with_need.values():
                self._start_following(entry, at, entry.base_mws)
        self._record_state_changes(at, [], [])

    def _expected_mws(self, entry: _Entry, now: float, energy_mws: float) -> float:
        """What the session is expected to have by its need's due time under the current plan."""
        key = entry.session.session_id
        remaining = entry.need_kwh * MWS_PER_KWH - energy_mws
        if remaining <= 0 or entry.due is None or not self._set.is_charging(key):
            return energy_mws  # a suspended one is counted at nothing more: when it resumes is not foreseen
        if not entry.tracked:
            return energy_mws + min(remaining, self._set.allocation_of(key) * max(0.0, entry.due - now))
        assert isinstance(self._set, DeadlineSet)
        position = self._set.position(key)
        if position is None:
            return energy_mws
        # Each plan is forecast once, and only as far along its queue as asked: between two changes
        # every session charges as it planned, so the energy it will have by its due time stays what
        # the forecast said.
        version, projection = self._projection
        if projection is None or version != self._state_version:
            projection = self._new_projection(now)
            self._projection = (self._state_version, projection)
        more = projection.expected(key, position)
        if more is None:
            return energy_mws
        return self._delivered_mws(entry, projection.now) + more

    def _new_projection(self, now: float) -> Projection:
        """The forecast of the current plan from ``now``, each session described when the fold reaches it."""
        assert isinstance(self._set, DeadlineSet)
        plan = self._set

        def describe(key: str) -> Projected | None:
            entry = self._sessions.get(key)
            if entry is None or entry.due is None or entry.met or not entry.tracked:
                return None
            member = plan.member(key)
            left = entry.need_kwh * MWS_PER_KWH - self._delivered_mws(entry, now)
            return Projected(key, member.minimum_mw, member.amount_mw, max(0.0, left), max(now, entry.due))

        budget = plan.limit_mw - plan.charging_minimum_total_mw
        return Projection(plan.queue_keys(), plan.served_in_full, budget, now, describe)

    def _retire(self, session_id: str, now: float, until: float | None = None) -> None:
        forget_at = self._retired.add(session_id, now, until)
        if forget_at is not None and self._store is not None:
            self._store.retire(session_id, forget_at)

    def _keep_ended(self, session_id: str, packed: bytes) -> None:
        self._ended[session_id] = packed
        while len(self._ended) > ENDED_SESSIONS_KEPT:
            self._ended.popitem(last=False)
        if self._store is not None:
            self._reports_in_memory.append(session_id)
            while len(self._reports_in_memory) > ENDED_REPORTS_IN_MEMORY:
                older = self._reports_in_memory.popleft()
                if self._ended.get(older) is not None:
                    self._ended[older] = None  # the state file has it

    def _ended_report(self, session_id: str) -> SessionReport:
        packed = self._ended[session_id]
        if packed is None:
            assert self._store is not None
            packed = self._store.ended_report(session_id)
            if packed is None:  # its write failed: nothing to show
                raise UnknownSession(session_id)
        return _unpacked(packed)

    def _prune_levels(self) -> None:
        oldest = next(iter(self._sessions.values()), None)
        # The point before the oldest session's own is kept too: it may be the level in effect when it
        # started (see _integrate).
        position = oldest.start_position - 1 if oldest else self._levels.last_position
        self._levels.prune_before(position)
        if self._store is not None:
            self._store.prune_levels_before(position)

    # ----- the store ----------------------------------------------------------------------------

    def _flush(self, now: float) -> int | None:
        """Seal what changed for the store's next commit (under the lock); the number to wait for.

        A read that changed nothing still waits for the changes sealed before it: it may
        report them, and nobody is told of a change before it is committed.
        """
        if self._store is None:
            return None
        changed = self._levels.changed_points()
        if changed is None and not self._store.has_pending and self._state_version == self._flushed_version:
            # A read that changed nothing (a scrape, a status): no write. The time and energy since the
            # last change are replayed from it at a restart.
            return self._store.seal()
        if changed is not None:
            self._store.levels_from(*changed, dropped_past=self._levels.take_dropped_past())
        if self._finished_since_trim >= TRIM_EVERY_FINISHES:
            self._store.trim(now, self._records_retention_seconds, self._records_max_rows, LIMIT_HISTORY_KEPT)
            self._finished_since_trim = 0
        self._store.meta({
            "schema_version": SCHEMA_VERSION,
            "substation_id": self._substation_id,
            "state_version": self._state_version,
            "time": self._time,
            "energy_mws": self._energy_mws,
            "admitted": self._admitted,
            "operator_limit_kw": self._operator_limit_kw,
            "peer_kw": self._peer_kw,
            "needs": self._needs,
        })
        self._flushed_version = self._state_version
        return self._store.seal()

    def _restore(self, state: StoredState, now: float) -> None:
        """Carry on from what the store holds: its sessions, histories and counters.

        The ledger resumes at the moment of its last change and plays what happened
        since (sessions that ended while it was down end at their ``ends_at``, profile
        steps at their time), so the first answer after a restart carries the true
        load. Power from peers is not counted any more: the links start over.
        """
        meta = state.meta
        self._state_version = meta["state_version"]
        self._time = meta["time"]
        self._energy_mws = meta["energy_mws"]
        self._admitted = meta["admitted"]
        self._operator_limit_kw = meta["operator_limit_kw"]
        self._peer_kw = meta["peer_kw"]
        self._needs.update(meta.get("needs", {}))  # absent before schema 3
        self._generation_kw = self._power.generation_at(self._time + PROFILE_STEP_EPSILON_SECONDS)
        self._next_step_at = self._power.next_change_after(self._time + PROFILE_STEP_EPSILON_SECONDS)
        if state.levels:
            self._levels.restore(state.levels)
        members = []
        suspended: list[tuple[float, str]] = []
        for stored in state.active:
            session = Session(stored.session_id, stored.vehicle_id, stored.amount_kw, stored.started_at,
                              stored.ends_at)
            amount = amount_to_mw(stored.amount_kw)
            member = Member(stored.session_id, amount, self._minimum_of(amount, stored.minimum_kw), stored.admitted)
            # A lease runs again from the restart: its holder renews well within a lease, and could not
            # reach this substation while it was down.
            end_at = now + stored.lease_seconds if stored.lease_seconds is not None else stored.ends_at
            entry = _Entry(session, member, stored.start_position, list(stored.state_changes),
                           amounts=list(stored.amounts), minimum_kw=stored.minimum_kw,
                           lease_seconds=stored.lease_seconds, end_at=end_at)
            if stored.need is not None:
                _restore_need(entry, jsonfast.loads(stored.need))
            self._sessions[session.session_id] = entry
            if entry.need_kwh is not None:
                self._with_need[session.session_id] = entry
            self._requested_mw += amount
            self._leased += stored.lease_seconds is not None
            heapq.heappush(self._ends, (end_at, session.session_id))
            members.append(member)
            last_at, charging = stored.state_changes[-1]
            if not charging:
                # Suspended at one instant means newest first: the order they were suspended in.
                suspended.append((last_at, -stored.admitted, stored.session_id))
        suspended_in_order = [key for *_, key in sorted(suspended)]
        if isinstance(self._set, DeadlineSet):
            for entry in self._sessions.values():
                if entry.need_kwh is not None and not entry.tracked:
                    self._start_tracking(entry, self._time)  # kept under another policy before the restart
            self._set.restore([(entry.member, None if entry.met else entry.due,
                                None if entry.need_kwh is None else max(
                                    0.0, entry.need_kwh - self._delivered_mws(entry, self._time) / MWS_PER_KWH))
                               for entry in self._sessions.values()], suspended_in_order,
                              to_mw(self._parts().limit_kw))
        else:
            for entry in self._sessions.values():
                if entry.tracked:
                    self._checkpoint(entry, self._time)  # kept under the deadline policy before the restart
            self._set.restore(members, suspended_in_order, to_mw(self._parts().limit_kw))
            for entry in self._with_need.values():
                self._start_following(entry, self._time)
        for record in state.ended[-ENDED_SESSIONS_KEPT:]:
            self._keep_ended(record["session_id"], _packed(record))
        self._retired.restore(state.retired)
        self._limit_history.extend(state.limits)
        self._apply_limit(self._time)
        self._play_events_until(now)
        self._advance_energy(now)
        if self._peer_kw:
            self._peer_kw = 0.0
            self._apply_limit(now)
        self._state_version += 1  # a restart is a change: every view of the old process is older

    def _next_end_at(self) -> float | None:
        # Stopped sessions and renewed leases leave their entries in the heap; drop those that reached the top.
        while self._ends:
            end_at, key = self._ends[0]
            entry = self._sessions.get(key)
            if entry is not None and entry.end_at == end_at:
                return end_at
            heapq.heappop(self._ends)
        return None

    def _next_event_at(self) -> float | None:
        """When the next session ends, lease lapses, planning event or profile step comes; None when none is due."""
        times = [at for at in (self._next_end_at(), self._next_step_at, self._next_mark_at()) if at is not None]
        return min(times) if times else None

    # ----- reports ---------------------------------------------------------------------------

    def _snapshot(self, now: float) -> Snapshot:
        parts = self._parts()
        level = self._set.level_mw
        return Snapshot(
            taken_at=now,
            load_kw=to_kw(self._set.allocated_mw),
            requested_kw=to_kw(self._requested_mw),
            minimum_load_kw=to_kw(self._set.minimum_total_mw),
            limit_kw=to_kw(self._set.limit_mw),
            limit_source=parts.source,
            parts=parts,
            total_capacity_kw=self.capacity_kw,
            fair_share_kw=None if level is None else to_kw(level),
            charging=len(self._sessions) - self._set.suspended_count,
            suspended=self._set.suspended_count,
            curtailed=self._set.curtailed_count,
            min_charge_kw=None if self.policy is AllocationPolicy.STRICT else self.min_charge_kw,
            energy_kwh=self._energy_mws / 1000.0 / 1000.0 / SECONDS_PER_HOUR,
            state_version=self._state_version,
            next_end_at=self._next_end_at(),
            leased=self._leased,
            leases_expired=self._leases_expired,
        )

    def _report(
        self,
        entry: _Entry,
        now: float,
        with_history: bool = False,
        ended_at: float | None = None,
        end_reason: str | None = None,
    ) -> SessionReport:
        points, energy_mws, suspended_seconds = self._integrate(entry, now)
        charging = ended_at is None and self._set.is_charging(entry.session.session_id)
        allocated = to_kw(self._set.allocation_of(entry.session.session_id)) if ended_at is None else 0.0
        if ended_at is not None:
            state = SessionState.ENDED
        else:
            state = SessionState.CHARGING if charging else SessionState.SUSPENDED
        history = None
        if with_history:
            if ended_at is not None:
                points.append((ended_at, 0.0))
            history = tuple(_merge_points(points)[-HISTORY_POINTS_KEPT:])
        ends_at = entry.session.ends_at
        energy_kwh = energy_mws / MWS_PER_KWH
        expected = None
        if entry.need_kwh is not None:
            expected = energy_kwh if ended_at is not None else self._expected_mws(entry, now, energy_mws) / MWS_PER_KWH
        return SessionReport(
            session=entry.session,
            state=state,
            allocated_kw=allocated,
            minimum_kw=to_kw(entry.member.minimum_mw),
            energy_kwh=energy_kwh,
            suspended_seconds=suspended_seconds,
            history=history,
            ended_at=ended_at,
            end_reason=end_reason,
            lease_seconds=entry.lease_seconds,
            lease_expires_at=entry.end_at if entry.lease_seconds is not None and ended_at is None else None,
            remaining_seconds=None if ends_at is None else max(0.0, ends_at - (now if ended_at is None else ended_at)),
            need_kwh=entry.need_kwh,
            departure=entry.departure,
            expected_kwh=expected,
        )

    def _integrate(self, entry: _Entry, until: float) -> tuple[list[tuple[float, float]], float, float]:
        """The session's allocation points, energy (mW·s) and suspended seconds from its start to ``until``."""
        if entry.tracked:
            return (list(entry.points), self._delivered_mws(entry, until),
                    _suspended_between(entry.state_changes, entry.session.started_at, until))
        changes = entry.state_changes
        amount_times = [t for t, *_ in entry.amounts]
        # (amount, floor) in mW: the floor binds only above the level, and only a session's own minimum can
        # be above it (under strict the level is None: every charging session gets its whole amount).
        terms_mw = [(amount_to_mw(kw), self._minimum_of(amount_to_mw(kw), minimum, AllocationPolicy.FAIR_SHARE))
                    for _, kw, minimum in entry.amounts]
        points: list[tuple[float, float]] = list(entry.base_points)
        energy = entry.base_mws
        suspended = entry.base_suspended
        # From the point before the session's own: a change undone at the instant it started removes its
        # point, and the level in effect then is the one before (the time of each point picks the right one).
        level_points = list(self._levels.since(entry.start_position - 1))
        # Counted from its start, or from where what came before was counted (Entry.base_at).
        started = entry.session.started_at if entry.base_at is None else entry.base_at
        # Segment boundaries: every level change, suspension, resumption and change of amount, up to ``until``.
        times = sorted({started, *(t for t, _ in level_points), *(t for t, _ in changes), *amount_times})
        times = [t for t in times if started <= t <= until]
        level_times = [t for t, _ in level_points]
        change_times = [t for t, _ in changes]
        for index, start in enumerate(times):
            end = times[index + 1] if index + 1 < len(times) else until
            level_index = bisect.bisect_right(level_times, start) - 1
            level = level_points[level_index][1] if level_index >= 0 else None
            change_index = bisect.bisect_right(change_times, start) - 1
            charging = changes[change_index][1] if change_index >= 0 else True
            amount, floor = terms_mw[max(0, bisect.bisect_right(amount_times, start) - 1)]
            kw_mw = allocation_mw(amount, level, floor) if charging else 0
            points.append((start, to_kw(kw_mw)))
            span = max(0.0, end - start)
            energy += kw_mw * span
            if not charging:
                suspended += span
        return points, energy, suspended

    def _report_finished(self) -> None:
        with self._lock:
            finished, self._unreported = self._unreported, []
        if self._on_session_finished is None:
            return
        for session, charged_seconds in finished:
            self._on_session_finished(session, charged_seconds)


def _suspended_between(changes: list[tuple[float, bool]], start: float, until: float) -> float:
    """Seconds suspended between ``start`` and ``until``, from (time, charging?) at every change."""
    suspended = 0.0
    for index, (at, charging) in enumerate(changes):
        end = changes[index + 1][0] if index + 1 < len(changes) else until
        if not charging:
            suspended += max(0.0, min(end, until) - max(at, start))
    return suspended


def _need_json(entry: _Entry) -> str | None:
    """A session's need and, when tracked, its own power history, as the store keeps them."""
    if entry.need_kwh is None and entry.base_at is None:
        return None
    return jsonfast.dumps_text({
        "need_kwh": entry.need_kwh, "departure": entry.departure, "due": entry.due, "hopeless": entry.hopeless,
        "base_at": entry.base_at, "base_mws": entry.base_mws, "base_suspended": entry.base_suspended,
        "base_points": entry.base_points, "tracked": entry.tracked, "power_mw": entry.power_mw,
        "power_since": entry.power_since, "delivered_mws": entry.delivered_mws, "points": list(entry.points),
        "met": entry.met,
    })


def _restore_need(entry: _Entry, need: dict) -> None:
    """Take back what ``_need_json`` kept."""
    entry.need_kwh, entry.departure, entry.due = need["need_kwh"], need["departure"], need["due"]
    entry.hopeless = need["hopeless"]
    entry.base_at, entry.base_mws, entry.base_suspended = need["base_at"], need["base_mws"], need["base_suspended"]
    entry.base_points = [(at, kw) for at, kw in need["base_points"]]
    entry.tracked, entry.power_mw, entry.power_since = need["tracked"], need["power_mw"], need["power_since"]
    entry.delivered_mws = need["delivered_mws"]
    entry.points = deque(((at, kw) for at, kw in need["points"]), maxlen=HISTORY_POINTS_KEPT)
    entry.met = need["met"]


def _merge_points(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for at, kw in points:
        if merged and merged[-1][1] == kw:
            continue
        merged.append((at, kw))
    return merged


def report_to_json(report: SessionReport) -> dict:
    """A finished session's report as the store keeps it."""
    session = report.session
    return {
        "session_id": session.session_id,
        "vehicle_id": session.vehicle_id,
        "amount_kw": session.amount_kw,
        "started_at": session.started_at,
        "ends_at": session.ends_at,
        "lease_seconds": report.lease_seconds,
        "minimum_kw": report.minimum_kw,
        "energy_kwh": report.energy_kwh,
        "suspended_seconds": report.suspended_seconds,
        "history": [list(point) for point in report.history or ()],
        "ended_at": report.ended_at,
        "end_reason": report.end_reason,
        "delivered_kwh": report.energy_kwh,
        "need_kwh": report.need_kwh,
        "departure": report.departure,
        "need_met": report.need_met,
    }


def _packed(record: dict) -> bytes:
    """A finished session's record (``report_to_json``) as compact JSON: in memory, and in the state file."""
    return jsonfast.dumps_to_keep(record)


def _unpacked(packed: bytes) -> SessionReport:
    return report_from_json(jsonfast.loads(packed))


def report_from_json(record: dict) -> SessionReport:
    session = Session(record["session_id"], record["vehicle_id"], record["amount_kw"], record["started_at"],
                      record["ends_at"])
    return SessionReport(
        session=session,
        state=SessionState.ENDED,
        allocated_kw=0.0,
        minimum_kw=record["minimum_kw"],
        energy_kwh=record["energy_kwh"],
        suspended_seconds=record["suspended_seconds"],
        history=tuple((at, kw) for at, kw in record["history"]),
        ended_at=record["ended_at"],
        end_reason=record["end_reason"],
        # Absent from the records of schema 1, which had no leases.
        lease_seconds=record.get("lease_seconds"),
        remaining_seconds=None if record["ends_at"] is None else max(0.0, record["ends_at"] - record["ended_at"]),
        # Absent from the records of schema 2, which had no needs.
        need_kwh=record.get("need_kwh"),
        departure=record.get("departure"),
        expected_kwh=None if record.get("need_kwh") is None else record["energy_kwh"],
    )
