"""Charge requests waiting for power, first come first served across the grid. Plain Python, no Flask.

A request that asked to wait (``"wait": true``) and found no room anywhere
joins the queue; the dispatcher starts the one at the head as soon as any
substation has room for its minimum. The queue is bounded (``MAX_QUEUED``),
a request waits at most ``QUEUE_TIMEOUT_SECONDS`` and the client may cancel
it. Positions cost O(log n) to read, so clients polling their place in a
long queue cost little.
"""
from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

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

    @property
    def session_id(self) -> str:
        assert self.request.session_id is not None
        return self.request.session_id

    def to_record(self) -> dict[str, object]:
        """What the store keeps, to queue it again in its place after a restart."""
        return {
            "vehicle_id": self.request.vehicle_id, "request": self.request.as_json(),
            "queued_at": format_time(self.queued_at), "expires_at": format_time(self.expires_at),
            "token_digest": self.token_digest,
        }

    def as_json(self, position: int) -> dict[str, object]:
        return {
            "session_id": self.session_id,
            "state": "queued",
            "position": position,
            "vehicle_id": self.request.vehicle_id,
            "amount": self.request.amount_kw,
            "duration_seconds": self.request.duration_seconds,
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

    def add(self, request: ChargeRequest, token_digest: str | None = None) -> tuple[QueuedRequest, int]:
        """Queue a request that carries its session id; ``(entry, position)``; raises ``QueueFull``."""
        if request.session_id is None:
            raise ValueError("a queued request needs its session id")
        with self._lock:
            if len(self._entries) >= self._max_queued:
                raise QueueFull(self._max_queued)
            now = self._clock()
            entry = QueuedRequest(request, now, now + self._timeout, self._next_sequence, token_digest)
            self._next_sequence += 1
            self._entries[entry.session_id] = entry
            return entry, self._position_locked(entry)

    def restore(self, records: list[dict]) -> None:
        """Queue again, in their order, the requests a previous process had queued."""
        with self._lock:
            for record in sorted(records, key=lambda r: r["queued_at"]):
                body = record["request"]
                request = ChargeRequest(body["vehicle_id"], body["amount"], body.get("duration_seconds"),
                                        body["session_id"])
                entry = QueuedRequest(request, parse_time(record["queued_at"]), parse_time(record["expires_at"]),
                                      self._next_sequence, record.get("token_digest"))
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

    def remove(self, session_id: str) -> QueuedRequest | None:
        """Take a request out (it started, or its client cancelled it); None if it was not waiting."""
        with self._lock:
            entry = self._entries.pop(session_id, None)
            if entry is not None:
                bisect.insort(self._gaps, entry.sequence)
                self._forget_gaps_locked()
            return entry

    def expire(self) -> list[QueuedRequest]:
        """Take out and return every request that waited past its time."""
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
            self._forget_gaps_locked()
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
