"""Scenario generation: seeded, bounded, shaped as the scenarios promise."""
from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from load_tester.scenarios import MAX_REQUESTS, SCENARIOS, DeratePlan, LoadPlan, default_derate, generate_requests

PLAN = LoadPlan(
    scenario="normal",
    requests=100,
    concurrency=10,
    ramp_up_seconds=60.0,
    duration_seconds=180.0,
    amount_min_kw=5.0,
    amount_max_kw=20.0,
    session_seconds=60.0,
    seed=42,
)


def test_the_presets_are_the_ones_of_the_design_documents():
    closed_loop = {name: s for name, s in SCENARIOS.items() if name != "sustained"}
    shape = {name: (s.requests, s.concurrency, s.ramp_up_seconds) for name, s in closed_loop.items()}
    assert shape == {
        "rush-hour": (100, 100, 0.0),
        "normal": (100, 10, 60.0),
        "high": (500, 50, 120.0),
        "burst": (200, 20, 0.0),
        "derate": (100, 100, 0.0),  # rush hour, with one substation's limit halved for a while
        "workplace-day": (60, 100, 0.0),  # arrivals as the seeded day has them, not a ramp
    }
    assert [name for name, s in SCENARIOS.items() if s.derate] == ["derate"]
    assert SCENARIOS["sustained"].arrival_rate is not None
    assert all(s.arrival_rate is None for name, s in SCENARIOS.items() if name != "sustained")


def test_the_same_seed_gives_the_same_requests_and_another_seed_others():
    first = generate_requests(PLAN)
    assert first == generate_requests(PLAN)
    other = generate_requests(replace(PLAN, seed=43))
    assert [r.amount_kw for r in other] != [r.amount_kw for r in first]
    assert {r.vehicle_id for r in other}.isdisjoint({r.vehicle_id for r in first})


@given(
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    low=st.floats(min_value=0.1, max_value=300),
    width=st.floats(min_value=0, max_value=50),
)
def test_amounts_stay_in_the_range_and_vehicles_are_distinct(seed, low, width):
    plan = replace(PLAN, seed=seed, requests=30, amount_min_kw=low, amount_max_kw=min(low + width, 350.0))
    planned = generate_requests(plan)
    assert len(planned) == 30
    assert all(plan.amount_min_kw <= r.amount_kw <= plan.amount_max_kw for r in planned)
    assert len({r.vehicle_id for r in planned}) == 30
    assert all(r.body()["duration_seconds"] == plan.session_seconds for r in planned)


def test_the_ramp_up_spreads_start_times_evenly_over_its_length():
    offsets = [r.offset_seconds for r in generate_requests(PLAN)]
    assert offsets[0] == 0.0
    assert offsets == sorted(offsets)
    assert offsets[1] == pytest.approx(0.6)
    assert offsets[-1] == pytest.approx(60.0 - 0.6)


def test_without_ramp_up_every_request_is_due_at_once():
    planned = generate_requests(replace(PLAN, ramp_up_seconds=0.0, requests=100))
    assert {r.offset_seconds for r in planned} == {0.0}


def test_open_loop_arrivals_follow_the_rate_within_the_duration():
    plan = replace(PLAN, requests=MAX_REQUESTS, duration_seconds=200.0, arrival_rate=5.0)
    offsets = [r.offset_seconds for r in generate_requests(plan)]
    # 1000 expected arrivals; a Poisson count is within +-4 standard deviations (~126) essentially always.
    assert 870 < len(offsets) < 1130
    assert offsets == sorted(offsets)
    assert 0 < offsets[0] and offsets[-1] < 200.0
    assert generate_requests(plan) == generate_requests(plan)


def test_open_loop_arrivals_stop_at_the_request_cap():
    plan = replace(PLAN, requests=25, duration_seconds=1000.0, arrival_rate=50.0)
    assert len(generate_requests(plan)) == 25


def test_a_request_asks_to_wait_only_when_told_and_asks_for_its_amount_for_its_whole_session():
    [first, *_] = generate_requests(PLAN)
    assert "wait" not in first.body()
    assert first.body(wait=True)["wait"] is True
    assert first.energy_kwh == pytest.approx(first.amount_kw * 60.0 / 3600.0)


def test_the_derate_defaults_follow_the_session_length():
    # A quarter of the way in, for a quarter: every rush-hour session still charges when it is undone.
    assert default_derate(60.0) == (15.0, 15.0)
    assert default_derate(4.0) == (1.0, 1.0)
    assert DeratePlan(at_seconds=2.0, for_seconds=3.0).until_seconds == 5.0
    assert DeratePlan(2.0, 3.0).factor == 0.5
