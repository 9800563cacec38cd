"""The pure parts of the load tester's new figures: Jain's index, energy per vehicle, the two capacity
witnesses, queued answers, and reading the substations' records. Hand-made data, no network."""
from __future__ import annotations

from dataclasses import replace

import pytest

from load_tester.energy import attach_energy, energy_figures, jain_index, unfinished_sessions, vehicle_histories
from load_tester.records import (
    ADMITTED,
    FAILED,
    QUEUE_EXPIRED,
    QUEUED,
    REJECTED,
    STILL_QUEUED,
    cancelled_at_time_limit,
    classify_response,
    follow_queued,
    not_sent,
    parse_audit,
    parse_sessions_sample,
)
from load_tester.scenarios import PlannedRequest
from load_tester.violations import (
    HISTORY,
    SAMPLES,
    check_samples,
    find_violations,
    run_start_by_substation,
    sweep_history,
)
from tests.load_tester_support import (
    BASE_EPOCH,
    admitted,
    audit,
    iso,
    session_record,
    substation_sample,
)

PLANNED = PlannedRequest(index=2, vehicle_id="ev-1-00003", amount_kw=10.0, duration_seconds=360.0, offset_seconds=0.0)


# Jain's fairness index ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 100])
def test_jain_is_one_when_everyone_gets_the_same_and_one_over_n_when_one_takes_all(n):
    assert jain_index([3.7] * n) == pytest.approx(1.0, abs=1e-12)
    assert jain_index([42.0] + [0.0] * (n - 1)) == pytest.approx(1.0 / n, abs=1e-12)


def test_jain_of_known_values_and_of_nothing():
    # (1 + 2 + 3)^2 / (3 * (1 + 4 + 9)) = 36 / 42
    assert jain_index([1.0, 2.0, 3.0]) == pytest.approx(36 / 42)
    assert jain_index([]) is None
    assert jain_index([0.0, 0.0]) is None  # nobody got anything: no share to compare


# Energy per vehicle ------------------------------------------------------------------------------------------------


def test_energy_figures_count_served_vehicles_delivered_energy_fairness_and_shares():
    # Requested: amount x duration = 10 kW x 0.1 h = 1 kWh each.
    results = [
        admitted(0, "substation-1", 10.0, start=0, duration=360, capacity=100.0, energy_kwh=1.0),
        admitted(1, "substation-1", 10.0, start=0, duration=360, capacity=100.0, energy_kwh=0.5),
        admitted(2, "substation-2", 10.0, start=0, duration=360, capacity=100.0, energy_kwh=0.5),
        admitted(3, "substation-2", 10.0, start=0, duration=360, capacity=100.0),  # energy unknown
        classify_response(PLANNED, "r", 0.0, 5.0, 503, {"error": "no_capacity"}),
    ]
    figures = energy_figures(results)
    assert (figures.vehicles_requested, figures.vehicles_served, figures.vehicles_energy_unknown) == (5, 4, 1)
    assert figures.energy_requested_kwh == pytest.approx(5.0)
    assert figures.energy_delivered_kwh == pytest.approx(2.0)
    assert figures.energy_delivered_ratio == pytest.approx(0.4)
    assert figures.jain_index_served == pytest.approx(4.0 / (3 * 1.5))
    # Over all requested the unserved one counts as 0; the unknown one is left out.
    assert figures.jain_index_all == pytest.approx(4.0 / (4 * 1.5))
    shares = figures.share_of_request
    assert (shares.min, shares.p50) == (pytest.approx(0.5), pytest.approx(0.5))
    assert shares.p95 == pytest.approx(0.95)
    assert (figures.queued, figures.queue_wait_p50_seconds) == (0, None)


