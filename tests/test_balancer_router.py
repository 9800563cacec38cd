"""Unit tests of the router's time limit, its refusals and its lost-session sweeps, on a fake clock.

The substations here take requests in and never answer, as frozen ones do; their
stand-in only moves the fake clock on by each call's read timeout. The same
behaviour against real frozen processes is in tests/test_balancer_integration.py.
Others answer as scripted (409 full, connection refused), to check the reason a
refusal gives; tests/test_refusals.py drives each case through real processes.
"""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import requests

from gridcommon.httpclient import HttpClient, HttpResponse, NotSent
from gridcommon.validation import ChargeRequest
from load_balancer.lost_answers import LostAnswers
from load_balancer.policies import make_policy
from load_balancer.router import (
    FULL,
    NO_TIME,
    TOO_SLOW,
    UNREACHABLE,
    NoCapacity,
    Router,
    TooLarge,
    fits_nowhere,
    free_kw,
    refusal_reason,
)
from load_balancer.view import GridView, Observation, SubstationSnapshot
from tests.substation_support import FakeClock

CONNECT_TIMEOUT = 1.0
FORWARD_TIMEOUT = 5.0
REFRESH_SECONDS = 3.5
ROUTE_DEADLINE = 8.0


def url_of(number: int) -> str:
    return f"http://127.0.0.1:{7000 + number}"


class SilentSubstations(HttpClient):
    """Every call waits out its read timeout (on the fake clock) and times out.

    ``hold`` makes calls wait for it first, to keep a call under way while a test looks.
    """

    def __init__(self, clock: FakeClock, forward_timeout: float) -> None:
        super().__init__("test", timeout=(CONNECT_TIMEOUT, forward_timeout))
        self.clock = clock
        self.calls: list[tuple[str, str, float]] = []
        self.hold: threading.Event | None = None
        self.call_started = threading.Event()

    def send(self, method: str, url: str, **kwargs: Any) -> Any:
        _, read_timeout = kwargs.get("timeout") or self.timeout
        self.calls.append((method, url, read_timeout))
        self.call_started.set()
        return SilentExchange(self, url, read_timeout)

    def request(self, method: str, url: str, *, resend_if_broken: bool | None = None, **kwargs: Any) -> Any:
        return self.send(method, url, **kwargs).finish()


class SilentExchange:
    """A forward on its way whose answer never comes: reading it waits out the timeout on the fake clock."""

    def __init__(self, client: SilentSubstations, url: str, read_timeout: float) -> None:
        self.client, self.url, self.read_timeout = client, url, read_timeout

    def ready(self, seconds: float) -> bool:
        return True  # read at once: finish() plays the wait on the fake clock

    def finish(self) -> Any:
        if self.client.hold is not None:
            assert self.client.hold.wait(timeout=5)
        self.client.clock.advance(self.read_timeout)
        raise requests.ReadTimeout(f"{self.url} did not answer within {self.read_timeout:g} s")


class ScriptedSubstations(HttpClient):
    """Each substation answers at once as its script says: an ``(status, body)`` answer or an exception."""

    def __init__(self, script: dict[str, tuple[int, dict[str, Any]] | Exception]) -> None:
        super().__init__("test", timeout=(CONNECT_TIMEOUT, FORWARD_TIMEOUT))
        self.script = script
        self.calls: list[tuple[str, str, float]] = []

    def send(self, method: str, url: str, **kwargs: Any) -> Any:
        _, read_timeout = kwargs.get("timeout") or self.timeout
        self.calls.append((method, url, read_timeout))
        answer = self.script[url.rsplit("/charge", 1)[0]]
        if isinstance(answer, NotSent):
            raise answer
        return ScriptedExchange(url, answer)

    def request(self, method: str, url: str, *, resend_if_broken: bool | None = None, **kwargs: Any) -> Any:
        return self.send(method, url, **kwargs).finish()


class ScriptedExchange:
    def __init__(self, url: str, answer: tuple[int, dict[str, Any]] | Exception) -> None:
        self.url, self.answer = url, answer

    def ready(self, seconds: float) -> bool:
        return True

    def finish(self) -> Any:
        if isinstance(self.answer, Exception):
            raise self.answer
        status, body = self.answer
        return HttpResponse(status, {}, json.dumps(body).encode(), self.url)


