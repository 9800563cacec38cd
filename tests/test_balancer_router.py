"""Unit tests of the router's time limit and of its lost-session sweeps, on a fake clock.

The substations here take requests in and never answer, as frozen ones do; their
stand-in only moves the fake clock on by each call's read timeout. The same
behaviour against real frozen processes is in tests/test_balancer_integration.py.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from gridcommon.httpclient import HttpClient
from gridcommon.validation import ChargeRequest
from load_balancer.lost_answers import LostAnswers
from load_balancer.policies import make_policy
from load_balancer.router import NoCapacity, Router
from load_balancer.view import GridView, Observation
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


@dataclass
class Rig:
    router: Router
    client: SilentSubstations
    lost: LostAnswers
    clock: FakeClock
    refreshed_at: list[float] = field(default_factory=list)


def rig(substations: int, forward_timeout: float = FORWARD_TIMEOUT) -> Rig:
    """A router over ``substations`` polled, empty, silent substations of 100 kW."""
    clock = FakeClock()
    view = GridView(clock=clock)
    for number in range(1, substations + 1):
        view.add_polled(url_of(number), f"substation-{number}", Observation(1, load_kw=0.0, capacity_kw=100.0))
    client = SilentSubstations(clock, forward_timeout)
    lost = LostAnswers(clock=clock)
    refreshed_at: list[float] = []

    def refresh() -> None:
        refreshed_at.append(clock())
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
    return Rig(router, client, lost, clock, refreshed_at)


def route(rig: Rig) -> tuple[NoCapacity, float]:
    """Route one request; its outcome and how long it took on the fake clock."""
    started = rig.clock()
    outcome = rig.router.route(ChargeRequest("ev-1", 10.0))
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
    assert outcome.message.startswith("No substation could be reached in time")
    assert outcome.retry_after_seconds == 5, "the poll interval: a poll brings a substation back"
    # Both forwards timed out: each substation may hold the session, to be freed after its next poll.
    assert [len(grid.lost.pending(url_of(number))) for number in (1, 2, 3)] == [1, 1, 0]


@pytest.mark.parametrize(
    "forward_timeout, refreshed",
    [(FORWARD_TIMEOUT, False), (2.0, True)],
    ids=["no-time-left-for-a-refresh", "time-for-a-refresh"],
)
def test_the_view_is_refreshed_only_with_time_for_a_forward_after_it(forward_timeout: float, refreshed: bool) -> None:
    grid = rig(substations=1, forward_timeout=forward_timeout)

    outcome, took = route(grid)

    assert grid.refreshed_at == ([grid.clock() - REFRESH_SECONDS] if refreshed else [])
    assert took <= ROUTE_DEADLINE
    assert ("in time" in outcome.message) is not refreshed


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
