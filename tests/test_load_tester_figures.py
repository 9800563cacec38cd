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
    DerateRecord,
    RunData,
    RunTiming,
    SubstationSample,
    cancelled_at_time_limit,
    classify_response,
    not_sent,
    parse_sessions_sample,
    parse_status,
    transport_failure,
    unanswered,
)
from load_tester.scenarios import PlannedRequest
from load_tester.stats import percentile, summarise
from load_tester.verdict import Limits, judge
from load_tester.violations import Witnesses, find_violations, run_start_by_substation
from tests.load_tester_support import (
    BASE_EPOCH,
    admitted,
    audit,
    iso,
    sample,
    session_record,
    substation_sample,
)

NO_WITNESSES = Witnesses((), ())

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


# Capacity violations (the witnesses themselves: tests/test_load_tester_witnesses.py) ---------------------------


def test_violations_of_both_witnesses_are_counted_apart_and_together():
    records = audit([(0, 100.0)], session_record("A", [(0, 150.0), (10, 0.0)]), taken_at=20.0)
    samples = [substation_sample(0.5, [150.0], 100.0), substation_sample(1.0, [150.0], 100.0)]
    witnesses = find_violations([records], samples, run_start_by_substation(samples), BASE_EPOCH)
    summary = summarise([], [], witnesses, RunTiming(1.0, 0.1))
    assert (summary.history_violations, summary.sample_violations, summary.capacity_violations) == (1, 2, 3)
    assert (summary.history_instants_checked, summary.substation_samples) == (2, 2)
    assert summary.peak_load_percentage == pytest.approx(150.0)


# Statistics --------------------------------------------------------------------------------------------------------


def test_percentiles_interpolate_between_the_nearest_values():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 95) == pytest.approx(95.05)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0


def _run(results, samples=(), wall=2.0, cpu=0.5, stopped_by=None, **more):
    return RunData(tuple(results), tuple(samples), RunTiming(wall, cpu), iso(0), iso(2), stopped_by, 0, **more)


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
    # Strict: each session got its whole amount, so the balancer's load % is what the substations carry.
    summary = summarise(data.results, data.samples, NO_WITNESSES, data.timing, allocation_policy="strict")
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
    assert by_name["substation-1"].end_requested_percentage is None  # no sample of its own sessions
    assert by_name["substation-1"].peak_load_percentage == pytest.approx(30.0)
    assert by_name["substation-2"].peak_load_percentage == pytest.approx(20.0)
    # Under sharing the same balancer figures say nothing of balance: they are left out.
    shared = summarise(data.results, data.samples, NO_WITNESSES, data.timing, allocation_policy="fair_share")
    assert (shared.spread_end, shared.spread_peak) == (None, None)


def test_without_samples_the_peak_comes_from_the_admissions_and_there_is_no_spread():
    results = [admitted(0, "substation-1", 10.0, start=0, duration=60, capacity=200.0, load=50.0)]
    summary = summarise(results, [], NO_WITNESSES, RunTiming(1.0, 0.1))
    [substation] = summary.substations
    assert substation.peak_load_percentage == pytest.approx(25.0)
    assert substation.end_requested_percentage is None
    assert (summary.spread_end, summary.spread_peak) == (None, None)
    assert (summary.power_spread_end_kw, summary.power_spread_peak_kw) == (None, None)


