"""Charge requests waiting for power, first come first served across the grid. Plain Python, no Flask.

A request that asked to wait (``"wait": true``) and found no room anywhere
joins the queue; the dispatcher starts the one at the head as soon as any
substation has room for its minimum. The queue is bounded (``MAX_QUEUED``),
a request waits at most ``QUEUE_TIMEOUT_SECONDS`` and the client may cancel
it. Positions cost O(log n) to read, so clients polling their place in a
long queue cost little.

``SharedQueue`` is the same queue in a database replicas share: one arrival
order and one bound for all of them, and one dispatcher at a time (a lease).
"""
from __future__ import annotations

import bisect
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from charge_request_service.sessions import (
    ChargeSession,
    SessionTracker,
    SharedSessionTracker,
)
from charge_request_service.store import ChargeStore, OwnerQuotas

from gridcommon.timefmt import format_time, parse_time
from gridcommon.validation import ChargeRequest

Clock = Callable[[], datetime]


class QueueFull(Exception):
    """``MAX_QUEUED`` requests are already waiting."""

    def __init__(self, max_queued: int) -> None:
        super().__init__(f"{max_queued} vehicles are already waiting for power, the most this service queues")
        self.max_queued = max_queued


@dataclass(frozen=True)
class QueuedRequest:
    request: ChargeRequest
    queued_at: datetime
    expires_at: datetime
    # Arrival order; positions are computed from it.
    sequence: int
    # SHA-256 of the session_token its client got: the session it becomes keeps it.
    token_digest: str | None = None
    # Id of the client key that queued it: the session it becomes belongs to that key.
    owner: str | None = None

    @property
    def session_id(self) -> str:
        assert self.request.session_id is not None
        return self.request.session_id

    def to_record(self) -> dict[str, object]:
        """What the store keeps, to queue it again in its place after a restart."""
        return {
            "vehicle_id": self.request.vehicle_id, "request": self.request.as_json(),
            "queued_at": format_time(self.queued_at), "expires_at": format_time(self.expires_at),
            "token_digest": self.token_digest, "owner": self.owner,
        }

    @classmethod
    def from_record(cls, record: dict, sequence: int) -> "QueuedRequest":
        body = record["request"]
        request = ChargeRequest(body["vehicle_id"], body["amount"], body.get("duration_seconds"),
                                body["session_id"], body.get("energy_kwh"),
                                parse_time(body["departure"]) if body.get("departure") else None)
        return cls(request, parse_time(record["queued_at"]), parse_time(record["expires_at"]), sequence,
                   record.get("token_digest"), record.get("owner"))

    def as_json(self, position: int) -> dict[str, object]:
        return {
            "session_id": self.session_id,
            "state": "queued",
            "position": position,
            "vehicle_id": self.request.vehicle_id,
            "amount": self.request.amount_kw,
            "duration_seconds": self.request.duration_seconds,
            **{name: value for name, value in self.request.as_json().items() if name in ("energy_kwh", "departure")},
            "queued_at": format_time(self.queued_at),
            "expires_at": format_time(self.expires_at),
        }


