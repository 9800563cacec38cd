"""A slow or frozen substation costs milliseconds: adaptive timeouts, hedged forwards, outlier ejection.

The unit tests drive ``load_balancer.tail`` and the view's ejection on a fake clock; the
integration test freezes a real substation (SIGSTOP) under a closed loop of charge
requests and audits, from the clients' answers and every substation's records, that
each admitted session is held exactly once.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from benchmarks.closedloop import closed_loop
from load_balancer.policies import LeastLoaded
from load_balancer.tail import ForwardTiming, TailSettings
from load_balancer.view import GridView
from tests.harness import OPERATOR, get_json, scrape, start_stack, wait_for
from tests.substation_support import FakeClock
from tests.test_balancer_view import observed

URLS = [f"http://127.0.0.1:{7001 + index}" for index in range(4)]


def view_of(count: int, clock: FakeClock, **ejection: float) -> GridView:
    view = GridView(clock=clock, **ejection)
    for index in range(count):
        view.add_polled(URLS[index], f"s{index}", observed(1))
    return view


def poll_again(view: GridView, index: int) -> None:
    marker = dict(view.poll_targets())[URLS[index]]
    view.record_poll(URLS[index], f"s{index}", observed(1), marker)


def is_up(view: GridView, index: int) -> bool:
    return next(s.up for s in view.snapshots() if s.url == URLS[index])


# ----- adaptive timeout and hedge delay -------------------------------------------------------------


def test_the_timeout_and_hedge_delay_follow_the_recent_forwards_within_their_bounds() -> None:
    timing = ForwardTiming(TailSettings(max_timeout_seconds=5.0, window=100, recompute_every=10))
    # Before any forward is seen: the configured ceiling, and the least hedge delay.
    assert timing.timeout_seconds == 5.0 and timing.hedge_delay_seconds == 0.05
    for index in range(100):
        timing.record(0.010 if index % 100 < 98 else 0.040)  # p95 10 ms, p99 40 ms
    p95, p99 = timing.percentiles()
    assert (p95, p99) == (0.010, 0.040)
    # 4 x p99 = 160 ms is under the 1 s floor; 2 x p95 = 20 ms under the 50 ms floor.
    assert timing.timeout_seconds == 1.0 and timing.hedge_delay_seconds == 0.05
    assert timing.stall_seconds == 0.5 and timing.unresponsive_seconds == 0.2
    for _ in range(100):
        timing.record(0.5)
    assert timing.timeout_seconds == 2.0 and timing.hedge_delay_seconds == 1.0
    for _ in range(100):
        timing.record(3.0)
    # Never past the configured FORWARD_TIMEOUT_SECONDS, and a hedge never after the timeout.
    assert timing.timeout_seconds == 5.0 and timing.hedge_delay_seconds == 5.0


def test_hedging_can_be_switched_off() -> None:
    assert ForwardTiming(TailSettings(hedging=False)).hedge_delay_seconds is None


def test_hedges_are_paid_from_a_budget_that_answered_forwards_refill() -> None:
    timing = ForwardTiming(TailSettings(hedge_budget_burst=3, hedge_budget_ratio=0.5, window=10, recompute_every=2))
    assert not timing.take_hedge(), "no hedge for slowness before the first percentiles"
    timing.record(0.01)
    timing.record(0.01)
    assert [timing.take_hedge() for _ in range(4)] == [True, True, True, False]
    timing.record(0.01)
    assert not timing.take_hedge(), "half a hedge is not a hedge"
    timing.record(0.01)
    assert timing.take_hedge()


def test_a_substation_that_went_silent_with_forwards_waiting_is_tried_last() -> None:
    clock = FakeClock()
    view = view_of(3, clock)
    [first, *_] = view.choose(1.0, LeastLoaded(), unresponsive_after=0.2)  # reserves on s0: a forward waits
    assert first.url == URLS[0]
    clock.advance(0.1)
    assert view.choose(1.0, LeastLoaded(), unresponsive_after=0.2)[0].url == URLS[1]  # s0 has one more in flight
    view.release(URLS[1], 1.0, observed(2))  # s1 answered
    clock.advance(0.15)
    # s0: 0.25 s of silence with a forward waiting; s1 answered 0.15 s ago; s2 has nothing in flight.
    order = [c.url for c in view.choose(1.0, LeastLoaded(), unresponsive_after=0.2)]
    assert order[-1] == URLS[0] and set(order) == set(URLS[:3])


# ----- outlier ejection ------------------------------------------------------------------------------


def test_an_ejected_substation_stays_out_until_its_ejection_ends_and_a_poll_finds_it() -> None:
    clock = FakeClock()
    view = view_of(3, clock, ejection_base_seconds=1.0)
    view.record_failure(URLS[0], "forward timed out", eject=True)
    assert not is_up(view, 0)
    clock.advance(0.5)
    poll_again(view, 0)
    assert not is_up(view, 0), "a poll inside the ejection does not bring it back"
    assert [c.url for c in view.choose(1.0, LeastLoaded())] == URLS[1:3]
    clock.advance(0.6)
    poll_again(view, 0)
    assert is_up(view, 0)


def test_ejections_soon_after_each_other_last_twice_as_long_up_to_the_most() -> None:
    clock = FakeClock()
    view = view_of(3, clock, ejection_base_seconds=1.0, ejection_max_seconds=5.0, ejection_memory_seconds=60.0)
    lengths = []
    for _ in range(5):
        view.record_failure(URLS[0], "forward timed out", eject=True)
        entry = next(s for s in view.snapshots() if s.url == URLS[0])
        lengths.append(entry.ejected_until - clock.now)
        clock.advance(entry.ejected_until - clock.now + 0.01)
        poll_again(view, 0)
        assert is_up(view, 0)
    assert lengths == pytest.approx([1.0, 2.0, 4.0, 5.0, 5.0])
    # Well after the last ejection ended, the next one starts from the base again.
    clock.advance(61.0)
    view.record_failure(URLS[0], "forward timed out", eject=True)
    entry = next(s for s in view.snapshots() if s.url == URLS[0])
    assert entry.ejected_until - clock.now == pytest.approx(1.0) and entry.ejections == 1


def test_a_refused_connection_marks_down_without_ejecting() -> None:
    clock = FakeClock()
    view = view_of(2, clock)
    view.record_failure(URLS[0], "connection refused", eject=False)
    assert not is_up(view, 0)
    poll_again(view, 0)
    assert is_up(view, 0), "the first poll that finds it listening again brings it back"


def test_at_most_half_of_the_substations_are_ejected_at_once() -> None:
    clock = FakeClock()
    view = view_of(4, clock)
    for index in range(4):
        view.record_failure(URLS[index], "forward timed out", eject=True)
    ejected = [s.url for s in view.snapshots() if s.ejected_until is not None and s.ejected_until > clock.now]
    assert ejected == URLS[:2]
    # The others are down for this failure (FAILURE_THRESHOLD 1) but come back at their next poll.
    poll_again(view, 2)
    assert is_up(view, 2) and not is_up(view, 0)


# ----- a frozen substation under load ----------------------------------------------------------------


def test_a_frozen_substation_is_hedged_around_and_ejected_and_no_session_is_held_twice(tmp_path: Path) -> None:
    stack = start_stack(
        tmp_path,
        # Room for every request of the loop (1 kW, 60 s) on the two that stay awake: this is about time.
        capacities=(10_000.0, 10_000.0, 10_000.0),
        balancer_env={"POLL_INTERVAL_SECONDS": "0.5", "POLL_TIMEOUT_SECONDS": "0.5", "ADMIN_TOKEN": "x"},
    )
    frozen = stack.substations[1]
    try:
        warm = closed_loop(stack.charge.url, 4, 1.0, prefix="EV-warm", duration_seconds=60, keep_admitted=True)

        def freeze_for_a_while() -> None:
            time.sleep(1.0)
            frozen.suspend()
            time.sleep(2.0)
            frozen.resume()

        freezer = threading.Thread(target=freeze_for_a_while)
        freezer.start()
        seen_ejected: list[bool] = []

        def watch() -> None:
            while freezer.is_alive():
                status = get_json(f"{stack.balancer.url}/status", timeout=5)
                seen_ejected.append(any(entry["ejected_for_seconds"] for entry in status["substations"]))
                time.sleep(0.1)

        watcher = threading.Thread(target=watch)
        watcher.start()
        loop = closed_loop(stack.charge.url, 8, 4.0, prefix="EV-freeze", duration_seconds=60, keep_admitted=True)
        freezer.join()
        watcher.join()
        assert loop.failures == 0 and set(loop.statuses) == {201}, (loop.failures, loop.statuses)
        assert any(seen_ejected), "the frozen substation was ejected while it was frozen"
        balancer = scrape(stack.balancer)
        assert balancer.value("load_balancer_hedges_total", outcome="sent") >= 1

        # Once the thawed substation was polled and swept, every admitted session is held
        # exactly where its client was told, and nowhere else.
        told = {answer["session_id"]: answer["substation"] for answer in [*warm.admitted, *loop.admitted]}

        def holders() -> dict[str, list[str]]:
            held: dict[str, list[str]] = {}
            for substation in stack.substations:
                for session in get_json(f"{substation.url}/sessions", headers=OPERATOR)["sessions"]:
                    held.setdefault(session["session_id"], []).append(substation.env["SUBSTATION_ID"])
            return held

        wait_for(lambda: all(len(where) == 1 for where in holders().values()), 10, "every copy stopped")
        held = holders()
        assert {session_id: where[0] for session_id, where in held.items()} == told
    finally:
        frozen.resume()
        stack.stop()
