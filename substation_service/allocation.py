"""How one substation shares its limit among its charging sessions. Plain Python, no web framework.

Power is counted in whole milliwatts (``int``) inside this module, so sums are
exact: the sum of the allocations can never pass the limit by rounding, and
running totals do not drift however many sessions come and go. Callers
convert at the edge with :func:`to_mw` / :func:`to_kw`.

Two policies, one mechanism:

* ``fair_share`` (EVerest's energy manager, Tinkerforge WARP, OCPP smart
  charging): every charging session gets at least its minimum
  (``MIN_CHARGE_KW``, or its whole amount when it asks for less) and at most its
  amount; the rest is shared max-min fairly ("water-filling"): every session
  gets ``min(level, amount)`` for one fair-share ``level`` chosen so that the
  limit is used up whenever anyone gets less than asked (work-conserving).
* ``strict``: a session's minimum is its whole amount, so it gets all of it or
  nothing; the same code then never curtails anyone.

A session may have a minimum of its own above ``MIN_CHARGE_KW`` (a three-phase
vehicle needs about 4.14 kW): it then gets ``min(amount, max(minimum, level))``,
and the level is the largest that still fits the limit with those floors. With
one minimum for all, the floors never bind (the level is at least the minimum
whenever every minimum fits), and the level is found incrementally as before.

When even the minimums do not fit (the limit fell), sessions are suspended
(0 kW), the most recently started first; when room returns they resume,
the one suspended longest first. A new session is admitted only when nobody
is suspended and every minimum, its own included, still fits.
"""
from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum

MW_PER_KW = 1_000_000


def to_mw(kw: float) -> int:
    """kW as whole milliwatts, rounded down: a limit never grows by conversion."""
    return math.floor(kw * MW_PER_KW)


def amount_to_mw(kw: float) -> int:
    """A requested amount as whole milliwatts: the nearest, and at least one."""
    return max(1, round(kw * MW_PER_KW))


def to_kw(mw: int) -> float:
    return mw / MW_PER_KW


class AllocationPolicy(str, Enum):
    FAIR_SHARE = "fair_share"
    STRICT = "strict"
    # Sessions with an energy need by a departure first, most urgent first (substation_service/scheduling.py);
    # the others share what is left as under fair_share, with the same minimums.
    DEADLINE = "deadline"


ALLOCATION_POLICIES = tuple(policy.value for policy in AllocationPolicy)


def minimum_mw(policy: AllocationPolicy, amount_mw: int, min_charge_mw: int) -> int:
    """The least a charging session of ``amount_mw`` may get under ``policy``."""
    if policy is AllocationPolicy.STRICT:
        return amount_mw
    return min(amount_mw, min_charge_mw)


def allocation_mw(amount_mw: int, level_mw: int | None, floor_mw: int = 0) -> int:
    """What a charging session gets at ``level_mw``: the level, but at least its floor and at most its amount."""
    return amount_mw if level_mw is None else min(amount_mw, max(floor_mw, level_mw))


@dataclass
class Member:
    """One session as the allocator sees it."""

    key: str
    amount_mw: int
    minimum_mw: int
    # Admission order: the larger, the more recently started.
    order: int