def test_energies_come_from_the_substations_records_matched_by_session_id():
    results = [
        admitted(0, "substation-1", 10.0, start=0, duration=10, capacity=100.0),
        admitted(1, "substation-2", 10.0, start=0, duration=10, capacity=100.0),
        not_sent(PLANNED, "r"),
    ]
    audits = [
        audit([(0, 100.0)], session_record("session-0", [(0, 10.0), (10, 0.0)], energy=0.0278)),
        audit([(0, 100.0)], session_record("session-1", [(0, 5.0)], energy=0.01, ended=False),
              substation="substation-2"),
    ]  # fmt: skip
    attached = attach_energy(results, audits)
    assert [(r.energy_kwh, r.energy_source) for r in attached] == [
        (0.0278, "substation"), (0.01, "substation"), (None, None)
    ]
    assert unfinished_sessions(attached, audits) == 1
    histories = vehicle_histories(attached, audits, BASE_EPOCH)
    assert histories == {0: [(0.0, 10.0), (10.0, 0.0)], 1: [(0.0, 5.0)]}


def test_a_hedged_sessions_energy_comes_from_where_its_client_was_told_not_from_the_stopped_copy():
    results = [admitted(0, "substation-1", 10.0, start=0, duration=10, capacity=100.0)]
    audits = [
        audit([(0, 100.0)], session_record("session-0", [(0, 10.0), (10, 0.0)], energy=0.0278)),
        # The copy the balancer did not use: admitted a moment earlier elsewhere, stopped at once.
        audit([(0, 100.0)], session_record("session-0", [(0, 10.0), (0.1, 0.0)], energy=0.0003,
                                           substation="substation-2"), substation="substation-2"),
    ]  # fmt: skip
    for order in (audits, audits[::-1]):
        attached = attach_energy(results, order)
        assert [(r.energy_kwh, r.energy_source) for r in attached] == [(0.0278, "substation")]
        assert vehicle_histories(attached, order, BASE_EPOCH) == {0: [(0.0, 10.0), (10.0, 0.0)]}
        assert unfinished_sessions(attached, order) == 0


def test_queue_waits_are_over_the_requests_that_waited_and_started():
    queued = classify_response(PLANNED, "r", 0.0, 5.0, 202, {"session_id": "q1", "position": 3}, "/sessions/q1")
    started = [
        follow_queued(queued, 200, {"state": "charging", "session_id": "q1", "queue_wait_seconds": wait}, 99.0)
        for wait in (1.0, 2.0, 3.0, 4.0)
    ]
    figures = energy_figures([*started, admitted(0, "substation-1", 5.0, start=0, duration=10, capacity=10.0)])
    assert figures.queued == 4
    assert figures.queue_wait_p50_seconds == pytest.approx(2.5)
    assert figures.queue_wait_p95_seconds == pytest.approx(3.85)


# Queued answers -------------------------------------------------------------------------------------------------


def test_a_202_is_queued_with_its_location_and_position():
    body = {"session_id": "q1", "state": "queued", "position": 4, "vehicle_id": "ev-1-00003", "amount": 10.0}
    result = classify_response(PLANNED, "rid", 0.1, 4.0, 202, body, "/sessions/q1")
    assert (result.outcome, result.location, result.queue_position, result.session_id) == (
        QUEUED, "/sessions/q1", 4, "q1"
    )
    assert result.queued and not result.served
    # Without a Location header the session id still says where to look; without either it cannot be followed.
    assert classify_response(PLANNED, "rid", 0.1, 4.0, 202, body).location == "/sessions/q1"
    lost = classify_response(PLANNED, "rid", 0.1, 4.0, 202, {"state": "queued"})
    assert (lost.outcome, lost.failure) == (FAILED, "202")


def test_queue_full_is_a_capacity_rejection():
    result = classify_response(PLANNED, "rid", 0.1, 4.0, 503, {"error": "queue_full", "message": "full"})
    assert (result.outcome, result.failure) == (REJECTED, None)


