"""Helpers shared by the substation's tests."""
from __future__ import annotations

import math
import re
from collections.abc import Iterable
from datetime import datetime

# The API's time format: ISO 8601, UTC, milliseconds, "Z" (gridcommon.timefmt).
ISO_UTC_MILLIS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


def epoch_of(text: str) -> float:
    """Seconds since the epoch of a time in the API's format; fails on any other format."""
    assert ISO_UTC_MILLIS.match(text), f"not an ISO 8601 UTC time with milliseconds and Z: {text!r}"
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class FakeClock:
    """Seconds since the epoch that move only when a test says so."""

    def __init__(self, start: float = 1_800_000_000.25) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def max_overlapping_load(sessions: Iterable[tuple[float, float, float]]) -> float:
    """The highest sum of amounts of ``(started_at, ends_at, amount)`` sessions charging at one instant."""
    events: list[tuple[float, float]] = []
    for started_at, ends_at, amount in sessions:
        events += [(started_at, amount), (ends_at, -amount)]
    load = peak = 0.0
    # At one instant ends sort before starts (negative first): a session no longer counts at its ends_at.
    for _, change in sorted(events):
        load = math.fsum([load, change])
        peak = max(peak, load)
    return peak
