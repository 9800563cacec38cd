"""The pure parts of the load tester: answers to records, capacity violations, statistics, verdict."""
from __future__ import annotations

import statistics

import pytest

from load_tester.records import (
    ADMITTED,
    FAILED,
    INTERRUPT,
    REJECTED,
    TIME_LIMIT,
    RunData,
    RunTiming,
    classify_response,
    not_sent,
    parse_status,
    transport_failure,
    unanswered,
)
from load_tester.scenarios import PlannedRequest
from load_tester.stats import percentile, summarise
from load_tester.verdict import Limits, judge
from load_tester.violations import find_violations, session_violations, status_violations
from tests.load_tester_support import admitted, iso, sample

PLANNED = PlannedRequest(index=3, vehicle_id="ev-1-00004", amount_kw=12.5, duration_seconds=60.0, offset_seconds=0.5)


# Answers to records ---------------------------------------------------------------------------------------------


def test_a_201_is_an_admission_with_its_session_and_the_substations_figures():
    body = {
        "session_id": "s-1", "substation": "substation-2", "vehicle_id": "ev-1-00004", "amount": 12.5,
        "started_at": iso(0), "ends_at": iso(60), "load": 40.0, "capacity": 100.0, "load_percentage": 40.0,
        "state_version": 7, "routing": {"policy": "least_loaded", "attempts": 1},
    }  # fmt: skip
    result = classify_response(PLANNED, "rid", 0.6, 12.0, 201, body)
    assert (result.outcome, result.failure) == (ADMITTED, None)
    assert (result.substation, result.session_id) == ("substation-2", "s-1")
    assert (result.load_kw, result.capacity_kw, result.state_version) == (40.0, 100.0, 7)
    assert result.schedule_lag_ms == pytest.approx(100.0)


@pytest.mark.parametrize(
    ("status", "body", "outcome", "failure"),
    [
        (503, {"error": "no_capacity", "message": "full", "retry_after_seconds": 5}, REJECTED, None),
        (409, {"error": "capacity_exceeded", "message": "full", "substation": "substation-1"}, REJECTED, None),
        (502, {"error": "load_balancer_unavailable", "message": "down"}, FAILED, "502"),
        (503, {"error": "something_else", "message": "?"}, FAILED, "503"),
        (500, "not json", FAILED, "500"),
        (400, {"error": "invalid_field", "field": "amount", "message": "bad"}, FAILED, "400"),
    ],
)
def test_capacity_errors_are_rejections_and_anything_else_a_failure(status, body, outcome, failure):
    result = classify_response(PLANNED, "rid", 0.5, 3.0, status, body)
    assert (result.outcome, result.failure, result.status) == (outcome, failure, status)
    assert result.session_id is None


def test_status_entries_without_figures_are_skipped():
    body = {
        "policy": "round_robin",
        "substations": [
            {"id": "substation-1", "load": 50, "capacity": 100, "load_percentage": 50.0, "up": True},
            {"id": "substation-2", "load": None, "capacity": None, "up": False},
            {"id": "substation-3", "load": 30, "capacity": 120, "up": False},
            "garbage",
        ],
    }
    parsed = parse_status(1.23456, body)
    assert parsed.t == 1.235 and parsed.policy == "round_robin"
    assert [(r.substation, r.load_percentage, r.up) for r in parsed.substations] == [
        ("substation-1", 50.0, True),
        ("substation-3", 25.0, False),
    ]
    assert parse_status(0, ["not", "an", "object"]).substations == ()


# Capacity violations ----------------------------------------------------------------------------------------------


def test_overlapping_sessions_above_capacity_are_a_violation_at_the_admission_that_broke_it():
    results = [
        admitted(0, "substation-1", 60.0, start=0, duration=10, capacity=100.0),
        admitted(1, "substation-1", 30.0, start=2, duration=10, capacity=100.0),
        admitted(2, "substation-1", 20.0, start=5, duration=10, capacity=100.0),  # 110 kW from t=5
    ]
    [violation] = session_violations(results)
    assert (violation.substation, violation.at, violation.source) == ("substation-1", iso(5), "sessions")
    assert violation.load_kw == pytest.approx(110.0) and violation.excess_kw == pytest.approx(10.0)