def full_answer(load_kw: float, capacity_kw: float = 100.0, version: int = 2) -> tuple[int, dict[str, Any]]:
    """A substation's 409: no room, with the state it reports."""
    return 409, {"error": "capacity_exceeded", "message": "full", "state_version": version, "load": load_kw,
                 "capacity": capacity_kw, "retry_after_seconds": 3}


@dataclass
class Rig:
    router: Router
    client: SilentSubstations
    lost: LostAnswers
    clock: FakeClock
    view: GridView
    refreshed_at: list[float] = field(default_factory=list)


def rig(
    substations: int,
    forward_timeout: float = FORWARD_TIMEOUT,
    client: HttpClient | None = None,
    load_kw: float = 0.0,
    refresh_hold: threading.Event | None = None,
) -> Rig:
    """A router over ``substations`` polled substations of 100 kW carrying ``load_kw``, silent unless ``client``.

    The refresh takes REFRESH_SECONDS on the fake clock; with ``refresh_hold`` it also waits for
    that event in real time, as a poll round that does not end does.
    """
    clock = FakeClock()
    view = GridView(clock=clock)
    for number in range(1, substations + 1):
        view.add_polled(url_of(number), f"substation-{number}", Observation(1, load_kw=load_kw, capacity_kw=100.0))
    client = client or SilentSubstations(clock, forward_timeout)
    lost = LostAnswers(clock=clock)
    refreshed_at: list[float] = []

    def refresh() -> None:
        refreshed_at.append(clock())
        if refresh_hold is not None:
            assert refresh_hold.wait(timeout=10)
        clock.advance(REFRESH_SECONDS)

    router = Router(
        view,
        client,
        refresh=refresh,
        policy=make_policy("least_loaded"),
        poll_interval_seconds=5.0,
        on_admitted=lambda _substation_id: None,
        on_forward_failure=lambda _substation_id: None,
        lost_answers=lost,
        on_lost_session_freed=lambda _substation_id: None,
        longest_session_seconds=3600.0,
        deadline_seconds=ROUTE_DEADLINE,
        refresh_seconds=REFRESH_SECONDS,
        clock=clock,
    )
    return Rig(router, client, lost, clock, view, refreshed_at)  # type: ignore[arg-type]


def route(rig: Rig, amount_kw: float = 10.0, deadline: float | None = None) -> tuple[NoCapacity, float]:
    """Route one request; its outcome and how long it took on the fake clock."""
    started = rig.clock()
    outcome = rig.router.route(ChargeRequest("ev-1", amount_kw), deadline=deadline)
    assert isinstance(outcome, NoCapacity), outcome
    return outcome, rig.clock() - started


def test_routing_stops_at_the_deadline_and_cuts_the_last_forward_short() -> None:
    grid = rig(substations=3)

    outcome, took = route(grid)

    # 5 s for the first forward leaves 3 s: connect time plus 2 s for the second one's answer,
    # then 1 s, too little for a third forward or for a refresh and a forward after it.
    assert grid.client.calls == [
        ("POST", f"{url_of(1)}/charge", 5.0),
        ("POST", f"{url_of(2)}/charge", 2.0),
    ]
    assert took <= ROUTE_DEADLINE
    assert grid.refreshed_at == []
    assert outcome.attempts == 2
    assert outcome.reason == TOO_SLOW
    assert outcome.message.startswith("The request could not be placed in time")
    assert "substation-1: no answer within the timeout" in outcome.message
    assert outcome.retry_after_seconds == 5, "the poll interval: a poll brings a substation back"
    # Both forwards timed out: each substation may hold the session, to be freed after its next poll.
    assert [len(grid.lost.pending(url_of(number))) for number in (1, 2, 3)] == [1, 1, 0]


