"""Routing policies: which substations to try for a request, best first.

Every policy only offers substations that are up and where the request fits in
the view (its minimum beside every session's minimum and the reservations, within
the limit; see ``SubstationSnapshot.fits``); they differ in the order. Offering a substation the view knows is full would only buy
a 409. Policies are pure apart from their own counter or random generator, which
tests inject.
"""
from __future__ import annotations

import random
import threading
import time
from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Iterable

from gridcommon.validation import ChargeRequest
from load_balancer.view import SubstationSnapshot

SECONDS_PER_HOUR = 3600.0
# A need is met when less than this is missing (ACN-Sim's definition, as the substations count it).
NEED_TOLERANCE_KWH = 0.1


class Policy(ABC):
    name: ClassVar[str]

    def order(self, substations: Iterable[SubstationSnapshot], amount_kw: float) -> list[SubstationSnapshot]:
        """The substations to try for ``amount_kw``, in the order to try them."""
        eligible = sorted((s for s in substations if s.fits(amount_kw)), key=_by_id)
        return self._order(eligible, amount_kw)

    @abstractmethod
    def _order(self, eligible: list[SubstationSnapshot], amount_kw: float) -> list[SubstationSnapshot]:
        """Order ``eligible`` for ``amount_kw`` (given sorted by id, so equal keys stay deterministic)."""


def _by_id(substation: SubstationSnapshot) -> str:
    return substation.polled_id


def _by_utilisation(substation: SubstationSnapshot) -> float:
    return substation.utilisation


class LeastLoaded(Policy):
    """Lowest (load + reserved) / capacity first; ties by id (sorted() is stable)."""

    name = "least_loaded"

    def _order(self, eligible: list[SubstationSnapshot], _amount_kw: float) -> list[SubstationSnapshot]:
        return sorted(eligible, key=_by_utilisation)


class LeastConnections(Policy):
    """Fewest charging sessions plus requests in flight first, then least loaded."""

    name = "least_connections"

    def _order(self, eligible: list[SubstationSnapshot], _amount_kw: float) -> list[SubstationSnapshot]:
        return sorted(eligible, key=lambda s: (s.connections, s.utilisation))


class RoundRobin(Policy):
    """Each request starts one substation further along the id order than the last."""

    name = "round_robin"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 0

    def _order(self, eligible: list[SubstationSnapshot], _amount_kw: float) -> list[SubstationSnapshot]:
        if not eligible:
            return []
        with self._lock:
            start = self._next % len(eligible)
            self._next += 1
        return eligible[start:] + eligible[:start]


class RandomChoice(Policy):
    name = "random"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def _order(self, eligible: list[SubstationSnapshot], _amount_kw: float) -> list[SubstationSnapshot]:
        return self._rng.sample(eligible, len(eligible))


class PowerOfTwo(Policy):
    """Two random candidates, the less loaded of them first; the rest least loaded first.

    Nearly as good as least_loaded, but balancers sharing stale numbers do not
    all pick the same substation.
    """

    name = "power_of_two"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def _order(self, eligible: list[SubstationSnapshot], _amount_kw: float) -> list[SubstationSnapshot]:
        if len(eligible) < 2:
            return eligible
        pair = sorted(self._rng.sample(eligible, 2), key=_by_utilisation)
        rest = sorted((s for s in eligible if s not in pair), key=_by_utilisation)
        return pair + rest


class FairShare(Policy):
    """Where the request's own allocation would be highest once admitted; ties least loaded.

    With substations that share their limit max-min fairly, this evens out the
    fair-share level across the grid: a vehicle is not curtailed to 2 kW at one
    substation while another could give it 5.
    """

    name = "fair_share"

    def _order(self, eligible: list[SubstationSnapshot], amount_kw: float) -> list[SubstationSnapshot]:
        return sorted(eligible, key=lambda s: (-s.predicted_allocation_kw(amount_kw), s.utilisation))


def expected_energy_kwh(substation: SubstationSnapshot, amount_kw: float, seconds_left: float) -> float:
    """About how much energy a session of ``amount_kw`` would get at ``substation`` in ``seconds_left``.

    The power it would be given now (``predicted_allocation_kw``) held until then: an estimate for
    ranking, not a promise; the substation's own answer says what it expects under its plan.
    """
    return substation.predicted_allocation_kw(amount_kw) * max(0.0, seconds_left) / SECONDS_PER_HOUR


def order_for_need(
    ordered: list[SubstationSnapshot], amount_kw: float, energy_kwh: float, seconds_left: float
) -> list[SubstationSnapshot]:
    """``ordered`` rearranged for a need of ``energy_kwh`` within ``seconds_left``: where it is best met first.

    First the substations where the need is expected to be met (``expected_energy_kwh`` at least the
    need, less the tolerance), then the others; within each, the most predicted power first. Equal
    substations keep their order in ``ordered`` (the configured policy's), as sorting is stable.
    """
    def rank(substation: SubstationSnapshot) -> tuple[bool, float]:
        expected = expected_energy_kwh(substation, amount_kw, seconds_left)
        return expected < energy_kwh - NEED_TOLERANCE_KWH, -substation.predicted_allocation_kw(amount_kw)

    return sorted(ordered, key=rank)


def seconds_to_deliver(request: ChargeRequest, now: float) -> float | None:
    """How long a request's need has to be delivered (seconds from ``now``, epoch seconds); None without one.

    Until its departure, or the end of its duration if that comes first.
    """
    if request.energy_kwh is None:
        return None
    limits = []
    if request.departure is not None:
        limits.append(request.departure.timestamp() - now)
    if request.duration_seconds is not None:
        limits.append(request.duration_seconds)
    return min(limits) if limits else None


class NeedFirst(Policy):
    """The configured policy's order, rearranged for a request with an energy need (``order_for_need``).

    Made per request (``with_need``), since the need and the time left are the request's own; it
    keeps the configured policy's name, which is what routed it.
    """

    def __init__(self, base: Policy, request: ChargeRequest, clock: Callable[[], float] = time.time) -> None:
        self._base = base
        self._request = request
        self._clock = clock
        self.name = base.name  # type: ignore[misc]  # the routing policy in effect is still the base one

    def _order(self, eligible: list[SubstationSnapshot], amount_kw: float) -> list[SubstationSnapshot]:
        ordered = self._base._order(eligible, amount_kw)
        seconds_left = seconds_to_deliver(self._request, self._clock())
        if seconds_left is None or self._request.energy_kwh is None:
            return ordered
        return order_for_need(ordered, amount_kw, self._request.energy_kwh, seconds_left)


def with_need(policy: Policy, request: ChargeRequest) -> Policy:
    """``policy`` itself for a request without an energy need; for one with a need, ``NeedFirst`` around it."""
    return policy if request.energy_kwh is None else NeedFirst(policy, request)


DEFAULT_POLICY = FairShare.name
POLICY_NAMES = (
    FairShare.name,
    LeastLoaded.name,
    LeastConnections.name,
    RoundRobin.name,
    RandomChoice.name,
    PowerOfTwo.name,
)


def make_policy(name: str, rng: random.Random | None = None) -> Policy:
    """A fresh policy called ``name``; ``rng`` drives random and power_of_two."""
    rng = rng or random.Random()
    if name == FairShare.name:
        return FairShare()
    if name == LeastLoaded.name:
        return LeastLoaded()
    if name == LeastConnections.name:
        return LeastConnections()
    if name == RoundRobin.name:
        return RoundRobin()
    if name == RandomChoice.name:
        return RandomChoice(rng)
    if name == PowerOfTwo.name:
        return PowerOfTwo(rng)
    raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