def test_a_session_no_longer_counts_from_its_end_so_back_to_back_sessions_fit():
    results = [
        admitted(0, "substation-1", 80.0, start=0, duration=5, capacity=100.0),
        admitted(1, "substation-1", 80.0, start=5, duration=5, capacity=100.0),  # starts the moment the first ends
        admitted(2, "substation-1", 20.0, start=6, duration=5, capacity=100.0),  # exactly full
    ]
    assert session_violations(results) == []


def test_sessions_at_different_substations_do_not_add_up():
    results = [
        admitted(0, "substation-1", 70.0, start=0, duration=10, capacity=100.0),
        admitted(1, "substation-2", 70.0, start=1, duration=10, capacity=100.0),
    ]
    assert session_violations(results) == []


def test_the_load_the_substation_reports_counts_even_when_the_run_cannot_see_other_sessions():
    results = [admitted(0, "substation-1", 10.0, start=0, duration=10, capacity=100.0, load=105.0)]
    [violation] = session_violations(results)
    assert violation.load_kw == 105.0


def test_admissions_in_one_millisecond_are_ordered_by_state_version():
    # Power from a peer raised the capacity between two admissions of the same millisecond. In admission
    # order (state_version) both fit: 90 of 100, then 110 of 120. In send order the 90 kW would seem to
    # land on 20 kW already charging, against the capacity of 100 it saw.
    results = [
        admitted(0, "substation-1", 20.0, start=1, duration=10, capacity=120.0, load=110.0, state_version=2),
        admitted(1, "substation-1", 90.0, start=1, duration=10, capacity=100.0, load=90.0, state_version=1),
    ]
    assert session_violations(results) == []


def test_a_status_sample_above_capacity_is_a_violation_and_a_down_substation_is_not_judged():
    samples = [
        sample(0.5, ("substation-1", 50.0, 100.0), ("substation-2", 100.0, 100.0)),
        sample(1.0, ("substation-1", 101.0, 100.0)),
    ]
    [violation] = status_violations(samples)
    assert (violation.substation, violation.at, violation.source) == ("substation-1", "t=1.0s", "status")
    assert "1.0 kW over" in violation.describe()


def test_find_violations_reports_both_witnesses():
    results = [admitted(0, "substation-1", 150.0, start=0, duration=10, capacity=100.0)]
    samples = [sample(0.5, ("substation-1", 150.0, 100.0))]
    assert {v.source for v in find_violations(results, samples)} == {"sessions", "status"}


# Statistics --------------------------------------------------------------------------------------------------------


def test_percentiles_interpolate_between_the_nearest_values():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 95) == pytest.approx(95.05)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0


def _run(results, samples=(), wall=2.0, cpu=0.5, stopped_by=None):
    return RunData(tuple(results), tuple(samples), RunTiming(wall, cpu), iso(0), iso(2), stopped_by, 0)


