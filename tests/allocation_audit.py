"""Independent witnesses of the capacity guarantee, for tests against real substations.

Neither trusts the number a substation reports about its own load: the
sampler adds up the allocations of the sessions themselves, twenty times a
second; the audit replays every session's allocation history against the
limit's history, change by change.
"""
from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import requests

from tests.harness import Service

TOLERANCE_KW = 1e-6


@dataclass(frozen=True)
class Sample:
    substation: str
    taken_at: float
    limit_kw: float
    allocated_kw: float
    requested_kw: float
    sessions: int

    @property
    def over_limit(self) -> bool:
        return self.allocated_kw > self.limit_kw + TOLERANCE_KW * max(1, self.sessions)


@dataclass
class Sampler:
    """Reads every substation's ``GET /sessions`` at ``rate_hz`` until stopped; bounded in time."""

    substations: list[Service]
    rate_hz: float = 20.0
    longest_seconds: float = 300.0
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> "Sampler":
        for substation in self.substations:
            thread = threading.Thread(target=self._run, args=(substation,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def _run(self, substation: Service) -> None:
        session = requests.Session()
        deadline = time.monotonic() + self.longest_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            try:
                body = session.get(f"{substation.url}/sessions", timeout=2).json()
            except requests.RequestException:
                body = None
            if body is not None:
                charging = body["sessions"]
                self.samples.append(
                    Sample(
                        substation=body["substation"],
                        taken_at=body["taken_at"],
                        limit_kw=body["limit_kw"],
                        allocated_kw=math.fsum(s["allocated_kw"] for s in charging),
                        requested_kw=math.fsum(s["amount"] for s in charging),
                        sessions=len(charging),
                    )
                )
            self._stop.wait(max(0.0, 1.0 / self.rate_hz - (time.monotonic() - started)))

    def over_limit(self) -> list[Sample]:
        return [sample for sample in self.samples if sample.over_limit]


@dataclass(frozen=True)
class HistoryBreach:
    substation: str
    at: float
    allocated_kw: float
    limit_kw: float


def history_breaches(substation: Service) -> tuple[list[HistoryBreach], int]:
    """Sweep the substation's recorded allocation changes against its limit; ``(breaches, points)``."""
    sessions = requests.get(f"{substation.url}/sessions?history=1&ended=1", timeout=10).json()
    limit = requests.get(f"{substation.url}/limit", timeout=10).json()
    return sweep(sessions["substation"], sessions["sessions"], limit["history"])


def sweep(
    substation: str, sessions: Iterable[dict[str, Any]], limits: list[list[Any]]
) -> tuple[list[HistoryBreach], int]:
    changes: dict[float, list[tuple[str, float]]] = defaultdict(list)
    for record in sessions:
        for at, kw in record["history"]:
            changes[at].append((record["session_id"], kw))
    limit_changes = sorted((at, kw) for at, kw, _ in limits)
    allocation: dict[str, float] = {}
    breaches = []
    points = 0
    limit_index = -1
    # At one instant every change is applied before checking: the ledger changes them atomically.
    for at in sorted(changes.keys() | {at for at, _ in limit_changes}):
        for session_id, kw in changes.get(at, []):
            allocation[session_id] = kw
            points += 1
        while limit_index + 1 < len(limit_changes) and limit_changes[limit_index + 1][0] <= at:
            limit_index += 1
        if limit_index < 0:
            continue  # before the oldest limit kept: nothing to compare with
        total = math.fsum(allocation.values())
        limit_kw = limit_changes[limit_index][1]
        if total > limit_kw + TOLERANCE_KW * max(1, len(allocation)):
            breaches.append(HistoryBreach(substation, at, total, limit_kw))
    return breaches, points


def jain_index(values: list[float]) -> float:
    """(Σx)² / (n·Σx²): 1.0 when everyone got the same, 1/n when one got everything."""
    squares = math.fsum(value * value for value in values)
    return math.fsum(values) ** 2 / (len(values) * squares) if squares else 1.0
