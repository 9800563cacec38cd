"""Unit tests of reading a substation's metrics page and of the single-flight refresh."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from gridcommon.httpclient import HttpClient
from load_balancer.poller import SUBSTATION_QUERY, PollError, Poller, read_substation_metrics
from load_balancer.view import GridView, Observation
from substation_service import create_app as create_substation_app
from substation_service.config import Settings as SubstationSettings
from tests.harness import wait_for


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def substation_metrics_page(capacity_kw: float, *amounts: float, query: str = "") -> str:
    """The /metrics page of a real substation app after admitting ``amounts``."""
    app = create_substation_app(SubstationSettings(substation_id="sub-x", capacity_kw=capacity_kw))
    client = app.test_client()
    for index, amount in enumerate(amounts):
        response = client.post("/charge", json={"vehicle_id": f"v{index}", "amount": amount})
        assert response.status_code == 201, response.get_json()
    return client.get(f"/metrics?{query}" if query else "/metrics").get_data(as_text=True)


def test_the_families_the_poll_asks_for_read_as_the_whole_page_does() -> None:
    whole = substation_metrics_page(120.0, 30.0, 12.5)
    asked = substation_metrics_page(120.0, 30.0, 12.5, query=SUBSTATION_QUERY)

    assert len(asked) < len(whole) / 2
    assert read_substation_metrics(asked)[1] == read_substation_metrics(whole)[1]


def test_reads_id_and_state_from_a_real_substation_page() -> None:
    substation_id, observation = read_substation_metrics(
        substation_metrics_page(120.0, 30.0, 12.5, query=SUBSTATION_QUERY)
    )
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


def test_unparseable_text_is_refused_without_quoting_it() -> None:
    with pytest.raises(ValueError) as raised:
        read_substation_metrics("<html>internal admin console of 10.0.0.7</html>")
    assert "10.0.0.7" not in str(raised.value) and "html" not in str(raised.value)


def fake_page(substation_id: str = "sub-x", capacity: str = "100", load: str = "0") -> str:
    return (
        f'current_load{{substation="{substation_id}"}} {load}\n'
        f'substation_state_version{{substation="{substation_id}"}} 3\n'
        f'admission_capacity{{substation="{substation_id}"}} {capacity}\n'
        f'total_capacity{{substation="{substation_id}"}} {capacity}\n'
        f'active_chargers{{substation="{substation_id}"}} 0\n'
    )


def test_a_minimal_page_is_read() -> None:
    substation_id, observation = read_substation_metrics(fake_page())
    assert (substation_id, observation.capacity_kw, observation.state_version) == ("sub-x", 100.0, 3)


@pytest.mark.parametrize(
    "page, complaint",
    [
        (fake_page(substation_id="a b"), "substation id"),
        (fake_page(substation_id="x" * 65), "substation id"),
        (fake_page(capacity="+Inf"), "admission_capacity"),  # would draw every request
        (fake_page(capacity="NaN"), "admission_capacity"),
        (fake_page(load="-5"), "current_load"),
    ],
)
def test_ids_and_figures_a_substation_could_not_report_are_refused(page: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        read_substation_metrics(page)


# Polls of servers that answer slowly or endlessly --------------------------------


@contextmanager
def serving(handler: Callable[[socket.socket], None]) -> Iterator[str]:
    """A local server running ``handler`` on each connection in a thread of its own; yields its URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=handler, args=(connection,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=2)
        listener.close()


def trickle(after: bytes) -> Callable[[socket.socket], None]:
    """Send ``after`` at once, then one byte every 0.2 s for ever (until the poller hangs up)."""

    def handler(connection: socket.socket) -> None:
        with connection:
            connection.recv(65536)
            try:
                connection.sendall(after)
                while True:
                    connection.sendall(b"#")
                    time.sleep(0.2)
            except OSError:
                return

    return handler


def flood(connection: socket.socket) -> None:
    with connection:
        connection.recv(65536)
        try:
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + fake_page().encode())
            while True:
                connection.sendall(b"# padding\n" * 4096)
        except OSError:
            return


def poller_with(connect: float, read: float, max_bytes: int = 1024 * 1024) -> Poller:
    return Poller(
        GridView(),
        HttpClient("test", timeout=(connect, read)),
        interval_seconds=60.0,
        refresh_min_interval_seconds=0.0,
        observe_duration=lambda _seconds: None,
        max_metrics_bytes=max_bytes,
    )


@pytest.mark.parametrize(
    "handler, complaint",
    [
        (trickle(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"), "no complete answer within 1.2 s"),
        (trickle(b"HTTP/1.1 200 OK\r\nX-Slow: "), "no complete answer within 1.2 s"),  # headers never end
        (flood, "larger than 65536 bytes"),
    ],
    ids=["trickled body", "trickled headers", "endless body"],
)
def test_a_poll_ends_within_its_total_limit_however_the_server_sends(handler, complaint: str) -> None:
    # Each byte comes well within the read timeout: only a limit on the whole poll ends it.
    poller = poller_with(connect=0.4, read=0.8, max_bytes=65536)
    assert poller.poll_limit == pytest.approx(1.2)
    with serving(handler) as url:
        started = time.monotonic()
        with pytest.raises(PollError, match=complaint) as raised:
            poller.fetch(url)
        assert time.monotonic() - started < poller.poll_limit + 0.5
        assert "#" not in str(raised.value) and "padding" not in str(raised.value)
    poller.stop()


def test_an_answer_that_is_not_http_is_refused_without_quoting_it() -> None:
    def banner(connection: socket.socket) -> None:
        with connection:
            connection.recv(65536)
            connection.sendall(b"SSH-2.0-OpenSSH_9.6 internal-bastion\r\n")

    poller = poller_with(connect=0.5, read=0.5)
    with serving(banner) as url:
        with pytest.raises(PollError, match="did not answer with valid HTTP") as raised:
            poller.fetch(url)
        assert "bastion" not in str(raised.value)
    poller.stop()


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
    poller._view.add_polled("http://s1", "s1", Observation(state_version=1, load_kw=0.0, capacity_kw=100.0))
    poller.release.set()
    poller.refresh()
    clock.now += 0.4
    poller.refresh()
    assert poller.rounds == 1, "a refresh right after a poll uses that poll"
    clock.now += 0.2
    poller.refresh()
    assert poller.rounds == 2


def test_a_refresh_is_not_rate_limited_while_no_substation_is_routable() -> None:
    # A balancer that started before its substations: its last round found none, but they may
    # listen now, and a request that found nowhere to go must not be refused on that old round.
    clock = FakeClock()
    poller = CountingPoller(clock, min_interval=0.5)
    poller.release.set()
    poller.refresh()
    clock.now += 0.1
    poller.refresh()
    assert poller.rounds == 2

