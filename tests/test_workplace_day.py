"""The seeded workplace day: the same seed gives the same day, and the day has a workplace's shape."""
from __future__ import annotations

import math
import statistics

import pytest

from load_tester.workplace_day import (
    DAY_SECONDS,
    ENERGY_MAX_KWH,
    SECONDS_PER_HOUR,
    STATION_MAX_KW,
    compress,
    workplace_day,
)


def test_the_same_seed_gives_the_same_day_and_another_seed_another() -> None:
    assert workplace_day(7, 60) == workplace_day(7, 60)
    assert workplace_day(7, 60) != workplace_day(8, 60)


@pytest.mark.parametrize("seed", [1, 2019, 31337])
def test_a_day_has_a_workplace_shape(seed: int) -> None:
    day = workplace_day(seed, 400)
    arrivals = [session.arrival / SECONDS_PER_HOUR for session in day]
    stays = [session.stay_hours for session in day]
    energies = [session.energy_kwh for session in day]
    assert arrivals == sorted(arrivals)
    # Arrivals peak in the morning: most between 07:00 and 09:00, and more than in any other two hours.
    by_two_hours = [sum(1 for hour in arrivals if start <= hour < start + 2) for start in range(24)]
    assert by_two_hours[7] >= 0.45 * len(day)
    assert by_two_hours[7] == max(by_two_hours)
    assert any(17 <= hour < 20 for hour in arrivals)  # a smaller evening peak exists
    # Stays of several hours; needs of a few to a few tens of kWh (the garage: median 6.7, mean 9.3).
    assert 5.0 <= statistics.mean(stays) <= 8.0
    assert 4.0 <= statistics.median(energies) <= 9.0
    assert 6.5 <= statistics.mean(energies) <= 12.0
    assert max(energies) >= 20.0
    for session in day:
        assert 0 <= session.arrival < session.departure <= DAY_SECONDS
        assert 0 < session.max_kw <= STATION_MAX_KW
        assert session.energy_kwh > 0


def test_a_few_sessions_cannot_be_met_even_at_full_power() -> None:
    day = workplace_day(2019, 400)
    infeasible = [s for s in day if s.energy_kwh > s.max_kw * s.stay_hours]
    assert len(infeasible) == 12  # 3 % of 400
    feasible = [s for s in day if s not in infeasible]
    assert all(s.energy_kwh <= ENERGY_MAX_KWH for s in feasible)
    assert all(s.feasible for s in feasible) and not any(s.feasible for s in infeasible)


def test_compressing_a_day_keeps_every_vehicle_s_power() -> None:
    day = workplace_day(5, 50)
    fast = compress(day, 60.0)
    for full, short in zip(day, fast):
        assert short.arrival == pytest.approx(full.arrival / 60)
        assert short.departure == pytest.approx(full.departure / 60)
        # The power that meets the need over the stay is the same in both.
        assert short.energy_kwh / short.stay_hours == pytest.approx(full.energy_kwh / full.stay_hours)
        assert short.max_kw == full.max_kw


@pytest.mark.parametrize("factor", [0.5, 0.0, -3.0, math.nan, math.inf])
def test_a_bad_compression_factor_is_refused(factor: float) -> None:
    with pytest.raises(ValueError, match="compression factor"):
        compress(workplace_day(1, 5), factor)


@pytest.mark.parametrize("sessions", [0, -1, 10_001])
def test_a_bad_session_count_is_refused(sessions: int) -> None:
    with pytest.raises(ValueError, match="sessions must be between"):
        workplace_day(1, sessions)