class ChargingSet:
    """The sessions of one substation, charging or suspended, and the level they share.

    Not thread-safe: the ledger calls it under its lock. Every operation keeps
    ``sum of minimums of charging sessions <= limit``; call :meth:`fit` after a
    change of limit and it suspends or resumes sessions until that holds again.
    """

    def __init__(self) -> None:
        self._members: dict[str, Member] = {}
        self._charging: set[str] = set()
        # Charging sessions, most recently started first (lazy: entries of non-charging ones are skipped).
        self._newest_first: list[tuple[int, str]] = []
        # Suspended sessions, longest suspended first.
        self._suspended: OrderedDict[str, None] = OrderedDict()
        self._amounts: list[int] = []  # amounts of the charging sessions, ascending
        self._minimums: list[int] = []  # minimums of the charging sessions, ascending
        # Charging sessions held at a floor equal to their whole amount above the level: not curtailed.
        self._whole_at_floor = 0
        # The water-filling split: the first ``_whole`` amounts are served whole, ``_whole_total`` is their sum.
        self._whole = 0
        self._whole_total = 0
        self._minimum_total = 0
        self._suspended_minimum_total = 0
        self._level: int | None = None
        self._allocated_total = 0
        self._limit = 0

    # ----- reading ---------------------------------------------------------------------------

    @property
    def level_mw(self) -> int | None:
        return self._level

    @property
    def allocated_mw(self) -> int:
        return self._allocated_total

    @property
    def limit_mw(self) -> int:
        return self._limit

    @property
    def minimum_total_mw(self) -> int:
        """Sum of the minimums of every session, suspended ones included: what admission must keep."""
        return self._minimum_total + self._suspended_minimum_total

    @property
    def charging_minimum_total_mw(self) -> int:
        """Sum of the minimums of the charging sessions: what must stay within the limit."""
        return self._minimum_total

    @property
    def suspended_count(self) -> int:
        return len(self._suspended)

    @property
    def suspended_in_order(self) -> list[str]:
        """The suspended sessions, the one suspended longest first (who resumes first)."""
        return list(self._suspended)

    @property
    def curtailed_count(self) -> int:
        """Charging sessions that get less than they ask for."""
        if self._level is None:
            return 0
        return len(self._amounts) - bisect.bisect_right(self._amounts, self._level) - self._whole_at_floor

    def is_charging(self, key: str) -> bool:
        return key in self._charging

    def allocation_of(self, key: str) -> int:
        if key not in self._charging:
            return 0
        member = self._members[key]
        return allocation_mw(member.amount_mw, self._level, member.minimum_mw)

    def __len__(self) -> int:
        return len(self._members)

    # ----- changing --------------------------------------------------------------------------

    def admits(self, minimum: int) -> bool:
        """True when a new session of this minimum fits beside everyone's minimum, nobody waiting."""
        return not self._suspended and self._minimum_total + minimum <= self._limit

    def restore(self, members: list[Member], suspended_in_order: list[str], limit_mw: int) -> None:
        """Take back sessions read from disk: the suspended ones in the order they were suspended."""
        suspended = set(suspended_in_order)
        for member in members:
            self._members[member.key] = member
            if member.key not in suspended:
                self._start_charging(member)
        for key in suspended_in_order:
            self._suspended[key] = None
            self._suspended_minimum_total += self._members[key].minimum_mw
        self._limit = max(0, limit_mw)
        self._reallocate()

    def rebuild_minimums(self) -> None:
        """Recount the minimums after the members' ``minimum_mw`` changed (a switch of policy)."""
        self._minimums = sorted(self._members[key].minimum_mw for key in self._charging)
        self._minimum_total = sum(self._minimums)
        self._suspended_minimum_total = sum(self._members[key].minimum_mw for key in self._suspended)

    def add(self, member: Member) -> None:
        """Add an admitted session as charging; the caller checked :meth:`admits`."""
        self._members[member.key] = member
        self._start_charging(member)
        self._reallocate()

    def fits_change(self, key: str, minimum: int) -> bool:
        """True when a charging session's minimum can become ``minimum`` without suspending anyone.

        A suspended session may take any minimum: it resumes once that fits.
        """
        if key not in self._charging:
            return True
        return self._minimum_total - self._members[key].minimum_mw + minimum <= self._limit

    def change(self, key: str, amount: int, minimum: int) -> tuple[list[str], list[str]]:
        """A session asks for another amount or minimum; the caller checked :meth:`fits_change`.

        Returns ``(suspended, resumed)`` by the change: a lowered minimum may let others resume.
        """
        member = self._members[key]
        if key in self._charging:
            # Out and in again: its amount moves in the sorted amounts, its minimum in the total.
            self._stop_charging(member)
            member.amount_mw, member.minimum_mw = amount, minimum
            self._start_charging(member)
        else:
            self._suspended_minimum_total += minimum - member.minimum_mw
            member.amount_mw, member.minimum_mw = amount, minimum
        return self.fit(self._limit)

    def remove(self, key: str) -> tuple[list[str], list[str]]:
        """Drop a session that ended; returns ``(suspended, resumed)`` by the change (resumed only)."""
        member = self._members.pop(key)
        if key in self._charging:
            self._stop_charging(member)
        else:
            del self._suspended[key]
            self._suspended_minimum_total -= member.minimum_mw
        return self.fit(self._limit)

    def fit(self, limit_mw: int) -> tuple[list[str], list[str]]:
        """Apply a new limit: suspend newest first or resume longest-suspended first, then share.

        Returns the keys suspended and resumed by this call.
        """
        self._limit = max(0, limit_mw)
        suspended: list[str] = []
        while self._minimum_total > self._limit:
            member = self._newest_charging()
            self._stop_charging(member)
            self._suspended[member.key] = None
            self._suspended_minimum_total += member.minimum_mw
            suspended.append(member.key)
        resumed: list[str] = []
        # Having had to suspend, there is no room to resume anyone: a session suspended just now
        # must not come straight back ahead of older ones.
        while self._suspended and not suspended:
            key = next(iter(self._suspended))
            member = self._members[key]
            if self._minimum_total + member.minimum_mw > self._limit:
                break  # first come, first served: nobody overtakes the one waiting longest
            del self._suspended[key]
            self._suspended_minimum_total -= member.minimum_mw
            self._start_charging(member)
            resumed.append(key)
        self._reallocate()
        return suspended, resumed

    def _start_charging(self, member: Member) -> None:
        self._charging.add(member.key)
        heapq.heappush(self._newest_first, (-member.order, member.key))
        if len(self._newest_first) > 2 * len(self._charging) + 64:
            # Entries of sessions that ended pile up otherwise: keep the heap to the charging ones.
            self._newest_first = [(-self._members[key].order, key) for key in self._charging]
            heapq.heapify(self._newest_first)
        index = bisect.bisect_right(self._amounts, member.amount_mw)
        self._amounts.insert(index, member.amount_mw)
        if index < self._whole:  # smaller than an amount served whole: served whole too, for now
            self._whole += 1
            self._whole_total += member.amount_mw
        self._minimum_total += member.minimum_mw
        bisect.insort(self._minimums, member.minimum_mw)

    def _stop_charging(self, member: Member) -> None:
        self._charging.discard(member.key)
        index = bisect.bisect_left(self._amounts, member.amount_mw)
        del self._amounts[index]
        if index < self._whole:
            self._whole -= 1
            self._whole_total -= member.amount_mw
        self._minimum_total -= member.minimum_mw
        del self._minimums[bisect.bisect_left(self._minimums, member.minimum_mw)]

    def _newest_charging(self) -> Member:
        while True:
            _, key = heapq.heappop(self._newest_first)
            if key in self._charging:
                return self._members[key]

    def _reallocate(self) -> None:
        """Find the max-min fair level again, moving the split from where it was.

        The level ``L`` is the largest whole number of milliwatts with
        ``sum(min(L, a)) <= limit``: the ``k`` smallest amounts are served whole
        and the rest get ``L = (limit - their sum) // (n - k)``, for the largest
        ``k`` whose own amount still fits under that level. A change moves the
        split by as many sessions as change between whole and curtailed, usually
        none or one, so an admission costs the same with ten sessions or a thousand
        (an O(n) prefix sum each time would not).
        """
        amounts, limit, count = self._amounts, self._limit, len(self._amounts)
        whole, total = self._whole, self._whole_total
        # Too many served whole: the largest of them does not fit under the level they would leave.
        while whole and (whole == count and total > limit
                         or whole < count and amounts[whole - 1] * (count - whole) > limit - total):
            whole -= 1
            total -= amounts[whole]
        # Too few: the next amount would still fit under the level with it served whole.
        while whole < count and (
            total + amounts[whole] <= limit
            if whole + 1 == count
            else amounts[whole] * (count - whole - 1) <= limit - total - amounts[whole]
        ):
            total += amounts[whole]
            whole += 1
        self._whole, self._whole_total = whole, total
        self._whole_at_floor = 0
        if whole == count:
            self._level, self._allocated_total = None, total
        else:
            self._level = (limit - total) // (count - whole)
            self._allocated_total = total + (count - whole) * self._level
            if self._minimums[-1] > self._level:
                self._reallocate_with_floors()

    def _reallocate_with_floors(self) -> None:
        """The level when some session's own minimum is above the plain level: O(n), only then.

        ``g(L) = sum(min(a, max(f, L)))`` grows with ``L``; the level is the largest whole ``L``
        with ``g(L) <= limit``, found by bisection on prefix sums of the sorted amounts and floors.
        The floors fit (``fit`` keeps their sum within the limit), so ``g(0) <= limit``.
        """
        amounts, floors, limit = self._amounts, self._minimums, self._limit
        count = len(amounts)
        amount_sums = [0, *itertools.accumulate(amounts)]
        floor_sums = [0, *itertools.accumulate(floors)]

        def used(level: int) -> int:
            whole = bisect.bisect_right(amounts, level)  # amounts served whole
            below = bisect.bisect_right(floors, level)  # floors at or under the level
            # Floors above the level hold their sessions there (f <= a, so none of them is served whole).
            return amount_sums[whole] + floor_sums[count] - floor_sums[below] + level * (below - whole)

        low, high = 0, self._level  # g(low) <= limit; the plain level is the most it can be
        while low < high:
            middle = (low + high + 1) // 2
            if used(middle) <= limit:
                low = middle
            else:
                high = middle - 1
        self._level, self._allocated_total = low, used(low)
        self._whole_at_floor = sum(
            1 for key in self._charging
            if self._members[key].minimum_mw == self._members[key].amount_mw > low
        )
