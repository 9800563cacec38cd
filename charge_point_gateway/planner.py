"""Which charging profiles go to which transaction, and when. Plain module, one planner per substation.

The substation's allocation is safe as a whole only once every station draws at most its
share. When power moves from one station to another, the one that gains may only take
it after the one that loses has let go, so:

- a decrease is sent at once, whatever its size and however recent the last profile;
- an increase waits until no decrease of this substation is in flight, refused, or still
  to be sent (a transaction whose increase is in flight sends its decrease only after), and
  until ``response_seconds`` have passed since the last decrease was accepted (a vehicle
  takes a moment to follow a lower limit);
- an increase smaller than ``deadband_a`` is not sent, and increases to one transaction
  are at least ``min_interval_seconds`` apart (stations keep profiles in flash);
- a transaction has at most one profile in flight.

A decrease that a station refuses (or never answers) leaves that station holding its
higher limit: every increase of the substation stays held until the caller resolves it
(raising that session's amount at the substation so the allocation counts what the
station holds), which shows as a target at or above what the station holds.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

_EPSILON = 1e-9


@dataclass(frozen=True)
class Send:
    """One profile to send: ``amps`` per phase for the transaction ``key``."""

    key: str
    amps: float
    decrease: bool


@dataclass
class _Line:
    held_a: float  # the most the station may be drawing now: what it was last told, or higher
    last_increase_at: float | None = None
    inflight: Send | None = None
    blocked: bool = False  # a decrease was refused or lost: the station still holds held_a


class ProfilePlanner:
    def __init__(self, deadband_a: float, min_interval_seconds: float, response_seconds: float) -> None:
        self.deadband_a = deadband_a
        self.min_interval_seconds = min_interval_seconds
        self.response_seconds = response_seconds
        self._lines: dict[str, _Line] = {}
        self._settled_at = -math.inf  # when increases may follow the last accepted decrease
        self._wake_at: float | None = None

    def track(self, key: str, held_a: float) -> None:
        """A new transaction whose station may draw up to ``held_a`` (its default profile) until told otherwise."""
        self._lines.setdefault(key, _Line(held_a=held_a))

    def forget(self, key: str) -> None:
        """The transaction ended: its station draws nothing more for it."""
        self._lines.pop(key, None)

    def assume(self, key: str, held_a: float) -> None:
        """The caller takes the transaction out of planning: its station is counted at ``held_a`` from now on
        (a station that refuses profiles, counted at its maximum by the substation too)."""
        line = self._lines.get(key)
        if line is not None:
            line.held_a = held_a
            line.blocked = False

    def held(self, key: str) -> float | None:
        line = self._lines.get(key)
        return None if line is None else line.held_a

    def blocked(self) -> list[str]:
        """Transactions whose refused decrease holds back the substation's increases."""
        return [key for key, line in self._lines.items() if line.blocked]

    @property
    def wake_at(self) -> float | None:
        """When a held increase may go: plan again then (None: nothing waits on time)."""
        return self._wake_at

    def plan(self, targets: Mapping[str, float], now: float) -> list[Send]:
        """The profiles to send now for ``targets`` (amps per transaction key); marks them in flight."""
        self._wake_at = None
        sends: list[Send] = []
        for key, target in targets.items():
            line = self._lines.get(key)
            if line is None or line.inflight is not None:
                continue
            if line.blocked and target >= line.held_a - _EPSILON:
                line.blocked = False
            if target < line.held_a - _EPSILON:
                send = Send(key, target, decrease=True)
                line.inflight = send
                sends.append(send)
        if any((line.inflight is not None and line.inflight.decrease) or line.blocked for line in self._lines.values()):
            return sends
        # A decrease that could not go yet (its transaction has an increase in flight) holds the increases too.
        if any(key in self._lines and target < self._lines[key].held_a - _EPSILON for key, target in targets.items()):
            return sends
        if now < self._settled_at:
            self._wake_at = self._settled_at
            return sends
        for key, target in targets.items():
            line = self._lines.get(key)
            if line is None or line.inflight is not None or target < line.held_a + max(self.deadband_a, _EPSILON):
                continue
            if line.last_increase_at is not None and now < line.last_increase_at + self.min_interval_seconds:
                due = line.last_increase_at + self.min_interval_seconds
                self._wake_at = due if self._wake_at is None else min(self._wake_at, due)
                continue
            send = Send(key, target, decrease=False)
            line.inflight = send
            # From the moment it is sent the station may draw the new limit.
            line.held_a = target
            line.last_increase_at = now
            sends.append(send)
        return sends

    def accepted(self, send: Send, now: float) -> None:
        line = self._lines.get(send.key)
        if line is None or line.inflight != send:
            return
        line.inflight = None
        if send.decrease:
            line.held_a = send.amps
            line.blocked = False
            self._settled_at = max(self._settled_at, now + self.response_seconds)

    def failed(self, send: Send, now: float) -> None:
        """The station refused the profile or did not answer: it keeps the higher of its limits."""
        line = self._lines.get(send.key)
        if line is None or line.inflight != send:
            return
        line.inflight = None
        if send.decrease:
            line.blocked = True
