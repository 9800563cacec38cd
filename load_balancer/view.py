"""The balancer's picture of every substation, kept right between two polls.

Polls arrive every few seconds, charge requests arrive all the time. Three rules
keep the picture good enough to route on without overloading anyone:

* Choosing a substation reserves the requested kW on it under the view's one
  lock, so a burst of concurrent requests spreads out instead of herding onto
  the substation that looked emptiest at the last poll.
* Every answer of a substation (201, 409, 200 on a stop) carries its load,
  capacity and ``state_version``; it updates the picture at once and releases
  the reservation.
* An observation only replaces the stored one when its ``state_version`` is not
  older, because a poll sent before an answer can come back after it.
* A 201 that arrives while other requests to the same substation are still on
  their way does not replace the load: its reported load may already include
  some of those requests, which are still counted as reservations. The admitted
  amount is added instead and remembered with its version, so a later
  observation replaces the load without losing it (see ``admissions_since_base``).

A substation is routable only while it is up, and it only comes up through a
successful poll: a new entry waits for its first poll, and one marked down by
failures waits for the poll that finds it back.

A substation that is there but unwell (a forward timed out, answered 5xx or
nonsense) is also ejected, as Envoy's outlier detection does: no poll brings it
back for ``ejection_base_seconds``, doubled at each ejection that follows
within ``ejection_memory_seconds`` of the last, up to ``ejection_max_seconds``.
So one that keeps failing right after it returns is tried less and less often.
As Envoy's ``max_ejection_percent``, at most ``max_ejected_fraction`` of the
substations (but always one) are ejected at once: when the whole machine is slow,
ejecting everyone would leave nowhere to route.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from load_balancer.policies import Policy

# Sums of floats differ in the last bits depending on their order; a request that
# exactly fills a substation must still fit.
FIT_TOLERANCE_KW = 1e-9


class SubstationConflict(Exception):
    """A substation reports an id that another registered URL already has, or a new one."""


@dataclass(frozen=True)
class Observation:
    """What a substation said about itself at one ``state_version``.

    Answers to charge requests carry no total capacity or charger count; ``None``
    keeps the value from the last report that had one.
    """

    state_version: int
    load_kw: float
    capacity_kw: float
    total_capacity_kw: float | None = None
    active_chargers: int | None = None
    # How the substation shares its limit (None from a substation that does not say):
    # the sum of its sessions' minimums, how many are suspended or curtailed, the fair-share
    # level (None when nobody is curtailed) and the least a new session gets (None: strict,
    # a session gets its whole amount or nothing).
    minimum_load_kw: float | None = None
    suspended: int = 0
    curtailed: int = 0
    fair_share_kw: float | None = None
    min_charge_kw: float | None = None


@dataclass(frozen=True)
class SubstationSnapshot:
    """One substation as the balancer sees it at one moment (immutable copy)."""

    url: str
    # Learnt at the first successful poll, which is also what first brings an entry up.
    substation_id: str | None = None
    up: bool = False
    load_kw: float = 0.0
    capacity_kw: float = 0.0
    total_capacity_kw: float = 0.0
    active_chargers: int = 0
    state_version: int = -1
    # (state_version, kW) of admissions answered after the observation at state_version:
    # load_kw and active_chargers include them, and an observation older than one keeps it.
    admissions_since_base: tuple[tuple[int, float, float], ...] = ()
    reserved_kw: float = 0.0
    # Minimums of the requests on their way to it, so a burst between polls sees each other's.
    reserved_minimum_kw: float = 0.0
    in_flight: int = 0
    minimum_load_kw: float | None = None
    suspended: int = 0
    curtailed: int = 0
    fair_share_kw: float | None = None
    min_charge_kw: float | None = None
    last_poll_at: float | None = None
    consecutive_failures: int = 0
    last_error: str | None = None
    # Outlier ejection: how often in a row, and until when (on the view's clock).
    ejections: int = 0
    ejected_until: float | None = None
    # When it last answered anything (a poll or a forward), on the view's clock.
    last_answer_at: float | None = None
    # Since when forwards have waited on it with no answer from it: set when the first one leaves,
    # moved on by every answer, None while none waits.
    waiting_since: float | None = None

    def unresponsive(self, now: float, after_seconds: float) -> bool:
        """Forwards have waited on it for ``after_seconds`` and it answered nothing meanwhile: frozen, most likely."""
        return self.in_flight > 0 and self.waiting_since is not None and now - self.waiting_since > after_seconds

    @property
    def polled_id(self) -> str:
        """The id of an entry that was polled; every entry that is, or once was, routable has one."""
        if self.substation_id is None:
            raise LookupError(f"{self.url} has not been polled yet, so its substation id is unknown")
        return self.substation_id

    @property
    def committed_kw(self) -> float:
        """Load the substation reported plus what requests on their way to it will add."""
        return self.load_kw + self.reserved_kw

    @property
    def utilisation(self) -> float:
        return self.committed_kw / self.capacity_kw if self.capacity_kw > 0 else math.inf

    @property
    def connections(self) -> int:
        return self.active_chargers + self.in_flight

    @property
    def load_percentage(self) -> float:
        return self.load_kw / self.capacity_kw * 100 if self.capacity_kw > 0 else 0.0

    def minimum_for(self, amount_kw: float) -> float:
        """The least a session of ``amount_kw`` would get here: the substation's minimum, or all of it."""
        return amount_kw if self.min_charge_kw is None else min(amount_kw, self.min_charge_kw)

    def fits(self, amount_kw: float) -> bool:
        """Whether the substation would admit it: its minimum fits beside everyone's, nobody suspended.

        A substation that does not report minimums admits what fits whole.
        """
        if not self.up:
            return False
        if self.minimum_load_kw is None:
            return self.committed_kw + amount_kw <= self.capacity_kw + FIT_TOLERANCE_KW
        needed = self.minimum_load_kw + self.reserved_minimum_kw + self.minimum_for(amount_kw)
        return self.suspended == 0 and needed <= self.capacity_kw + FIT_TOLERANCE_KW

    def predicted_allocation_kw(self, amount_kw: float) -> float:
        """About how much a session of ``amount_kw`` would get here once admitted.

        Curtailed sessions share what the others leave (``capacity - uncurtailed load``);
        the new session and the requests on their way join them. An estimate for ranking,
        not a promise: the substation decides.
        """
        pending = self.in_flight + 1
        if self.fair_share_kw is not None and self.curtailed:
            # Requests on their way will be curtailed too: they take a share of the level, not their amounts.
            uncurtailed = self.load_kw - self.curtailed * self.fair_share_kw
            level = (self.capacity_kw - uncurtailed) / (self.curtailed + pending)
        else:
            left = self.capacity_kw - self.committed_kw
            if amount_kw <= left:
                return amount_kw
            level = max(left, self.capacity_kw / (self.active_chargers + pending))
        return max(0.0, min(amount_kw, level))

    def as_status(self, now: float) -> dict[str, Any]:
        """The entry of ``GET /status`` and ``GET /substations``."""
        polled = self.last_poll_at is not None
        return {
            "id": self.substation_id,
            "url": self.url,
            "up": self.up,
            "load": _kw(self.load_kw) if polled else None,
            "capacity": _kw(self.capacity_kw) if polled else None,
            "total_capacity": _kw(self.total_capacity_kw) if polled else None,
            "load_percentage": round(self.load_percentage, 2) if polled and self.capacity_kw > 0 else None,
            "available": _kw(self.capacity_kw - self.load_kw) if polled else None,
            "active_chargers": self.active_chargers if polled else None,
            "reserved_kw": _kw(self.reserved_kw),
            "minimum_load": _kw(self.minimum_load_kw) if polled and self.minimum_load_kw is not None else None,
            "suspended": self.suspended if polled else None,
            "curtailed": self.curtailed if polled else None,
            "fair_share_kw": _kw(self.fair_share_kw) if polled and self.fair_share_kw is not None else None,
            "in_flight": self.in_flight,
            "state_version": self.state_version if polled else None,
            "last_poll_age_seconds": round(now - self.last_poll_at, 3) if polled else None,
            "consecutive_failures": self.consecutive_failures,
            "last_error": self.last_error,
            "ejected_for_seconds": (
                round(self.ejected_until - now, 3)
                if self.ejected_until is not None and self.ejected_until > now else None
            ),
            "ejections": self.ejections,
        }