@pytest.mark.parametrize(
    "forward_timeout, refreshed",
    # 5 s leaves 3 s: a forward (1.5 s at least) still fits after a refresh that ends at once. 7 s leaves 1 s.
    [(FORWARD_TIMEOUT, True), (7.0, False)],
    ids=["time-for-a-forward-after-it", "no-time-left-for-a-forward-after-it"],
)
def test_the_view_is_refreshed_only_with_time_for_a_forward_after_it(forward_timeout: float, refreshed: bool) -> None:
    grid = rig(substations=1, forward_timeout=forward_timeout)
    started = grid.clock()

    outcome, took = route(grid)

    assert grid.refreshed_at == ([started + forward_timeout] if refreshed else [])
    assert took <= ROUTE_DEADLINE + (REFRESH_SECONDS if refreshed else 0), "a refresh is bounded by the poller"
    assert outcome.reason == TOO_SLOW, "the forward timed out either way"


def test_a_refresh_that_outlasts_the_time_left_is_not_waited_for() -> None:
    hold = threading.Event()
    grid = rig(substations=2, load_kw=100.0, refresh_hold=hold)  # full in the view: nothing to forward
    try:
        started = time.monotonic()
        # 2.5 s to the caller's deadline: 1 s to wait for the refresh, then 1.5 s for a forward.
        outcome, _ = route(grid, deadline=time.time() + 2.5)
        waited = time.monotonic() - started
    finally:
        hold.set()

    assert len(grid.refreshed_at) == 1
    assert 0.9 <= waited < 2.0, f"the request waited {waited:.2f} s for a refresh it had 1 s for"
    assert outcome.reason == TOO_SLOW
    assert "the poll of the substations did not end in time" in outcome.message
    assert grid.client.calls == []


def test_a_grid_that_answers_full_is_refused_as_full_with_what_each_substation_has_free() -> None:
    # The view thinks both are empty; their answers say 95 and 98 of 100 kW are taken.
    client = ScriptedSubstations({url_of(1): full_answer(95.0), url_of(2): full_answer(98.0)})
    grid = rig(substations=2, client=client)

    outcome, _ = route(grid, amount_kw=10.0)

    assert outcome.reason == FULL
    assert outcome.free_kw == {"substation-1": 5.0, "substation-2": 2.0}
    assert "ask for at most 5 kW" in outcome.message and "substation-1 5 kW" in outcome.message
    assert outcome.retry_after_seconds == 3, "the substations' own hint"
    assert len(grid.refreshed_at) == 1, "the view was refreshed before the 503"


def test_refused_connections_are_refused_as_unreachable() -> None:
    client = ScriptedSubstations({url_of(n): NotSent(f"{url_of(n)}: cannot connect") for n in (1, 2)})
    grid = rig(substations=2, client=client)

    outcome, _ = route(grid)

    assert outcome.reason == UNREACHABLE
    assert "could be reached" in outcome.message and "substation-2" in outcome.message
    assert outcome.free_kw == {}


def test_a_deadline_with_no_time_for_a_forward_is_refused_for_it() -> None:
    grid = rig(substations=1)

    outcome, _ = route(grid, deadline=time.time() + 0.5)

    assert outcome.reason == NO_TIME
    assert grid.client.calls == [] and grid.refreshed_at == []
    assert "X-Request-Deadline" in outcome.message


@pytest.mark.parametrize(
    "failures, out_of_time, tried, any_up, reason",
    [
        ([], False, True, True, FULL),
        ([], False, False, True, FULL),
        ([], False, False, False, UNREACHABLE),
        ([UNREACHABLE], False, True, True, UNREACHABLE),
        ([UNREACHABLE, TOO_SLOW], False, True, True, TOO_SLOW),
        ([], True, True, True, TOO_SLOW),
        ([], True, False, True, NO_TIME),
        ([UNREACHABLE], True, True, False, TOO_SLOW),
    ],
)
def test_the_reason_of_a_refusal_follows_what_happened(
    failures: list[str], out_of_time: bool, tried: bool, any_up: bool, reason: str
) -> None:
    assert refusal_reason(failures, out_of_time, tried, any_up) == reason


def polled(number: int, capacity_kw: float, min_charge_kw: float | None, up: bool = True,
           minimum_load_kw: float | None = 0.0) -> SubstationSnapshot:
    return SubstationSnapshot(url=url_of(number), substation_id=f"substation-{number}", up=up,
                              capacity_kw=capacity_kw, min_charge_kw=min_charge_kw, minimum_load_kw=minimum_load_kw,
                              last_poll_at=0.0)


