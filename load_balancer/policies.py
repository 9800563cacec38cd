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
from abc import ABC, abstractmethod
from typing import ClassVar, Iterable

from load_balancer.view import SubstationSnapshot


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
