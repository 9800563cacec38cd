"""The budget of wrong station passwords per client address (charge_point_gateway.guesses), on a fake clock."""
from __future__ import annotations

from charge_point_gateway.guesses import GuessBudget


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_address_gets_its_burst_then_one_more_per_period() -> None:
    clock = Clock()
    budget = GuessBudget(per_minute=6, burst=3, clock=clock)
    for _ in range(3):
        assert budget.retry_after("198.51.100.7") == 0
        budget.failed("198.51.100.7")
    assert budget.retry_after("198.51.100.7") == 10  # one more every 60 / 6 s
    clock.now += 4
    assert budget.retry_after("198.51.100.7") == 6
    clock.now += 6
    assert budget.retry_after("198.51.100.7") == 0
    budget.failed("198.51.100.7")
    assert budget.retry_after("198.51.100.7") == 10


def test_addresses_are_counted_apart_and_refill_to_the_burst_only() -> None:
    clock = Clock()
    budget = GuessBudget(per_minute=60, burst=2, clock=clock)
    budget.failed("a")
    budget.failed("a")
    assert budget.retry_after("a") == 1 and budget.retry_after("b") == 0
    clock.now += 3600  # an hour later it has its burst again, not an hour's worth
    budget.failed("a")
    budget.failed("a")
    assert budget.retry_after("a") == 1


def test_the_addresses_kept_are_bounded_oldest_failure_first() -> None:
    budget = GuessBudget(per_minute=1, burst=1, clock=Clock(), max_addresses=3)
    for address in ("a", "b", "c", "d"):
        budget.failed(address)
    # "a" was dropped to make room: it starts again with a full burst; the others are still spent.
    assert budget.retry_after("a") == 0
    assert [budget.retry_after(address) > 0 for address in ("b", "c", "d")] == [True, True, True]