def test_a_queued_request_is_followed_until_it_starts_expires_or_is_lost():
    queued = classify_response(PLANNED, "rid", 0.1, 4.0, 202, {"session_id": "q1", "position": 1}, "/sessions/q1")
    assert follow_queued(queued, 200, {"state": "queued", "position": 1}, 1.0) is None
    assert follow_queued(queued, 502, {"error": "load_balancer_unavailable"}, 1.0) is None  # read again later
    body = {
        "session_id": "q1", "state": "charging", "substation": "substation-2", "started_at": iso(3),
        "ends_at": iso(363), "allocated_kw": 7.5, "queue_wait_seconds": 2.75,
    }  # fmt: skip
    started = follow_queued(queued, 200, body, 3.1)
    assert (started.outcome, started.state, started.substation, started.queue_wait_seconds) == (
        ADMITTED, "charging", "substation-2", 2.75
    )
    assert (started.status, started.allocated_kw, started.ends_at) == (202, 7.5, iso(363))
    # Without the charge API's figure, the time from the 202 to the answer that saw it start.
    assert follow_queued(queued, 200, {**body, "queue_wait_seconds": None}, 3.1).queue_wait_seconds == 3.1
    expired = follow_queued(queued, 200, {"state": "expired"}, 300.0)
    assert (expired.outcome, expired.error, expired.served) == (REJECTED, QUEUE_EXPIRED, False)
    cancelled = follow_queued(queued, 200, {"state": "cancelled"}, 5.0)
    assert (cancelled.outcome, cancelled.failure) == (FAILED, "cancelled")
    lost = follow_queued(queued, 404, {"error": "session_not_found"}, 5.0)
    assert (lost.outcome, lost.failure) == (FAILED, "lost_in_queue")
    refused = follow_queued(queued, 401, {"error": "unauthorized"}, 5.0)
    assert (refused.outcome, refused.failure) == (FAILED, "401")


def test_the_session_token_is_kept_to_follow_the_session_but_never_written_out():
    body = {"session_id": "q1", "state": "queued", "position": 1, "session_token": "secret-token"}
    queued = classify_response(PLANNED, "rid", 0.1, 4.0, 202, body, "/sessions/q1")
    assert queued.session_token == "secret-token"
    started = follow_queued(queued, 200, {"session_id": "q1", "state": "charging"}, 1.0)
    assert started.session_token == "secret-token"
    assert "secret-token" not in repr(started) and "session_token" not in started.as_json()
    admitted_201 = classify_response(PLANNED, "rid", 0.1, 4.0, 201, {"session_id": "s1", "session_token": "t2"})
    assert admitted_201.session_token == "t2" and "t2" not in str(admitted_201.as_json())


def test_a_request_still_queued_at_the_time_limit_is_rejected_unless_it_had_just_started():
    queued = classify_response(PLANNED, "rid", 0.1, 4.0, 202, {"session_id": "q1"}, "/sessions/q1")
    gave_up = cancelled_at_time_limit(queued, 200, {"session_id": "q1", "state": "cancelled"}, 30.0)
    assert (gave_up.outcome, gave_up.error) == (REJECTED, STILL_QUEUED)
    assert cancelled_at_time_limit(queued, None, None, 30.0).error == STILL_QUEUED
    just_started = cancelled_at_time_limit(queued, 200, {"session_id": "q1", "state": "ended"}, 30.0)
    assert just_started.served
    refused = cancelled_at_time_limit(queued, 403, {"error": "forbidden"}, 30.0)
    assert (refused.outcome, refused.failure) == (FAILED, "403")


# The history witness ----------------------------------------------------------------------------------------------


def test_a_valid_history_has_no_violation_even_with_changes_at_one_instant_and_limit_cuts():
    # 100 kW; A gets 60, B joins at t=2 and both get 50; at t=5 the limit falls to 40 and both are cut
    # to 20 at that same instant; at t=8 A ends and B gets 40; the limit comes back at t=9, B gets 50.
    records = audit(
        [(0, 100.0), (5, 40.0), (9, 100.0)],
        session_record("A", [(0, 60.0), (2, 50.0), (5, 20.0), (8, 0.0)]),
        session_record("B", [(2, 50.0), (5, 20.0), (8, 40.0), (9, 50.0), (12, 0.0)]),
        taken_at=20.0,
    )
    check = sweep_history(records, since=BASE_EPOCH, run_start=BASE_EPOCH)
    assert check.violations == ()
    assert check.instants == 6  # t = 0, 2, 5, 8, 9, 12
    assert check.peak_load_percentage == pytest.approx(100.0)


