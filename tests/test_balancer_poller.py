"""Unit tests of reading a substation's metrics page and of the single-flight refresh."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from gridcommon.httpclient import HttpClient
from load_balancer.poller import Poller, read_substation_metrics
from load_balancer.view import GridView
from substation_service import create_app as create_substation_app
from substation_service.config import Settings as SubstationSettings
from tests.harness import wait_for


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def substation_metrics_page(capacity_kw: float, *amounts: float) -> str:
    """The /metrics page of a real substation app after admitting ``amounts``."""
    app = create_substation_app(SubstationSettings(substation_id="sub-x", capacity_kw=capacity_kw))
    client = app.test_client()
    for index, amount in enumerate(amounts):
        response = client.post("/charge", json={"vehicle_id": f"v{index}", "amount": amount})
        assert response.status_code == 201, response.get_json()
    return client.get("/metrics").get_data(as_text=True)


def test_reads_id_and_state_from_a_real_substation_page() -> None:
    substation_id, observation = read_substation_metrics(substation_metrics_page(120.0, 30.0, 12.5))
    assert substation_id == "sub-x"
    assert observation.load_kw == 42.5
    assert observation.capacity_kw == 120.0
    assert observation.total_capacity_kw == 120.0
    assert observation.active_chargers == 2
    assert observation.state_version >= 2


@pytest.mark.parametrize(
    "page, complaint",
    [
        ("", "current_load"),
        ('# TYPE current_load gauge\ncurrent_load 3.0\n', "current_load"),
        ('# TYPE current_load gauge\ncurrent_load{substation="s"} 3.0\n', "substation_state_version"),
    ],
)
def test_pages_that_are_not_a_substations_are_refused(page: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        read_substation_metrics(page)


def test_unparseable_text_is_refused() -> None:
    with pytest.raises(ValueError):
        read_substation_metrics("<html>not metrics</html>")


class WaiterCountingCondition(threading.Condition):
    """A condition that knows which threads have waited on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waiters: set[int] = set()

    def wait(self, timeout: float | None = None) -> bool:
        # Called with the lock held, which wait() gives up only once the thread can be notified.
        self.waiters.add(threading.get_ident())
        return super().wait(timeout)


class CountingPoller(Poller):
    """A poller whose round is a countable, blockable stand-in for the network."""

    def __init__(self, clock: FakeClock, min_interval: float) -> None:
        super().__init__(
            GridView(),
            HttpClient("test", timeout=(0.5, 0.5)),
            interval_seconds=60.0,
            refresh_min_interval_seconds=min_interval,
            observe_duration=lambda _seconds: None,
            clock=clock,
        )
        self.rounds = 0
        self.release = threading.Event()
        self.started = threading.Event()
        # Requests that find a round under way wait on the poller's condition for its end.
        self._cond = self.joined = WaiterCountingCondition()

    def poll_all(self) -> None:
        self.rounds += 1
        self.started.set()
        self.release.wait(timeout=10)


def test_concurrent_refreshes_share_one_poll() -> None:
    poller = CountingPoller(FakeClock(), min_interval=0.0)
    with ThreadPoolExecutor(10) as pool:
        first = pool.submit(poller.refresh)
        assert poller.started.wait(timeout=5)
        others = [pool.submit(poller.refresh) for _ in range(9)]
        # All nine wait for the round under way before it ends; with no rate limit, one
        # arriving later would start a second round.
        wait_for(lambda: len(poller.joined.waiters) == 9, timeout=5, what="nine refreshes joining the round")
        poller.release.set()
        for future in [first, *others]:
            future.result(timeout=5)
    assert poller.rounds == 1


def test_refreshes_are_rate_limited() -> None:
    clock = FakeClock()
    poller = CountingPoller(clock, min_interval=0.5)
    poller.release.set()
    poller.refresh()
    clock.now += 0.4
    poller.refresh()
    assert poller.rounds == 1, "a refresh right after a poll uses that poll"
    clock.now += 0.2
    poller.refresh()
    assert poller.rounds == 2