def test_a_substations_sample_says_what_its_vehicles_ask_for_and_its_fair_share_level():
    body = {"substation": "substation-1", "taken_at": BASE_EPOCH, "limit_kw": 10.0, "sessions": [
        {"amount": 2.0, "allocated_kw": 2.0},     # asks less than the level: gets it all
        {"amount": 11.0, "allocated_kw": 4.0},    # curtailed to the level
        {"amount": 20.0, "allocated_kw": 4.0},
        {"amount": 7.0, "allocated_kw": 0.0, "state": "suspended"},
    ]}  # fmt: skip
    parsed = parse_sessions_sample(0.25, "substation-1", body)
    assert (parsed.allocated_kw, parsed.requested_kw, parsed.sessions) == (10.0, 40.0, 4)
    # A suspended vehicle is short of its amount too: it gets nothing.
    assert (parsed.fair_share_kw, parsed.largest_kw) == (0.0, 4.0)
    body["sessions"] = body["sessions"][:3]
    assert parse_sessions_sample(0.25, "substation-1", body).fair_share_kw == 4.0
    body["sessions"] = [{"amount": 3.0, "allocated_kw": 3.0}]
    assert parse_sessions_sample(0.25, "substation-1", body).fair_share_kw is None


def _shared(t: float, substation: str, limit: float, amounts: list[float]) -> SubstationSample:
    """A sample of a substation whose sessions get their amounts, or, when together they ask for more than
    its limit, an equal share of it (max-min fair when, as here, a crowd's vehicles ask for the same)."""
    level = limit / len(amounts) if sum(amounts) > limit else max(amounts)
    return substation_sample(t, [min(a, level) for a in amounts], limit, substation, amounts)


def test_a_perfectly_fair_sharing_run_reports_no_spread_of_power_per_vehicle():
    # 20, 30 and 40 vehicles on 60, 90 and 120 kW: every vehicle gets 3 kW wherever it charges, although
    # what they ask for is 333 %, 500 % and 267 % of the limits.
    fleets = {"substation-1": (60.0, [10.0] * 20), "substation-2": (90.0, [15.0] * 30),
              "substation-3": (120.0, [8.0] * 40)}  # fmt: skip
    own = [_shared(t, name, limit, amounts) for t in (0.5, 1.0, 1.5) for name, (limit, amounts) in fleets.items()]
    # The balancer's view as it was: each new session counted at its whole amount until its next poll.
    balancer = [sample(t, *((name, sum(amounts), limit) for name, (limit, amounts) in fleets.items()))
                for t in (0.5, 1.0, 1.5)]  # fmt: skip
    assert all(s.fair_share_kw == pytest.approx(3.0) for s in own)
    summary = summarise([], balancer, NO_WITNESSES, RunTiming(2.0, 0.1), substation_samples=own, end_t=0.9,
                        allocation_policy="fair_share")  # fmt: skip
    assert summary.power_spread_end_kw == pytest.approx(0.0, abs=1e-9)
    assert summary.power_spread_peak_kw == pytest.approx(0.0, abs=1e-9)
    # The load % spread of those requests (233 points) is not reported as balance.
    assert (summary.spread_end, summary.spread_peak) == (None, None)
    requested = {s.substation: s.end_requested_percentage for s in summary.substations}
    assert requested == {"substation-1": pytest.approx(1000 / 3), "substation-2": pytest.approx(500.0),
                         "substation-3": pytest.approx(800 / 3)}  # fmt: skip


def test_a_lopsided_sharing_run_reports_its_spread_of_power_per_vehicle_in_kw():
    # substation-1 shares 12 kW among 6 vehicles (2 kW each) while substation-2's 2 vehicles get their 10 kW.
    crowded = [_shared(t, "substation-1", 12.0, [10.0] * 6) for t in (0.5, 1.0)]
    roomy = [_shared(t, "substation-2", 100.0, [10.0, 6.0]) for t in (0.6, 1.1)]
    summary = summarise([], [], NO_WITNESSES, RunTiming(2.0, 0.1), substation_samples=crowded + roomy, end_t=0.55)
    assert summary.power_spread_end_kw == pytest.approx(8.0)
    assert summary.power_spread_peak_kw == pytest.approx(8.0)
    # Nobody short anywhere (the crowd has left): every vehicle gets what it asks, nothing to balance.
    quiet = [_shared(2.0, "substation-1", 12.0, [3.0]), _shared(2.0, "substation-2", 100.0, [10.0])]
    summary = summarise([], [], NO_WITNESSES, RunTiming(3.0, 0.1), substation_samples=quiet)
    assert (summary.power_spread_end_kw, summary.power_spread_peak_kw) == (0.0, 0.0)


