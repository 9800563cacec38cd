"""Sessions a substation may hold although no client was told of them.

When a forward times out or breaks after it was sent, the substation may have
admitted the session and only its answer was lost; the balancer meanwhile
serves the request elsewhere (or answers 503). Such a session would hold its
kW until it ends by itself, and the vehicle would be charged twice.

Every forward carries a session id the balancer chose, so a lost one can be
found again: once the request is finished, its unanswered forwards are
remembered here, and after the next successful poll of that substation the
balancer asks it to stop them (``DELETE /charge/<session_id>``). A 404 means
the request never arrived; a 200 means a lost session was freed. Each DELETE
may wait out a timeout, so a sweep can outlast the next poll: one sweep per
substation runs at a time.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# Beyond this many unresolved forwards the oldest are given up: their sessions end by themselves.
MAX_REMEMBERED = 10_000


@dataclass(frozen=True)
class UnansweredForward:
    url: str
    substation_id: str
    session_id: str
    # After this moment (the balancer's clock) the session has ended by itself if it ever existed.
    relevant_until: float


class LostAnswers:
    """Thread-safe memory of forwards whose answer never came, per substation URL."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, limit: int = MAX_REMEMBERED) -> None:
        self._clock = clock
        self._limit = limit
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], UnansweredForward] = OrderedDict()
        self._sweeping: set[str] = set()

    def remember(self, url: str, substation_id: str, session_id: str, lifetime_seconds: float) -> None:
        entry = UnansweredForward(url, substation_id, session_id, self._clock() + lifetime_seconds)
        with self._lock:
            self._entries[url, session_id] = entry
            while len(self._entries) > self._limit:
                self._entries.popitem(last=False)

    def pending(self, url: str) -> list[UnansweredForward]:
        """The still-relevant entries for ``url``; ones past their lifetime are dropped."""
        now = self._clock()
        with self._lock:
            for key in [key for key, entry in self._entries.items() if entry.relevant_until <= now]:
                del self._entries[key]
            return [entry for (entry_url, _), entry in self._entries.items() if entry_url == url]

    @contextmanager
    def sweep(self, url: str) -> Iterator[list[UnansweredForward]]:
        """``url``'s pending entries for one clean-up; none while another clean-up of ``url`` is under way."""
        with self._lock:
            busy = url in self._sweeping
            self._sweeping.add(url)
        if busy:
            yield []
            return
        try:
            yield self.pending(url)
        finally:
            with self._lock:
                self._sweeping.discard(url)

    def resolve(self, entry: UnansweredForward) -> None:
        with self._lock:
            self._entries.pop((entry.url, entry.session_id), None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
