"""Unit tests of the balancer's view of the grid (no web framework, no processes)."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from load_balancer.policies import LeastLoaded
from load_balancer.view import GridView, Observation, SubstationConflict

URL_A = "http://127.0.0.1:7001"
URL_B = "http://127.0.0.1:7002"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def observed(version: int, load: float = 0.0, capacity: float = 100.0, chargers: int = 0) -> Observation:
    return Observation(
        state_version=version,
        load_kw=load,
        capacity_kw=capacity,
        total_capacity_kw=capacity,
        active_chargers=chargers,
    )


def polled_view(*loads: float, failure_threshold: int = 1, clock: FakeClock | None = None) -> GridView:
    """A view with one polled, healthy substation per load: a at URL_A, b at URL_B, ..."""
    view = GridView(failure_threshold=failure_threshold, clock=clock or FakeClock())
    for index, load in enumerate(loads):
        view.add_polled(f"http://127.0.0.1:{7001 + index}", "abcdefg"[index], observed(1, load))
    return view


def poll(view: GridView, url: str, substation_id: str, observation: Observation) -> bool:
    marker = dict(view.poll_targets())[url]
    return view.record_poll(url, substation_id, observation, marker)


# Reservations ---------------------------------------------------------------


def test_choosing_reserves_the_amount_on_the_first_candidate() -> None:
    view = polled_view(0.0, 0.0)
    candidates = view.choose(30.0, LeastLoaded())
    assert [c.substation_id for c in candidates] == ["a", "b"]
    a, b = view.snapshots()
    assert (a.reserved_kw, a.in_flight) == (30.0, 1)
    assert (b.reserved_kw, b.in_flight) == (0.0, 0)


def test_a_second_choice_sees_the_first_reservation_and_goes_elsewhere() -> None:
    view = polled_view(0.0, 0.0)
    first = view.choose(30.0, LeastLoaded())[0]
    second = view.choose(30.0, LeastLoaded())[0]
    assert (first.substation_id, second.substation_id) == ("a", "b")


def test_reservations_count_against_capacity() -> None:
    view = polled_view(50.0)
    assert view.choose(40.0, LeastLoaded())
    assert view.choose(20.0, LeastLoaded()) == []  # 50 + 40 reserved + 20 > 100
    assert view.choose(10.0, LeastLoaded())  # exactly full still fits


def test_concurrent_choices_never_reserve_beyond_capacity() -> None:
    view = polled_view(0.0, 0.0, 0.0)
    barrier = threading.Barrier(30)

    def choose_one(_: int) -> str | None:
        barrier.wait()
        candidates = view.choose(10.0, LeastLoaded())
        return candidates[0].substation_id if candidates else None

    with ThreadPoolExecutor(30) as pool:
        chosen = list(pool.map(choose_one, range(30)))
    assert sorted(chosen.count(name) for name in "abc") == [10, 10, 10]
    assert all(s.reserved_kw == pytest.approx(100.0) for s in view.snapshots())


def test_release_applies_the_answer_and_drops_the_reservation() -> None:
    view = polled_view(0.0)
    view.choose(30.0, LeastLoaded())
    view.release(URL_A, 30.0, Observation(state_version=2, load_kw=30.0, capacity_kw=100.0))
    (a,) = view.snapshots()
    assert (a.load_kw, a.reserved_kw, a.in_flight, a.state_version) == (30.0, 0.0, 0, 2)
    assert a.total_capacity_kw == 100.0, "an answer without total_capacity keeps the known one"


def test_answers_out_of_order_never_count_an_admission_twice() -> None:
    view = polled_view(0.0)  # one substation, observed empty at version 1
    assert view.reserve(URL_A, 10.0) and view.reserve(URL_A, 10.0)  # requests r1 and r2 on their way
    # The substation admits r1 (version 2) then r2 (version 3), but r2's answer arrives first.
    # Its load (20) includes r1, which is still reserved: adding r2's 10 kW keeps the sum exact.
    view.release(URL_A, 10.0, observed(3, 20.0, chargers=2), admitted=True)
    assert view.snapshots()[0].committed_kw == 20.0
    view.release(URL_A, 10.0, observed(2, 10.0, chargers=1), admitted=True)
    (a,) = view.snapshots()
    assert (a.load_kw, a.reserved_kw, a.committed_kw) == (20.0, 0.0, 20.0)
    assert a.active_chargers == 2


def test_an_observation_older_than_an_admission_keeps_that_admission() -> None:
    view = polled_view(0.0)
    assert view.reserve(URL_A, 10.0) and view.reserve(URL_A, 30.0)
    view.release(URL_A, 30.0, observed(5, 30.0, chargers=1), admitted=True)
    # A poll taken at version 4 (before that admission, after a session of 5 kW started elsewhere).
    poll(view, URL_A, "a", observed(4, 5.0, chargers=1))
    (a,) = view.snapshots()
    assert (a.load_kw, a.active_chargers, a.state_version) == (35.0, 2, 4)
    # A poll at version 5 or later includes it.
    poll(view, URL_A, "a", observed(6, 35.0, chargers=2))
    assert view.snapshots()[0].load_kw == 35.0


def test_release_without_answer_only_drops_the_reservation() -> None:
    view = polled_view(20.0)
    view.choose(30.0, LeastLoaded())
    view.release(URL_A, 30.0)
    (a,) = view.snapshots()
    assert (a.load_kw, a.reserved_kw, a.in_flight) == (20.0, 0.0, 0)


def test_reserve_on_a_later_candidate_checks_that_it_still_fits() -> None:
    view = polled_view(0.0)
    assert view.reserve(URL_A, 60.0)
    assert not view.reserve(URL_A, 60.0)
    assert view.reserve(URL_A, 40.0)


# Version ordering -----------------------------------------------------------


def test_an_older_answer_does_not_overwrite_a_newer_one() -> None:
    view = polled_view(0.0)
    view.observe(URL_A, Observation(state_version=5, load_kw=50.0, capacity_kw=100.0))
    view.observe(URL_A, Observation(state_version=4, load_kw=40.0, capacity_kw=100.0))
    assert view.snapshots()[0].load_kw == 50.0


def test_a_poll_that_returns_after_a_newer_answer_is_ignored() -> None:
    view = polled_view(0.0)
    marker = dict(view.poll_targets())[URL_A]  # poll sent ...
    view.observe(URL_A, Observation(state_version=7, load_kw=70.0, capacity_kw=100.0))  # ... answer arrives ...
    view.record_poll(URL_A, "a", observed(6, 60.0), marker)  # ... then the poll's older reading
    (a,) = view.snapshots()
    assert (a.load_kw, a.state_version) == (70.0, 7)
    assert a.up


def test_a_newer_poll_replaces_the_stored_observation() -> None:
    view = polled_view(0.0)
    view.observe(URL_A, Observation(state_version=3, load_kw=30.0, capacity_kw=100.0))
    poll(view, URL_A, "a", observed(9, 10.0, chargers=1))
    (a,) = view.snapshots()
    assert (a.load_kw, a.state_version, a.active_chargers) == (10.0, 9, 1)


def test_a_lower_version_with_no_answer_in_between_means_a_restart() -> None:
    view = polled_view(0.0)
    view.observe(URL_A, Observation(state_version=40, load_kw=80.0, capacity_kw=100.0))
    poll(view, URL_A, "a", observed(0, 0.0))
    (a,) = view.snapshots()
    assert (a.load_kw, a.state_version) == (0.0, 0)


# Health -----------------------------------------------------------------------


def test_a_new_url_is_not_routable_until_polled() -> None:
    view = GridView(clock=FakeClock())
    view.add_url(URL_A)
    (entry,) = view.snapshots()
    assert entry.substation_id is None and not entry.up
    with pytest.raises(LookupError, match=URL_A):
        entry.polled_id  # noqa: B018 - the property raises
    assert view.choose(1.0, LeastLoaded()) == []
    assert poll(view, URL_A, "a", observed(1)), "the first successful poll brings it up"
    assert [c.polled_id for c in view.choose(1.0, LeastLoaded())] == ["a"]


def test_one_failure_marks_a_substation_down_by_default() -> None:
    view = polled_view(0.0, 0.0)
    assert view.record_failure(URL_A, "connection refused")
    a, b = view.snapshots()
    assert not a.up and a.last_error == "connection refused" and a.consecutive_failures == 1
    assert [c.substation_id for c in view.choose(10.0, LeastLoaded())] == ["b"]


def test_the_failure_threshold_is_respected() -> None:
    view = polled_view(0.0, failure_threshold=3)
    assert not view.record_failure(URL_A, "timeout")
    assert not view.record_failure(URL_A, "timeout")
    assert view.snapshots()[0].up
    assert view.record_failure(URL_A, "timeout")
    assert not view.snapshots()[0].up
    assert not view.record_failure(URL_A, "timeout"), "only the failure that marks it down reports it"


def test_a_successful_poll_brings_a_down_substation_back() -> None:
    clock = FakeClock()
    view = polled_view(0.0, clock=clock)
    view.record_failure(URL_A, "connection refused")
    clock.now += 5
    assert poll(view, URL_A, "a", observed(2, 10.0))
    (a,) = view.snapshots()
    assert a.up and a.consecutive_failures == 0 and a.last_error is None
    assert a.last_poll_at == clock.now


def test_answers_do_not_bring_a_down_substation_back() -> None:
    view = polled_view(0.0)
    view.record_failure(URL_A, "timeout")
    view.observe(URL_A, Observation(state_version=9, load_kw=0.0, capacity_kw=100.0))
    assert not view.snapshots()[0].up


# Registry -----------------------------------------------------------------------


def test_an_id_can_belong_to_one_url_only() -> None:
    view = polled_view(0.0)
    with pytest.raises(SubstationConflict, match="already has"):
        view.add_polled(URL_B, "a", observed(1))
    assert [s.url for s in view.snapshots()] == [URL_A], "the clashing URL is not kept"


def test_a_url_that_starts_reporting_another_id_is_a_conflict() -> None:
    view = polled_view(0.0)
    with pytest.raises(SubstationConflict, match="now reports id 'z'"):
        poll(view, URL_A, "z", observed(2))


def test_registering_a_known_url_again_is_not_a_new_entry() -> None:
    view = polled_view(10.0)
    entry, created = view.add_polled(URL_A, "a", observed(3, 20.0))
    assert not created and entry.load_kw == 20.0
    assert len(view.snapshots()) == 1


def test_removing_forgets_the_substation_and_late_polls_are_ignored() -> None:
    view = polled_view(0.0)
    marker = dict(view.poll_targets())[URL_A]
    removed = view.remove("a")
    assert removed is not None and removed.url == URL_A
    assert view.remove("a") is None
    assert not view.record_poll(URL_A, "a", observed(2), marker)
    assert view.snapshots() == []


def test_status_entry_reports_reservations_and_poll_age() -> None:
    clock = FakeClock()
    view = polled_view(25.0, clock=clock)
    view.choose(10.0, LeastLoaded())
    clock.now += 2.5
    entry = view.snapshots()[0].as_status(clock.now)
    assert entry == {
        "id": "a",
        "url": URL_A,
        "up": True,
        "load": 25.0,
        "capacity": 100.0,
        "total_capacity": 100.0,
        "load_percentage": 25.0,
        "available": 75.0,
        "active_chargers": 0,
        "reserved_kw": 10.0,
        "minimum_load": None,
        "suspended": 0,
        "curtailed": 0,
        "fair_share_kw": None,
        "in_flight": 1,
        "state_version": 1,
        "last_poll_age_seconds": 2.5,
        "consecutive_failures": 0,
        "last_error": None,
        "ejected_for_seconds": None,
        "ejections": 0,
    }