def test_the_sweep_finds_a_planted_violation_at_the_right_instant():
    # B joins at t=3 with 50 while A keeps 60: 110 kW of 100 from t=3 until A is cut at t=4.
    records = audit(
        [(0, 100.0)],
        session_record("A", [(0, 60.0), (4, 50.0), (10, 0.0)]),
        session_record("B", [(3, 50.0), (10, 0.0)]),
    )
    [violation] = sweep_history(records, since=BASE_EPOCH, run_start=BASE_EPOCH).violations
    assert (violation.source, violation.substation, violation.at, violation.t) == (HISTORY, "substation-1", iso(3), 3.0)
    assert (violation.load_kw, violation.capacity_kw, violation.sessions) == (110.0, 100.0, 2)
    assert violation.excess_kw == pytest.approx(10.0)
    assert "110.000 kW to 2 session(s) under a limit of 100.000 kW" in violation.describe()


def test_a_limit_cut_whose_allocations_follow_later_is_a_violation_until_they_do():
    # The limit falls to 50 at t=5, but A's allocation only drops at t=6: over for one second.
    records = audit([(0, 100.0), (5, 50.0)], session_record("A", [(0, 80.0), (6, 50.0), (10, 0.0)]))
    [violation] = sweep_history(records, since=BASE_EPOCH).violations
    assert (violation.at, violation.load_kw, violation.capacity_kw) == (iso(5), 80.0, 50.0)


def test_a_cut_and_its_reallocation_at_the_same_instant_are_applied_together_whatever_their_order():
    # The same timestamp for the limit's fall and both allocations' fall, given in every order.
    for order in ((("A", "B"), True), (("B", "A"), False)):
        names, limit_first = order
        sessions = {
            "A": session_record("A", [(0, 50.0), (5, 25.0), (10, 0.0)]),
            "B": session_record("B", [(0, 50.0), (5, 25.0), (10, 0.0)]),
        }
        records = audit([(0, 100.0), (5, 50.0)] if limit_first else [(5, 50.0), (0, 100.0)],
                        *(sessions[name] for name in names))  # fmt: skip
        assert sweep_history(records, since=BASE_EPOCH).violations == ()


def test_the_sweep_judges_only_the_run_and_only_up_to_the_audit():
    # Over the limit at t=1 (before the run, which starts at t=2) and at t=30 (after the sessions were read).
    records = audit(
        [(0, 10.0), (30, 1.0)],
        session_record("old", [(0, 20.0), (1.5, 0.0)]),
        session_record("new", [(2, 10.0), (40, 0.0)], ended=False),
        taken_at=20.0,
    )
    assert sweep_history(records, since=BASE_EPOCH + 2.0).violations == ()
    # The state the run starts in is judged at its start, even with no change then.
    records = audit([(0, 10.0)], session_record("long", [(0, 20.0), (50, 0.0)], ended=False), taken_at=20.0)
    [violation] = sweep_history(records, since=BASE_EPOCH + 2.0, run_start=BASE_EPOCH + 2.0).violations
    assert (violation.at, violation.t) == (iso(2), 0.0)


def test_instants_before_the_limit_is_known_are_not_judged():
    records = audit([(5, 10.0)], session_record("A", [(0, 50.0), (4, 10.0), (10, 0.0)]))
    check = sweep_history(records, since=BASE_EPOCH)
    assert check.violations == () and check.instants == 2  # t=5 (the limit known from then) and t=10


def test_a_substation_whose_records_could_not_be_read_is_not_judged():
    records = audit([(0, 10.0)], session_record("A", [(0, 50.0)]))
    check = sweep_history(replace(records, taken_at=None))
    assert (check.instants, check.violations) == (0, ())


# The sample witness ------------------------------------------------------------------------------------------------