class WaitingQueue:
    """Thread-safe FIFO of waiting requests with expiry, cancellation and cheap positions."""

    def __init__(self, max_queued: int, timeout_seconds: float, clock: Clock) -> None:
        if max_queued < 0:
            raise ValueError(f"max_queued must be at least 0, got {max_queued}")
        self._max_queued = max_queued
        self._timeout = timedelta(seconds=timeout_seconds)
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, QueuedRequest] = OrderedDict()
        self._next_sequence = 0
        # Sequences removed while others before them still wait (a cancellation, say), ascending.
        self._gaps: list[int] = []

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def add(self, request: ChargeRequest, token_digest: str | None = None,
            owner: str | None = None, quotas: OwnerQuotas | None = None) -> tuple[QueuedRequest, int]:
        """Queue a request that carries its session id; ``(entry, position)``; raises ``QueueFull``.

        ``quotas`` are for a database replicas share; one process counts its keys' queued requests
        in its ``QuotaLedger`` and is never given any.
        """
        if quotas is not None:
            raise ValueError("a single process books client keys' quotas in its QuotaLedger, not here")
        if request.session_id is None:
            raise ValueError("a queued request needs its session id")
        with self._lock:
            if len(self._entries) >= self._max_queued:
                raise QueueFull(self._max_queued)
            now = self._clock()
            # A vehicle that departs leaves the queue with it: power after its departure is of no use.
            expires_at = min(now + self._timeout, request.departure or now + self._timeout)
            entry = QueuedRequest(request, now, expires_at, self._next_sequence, token_digest, owner)
            self._next_sequence += 1
            self._entries[entry.session_id] = entry
            return entry, self._position_locked(entry)

    def restore(self, records: list[dict]) -> None:
        """Queue again, in their order, the requests a previous process had queued."""
        with self._lock:
            for record in sorted(records, key=lambda r: r["queued_at"]):
                entry = QueuedRequest.from_record(record, self._next_sequence)
                self._next_sequence += 1
                self._entries[entry.session_id] = entry

    def get(self, session_id: str) -> tuple[QueuedRequest, int] | None:
        """The waiting request and its position (1 = next), or None if it is not waiting."""
        with self._lock:
            entry = self._entries.get(session_id)
            return None if entry is None else (entry, self._position_locked(entry))

    def head(self) -> QueuedRequest | None:
        with self._lock:
            return next(iter(self._entries.values()), None)

    def finish(self, session_id: str, state: str, tracker: SessionTracker | None = None) -> QueuedRequest | None:
        """Take out a request that leaves without starting (``cancelled``: by its client, or refused;
        ``expired``: its offer's answer was lost), ``tracker`` recording it so in the same step for readers;
        None if it was not waiting."""
        with self._lock:
            entry = self._entries.pop(session_id, None)
            if entry is None:
                return None
            bisect.insort(self._gaps, entry.sequence)
            self._forget_gaps_locked()
            if tracker is not None:
                tracker.finish_waiting(entry.session_id, entry.request.vehicle_id, entry.request.amount_kw, state,
                                       entry.queued_at, entry.token_digest, entry.owner)
            return entry

    def start(self, session: ChargeSession, tracker: SessionTracker) -> bool:
        """Take out the request that started as ``session`` and record the session, as one step for readers:
        whoever looks finds it waiting (they wait for the lock) or active, never neither. False if it had left
        the queue meanwhile (its client cancelled it): then nothing is recorded."""
        with self._lock:
            entry = self._entries.pop(session.session_id, None)
            if entry is None:
                return False
            bisect.insort(self._gaps, entry.sequence)
            self._forget_gaps_locked()
            tracker.record(session)
            return True

    def expire(self, tracker: SessionTracker | None = None) -> list[QueuedRequest]:
        """Take out and return every request that waited past its time; ``tracker`` records each as expired
        in the same step for readers (they wait for the lock), so none is ever found neither waiting nor
        expired."""
        with self._lock:
            now = self._clock()
            expired = []
            # All wait the same time, so the oldest expire first: stop at the first that has time left.
            while self._entries:
                entry = next(iter(self._entries.values()))
                if entry.expires_at > now:
                    break
                del self._entries[entry.session_id]
                bisect.insort(self._gaps, entry.sequence)
                expired.append(entry)
            # A request that departs earlier expires out of turn: a pass over the bounded queue finds them.
            for entry in [e for e in self._entries.values() if e.request.departure is not None and e.expires_at <= now]:
                del self._entries[entry.session_id]
                bisect.insort(self._gaps, entry.sequence)
                expired.append(entry)
            self._forget_gaps_locked()
            for entry in expired if tracker is not None else ():
                tracker.finish_waiting(entry.session_id, entry.request.vehicle_id, entry.request.amount_kw,
                                       "expired", entry.queued_at, entry.token_digest, entry.owner)
            return expired

    def oldest_wait_seconds(self) -> float:
        with self._lock:
            entry = next(iter(self._entries.values()), None)
            return 0.0 if entry is None else max(0.0, (self._clock() - entry.queued_at).total_seconds())

    def _position_locked(self, entry: QueuedRequest) -> int:
        head = next(iter(self._entries.values()))
        removed_between = bisect.bisect_left(self._gaps, entry.sequence) - bisect.bisect_left(self._gaps, head.sequence)
        return entry.sequence - head.sequence - removed_between + 1

    def _forget_gaps_locked(self) -> None:
        # Gaps before the head no longer count for anyone's position: the list stays as long as the queue.
        head = next(iter(self._entries.values()), None)
        cut = len(self._gaps) if head is None else bisect.bisect_left(self._gaps, head.sequence)
        del self._gaps[:cut]