def _kw(value: float) -> float:
    return round(value, 3)


def _rebased(current: SubstationSnapshot, observation: Observation, restarted: bool = False) -> SubstationSnapshot:
    """``current`` with ``observation`` as its new base, keeping admissions it does not include yet."""
    later = () if restarted else tuple(a for a in current.admissions_since_base if a[0] > observation.state_version)
    minimum_load = observation.minimum_load_kw
    if minimum_load is not None:
        minimum_load += math.fsum(minimum for _, _, minimum in later)
    return replace(
        current,
        state_version=observation.state_version,
        load_kw=observation.load_kw + math.fsum(amount for _, amount, _ in later),
        capacity_kw=observation.capacity_kw,
        total_capacity_kw=(
            current.total_capacity_kw if observation.total_capacity_kw is None else observation.total_capacity_kw
        ),
        active_chargers=(
            current.active_chargers if observation.active_chargers is None else observation.active_chargers + len(later)
        ),
        admissions_since_base=later,
        minimum_load_kw=minimum_load,
        suspended=observation.suspended,
        curtailed=observation.curtailed,
        fair_share_kw=observation.fair_share_kw,
        min_charge_kw=observation.min_charge_kw,
    )


def _with_admission(current: SubstationSnapshot, answer: Observation, amount_kw: float) -> SubstationSnapshot:
    minimum = current.minimum_for(amount_kw)
    return replace(
        current,
        load_kw=current.load_kw + amount_kw,
        capacity_kw=answer.capacity_kw,
        active_chargers=current.active_chargers + 1,
        admissions_since_base=(*current.admissions_since_base, (answer.state_version, amount_kw, minimum)),
        minimum_load_kw=None if current.minimum_load_kw is None else current.minimum_load_kw + minimum,
    )