def test_samples_above_the_limit_are_violations_within_a_tolerance_per_session():
    samples = [
        substation_sample(0.05, [40.0, 60.0], 100.0),  # exactly full
        substation_sample(0.10, [40.0, 60.0 + 1.5e-6], 100.0),  # rounding of two sessions: within 2e-6
        substation_sample(0.15, [40.0, 60.0 + 3e-6], 100.0),  # 3e-6 over: a violation
        substation_sample(0.20, [30.0, 30.0], 50.0, substation="substation-2"),
        substation_sample(0.25, [], 0.0, substation="substation-2"),  # limit 0, nothing allocated
    ]
    checks = {c.substation: c for c in check_samples(samples)}
    [violation] = checks["substation-1"].violations
    assert (violation.source, violation.t, violation.sessions) == (SAMPLES, 0.15, 2)
    assert violation.load_kw == pytest.approx(100.000003)
    [over] = checks["substation-2"].violations
    assert (over.load_kw, over.capacity_kw, over.at) == (60.0, 50.0, iso(0.2))
    assert (checks["substation-1"].samples, checks["substation-2"].samples) == (3, 2)
    assert checks["substation-2"].peak_load_percentage == pytest.approx(120.0)


def test_both_witnesses_together_and_the_peak_load_from_either():
    records = audit([(0, 100.0)], session_record("A", [(0, 90.0), (10, 0.0)]), taken_at=20.0)
    samples = [substation_sample(0.0, [], 100.0), substation_sample(1.0, [95.0], 100.0)]
    witnesses = find_violations([records], samples, run_start_by_substation(samples), BASE_EPOCH)
    assert witnesses.violations == ()
    assert witnesses.peak_load_percentage("substation-1") == pytest.approx(95.0)
    assert witnesses.peak_load_percentage("substation-9") is None
    # The first sample tells when the run started by the substation's clock.
    assert run_start_by_substation(samples) == {"substation-1": BASE_EPOCH}


# Reading the substations' answers ----------------------------------------------------------------------------------


def test_a_sessions_sample_adds_the_allocations_up_itself():
    body = {
        "substation": "substation-1", "taken_at": 1000.5, "limit_kw": 20.0, "limit_source": "operator",
        "load": 1.0,  # the substation's own total is not what the witness uses
        "sessions": [{"session_id": "a", "allocated_kw": 8.5}, {"session_id": "b", "allocated_kw": 12.0}],
    }  # fmt: skip
    sample = parse_sessions_sample(0.1234, "substation-1", body)
    assert (sample.t, sample.taken_at, sample.limit_kw, sample.allocated_kw, sample.sessions) == (
        0.123, 1000.5, 20.0, 20.5, 2
    )
    assert parse_sessions_sample(0.1, "substation-1", {"sessions": []}) is None
    assert parse_sessions_sample(0.1, "s", {**body, "sessions": [{"allocated_kw": None}]}) is None


def test_an_audit_reads_sessions_with_histories_and_the_limits_history():
    sessions_body = {
        "substation": "substation-1", "taken_at": BASE_EPOCH + 20, "limit_kw": 10.0,
        "sessions": [
            {"session_id": "a", "vehicle_id": "ev-a", "amount": 7.0, "state": "ended", "energy_kwh": 0.004,
             "started_at": iso(0), "ends_at": iso(2), "ended_at": iso(2),
             "history": [[BASE_EPOCH, 7.0], [BASE_EPOCH + 1, 3.0], [BASE_EPOCH + 2, 0.0]]},
            {"session_id": "broken", "amount": 7.0},
        ],
    }  # fmt: skip
    limit_body = {"limit_kw": 3.0, "history": [[BASE_EPOCH + 1, 3.0, "operator"], [BASE_EPOCH - 5, 10.0, "substation"]]}
    records = parse_audit("substation-1", "http://s1", sessions_body, limit_body)
    assert records.error is None and records.unreadable_sessions == 1
    assert records.limit_history == ((BASE_EPOCH - 5, 10.0), (BASE_EPOCH + 1, 3.0))
    [session] = records.sessions
    assert (session.session_id, session.ended, session.energy_kwh, session.started_at) == ("a", True, 0.004, BASE_EPOCH)
    assert session.history[-1] == (BASE_EPOCH + 2, 0.0)
    assert sweep_history(records).violations == ()
    assert parse_audit("substation-1", "http://s1", {"sessions": []}, limit_body).error is not None
