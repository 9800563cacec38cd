"""The charge API's in-memory rate-limit store: moving windows that forget lazily, within a bound."""
from __future__ import annotations

import pytest
from limits import parse
from limits.storage import storage_from_string
from limits.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

from charge_request_service import rate_limit_store
from charge_request_service.rate_limit_store import BoundedMemoryStorage


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1_800_000_000.0]
    monkeypatch.setattr(rate_limit_store.time, "time", lambda: now[0])
    return now


def test_the_scheme_names_this_store() -> None:
    assert isinstance(storage_from_string("bounded-memory://"), BoundedMemoryStorage)


def test_a_moving_window_refuses_past_its_limit_and_lets_through_once_the_oldest_hit_leaves(clock) -> None:
    limiter = MovingWindowRateLimiter(BoundedMemoryStorage())
    two_a_second = parse("2/second")
    assert limiter.hit(two_a_second, "vehicle:EV-1") and limiter.hit(two_a_second, "vehicle:EV-1")
    assert not limiter.hit(two_a_second, "vehicle:EV-1")
    assert limiter.hit(two_a_second, "vehicle:EV-2"), "every vehicle has its own window"
    start, hits = limiter.storage.get_moving_window(two_a_second.key_for("vehicle:EV-1"), 2, 1)
    assert (start, hits) == (clock[0], 2)
    clock[0] += 1.01
    assert limiter.hit(two_a_second, "vehicle:EV-1")


def test_windows_that_ran_out_are_forgotten_by_later_hits(clock) -> None:
    storage = BoundedMemoryStorage()
    limiter = MovingWindowRateLimiter(storage)
    for index in range(1000):
        limiter.hit(parse("2/second"), f"vehicle:EV-{index}")
    assert len(storage) == 1000
    clock[0] += 2
    limiter.hit(parse("2/second"), "vehicle:EV-new")
    assert len(storage) == 1, "nothing runs between requests, yet nothing that ran out is kept"


def test_the_store_keeps_at_most_its_bound_forgetting_the_least_recently_hit(clock) -> None:
    storage = BoundedMemoryStorage(max_keys=100)
    limiter = MovingWindowRateLimiter(storage)
    one_a_minute = parse("1/minute")
    for index in range(150):
        assert limiter.hit(one_a_minute, f"vehicle:EV-{index}")
    assert len(storage) == 100 and storage.evicted == 50
    assert not limiter.hit(one_a_minute, "vehicle:EV-149"), "a vehicle hit recently is still limited"
    assert limiter.hit(one_a_minute, "vehicle:EV-0"), "the least recently hit was forgotten: it errs towards letting through"


def test_fixed_windows_count_and_expire(clock) -> None:
    limiter = FixedWindowRateLimiter(BoundedMemoryStorage())
    three_a_minute = parse("3/minute")
    assert all(limiter.hit(three_a_minute, "client:a") for _ in range(3))
    assert not limiter.hit(three_a_minute, "client:a")
    clock[0] += 61
    assert limiter.hit(three_a_minute, "client:a")