def test_the_summary_counts_outcomes_latency_and_load_per_substation():
    results = [
        admitted(0, "substation-1", 10.0, start=0, duration=60, capacity=100.0, load=10.0, latency_ms=10.0),
        admitted(1, "substation-2", 20.0, start=0, duration=60, capacity=100.0, load=20.0, latency_ms=20.0),
        admitted(2, "substation-1", 15.0, start=0, duration=60, capacity=100.0, load=25.0, latency_ms=30.0),
        classify_response(PLANNED, "r", 0.1, 40.0, 503, {"error": "no_capacity"}),
        classify_response(PLANNED, "r", 0.1, 50.0, 502, {"error": "load_balancer_unavailable"}),
        transport_failure(PLANNED, "r", 0.1, 1000.0, "timeout", "read timed out"),
        not_sent(PLANNED, "r"),
    ]
    samples = [
        sample(0.0, ("substation-1", 0.0, 100.0), ("substation-2", 0.0, 100.0)),
        sample(0.5, ("substation-1", 30.0, 100.0), ("substation-2", 5.0, 100.0)),  # spread 25
        sample(1.0, ("substation-1", 25.0, 100.0), ("substation-2", 20.0, 100.0)),  # spread 5
    ]
    data = _run(results, samples)
    summary = summarise(data.results, data.samples, [], data.timing)
    assert (summary.planned, summary.sent, summary.admitted, summary.rejected, summary.failed, summary.not_sent) == (
        7, 6, 3, 1, 2, 1,
    )  # fmt: skip
    assert summary.failed_by_status == {"502": 1, "timeout": 1}
    assert summary.failure_causes() == "502: 1, timeout: 1"
    # Errors are the two failures and the request never sent; the capacity rejection is not one of them.
    assert summary.error_rate == pytest.approx(3 / 7)
    assert summary.rejection_rate == pytest.approx(1 / 7)
    # Latency over answered requests only: the timeout got no answer.
    answered = [10.0, 20.0, 30.0, 40.0, 50.0]
    assert summary.latency.mean == pytest.approx(30.0)
    assert summary.latency.median == 30.0 and summary.latency.max == 50.0
    assert summary.latency.p95 == pytest.approx(statistics.quantiles(answered, n=100, method="inclusive")[94])
    assert summary.throughput_rps == pytest.approx(2.5)
    assert summary.tool_cpu_percent == pytest.approx(25.0)
    assert (summary.spread_end, summary.spread_peak) == (pytest.approx(5.0), pytest.approx(25.0))
    by_name = {s.substation: s for s in summary.substations}
    assert (by_name["substation-1"].admitted, by_name["substation-1"].admitted_kw) == (2, 25.0)
    assert by_name["substation-1"].end_load_percentage == pytest.approx(25.0)
    assert by_name["substation-1"].peak_load_percentage == pytest.approx(30.0)
    assert by_name["substation-2"].peak_load_percentage == pytest.approx(20.0)


def test_without_samples_the_peak_comes_from_the_admissions_and_there_is_no_spread():
    results = [admitted(0, "substation-1", 10.0, start=0, duration=60, capacity=200.0, load=50.0)]
    summary = summarise(results, [], [], RunTiming(1.0, 0.1))
    [substation] = summary.substations
    assert substation.peak_load_percentage == pytest.approx(25.0)
    assert substation.end_load_percentage is None
    assert (summary.spread_end, summary.spread_peak) == (None, None)


# Verdict ---------------------------------------------------------------------------------------------------------


def _verdict(results, samples=(), cpu=0.5, stopped_by=None, open_loop=False, **limits):
    data = _run(results, samples, cpu=cpu, stopped_by=stopped_by)
    violations = find_violations(data.results, data.samples)
    summary = summarise(data.results, data.samples, violations, data.timing)
    return judge(summary, violations, data, Limits(**limits), open_loop)


def _three_admitted_and(*others):
    results = [admitted(i, "substation-1", 1.0, start=0, duration=60, capacity=100.0) for i in range(3)]
    return results + list(others), [sample(0.1, ("substation-1", 3.0, 100.0))]


def test_capacity_rejections_pass_by_default_and_fail_only_above_the_allowed_rejection_rate():
    # Five of eight rejected: a grid too small for the crowd, refusing power it does not have.
    results, samples = _three_admitted_and(
        *(classify_response(PLANNED, f"r{i}", 0.1, 5.0, 503, {"error": "no_capacity"}) for i in range(5))
    )
    default = _verdict(results, samples)
    assert default.passed and default.problems == ()
    assert _verdict(results, samples, max_rejection_rate=0.625).passed
    strict = _verdict(results, samples, max_rejection_rate=0.6)
    assert not strict.passed
    [problem] = strict.problems
    assert "rejection rate 62.5% is above the allowed 60.0% (5 of 8 requests rejected for capacity)" in problem
    assert "--max-rejection-rate" in problem
    assert not _verdict(results, samples, max_rejection_rate=0.0).passed


def test_a_failed_request_fails_the_run_by_default_and_passes_at_the_allowed_error_rate():
    results, samples = _three_admitted_and(
        classify_response(PLANNED, "r", 0.1, 5.0, 502, {"error": "load_balancer_unavailable"})
    )
    [problem] = _verdict(results, samples).problems
    assert problem.startswith("error rate 25.0% is above the allowed 0.0% (1 failed (502: 1), 0 not sent)")
    assert _verdict(results, samples, max_error_rate=0.25).passed
    assert not _verdict(results, samples, max_error_rate=0.2).passed
    # Failures do not count as rejections: demanding no rejection changes nothing here.
    assert _verdict(results, samples, max_error_rate=0.25, max_rejection_rate=0.0).passed