class SharedQueue:
    """``WaitingQueue``'s methods on the rows of a database replicas share (``ChargeStore.shared``).

    A queued request is its session's row in state ``queued``: its ``sequence``, given under the
    queue's lock, is the one arrival order of every replica, and the bound is counted under the same
    lock. Only the replica that holds the dispatch lease sees a head and expires requests, so one
    dispatcher at a time offers the head: nobody is overtaken. A request leaves the queue in the
    one update that writes how (``active``, ``expired``, ``cancelled``), so a client polling it never
    finds it missing, and of two replicas racing to take it out (a cancellation and a start, say)
    one wins and the other finds it gone.
    """

    LEASE = "dispatch"

    def __init__(self, store: ChargeStore, max_queued: int, timeout_seconds: float, clock: Clock, holder: str,
                 lease_seconds: float) -> None:
        if max_queued < 0:
            raise ValueError(f"max_queued must be at least 0, got {max_queued}")
        self._store = store
        self._max_queued = max_queued
        self._timeout = timedelta(seconds=timeout_seconds)
        self._clock = clock
        self._holder = holder
        self._lease_seconds = lease_seconds

    def __len__(self) -> int:
        # A request that just claimed its vehicle read the length in the same round trip, a moment ago.
        noted = self._store.noted_queue_length()
        return self._store.count_in("queued") if noted is None else noted

    def add(self, request: ChargeRequest, token_digest: str | None = None,
            owner: str | None = None, quotas: OwnerQuotas | None = None) -> tuple[QueuedRequest, int]:
        """Queue a pending request (its row); ``(entry, position)``; raises ``QueueFull``, and with ``quotas``
        (its client key's) ``QuotaExceeded`` once the key has its quota of requests waiting on any replica."""
        if request.session_id is None:
            raise ValueError("a queued request needs its session id")
        now = self._clock()
        # As in WaitingQueue: a vehicle that departs leaves the queue with it.
        expires_at = min(now + self._timeout, request.departure or now + self._timeout)
        entry = QueuedRequest(request, now, expires_at, 0, token_digest, owner)
        placed = self._store.enqueue(entry.session_id, entry.to_record(), now.timestamp(),
                                     entry.expires_at.timestamp(), self._max_queued, quotas)
        if placed is None:
            raise QueueFull(self._max_queued)
        sequence, position = placed
        return replace(entry, sequence=sequence), position

    def restore(self, records: list[dict]) -> None:
        """Nothing to take back: the database holds the queue."""

    def get(self, session_id: str) -> tuple[QueuedRequest, int] | None:
        stored = self._store.session(session_id)
        if stored is None or stored.state != "queued" or stored.sequence is None:
            return None
        return QueuedRequest.from_record(stored.record, stored.sequence), self._store.queue_position(stored.sequence)

    def head(self) -> QueuedRequest | None:
        """The request to offer next, for the replica that holds the dispatch lease; None elsewhere."""
        if not self._dispatching():
            return None
        rows = self._store.sessions_in("queued", limit=1)
        return QueuedRequest.from_record(rows[0].record, rows[0].sequence or 0) if rows else None

    def finish(self, session_id: str, state: str, tracker: SharedSessionTracker) -> QueuedRequest | None:
        """Take out a request that leaves without starting, written ``state`` by ``tracker`` in one update from
        ``queued``; None if it was not waiting (or another replica took it out first)."""
        stored = self._store.session(session_id)
        if stored is None or stored.state != "queued":
            return None
        entry = QueuedRequest.from_record(stored.record, stored.sequence or 0)
        written = tracker.finish_waiting(entry.session_id, entry.request.vehicle_id, entry.request.amount_kw, state,
                                         entry.queued_at, entry.token_digest, entry.owner)
        return entry if written else None

    def start(self, session: ChargeSession, tracker: SharedSessionTracker) -> bool:
        """The request started as ``session``: its row goes from queued to active in one update, so a reader
        on any replica finds it queued or active, never neither. False if it had left the queue meanwhile."""
        return tracker.record_started(session)

    def expire(self, tracker: SharedSessionTracker) -> list[QueuedRequest]:
        """Take out every request that waited past its time (the dispatch lease's holder only), each written
        ``expired`` by ``tracker`` in one update from ``queued``: a reader on any replica never finds it
        neither waiting nor expired, and a cancellation on another replica at that moment either wins or
        finds it gone."""
        if not self._dispatching():
            return []
        expired = self._store.sessions_in("queued", due_by=self._clock().timestamp())
        entries = [QueuedRequest.from_record(row.record, row.sequence or 0) for row in expired]
        return [entry for entry in entries if tracker.finish_waiting(
            entry.session_id, entry.request.vehicle_id, entry.request.amount_kw, "expired", entry.queued_at,
            entry.token_digest, entry.owner)]

    def oldest_wait_seconds(self) -> float:
        rows = self._store.sessions_in("queued", limit=1)
        if not rows:
            return 0.0
        queued_at = QueuedRequest.from_record(rows[0].record, rows[0].sequence or 0).queued_at
        return max(0.0, (self._clock() - queued_at).total_seconds())

    def _dispatching(self) -> bool:
        return self._store.take_lease(self.LEASE, self._holder, time.time(), self._lease_seconds)
