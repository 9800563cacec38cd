"""A seeded ``workplace-day``: who plugs in at a workplace car park, when, for how long, needing what. Plain Python.

Its shape follows the Caltech garage's weekdays (ACN-Data, March 2019):
arrivals peak between 07:00 and 09:00 with a smaller evening peak, stays last
several hours (6.9 h on average on a weekday), and vehicles need a few to a few
tens of kWh (median 6.7, mean 9.3, at most 58). A few sessions (3 %) cannot be
met even at full power for the whole stay, as in the real data: a schedule is
judged on the others too.

Everything random comes from one ``random.Random(seed)``: the same seed and
options always give the same day. :func:`compress` plays the day faster for a
load test against real services: times shrink by the factor and so do the
energies, so every vehicle asks for the same power as in the full day.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

SECONDS_PER_HOUR = 3600.0
DAY_SECONDS = 24 * SECONDS_PER_HOUR
# A BASIC charging point of ACN-Sim: 32 A at 208 V. A vehicle's own charger may take less.
STATION_MAX_KW = 32 * 208 / 1000
# Vehicles' on-board chargers (kW): single-phase 3.3 and 6.6 kW, and those that take all the station gives.
ONBOARD_CHARGERS_KW = (3.3, 6.6, 7.2)
ONBOARD_WEIGHTS = (0.2, 0.5, 0.3)
# Energy per session: log-normal with the garage's median (6.7 kWh) and mean (9.3 kWh).
ENERGY_MEDIAN_KWH = 6.7
ENERGY_SIGMA = math.sqrt(2 * math.log(9.3 / 6.7))
ENERGY_MIN_KWH = 1.0
ENERGY_MAX_KWH = 58.0
# Sessions whose need cannot be met even at full power all the time (about 3 % in the garage's data).
INFEASIBLE_SHARE = 0.03
# Every feasible session leaves at least this much slack at full power, so rounding cannot make it infeasible.
FEASIBLE_MARGIN = 0.95
MAX_SESSIONS = 10_000


@dataclass(frozen=True)
class PlannedSession:
    """One vehicle's visit: times in seconds since the day's midnight, the station's power for it."""

    session_id: str
    vehicle_id: str
    arrival: float
    departure: float
    energy_kwh: float
    max_kw: float

    @property
    def stay_hours(self) -> float:
        return (self.departure - self.arrival) / SECONDS_PER_HOUR

    @property
    def feasible(self) -> bool:
        """True when the need can be met by charging at full power for the whole stay."""
        return self.energy_kwh <= self.max_kw * self.stay_hours


def _arrival_and_stay_hours(rng: random.Random) -> tuple[float, float]:
    """When a vehicle arrives and how long it stays: the morning peak, midday, or the smaller evening peak."""
    kind = rng.random()
    if kind < 0.75:  # commuters: 07:00-09:00, a working day
        return min(max(rng.gauss(8.0, 0.7), 6.0), 11.0), min(max(rng.gauss(8.0, 1.5), 3.0), 11.0)
    if kind < 0.9:  # visitors and shift changes around midday
        return rng.uniform(10.0, 14.0), min(max(rng.gauss(3.5, 1.2), 1.0), 6.0)
    return min(max(rng.gauss(18.0, 0.8), 16.0), 21.0), min(max(rng.gauss(3.0, 1.0), 1.0), 5.0)


def workplace_day(seed: int, sessions: int = 60) -> list[PlannedSession]:
    """The seeded day's sessions, by arrival."""
    if not 1 <= sessions <= MAX_SESSIONS:
        raise ValueError(f"sessions must be between 1 and {MAX_SESSIONS}, not {sessions}")
    rng = random.Random(seed)
    infeasible = set(rng.sample(range(sessions), round(sessions * INFEASIBLE_SHARE)))
    planned = []
    for index in range(sessions):
        arrival_hour, stay_hours = _arrival_and_stay_hours(rng)
        # Never past midnight: the day is one day.
        stay_hours = min(stay_hours, 23.9 - arrival_hour)
        max_kw = min(STATION_MAX_KW, rng.choices(ONBOARD_CHARGERS_KW, ONBOARD_WEIGHTS)[0])
        at_full_power = max_kw * stay_hours
        energy = min(max(rng.lognormvariate(math.log(ENERGY_MEDIAN_KWH), ENERGY_SIGMA), ENERGY_MIN_KWH),
                     ENERGY_MAX_KWH)
        if index in infeasible:
            energy = min(max(energy, at_full_power * rng.uniform(1.1, 1.5)), ENERGY_MAX_KWH * 2)
        else:
            energy = min(energy, at_full_power * FEASIBLE_MARGIN)
        arrival = arrival_hour * SECONDS_PER_HOUR
        planned.append(PlannedSession(
            session_id=f"wd-{seed}-{index}",
            vehicle_id=f"EV-wd-{index:04d}",
            arrival=round(arrival, 3),
            departure=round(arrival + stay_hours * SECONDS_PER_HOUR, 3),
            energy_kwh=round(energy, 3),
            max_kw=max_kw,
        ))
    planned.sort(key=lambda session: (session.arrival, session.session_id))
    return planned


def compress(day: list[PlannedSession], factor: float) -> list[PlannedSession]:
    """The same day played ``factor`` times faster: times and energies shrink alike, powers stay."""
    if not factor >= 1 or math.isinf(factor):
        raise ValueError(f"the compression factor must be a finite number of at least 1, not {factor}")
    return [
        replace(session, arrival=session.arrival / factor, departure=session.departure / factor,
                energy_kwh=session.energy_kwh / factor)
        for session in day
    ]