def test_timeouts_and_requests_never_sent_are_errors_too():
    results, samples = _three_admitted_and(
        transport_failure(PLANNED, "r", 0.1, 1000.0, "timeout", "read timed out"), not_sent(PLANNED, "r2")
    )
    [problem] = _verdict(results, samples, max_error_rate=0.3).problems
    assert "error rate 40.0% is above the allowed 30.0% (1 failed (timeout: 1), 1 not sent)" in problem
    assert _verdict(results, samples, max_error_rate=0.4).passed


def test_both_limits_are_judged_and_each_names_its_own_problem():
    results, samples = _three_admitted_and(
        classify_response(PLANNED, "r", 0.1, 5.0, 503, {"error": "no_capacity"}),
        classify_response(PLANNED, "r2", 0.1, 5.0, 500, "not json"),
    )
    problems = _verdict(results, samples, max_rejection_rate=0.1).problems
    assert [p.split(" is above")[0] for p in problems] == ["error rate 20.0%", "rejection rate 20.0%"]


def test_a_capacity_violation_fails_the_run_whatever_the_error_rate():
    results = [admitted(0, "substation-1", 150.0, start=0, duration=60, capacity=100.0)]
    verdict = _verdict(results, [sample(0.1, ("substation-1", 0.0, 100.0))], max_error_rate=1.0)
    assert not verdict.passed
    assert "substation-1 carried 150.0 kW of 100.0 kW capacity" in verdict.problems[0]


def test_warnings_name_a_saturated_tool_missing_samples_and_an_interruption_is_a_problem():
    results = [admitted(0, "substation-1", 1.0, start=0, duration=60, capacity=100.0)]
    verdict = _verdict(results, (), cpu=1.9, stopped_by=INTERRUPT)
    assert any("95% of a CPU core" in w for w in verdict.warnings)
    assert any("no status sample" in w for w in verdict.warnings)
    assert verdict.problems == ("the run was interrupted (Ctrl-C): its figures cover only what happened before",)


def test_requests_still_open_at_the_time_limit_fail_the_run_and_are_not_called_an_interruption():
    results, samples = _three_admitted_and(unanswered(PLANNED, "r1", 0.5), unanswered(PLANNED, "r2", 0.6))
    data = _run(results, samples, stopped_by=TIME_LIMIT)
    assert (data.unanswered, data.interrupted) == (2, False)
    assert summarise(data.results, data.samples, [], data.timing).failed_by_status == {"unanswered": 2}
    # However many failures are allowed, requests the run gave up on fail it.
    verdict = _verdict(results, samples, stopped_by=TIME_LIMIT, max_error_rate=1)
    [problem] = verdict.problems
    assert problem.startswith("2 request(s) still unanswered at the time limit")
    assert "interrupted" not in problem and 'failure "unanswered"' in problem
    # The same records from a run that ended by itself: only the error rate judges them.
    assert _verdict(results, samples, max_error_rate=1).passed


def test_requests_cut_off_by_the_time_limit_are_a_warning_unless_the_user_interrupted():
    results = [admitted(0, "substation-1", 1.0, start=0, duration=60, capacity=100.0), not_sent(PLANNED, "r")]
    samples = [sample(0.1, ("substation-1", 1.0, 100.0))]
    assert any("raise --duration" in w for w in _verdict(results, samples, max_error_rate=1).warnings)
    interrupted = _verdict(results, samples, max_error_rate=1, stopped_by=INTERRUPT)
    assert not any("raise --duration" in w for w in interrupted.warnings)


def test_late_open_loop_starts_are_a_warning():
    late = classify_response(PlannedRequest(0, "ev", 1.0, 60.0, offset_seconds=1.0), "r", 1.5, 5.0, 201, {})
    assert any("500 ms late" in w for w in _verdict([late], open_loop=True, max_error_rate=1).warnings)
    assert not any("late" in w for w in _verdict([late], open_loop=False, max_error_rate=1).warnings)
