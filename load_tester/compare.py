"""The same seeded run under each routing policy of the balancer, or under each allocation policy of
the substations, from an empty grid each time."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import requests

from load_tester.api import GridClient, StackError
from load_tester.records import ADMITTED, RequestResult, parse_status
from load_tester.report import RunReport

POLICIES = ("fair_share", "least_loaded", "least_connections", "round_robin", "random", "power_of_two")
ALLOCATION_POLICIES = ("strict", "fair_share")
# Parallel DELETEs when emptying the grid between runs: quick, without swamping the stack.
CLEANUP_WORKERS = 8
SETTLE_POLL_SECONDS = 0.2
TOLERANCE_KW = 1e-6
# Sessions last 60 s by default: wait that long, and a poll interval more, for a busy grid to empty.
EMPTY_GRID_TIMEOUT_SECONDS = 70.0

log = logging.getLogger(__name__)


@dataclass
class Comparison:
    """The runs done so far, one per policy; ``interrupted`` when Ctrl-C ended the comparison early."""

    reports: list[RunReport] = field(default_factory=list)
    interrupted: bool = False


class PolicySwitch(Protocol):
    """Where a comparison switches policies: the balancer's routing, or every substation's allocation."""

    def read(self) -> tuple[object, list[str] | None]:
        """The policy in force now (to restore at the end), and the ones offered if known."""

    def switch(self, policy: str) -> None: ...

    def restore(self, original: object) -> None: ...


class RoutingSwitch:
    def __init__(self, client: GridClient) -> None:
        self.client = client

    def read(self) -> tuple[object, list[str] | None]:
        return self.client.policies()

    def switch(self, policy: str) -> None:
        self.client.set_policy(policy)

    def restore(self, original: object) -> None:
        self.client.set_policy(str(original))


class AllocationSwitch:
    """Every substation the balancer lists, switched together through its ``PUT /allocation-policy``."""

    def __init__(self, client: GridClient, substations: Sequence[tuple[str, str]]) -> None:
        if not substations:
            raise StackError("the balancer lists no substation: there is no allocation policy to switch.")
        self.client = client
        self.substations = substations

    def read(self) -> tuple[object, list[str] | None]:
        original: dict[str, str] = {}
        offered: list[str] | None = None
        for _, url in self.substations:
            policy, available = self.client.allocation_policy(url)
            original[url] = policy
            if available is not None:
                # Only a policy every substation offers can be compared.
                offered = available if offered is None else [name for name in offered if name in available]
        return original, offered

    def switch(self, policy: str) -> None:
        switched_at = time.monotonic()
        for _, url in self.substations:
            self.client.set_allocation_policy(url, policy)
        # The balancer routes by the minimum each substation grants (none under strict): until it has
        # polled them after the switch it would route the first requests by the old policy.
        if not wait_for_polls_since(self.client, switched_at, settle_timeout(self.client)):
            log.warning("The balancer did not poll every substation within %.0f s of the switch to %s; "
                        "the run's first requests may be routed by the previous policy.",
                        settle_timeout(self.client), policy)

    def restore(self, original: object) -> None:
        assert isinstance(original, dict)
        failed = []
        for name, url in self.substations:
            try:
                self.client.set_allocation_policy(url, original[url])
            except StackError as exc:
                failed.append(f"{name} ({exc})")
        if failed:
            # Each is tried: one substation that cannot be reached must not leave the others switched.
            log.error("The allocation policy of %s could not be restored; set it back by hand with "
                      "PUT <substation>/allocation-policy.", "; ".join(failed))  # fmt: skip


def compare_policies(
    client: GridClient,
    requested: Sequence[str] | None,
    run_one: Callable[[str], RunReport],
    switch: PolicySwitch | None = None,
    known: Sequence[str] = POLICIES,
) -> Comparison:
    """Switch to each policy, run, then stop that run's sessions; restore the policy at the end.

    ``requested`` None means every policy offered. By default the balancer's routing policy is switched;
    ``switch`` can be an ``AllocationSwitch`` instead (with ``known=ALLOCATION_POLICIES``).
    """
    switch = switch or RoutingSwitch(client)
    original, offered = switch.read()
    policies = choose_policies(requested, offered or list(known))
    baseline_kw = start_from_an_empty_grid(client)
    comparison = Comparison()
    try:
        for policy in policies:
            switch.switch(policy)
            report = run_one(policy)
            comparison.reports.append(report)
            stop_sessions(client, report.data.results)
            if report.data.interrupted:
                comparison.interrupted = True
                break
            if not wait_for_load_at_most(client, baseline_kw, settle_timeout(client)):
                log.warning(
                    "The grid still carries more load than before the comparison; the next policy starts on "
                    "a fuller grid. Other clients may be charging: compare on an otherwise idle stack."
                )
    except KeyboardInterrupt:
        # Between two runs (or while one is written): the runs done so far are still compared.
        comparison.interrupted = True
    finally:
        switch.restore(original)
    return comparison


def choose_policies(requested: Sequence[str] | None, offered: Sequence[str]) -> list[str]:
    if requested is None:
        return list(offered)
    unknown = [name for name in requested if name not in offered]
    if unknown:
        raise StackError(
            f"there is no policy {', '.join(unknown)} to switch to; the stack offers {', '.join(offered)}."
        )
    return list(requested)


def stop_sessions(client: GridClient, results: Sequence[RequestResult]) -> None:
    """Stop every session a run opened; those that cannot be stopped end by themselves."""
    admitted = [r for r in results if r.outcome == ADMITTED and r.session_id]

    def stop(result: RequestResult) -> bool:
        try:
            # 404: the session had already ended by itself, which is just as good.
            stopped = client.stop_session(result.session_id or "", f"{result.request_id}-stop", result.session_token)
            return stopped in (200, 404)
        except requests.RequestException:
            return False

    with ThreadPoolExecutor(max_workers=CLEANUP_WORKERS, thread_name_prefix="cleanup") as pool:
        failures = sum(1 for stopped in pool.map(stop, admitted) if not stopped)
    if failures:
        log.warning(
            "%d of %d sessions could not be stopped; they end by themselves at ends_at.", failures, len(admitted)
        )


def start_from_an_empty_grid(client: GridClient) -> float:
    """Wait (bounded) for sessions already charging to end; the load the comparison starts from.

    Policies are only comparable on the same grid: a first run on a grid that is
    still full from an earlier test would admit nothing and look worst.
    """
    load_kw = total_load_kw(client)
    if load_kw <= TOLERANCE_KW:
        return 0.0
    log.warning(
        "The grid already carries %.1f kW; waiting up to %.0f s for those sessions to end before comparing.",
        load_kw,
        EMPTY_GRID_TIMEOUT_SECONDS,
    )
    if wait_for_load_at_most(client, 0.0, EMPTY_GRID_TIMEOUT_SECONDS):
        return 0.0
    load_kw = total_load_kw(client)
    log.warning(
        "The grid still carries %.1f kW: other clients may be charging. Every policy starts from that load; "
        "compare on an otherwise idle stack for a fair picture.",
        load_kw,
    )
    return load_kw


def total_load_kw(client: GridClient) -> float:
    return sum(reading.load_kw for reading in parse_status(0.0, client.balancer_status()).substations)


def settle_timeout(client: GridClient) -> float:
    # The balancer's view may lag by a poll interval: allow two, and a little more.
    interval = client.balancer_status().get("poll_interval_seconds")
    return 2.0 * float(interval if isinstance(interval, (int, float)) else 5.0) + 2.0


def wait_for_polls_since(client: GridClient, since: float, timeout: float) -> bool:
    """Wait (bounded) until the balancer has polled every substation it lists after ``since`` (monotonic)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            entries = client.balancer_status().get("substations") or []
            ages = [entry.get("last_poll_age_seconds") for entry in entries if isinstance(entry, dict)]
            elapsed = time.monotonic() - since
            if ages and all(isinstance(age, (int, float)) and age < elapsed for age in ages):
                return True
        except StackError:
            pass  # a missed reading only delays the check until the next one
        time.sleep(SETTLE_POLL_SECONDS)
    return False


def wait_for_load_at_most(client: GridClient, limit_kw: float, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if total_load_kw(client) <= limit_kw + TOLERANCE_KW:
                return True
        except StackError:
            pass  # a missed reading only delays the check until the next one
        time.sleep(SETTLE_POLL_SECONDS)
    return False