class GridView:
    """Thread-safe map of substation URL -> :class:`SubstationSnapshot`."""

    def __init__(
        self,
        failure_threshold: int = 1,
        clock: Callable[[], float] = time.monotonic,
        ejection_base_seconds: float = 1.0,
        ejection_max_seconds: float = 30.0,
        ejection_memory_seconds: float = 60.0,
        max_ejected_fraction: float = 0.5,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self._failure_threshold = failure_threshold
        self._ejection_base = ejection_base_seconds
        self._ejection_max = ejection_max_seconds
        self._ejection_memory = ejection_memory_seconds
        self._max_ejected_fraction = max_ejected_fraction
        self._clock = clock
        self._lock = threading.Lock()
        self._substations: dict[str, SubstationSnapshot] = {}
        # How many observations were applied per URL: lets a poll tell "older than
        # an answer that arrived meanwhile" from "the substation restarted".
        self._applied: dict[str, int] = {}

    def now(self) -> float:
        return self._clock()

    # Registry -------------------------------------------------------------

    def add_url(self, url: str) -> None:
        """Track a URL whose id is not known yet (it is learnt at its first poll)."""
        with self._lock:
            if url not in self._substations:
                self._substations[url] = SubstationSnapshot(url=url)
                self._applied[url] = 0

    def add_polled(self, url: str, substation_id: str, observation: Observation) -> tuple[SubstationSnapshot, bool]:
        """Register a substation that was just polled; ``(entry, created)``."""
        with self._lock:
            created = url not in self._substations
            if created:
                self._substations[url] = SubstationSnapshot(url=url)
                self._applied[url] = 0
            try:
                self._record_poll_locked(url, substation_id, observation, accept_older=True)
            except SubstationConflict:
                if created:
                    self._forget_locked(url)
                raise
            return self._substations[url], created

    def remove(self, substation_id: str) -> SubstationSnapshot | None:
        with self._lock:
            entry = self._find_locked(substation_id)
            if entry is not None:
                self._forget_locked(entry.url)
            return entry

    def _forget_locked(self, url: str) -> None:
        del self._substations[url]
        del self._applied[url]

    # Reading --------------------------------------------------------------

    def snapshots(self) -> list[SubstationSnapshot]:
        """Every entry, known ids first in id order, then URLs still waiting for their first poll."""
        with self._lock:
            entries = list(self._substations.values())
        return sorted(entries, key=lambda s: (s.substation_id is None, s.substation_id or "", s.url))

    def entry(self, url: str) -> SubstationSnapshot | None:
        """The substation at ``url`` as the view has it now."""
        with self._lock:
            return self._substations.get(url)

    def find(self, substation_id: str) -> SubstationSnapshot | None:
        with self._lock:
            return self._find_locked(substation_id)

    def _find_locked(self, substation_id: str) -> SubstationSnapshot | None:
        return next((s for s in self._substations.values() if s.substation_id == substation_id), None)

    def poll_targets(self) -> list[tuple[str, int]]:
        """``(url, marker)`` per entry; hand the marker back to :meth:`record_poll`."""
        with self._lock:
            return list(self._applied.items())

    # Polls ----------------------------------------------------------------

    def record_poll(self, url: str, substation_id: str, observation: Observation, marker: int) -> bool:
        """Apply a successful poll; True when it brings the substation back up.

        The poll's numbers are dropped when an answer with a newer state_version
        arrived while the poll was under way. A lower version with no answer in
        between means the substation restarted and counts from zero again.
        """
        with self._lock:
            if url not in self._substations:
                return False  # deregistered while the poll was under way
            was_up = self._substations[url].up
            self._record_poll_locked(url, substation_id, observation, accept_older=self._applied[url] == marker)
            return not was_up

    def _record_poll_locked(self, url: str, substation_id: str, observation: Observation, accept_older: bool) -> None:
        entry = self._substations[url]
        self._check_identity_locked(entry, substation_id)
        if observation.state_version >= entry.state_version or accept_older:
            entry = _rebased(entry, observation, restarted=observation.state_version < entry.state_version)
            self._applied[url] += 1
        now = self._clock()
        ejected = entry.ejected_until is not None and now < entry.ejected_until
        self._substations[url] = replace(
            entry,
            substation_id=substation_id,
            up=not ejected,
            last_poll_at=now,
            last_answer_at=now,
            consecutive_failures=entry.consecutive_failures if ejected else 0,
            last_error=entry.last_error if ejected else None,
        )

    def _check_identity_locked(self, entry: SubstationSnapshot, substation_id: str) -> None:
        if entry.substation_id is not None and entry.substation_id != substation_id:
            raise SubstationConflict(
                f"{entry.url} now reports id {substation_id!r} but was registered as "
                f"{entry.substation_id!r}; DELETE /substations/{entry.substation_id} and register it again"
            )
        owner = self._find_locked(substation_id)
        if owner is not None and owner.url != entry.url:
            raise SubstationConflict(
                f"{entry.url} reports id {substation_id!r}, which {owner.url} already has; "
                "give every substation its own SUBSTATION_ID"
            )

    def record_failure(self, url: str, reason: str, eject: bool = False) -> bool:
        """Count a failed poll or forward; True when this failure marks the substation down.

        ``eject``: the substation answered badly or not in time (not: refused the connection);
        it is ejected, for longer if it was ejected recently too.
        """
        with self._lock:
            entry = self._substations.get(url)
            if entry is None:
                return False
            failures = entry.consecutive_failures + 1
            now = self._clock()
            ejections, ejected_until = entry.ejections, entry.ejected_until
            already = ejected_until is not None and now < ejected_until
            eject = eject and (already or self._may_eject_locked(now))
            down = entry.up and (failures >= self._failure_threshold or eject)
            if eject and not already:
                recent = ejected_until is not None and now - ejected_until < self._ejection_memory
                ejections = ejections + 1 if recent else 1
                ejected_until = now + min(self._ejection_max, self._ejection_base * 2 ** (ejections - 1))
            self._substations[url] = replace(
                entry,
                up=entry.up and not down,
                consecutive_failures=failures,
                last_error=reason,
                ejections=ejections,
                ejected_until=ejected_until,
            )
            return down

    def _may_eject_locked(self, now: float) -> bool:
        ejected = sum(1 for e in self._substations.values() if e.ejected_until is not None and now < e.ejected_until)
        return ejected < max(1, math.floor(self._max_ejected_fraction * len(self._substations)))

    # Routing --------------------------------------------------------------

    def choose(
        self, amount_kw: float, policy: "Policy", unresponsive_after: float | None = None
    ) -> list[SubstationSnapshot]:
        """The policy's candidates for ``amount_kw``, with the amount reserved on the first.

        Ranking and reserving under one lock is what makes concurrent requests
        see each other's choices. With ``unresponsive_after``, a substation that has
        forwards waiting and has answered nothing for that long goes last: a frozen
        one stops drawing requests within moments, long before anything times out.
        """
        with self._lock:
            candidates = policy.order(self._substations.values(), amount_kw)
            if unresponsive_after is not None:
                now = self._clock()
                candidates.sort(key=lambda candidate: candidate.unresponsive(now, unresponsive_after))
            if candidates:
                self._reserve_locked(candidates[0].url, amount_kw)
            return candidates

    def reserve(self, url: str, amount_kw: float) -> bool:
        """Reserve on a later candidate, if it is still up and the amount still fits."""
        with self._lock:
            entry = self._substations.get(url)
            if entry is None or not entry.fits(amount_kw):
                return False
            self._reserve_locked(url, amount_kw)
            return True

    def _reserve_locked(self, url: str, amount_kw: float) -> None:
        entry = self._substations[url]
        self._substations[url] = replace(
            entry,
            reserved_kw=entry.reserved_kw + amount_kw,
            reserved_minimum_kw=entry.reserved_minimum_kw + entry.minimum_for(amount_kw),
            in_flight=entry.in_flight + 1,
            waiting_since=entry.waiting_since if entry.in_flight else self._clock(),
        )

    def release(
        self, url: str, amount_kw: float, answer: Observation | None = None, *, admitted: bool = False
    ) -> None:
        """The forward to ``url`` is over: drop its reservation and apply the answer, if any.

        ``admitted`` says the answer is a 201 for ``amount_kw``.
        """
        with self._lock:
            entry = self._substations.get(url)
            if entry is None:
                return
            in_flight = max(0, entry.in_flight - 1)
            entry = replace(
                entry,
                # With nothing left in flight the sums are exactly zero: float leftovers must not linger.
                reserved_kw=max(0.0, entry.reserved_kw - amount_kw) if in_flight else 0.0,
                reserved_minimum_kw=(
                    max(0.0, entry.reserved_minimum_kw - entry.minimum_for(amount_kw)) if in_flight else 0.0
                ),
                in_flight=in_flight,
            )
            if answer is not None:
                entry = replace(entry, last_answer_at=self._clock(), waiting_since=self._clock())
            if not in_flight:
                entry = replace(entry, waiting_since=None)
            self._substations[url] = entry
            if answer is not None:
                self._apply_answer_locked(url, answer, amount_kw if admitted else None)

    def observe(self, url: str, answer: Observation) -> None:
        """Apply an answer that involved no reservation (e.g. a stopped session)."""
        with self._lock:
            if url in self._substations:
                self._apply_answer_locked(url, answer, None)

    def _apply_answer_locked(self, url: str, answer: Observation, admitted_kw: float | None) -> None:
        entry = self._substations[url]
        if admitted_kw is not None and entry.in_flight and answer.state_version > entry.state_version:
            updated = _with_admission(entry, answer, admitted_kw)
        elif answer.state_version >= entry.state_version:
            updated = _rebased(entry, answer)
        else:
            return  # older than what is known, and an admission in it is already counted
        self._substations[url] = updated
        self._applied[url] += 1