# Verdict ---------------------------------------------------------------------------------------------------------


def _verdict(results, samples=(), cpu=0.5, stopped_by=None, open_loop=False, audits=(), substation_samples=(),
             derate=None, **limits):  # fmt: skip
    data = _run(results, samples, cpu=cpu, stopped_by=stopped_by, audits=tuple(audits),
                substation_samples=tuple(substation_samples), derate=derate, started_epoch=BASE_EPOCH)  # fmt: skip
    witnesses = find_violations(data.audits, data.substation_samples, None, data.started_epoch)
    summary = summarise(data.results, data.samples, witnesses, data.timing)
    return judge(summary, witnesses, data, Limits(**limits), open_loop)


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


def test_a_capacity_violation_of_either_witness_fails_the_run_whatever_the_error_rate():
    results = [admitted(0, "substation-1", 150.0, start=0, duration=60, capacity=100.0)]
    records = audit([(0, 100.0)], session_record("session-0", [(0, 150.0), (60, 0.0)]), taken_at=70.0)
    verdict = _verdict(results, audits=[records], max_error_rate=1.0)
    assert not verdict.passed
    [problem] = verdict.problems
    assert problem.startswith("1 capacity violation(s) in the sessions' allocation histories: substation-1 allocated "
                              "150.000 kW to 1 session(s) under a limit of 100.000 kW")  # fmt: skip
    many = [substation_sample(t / 10, [101.0], 100.0) for t in range(5)]
    [problem] = _verdict(results, audits=[audit([(0, 100.0)], taken_at=70.0)], substation_samples=many).problems
    assert problem.startswith("5 capacity violation(s) in the samples of the substations' sessions")
    assert "(and 2 more)" in problem and "The worst: 1.000 kW over at substation-1" in problem
    # The balancer's estimate between polls is no witness: its load above capacity is no violation.
    assert _verdict(results, [sample(0.1, ("substation-1", 150.0, 100.0))], audits=[audit([(0, 200.0)])]).passed


def test_a_derate_that_did_not_happen_or_was_not_undone_fails_the_run():
    results, samples = _three_admitted_and()
    never = DerateRecord("substation-1", 5.0, 5.0, error="the limit could not be lowered: HTTP 401")
    [problem] = _verdict(results, samples, derate=never).problems
    assert problem == "The derate did not happen: the limit could not be lowered: HTTP 401."
    stuck = DerateRecord("substation-1", 5.0, 5.0, 100.0, 50.0, 5.0, iso(5), error="the limit could NOT be restored")
    [problem] = _verdict(results, samples, derate=stuck).problems
    assert "lowered from 100.0 kW to 50.0 kW at t=5.0 s" in problem and "NOT restored" in problem
    done = DerateRecord("substation-1", 5.0, 5.0, 100.0, 50.0, 5.0, iso(5), 10.0, iso(10))
    assert _verdict(results, samples, derate=done).passed


def test_missing_witnesses_and_requests_left_in_the_queue_are_warnings():
    results, samples = _three_admitted_and()
    warnings = _verdict(results, samples).warnings
    assert any("no substation's allocation history could be read" in w for w in warnings)
    queued = classify_response(PLANNED, "q", 0.1, 5.0, 202, {"session_id": "q"}, "/sessions/q")
    left = cancelled_at_time_limit(queued, None, None, 30.0)
    warnings = _verdict([*results, left], samples, audits=[audit([(0, 100.0)])],
                        substation_samples=[substation_sample(0.0, [], 100.0)]).warnings  # fmt: skip
    assert any("1 request(s) were still waiting in the queue at the time limit" in w for w in warnings)
    assert not any("allocation history" in w for w in warnings)


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
    assert summarise(data.results, data.samples, NO_WITNESSES, data.timing).failed_by_status == {"unanswered": 2}
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
