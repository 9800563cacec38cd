"""A balancer that can route nowhere polls again within a second, not a whole poll interval later."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable

from werkzeug.serving import make_server

from gridcommon.httpclient import HttpClient
from load_balancer.poller import UNROUTABLE_POLL_INTERVAL_SECONDS, Poller
from load_balancer.view import GridView
from substation_service import create_app as create_substation_app
from substation_service.config import Settings as SubstationSettings
from tests.harness import wait_for

POLL_INTERVAL_SECONDS = 60.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class CountingPolls:
    """A real substation app that counts the polls of its /metrics."""

    def __init__(self) -> None:
        self.app = create_substation_app(SubstationSettings(substation_id="sub-late", capacity_kw=50))
        self.polls = 0

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/metrics":
            self.polls += 1
        return self.app(environ, start_response)


def test_a_substation_that_starts_after_the_first_poll_is_routable_within_a_second_or_so() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    view = GridView()
    view.add_url(url)
    poller = Poller(view, HttpClient("test", timeout=(0.5, 1.0)), interval_seconds=POLL_INTERVAL_SECONDS,
                    refresh_min_interval_seconds=0.0, observe_duration=lambda _seconds: None)  # fmt: skip
    poller.start()
    counting = CountingPolls()
    server = None
    try:
        # The first poll finds nothing listening: the substation is down, and stays so until a poll finds it.
        wait_for(lambda: view.snapshots()[0].last_error is not None, 5, "the first poll failing")
        assert not view.snapshots()[0].up
        server = make_server("127.0.0.1", port, counting, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        took = wait_for(lambda: view.snapshots()[0].up, 10, "the substation routable")
        assert took < UNROUTABLE_POLL_INTERVAL_SECONDS + 1.5
        # Once it is routable, the configured interval applies again: no further poll for a while.
        polls = counting.polls
        time.sleep(3 * UNROUTABLE_POLL_INTERVAL_SECONDS)
        assert counting.polls == polls
    finally:
        poller.stop()
        if server is not None:
            server.shutdown()