def test_under_strict_allocation_a_request_larger_than_every_limit_fits_nowhere() -> None:
    grid = [polled(1, 150.0, None), polled(2, 200.0, None)]

    too_large = fits_nowhere(grid, 350.0)

    assert too_large is not None
    assert (too_large.minimum_kw, too_large.largest_limit_kw, too_large.substation_id) == (350.0, 200.0, "substation-2")
    assert "Ask for at most 200 kW" in too_large.message
    assert fits_nowhere(grid, 200.0) is None


def test_under_fair_sharing_only_the_per_vehicle_minimum_must_fit() -> None:
    assert fits_nowhere([polled(1, 150.0, 7.0), polled(2, 200.0, 7.0)], 350.0) is None
    too_large = fits_nowhere([polled(1, 5.0, 7.0), polled(2, 6.0, 7.0)], 350.0)
    assert too_large is not None and (too_large.minimum_kw, too_large.largest_limit_kw) == (7.0, 6.0)
    assert fits_nowhere([polled(1, 5.0, 7.0)], 4.0) is None, "a request below the minimum is its own minimum"


def test_what_is_not_known_to_be_too_large_is_not_refused_as_such() -> None:
    assert fits_nowhere([], 350.0) is None
    assert fits_nowhere([SubstationSnapshot(url=url_of(1))], 350.0) is None, "never polled: its limit is unknown"
    assert fits_nowhere([polled(1, 150.0, None), polled(2, 400.0, None, up=False)], 350.0) is None, \
        "a substation that is down may come back with its limit"
    assert fits_nowhere([polled(1, 0.0, None), polled(2, 0.0, None)], 10.0) is None, "no power at all is full"


def test_what_is_free_is_room_for_a_new_sessions_minimum() -> None:
    strict = replace(polled(1, 100.0, None, minimum_load_kw=None), load_kw=60.0, reserved_kw=10.0)
    fair = replace(polled(2, 100.0, 7.0, minimum_load_kw=70.0), load_kw=100.0, reserved_minimum_kw=7.0)
    assert free_kw(strict) == 30.0
    assert free_kw(fair) == 23.0, "curtailed sessions make room down to their minimums"
    assert free_kw(replace(fair, suspended=1)) == 0.0
    assert free_kw(replace(strict, up=False)) == 0.0


def test_a_request_larger_than_every_limit_is_refused_before_any_forward_after_a_refresh() -> None:
    grid = rig(substations=2)

    outcome = grid.router.route(ChargeRequest("ev-1", 150.0))

    assert isinstance(outcome, TooLarge), outcome
    assert outcome.largest_limit_kw == 100.0 and outcome.minimum_kw == 150.0
    assert grid.client.calls == []
    assert len(grid.refreshed_at) == 1, "the limits move: the view is refreshed before it refuses"


def test_one_lost_session_sweep_per_substation_runs_at_a_time() -> None:
    grid = rig(substations=1)
    grid.lost.remember(url_of(1), "substation-1", "lost-session", lifetime_seconds=60)
    grid.client.hold = threading.Event()

    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(grid.router.free_lost_sessions, url_of(1))
        assert grid.client.call_started.wait(timeout=5)
        # A later poll's sweep while the first one's DELETE is still waiting for an answer.
        grid.router.free_lost_sessions(url_of(1))
        assert [method for method, _, _ in grid.client.calls] == ["DELETE"]
        grid.client.hold.set()
        first.result(timeout=5)

    # The DELETE timed out, so the entry stays; once the first sweep is over, the next one asks again.
    grid.router.free_lost_sessions(url_of(1))
    assert [method for method, _, _ in grid.client.calls] == ["DELETE", "DELETE"]
    assert len(grid.lost.pending(url_of(1))) == 1


def test_a_full_grid_names_the_substations_it_cannot_reach() -> None:
    client = ScriptedSubstations({url_of(1): full_answer(95.0)})
    grid = rig(substations=2, client=client)
    grid.view.record_failure(url_of(2), "polling failed: connection refused")  # down before the request

    outcome, _ = route(grid, amount_kw=10.0)

    assert outcome.reason == FULL, "no forward failed: the one substation that is up is full"
    assert outcome.free_kw == {"substation-1": 5.0}
    assert "substation-2 cannot be reached now" in outcome.message
