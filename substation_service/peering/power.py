"""Local generation and storage of a substation: its simulated DRER and DESD devices.

Generation is either constant (``GENERATION_KW``) or follows a step profile
over a day (``GENERATION_PROFILE``), written as ``hour:kW`` pairs, e.g.
``"0:0,7:20,10:60,16:20,19:0"``: each value holds from its hour until the
next listed hour, and the last one of the day holds past midnight until the
first. The hour is read from UTC wall time; ``PROFILE_DAY_SECONDS`` shortens
the "day" (600 gives a whole day in ten minutes, for demonstrations).
Storage supplies a constant ``STORAGE_KW``.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from gridcommon.settings import SettingsError

HOURS_PER_DAY = 24.0
SECONDS_PER_DAY = 86400.0


@dataclass(frozen=True)
class GenerationProfile:
    # (hour of day, kW), sorted by hour, hours distinct.
    points: tuple[tuple[float, float], ...]
    day_seconds: float = SECONDS_PER_DAY

    def at(self, moment: float) -> float:
        hour = (moment % self.day_seconds) / self.day_seconds * HOURS_PER_DAY
        index = bisect.bisect_right([point_hour for point_hour, _ in self.points], hour) - 1
        # Before the first listed hour, yesterday's last value still holds (index -1).
        return self.points[index][1]

    def next_change_after(self, moment: float) -> float:
        """The first moment after ``moment`` at which the profile steps to another value."""
        day_start = moment - moment % self.day_seconds
        for day in (day_start, day_start + self.day_seconds):
            for hour, _ in self.points:
                at = day + hour / HOURS_PER_DAY * self.day_seconds
                if at > moment:
                    return at
        return day_start + 2 * self.day_seconds  # one point only: it never steps; look again tomorrow


def parse_profile(text: str, day_seconds: float = SECONDS_PER_DAY, name: str = "GENERATION_PROFILE") -> GenerationProfile:
    """``"hour:kW,..."`` as a profile; raises ``SettingsError`` saying what is wrong."""
    points: dict[float, float] = {}
    for item in (part.strip() for part in text.split(",")):
        hour, kw = _profile_point(item, name)
        if hour in points:
            raise SettingsError(f"{name} lists hour {hour:g} twice; give each hour once")
        points[hour] = kw
    if not points:
        raise SettingsError(f"{name} must list at least one hour:kW pair, e.g. '0:0,10:60,16:0'")
    return GenerationProfile(tuple(sorted(points.items())), day_seconds)


def _profile_point(item: str, name: str) -> tuple[float, float]:
    hour_text, separator, kw_text = item.partition(":")
    example = "write hour:kW pairs separated by commas, e.g. '0:0,10:60,16:0'"
    if not separator:
        raise SettingsError(f"{name}: {item!r} is not an hour:kW pair; {example}")
    try:
        hour, kw = float(hour_text), float(kw_text)
    except ValueError:
        raise SettingsError(f"{name}: {item!r} is not an hour:kW pair of numbers; {example}") from None
    if not 0 <= hour < HOURS_PER_DAY:
        raise SettingsError(f"{name}: hour {hour_text.strip()!r} must be at least 0 and below 24")
    if not math.isfinite(kw) or kw < 0:
        raise SettingsError(f"{name}: generation {kw_text.strip()!r} kW must be a finite number, at least 0")
    return hour, kw


@dataclass(frozen=True)
class LocalPower:
    generation_kw: float = 0.0
    storage_kw: float = 0.0
    profile: GenerationProfile | None = None

    def generation_at(self, moment: float) -> float:
        return self.profile.at(moment) if self.profile is not None else self.generation_kw

    def next_change_after(self, moment: float) -> float | None:
        """When local power next steps, or None when it never does (no profile)."""
        return self.profile.next_change_after(moment) if self.profile is not None else None
