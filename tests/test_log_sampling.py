"""Which requests' log lines are written: a burst a second in full, then a sample; chosen once per request."""
from __future__ import annotations

from pathlib import Path

import requests

from gridcommon.log_sampling import LogSampler, LogSampling
from tests.harness import logged_within, start_stack


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def decisions(sampler: LogSampler, count: int, passed_on: str | None = None, named: bool = False) -> list[bool]:
    return [sampler.decide(passed_on, named) for _ in range(count)]


def test_the_first_requests_of_each_second_are_logged_then_one_in_every() -> None:
    clock = Clock()
    sampler = LogSampler(LogSampling(burst_per_second=20, every=100), clock)
    first_second = decisions(sampler, 520)
    assert first_second[:20] == [True] * 20
    assert sum(first_second[20:]) == 5, "one in 100 of the 500 past the burst"
    clock.now += 1.0
    assert decisions(sampler, 20) == [True] * 20, "a new second, a new burst"


def test_a_request_its_caller_named_is_always_logged() -> None:
    sampler = LogSampler(LogSampling(burst_per_second=0, every=0), Clock())
    assert decisions(sampler, 50, named=True) == [True] * 50
    assert decisions(sampler, 50) == [False] * 50


def test_the_choice_of_the_service_the_request_came_through_is_kept() -> None:
    sampler = LogSampler(LogSampling(burst_per_second=1000, every=1), Clock())
    assert decisions(sampler, 3, passed_on="0") == [False] * 3
    assert decisions(sampler, 3, passed_on="1", named=False) == [True] * 3
    # Anything else in the header is ignored, and the service decides for itself.
    assert decisions(sampler, 3, passed_on="yes") == [True] * 3


def test_every_one_logs_all_requests() -> None:
    sampler = LogSampler(LogSampling(burst_per_second=0, every=1), Clock())
    assert decisions(sampler, 200) == [True] * 200


def test_across_the_stack_a_request_is_logged_everywhere_or_nowhere_and_failures_always(tmp_path: Path) -> None:
    quiet = {"ACCESS_LOG_BURST": "0", "ACCESS_LOG_SAMPLE": "0"}
    stack = start_stack(tmp_path, capacities=(100.0,), substation_env=quiet, balancer_env=quiet, charge_env=quiet)
    try:
        unnamed = requests.post(f"{stack.charge.url}/charge", json={"vehicle_id": "EV-quiet", "amount": 5}, timeout=10)
        assert unnamed.status_code == 201
        named = requests.post(f"{stack.charge.url}/charge", json={"vehicle_id": "EV-named", "amount": 5},
                              headers={"X-Request-ID": "trace-me-1"}, timeout=10)
        assert named.status_code == 201
        refused = requests.post(f"{stack.charge.url}/charge", json={"vehicle_id": "EV-bad", "amount": -1}, timeout=10)
        assert refused.status_code == 400
        for service in stack.services:
            assert logged_within(service, "[trace-me-1]"), f"{service.name} left out the request its caller named"
        assert logged_within(stack.charge, "POST /charge -> 400"), "a refusal is logged even out of the sample"
        unnamed_id = unnamed.headers["X-Request-ID"]
        for service in stack.services:
            assert f"[{unnamed_id}]" not in service.log_text(), f"{service.name} logged a request left out of the sample"
    finally:
        stack.stop()
