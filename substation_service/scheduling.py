"""Energy by departure: share a substation's limit by who needs it most before leaving. Plain Python, no web framework.

A session may state a need: the energy it still needs and when it departs.
The deadline policy shares the limit in three passes, in whole milliwatts
like :mod:`substation_service.allocation`:

1. Every charging session gets its minimum. Who charges at all follows the
   same rules as ``fair_share`` (:class:`~substation_service.allocation.ChargingSet`
   decides): when the minimums do not fit, the newest are suspended, and they
   resume longest-suspended first.
2. What is left goes to the sessions with a need, most urgent first, each up
   to its maximum power. First come the sessions that must charge at full
   power now or miss their need (laxity, the time left minus the time the
   remaining energy takes at full power, between 0 and ``URGENT_WITHIN_SECONDS``),
   then the others by *priority*: earliest departure first (``edf``) or least
   laxity first (``llf``). A session whose need can no longer be met keeps its
   place: what it still gets counts for the energy delivered. Sessions of
   equal priority at the point where the power runs out share what is left of
   it max-min fairly.
3. What is left after every session with a need has its maximum goes to the
   sessions without a need, shared max-min fairly as ``fair_share`` shares it.

A session never gets more than it can use before it is done: its maximum power
is capped at its remaining energy over the planning period when one is given
(:func:`usable_mw`), and a session with nothing left to charge gets nothing.

:func:`plan` computes the whole plan from scratch in O(n log n), for either
priority. :class:`DeadlineSet` keeps the plan up to date at every event
(arrival, departure, a change of limit, of a session's maximum or urgency) in
O(log n) plus the sessions that move across the point where the power runs
out, usually none or one: re-planning with a thousand sessions costs about what
it costs with ten. It orders by a key fixed when a session is admitted: the
departure, or for least laxity the latest time it can start at
full power and still finish (``departure - remaining / max power``), which
orders as the laxities do at that moment. Laxities of sessions held below
their maximum shrink as time passes; the urgency mark, which the owner sets
from the energy it integrates, is what catches up with them.
"""
from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

from substation_service.allocation import ChargingSet, Member, amount_to_mw

SECONDS_PER_HOUR = 3600.0


class Priority(str, Enum):
    EARLIEST_DEADLINE = "edf"
    LEAST_LAXITY = "llf"


# Measured on the seeded workplace day at the moderate limit (benchmarks/energy.py): least laxity
# delivered more energy than earliest deadline and than any of acnportal's sorted schedules, and met
# more needs than they did; earliest deadline met the most needs but delivered less energy.
DEFAULT_PRIORITY = Priority.LEAST_LAXITY
# A session with less laxity than this must charge at full power now: one planning period.
URGENT_WITHIN_SECONDS = 300.0


@dataclass(frozen=True)
class Need:
    """One session as the deadline policy sees it.

    ``remaining_kwh`` and ``departure`` (seconds, on the caller's clock) are None
    for a session that stated no need; it is then shared max-min fairly with the
    others that have none.
    """

    key: str
    max_kw: float
    minimum_kw: float
    remaining_kwh: float | None = None
    departure: float | None = None
    # Admission order: the larger, the more recently started (who is suspended first).
    order: int = 0

    @property
    def has_need(self) -> bool:
        return self.remaining_kwh is not None


def usable_mw(max_kw: float, remaining_kwh: float | None, period_seconds: float | None) -> int:
    """The most a session can use: its maximum, or what finishes its need within one planning period."""
    cap = amount_to_mw(max_kw)
    if remaining_kwh is None:
        return cap
    if remaining_kwh <= 0:
        return 0
    if period_seconds:
        cap = min(cap, max(1, math.floor(remaining_kwh * SECONDS_PER_HOUR / period_seconds * 1_000_000)))
    return cap


def laxity_seconds(remaining_kwh: float, max_kw: float, departure: float, now: float) -> float:
    """Time to spare: time left before departure minus the time the need takes at full power."""
    return (departure - now) - remaining_kwh / max_kw * SECONDS_PER_HOUR


def is_urgent(remaining_kwh: float, max_kw: float, departure: float | None, now: float,
              within_seconds: float = URGENT_WITHIN_SECONDS) -> bool:
    """True when the need can still be met, but only by charging at full power from now on."""
    if departure is None or remaining_kwh <= 0:
        return False
    return 0 <= laxity_seconds(remaining_kwh, max_kw, departure, now) < within_seconds


def priority_value(priority: Priority, remaining_kwh: float, max_kw: float, departure: float | None) -> float:
    """The order among sessions that are not urgent, smallest first.

    For least laxity it is the latest time the session can start at full power and still
    finish: at any one instant the laxities are these values less the same ``now``.
    """
    if departure is None:
        return math.inf
    if priority is Priority.EARLIEST_DEADLINE:
        return departure
    return departure - remaining_kwh / max_kw * SECONDS_PER_HOUR


def max_min_share(members: list[Member], budget_mw: int) -> dict[str, int]:
    """``fair_share``'s allocation of ``budget_mw`` above the members' minimums (which must fit)."""
    shared = ChargingSet()
    shared.restore(members, [], sum(member.minimum_mw for member in members) + max(0, budget_mw))
    return {member.key: shared.allocation_of(member.key) for member in members}


def plan(
    needs: list[Need],
    limit_mw: int,
    now: float,
    priority: Priority = DEFAULT_PRIORITY,
    period_seconds: float | None = None,
    urgent_within_seconds: float = URGENT_WITHIN_SECONDS,
) -> dict[str, int]:
    """Each session's power in milliwatts under the deadline policy, computed from scratch.

    ``period_seconds`` is how long the plan holds: no session gets more than finishes its
    need within it. Sessions are suspended as a :class:`ChargingSet` that admitted them in ``order``
    and then met ``limit_mw`` would: newest first until the minimums fit.
    """
    limit = max(0, limit_mw)
    members = [_member(need, period_seconds) for need in needs]
    charging = ChargingSet()
    charging.restore(sorted(members, key=lambda member: member.order), [], limit)
    charging.fit(limit)
    powers = {member.key: 0 for member in members}
    budget = limit - charging.charging_minimum_total_mw
    with_need: list[tuple[tuple[bool, float, int], Member]] = []
    without_need: list[Member] = []
    for need, member in zip(needs, members):
        if not charging.is_charging(member.key):
            continue
        powers[member.key] = member.minimum_mw
        if need.has_need:
            with_need.append((_priority_key(need, priority, now, urgent_within_seconds), member))
        else:
            without_need.append(member)
    with_need.sort(key=lambda item: item[0])
    start = 0
    while start < len(with_need) and budget > 0:
        end = start + 1
        while end < len(with_need) and with_need[end][0][:2] == with_need[start][0][:2]:
            end += 1  # a tie of priority: these share max-min fairly
        group = [member for _, member in with_need[start:end]]
        extra = sum(member.amount_mw - member.minimum_mw for member in group)
        if extra <= budget:
            for member in group:
                powers[member.key] = member.amount_mw
        else:
            powers.update(max_min_share(group, budget))
        budget -= min(extra, budget)
        start = end
    if without_need:
        powers.update(max_min_share(without_need, budget))
    return powers


def _member(need: Need, period_seconds: float | None) -> Member:
    cap = usable_mw(need.max_kw, need.remaining_kwh, period_seconds)
    return Member(need.key, cap, min(cap, amount_to_mw(need.minimum_kw)), need.order)


def _priority_key(need: Need, priority: Priority, now: float, within: float) -> tuple[bool, float, int]:
    """Sort key, most urgent first: the urgent ones, then by deadline or laxity, then by admission."""
    remaining = need.remaining_kwh or 0.0
    urgent = is_urgent(remaining, need.max_kw, need.departure, now, within)
    # The maximum as DeadlineSet holds it (whole milliwatts), so both order alike.
    max_kw = amount_to_mw(need.max_kw) / 1_000_000
    return not urgent, priority_value(priority, remaining, max_kw, need.departure), need.order


class DeadlineSet:
    """The deadline policy's plan of one substation, kept up to date event by event.

    Not thread-safe: its owner calls it under a lock. It gives the same powers as
    :func:`plan` for the same charging sessions, limit and urgency marks, with
    each session's key taken when it was admitted.
    Its owner integrates the energy, so it is the owner that says when a session
    turns urgent or stops being so (:meth:`set_urgent`, with :func:`is_urgent`).
    """

    def __init__(self, limit_mw: int = 0, priority: Priority = DEFAULT_PRIORITY) -> None:
        self._priority = priority
        self._set = ChargingSet()  # who charges: the same suspend/resume rules as fair_share
        self._set.fit(limit_mw)
        self._order = 0
        self._members: dict[str, Member] = {}
        self._keys: dict[str, tuple[bool, float, int]] = {}  # priority key of each session with a need
        # Charging sessions with a need, most urgent first, and the power each takes above its minimum.
        self._queue: list[tuple[bool, float, int]] = []
        self._queue_keys: list[str] = []
        self._extras: list[int] = []
        # The first ``_full`` of the queue get their maximum; ``_full_total`` is their extras' sum.
        self._full = 0
        self._full_total = 0
        self._tie: dict[str, int] = {}  # the sessions sharing the rest where it runs out, and their power
        self._free = ChargingSet()  # charging sessions without a need
        self._free_minimums = 0
        self._changed: set[str] = set()  # see take_changed

    # ----- reading ---------------------------------------------------------------------------

    @property
    def limit_mw(self) -> int:
        return self._set.limit_mw

    @property
    def priority(self) -> Priority:
        return self._priority

    def is_urgent(self, key: str) -> bool:
        return key in self._keys and not self._keys[key][0]

    def admits(self, minimum_mw: int) -> bool:
        return self._set.admits(minimum_mw)

    def fits_change(self, key: str, minimum_mw: int) -> bool:
        return self._set.fits_change(key, minimum_mw)

    def is_charging(self, key: str) -> bool:
        return self._set.is_charging(key)

    def allocation_of(self, key: str) -> int:
        """A session's power now: O(log n)."""
        if not self._set.is_charging(key):
            return 0
        if key not in self._keys:
            return self._free.allocation_of(key)
        if key in self._tie:
            return self._tie[key]
        member = self._members[key]
        position = bisect.bisect_left(self._queue, self._keys[key])
        return member.amount_mw if position < self._full else member.minimum_mw

    def allocations(self) -> dict[str, int]:
        return {key: self.allocation_of(key) for key in self._members}

    @property
    def suspended_in_order(self) -> list[str]:
        return self._set.suspended_in_order

    def queue_keys(self) -> list[str]:
        """The charging sessions with a need in the order they are served, the most urgent first; a copy.

        O(n), but at the speed of a list copy.
        """
        return list(self._queue_keys)

    def position(self, key: str) -> int | None:
        """Where a charging session with a need is in :meth:`queue_keys`: O(log n). None for any other."""
        if key not in self._keys or not self._set.is_charging(key):
            return None
        return bisect.bisect_left(self._queue, self._keys[key])

    @property
    def served_in_full(self) -> int:
        """How many sessions at the head of :meth:`queue_keys` get their maximum."""
        return self._full

    def member(self, key: str) -> Member:
        """A session as the plan holds it: its usable maximum and its minimum."""
        return self._members[key]

    def has_need(self, key: str) -> bool:
        return key in self._keys

    @property
    def level_mw(self) -> int | None:
        """The max-min fair level of the sessions without a need (None: each gets its maximum)."""
        return self._free.level_mw

    @property
    def allocated_mw(self) -> int:
        """The sum of every session's power: O(sessions sharing where the power runs out)."""
        tie_extra = sum(power - self._members[key].minimum_mw for key, power in self._tie.items())
        return (self._set.charging_minimum_total_mw + self._full_total + tie_extra
                + self._free.allocated_mw - self._free_minimums)

    @property
    def minimum_total_mw(self) -> int:
        return self._set.minimum_total_mw

    @property
    def charging_minimum_total_mw(self) -> int:
        return self._set.charging_minimum_total_mw

    @property
    def suspended_count(self) -> int:
        return self._set.suspended_count

    @property
    def curtailed_count(self) -> int:
        """Charging sessions that get less than their maximum."""
        with_need_short = len(self._queue) - self._full - sum(
            1 for key, power in self._tie.items() if power >= self._members[key].amount_mw
        )
        return with_need_short + self._free.curtailed_count

    def take_changed(self) -> set[str]:
        """Sessions with a need whose power may have changed since the last call.

        The owner keeps each one's own power history from these: O(sessions that crossed the point
        where the power runs out), not O(n). The powers of sessions without a need follow
        :attr:`level_mw`.
        """
        changed, self._changed = self._changed, set()
        return changed

    def __len__(self) -> int:
        return len(self._members)

    # ----- changing --------------------------------------------------------------------------

    def add(self, key: str, amount_mw: int, minimum_mw: int, departure: float | None = None,
            remaining_kwh: float | None = None, order: int | None = None) -> None:
        """Admit a session as charging; the caller checked :meth:`admits`.

        ``remaining_kwh`` None: no need, a max-min fair share of what the others leave.
        A session with a need but no departure comes after every departure. ``order`` is the
        admission order when the owner keeps its own (the larger, the newer; suspended first).
        """
        self._order = max(self._order + 1, order or 0)
        member = Member(key, amount_mw, min(amount_mw, minimum_mw), order or self._order)
        self._members[key] = member
        if remaining_kwh is not None:
            self._keys[key] = self._key_of(member, departure, remaining_kwh)
        self._set.add(_copy(member))
        self._start(key)
        self._replan()

    def restore(self, sessions: list[tuple[Member, float | None, float | None]], suspended_in_order: list[str],
                limit_mw: int) -> None:
        """Take back ``(member, departure, remaining_kwh)`` of sessions kept elsewhere, into an empty set.

        The suspended ones in the order they were suspended, as :meth:`ChargingSet.restore` takes them.
        """
        for member, departure, remaining in sessions:
            member = _copy(member)
            self._members[member.key] = member
            self._order = max(self._order, member.order)
            if remaining is not None:
                self._keys[member.key] = self._key_of(member, departure, remaining)
        self._set.restore([_copy(member) for member, _, _ in sessions], suspended_in_order, limit_mw)
        for member, _, _ in sessions:
            if self._set.is_charging(member.key):
                self._start(member.key)
        self._replan()

    def set_need(self, key: str, departure: float | None, remaining_kwh: float | None) -> None:
        """A session's need is stated, changed or dropped (None): it takes its place again by the new one.

        Its admission order stays: who is suspended first does not change.
        """
        charging = self._set.is_charging(key)
        if charging:
            self._stop(key)
        if remaining_kwh is None:
            self._keys.pop(key, None)
        else:
            self._keys[key] = self._key_of(self._members[key], departure, remaining_kwh)
        if charging:
            self._start(key)
        self._replan()

    def _key_of(self, member: Member, departure: float | None, remaining_kwh: float) -> tuple[bool, float, int]:
        value = priority_value(self._priority, remaining_kwh, member.amount_mw / 1_000_000, departure)
        return True, value, member.order

    def remove(self, key: str) -> tuple[list[str], list[str]]:
        """A session ended (departed, done or stopped); returns ``(suspended, resumed)`` as ChargingSet does."""
        if self._set.is_charging(key):
            self._stop(key)
        _, resumed = self._set.remove(key)
        del self._members[key]
        self._keys.pop(key, None)
        self._changed.discard(key)
        self._sync([], resumed)
        return [], resumed

    def change(self, key: str, amount_mw: int, minimum_mw: int | None = None) -> tuple[list[str], list[str]]:
        """A session's maximum changes (it tapers, or its need fits within one period); its key stays.

        The caller checked :meth:`fits_change` for a higher minimum.
        """
        member = self._members[key]
        minimum = min(amount_mw, member.minimum_mw if minimum_mw is None else minimum_mw)
        charging = self._set.is_charging(key)
        if charging:
            self._stop(key)
        member.amount_mw, member.minimum_mw = amount_mw, minimum
        suspended, resumed = self._set.change(key, amount_mw, minimum)
        if charging and key not in suspended:
            self._start(key)
        self._sync([k for k in suspended if k != key], resumed)
        return suspended, resumed

    def set_urgent(self, key: str, urgent: bool) -> None:
        """The session must charge at full power from now on to meet its need (or no longer must)."""
        if key not in self._keys or (not self._keys[key][0]) == urgent:
            return
        charging = self._set.is_charging(key)
        if charging:
            self._stop(key)
        _, value, order = self._keys[key]
        self._keys[key] = (not urgent, value, order)
        if charging:
            self._start(key)
        self._replan()

    def fit(self, limit_mw: int) -> tuple[list[str], list[str]]:
        """A new limit: suspend or resume as fair_share does, then re-plan; returns ``(suspended, resumed)``."""
        suspended, resumed = self._set.fit(limit_mw)
        self._sync(suspended, resumed)
        return suspended, resumed

    # ----- inside ----------------------------------------------------------------------------

    def _sync(self, suspended: list[str], resumed: list[str]) -> None:
        for key in suspended:
            self._stop(key)
        for key in resumed:
            self._start(key)
        self._replan()

    def _start(self, key: str) -> None:
        member = self._members[key]
        if key not in self._keys:
            # Room first, so the set never suspends anyone: it only shares what _replan gives it.
            self._free.fit(self._free.limit_mw + member.minimum_mw)
            self._free.add(_copy(member))
            self._free_minimums += member.minimum_mw
            return
        self._changed.add(key)
        priority = self._keys[key]
        index = bisect.bisect_left(self._queue, priority)
        extra = member.amount_mw - member.minimum_mw
        self._queue.insert(index, priority)
        self._queue_keys.insert(index, key)
        self._extras.insert(index, extra)
        if index < self._full:  # more urgent than one served in full: served in full too, for now
            self._full += 1
            self._full_total += extra

    def _stop(self, key: str) -> None:
        member = self._members[key]
        if key not in self._keys:
            self._free.remove(key)
            self._free_minimums -= member.minimum_mw
            return
        self._changed.add(key)
        index = bisect.bisect_left(self._queue, self._keys[key])
        if index < self._full:
            self._full -= 1
            self._full_total -= self._extras[index]
        del self._queue[index], self._queue_keys[index], self._extras[index]

    def _replan(self) -> None:
        """Move the point where the power runs out from where it was: O(sessions that cross it)."""
        budget = self._set.limit_mw - self._set.charging_minimum_total_mw
        extras, count = self._extras, len(self._extras)
        full, total = self._full, self._full_total
        was_full = full
        self._changed.update(key for key in self._tie if key in self._members)
        while full and total > budget:
            full -= 1
            total -= extras[full]
        while full < count and total + extras[full] <= budget:
            total += extras[full]
            full += 1
        self._tie = {}
        if full < count:
            # Equal priorities around that point share what is left max-min fairly.
            first = self._tie_start(full)
            last = self._tie_end(full)
            before = total - sum(extras[first:full])
            if last - first == 1:  # the usual case: no tie, the one session takes what is left
                member = self._members[self._queue_keys[first]]
                self._tie = {member.key: member.minimum_mw + budget - before}
            else:
                group = [self._members[self._queue_keys[index]] for index in range(first, last)]
                self._tie = max_min_share(group, budget - before)
            full = first
            total = before
        self._full, self._full_total = full, total
        # Served in full before and not now, or the other way round; and who shares where it runs out.
        self._changed.update(self._queue_keys[min(was_full, full):max(was_full, full)])
        self._changed.update(self._tie)
        # Sessions without a need share only what every session with one leaves over.
        self._free.fit(self._free_minimums + (0 if self._tie else budget - total))

    def _tie_start(self, index: int) -> int:
        same = self._queue[index][:2]
        while index and self._queue[index - 1][:2] == same:
            index -= 1
        return index

    def _tie_end(self, index: int) -> int:
        same = self._queue[index][:2]
        while index < len(self._queue) and self._queue[index][:2] == same:
            index += 1
        return index


def _copy(member: Member) -> Member:
    """A member of its own for an inner set: the sets change their members' fields."""
    return Member(member.key, member.amount_mw, member.minimum_mw, member.order)


class Projected(NamedTuple):
    """One charging session with a need, as :class:`Projection` sees it: in milliwatts and mW·s.

    A tuple: the forecast makes one per session it reaches.
    """

    key: str
    minimum_mw: int
    maximum_mw: int
    remaining_mws: float
    deadline: float


class Projection:
    """The energy (mW·s) each charging session with a need is expected to get from ``now`` to its deadline.

    The model: the plan stays as it is (no arrivals, the same limit, the same order). ``keys`` are
    the sessions in the order the plan serves them, most urgent first; the first ``served_in_full``
    of them get their maximum now; ``budget_mw`` is what the limit leaves above every charging
    session's minimum. Sessions ahead are served first: each session gets its minimum throughout,
    and above it what the sessions ahead of it leave, which grows as they finish (need delivered, or
    deadline come) and give back their power, minimum included, up to its maximum. What the model
    does not foresee: sessions turning urgent (or hopeless) later, which moves them in the order;
    and sessions without a need, which only take what is left.

    A session's forecast depends only on the sessions ahead of it, so the forecast is a fold along
    the queue that goes only as far as it is asked about (:meth:`expected`): a session served in
    full keeps its maximum to the end, O(1); one further back costs the sessions ahead of it,
    O(p log p) for the p-th, once per plan (later questions about the same plan continue the fold
    where it stopped). Every session's, :meth:`expected_all`: O(n log n). ``describe`` gives a
    session's figures when the fold reaches it, or None for one that is not forecast (it gets the
    power the plan gives it, and is not counted as giving any back).
    """

    def __init__(self, keys: list[str], served_in_full: int, budget_mw: int, now: float,
                 describe: Callable[[str], Projected | None]) -> None:
        self.now = now
        self._keys = keys
        self._served_in_full = served_in_full
        self._describe = describe
        self._expected: dict[str, float] = {}
        self._folded = 0  # how far along ``keys`` the fold has gone
        # (when it gives power back, the power it holds above its minimum then, its minimum), soonest first
        self._holding: list[tuple[float, int, int]] = []
        self._used = 0
        self._budget = max(0, budget_mw)
        self._clock = now  # a session behind gets more than its minimum no earlier than one ahead of it did

    def expected(self, key: str, position: int) -> float | None:
        """What ``key``, at ``position`` in the queue, is expected to get by its deadline; None if not forecast."""
        if key in self._expected:
            return self._expected[key]
        if position < self._served_in_full:
            # Everyone ahead gets their maximum too: nobody's release can give it more, nor take any.
            session = self._describe(key)
            if session is None:
                return None
            gets = min(session.remaining_mws, session.maximum_mw * max(0.0, session.deadline - self.now))
            self._expected[key] = gets
            return gets
        while self._folded <= position and self._folded < len(self._keys):
            self._fold_next()
        return self._expected.get(key)

    def expected_all(self) -> dict[str, float]:
        while self._folded < len(self._keys):
            self._fold_next()
        return dict(self._expected)

    def _fold_next(self) -> None:
        key = self._keys[self._folded]
        self._folded += 1
        session = self._describe(key)
        if session is None:
            return
        holding = self._holding
        minimum, maximum, deadline = session.minimum_mw, session.maximum_mw, session.deadline
        want = maximum - minimum
        left, at, rate = session.remaining_mws, self.now, minimum
        while left > 0:
            if at < self._clock:
                until = self._clock  # the sessions ahead take every bit above the minimums until then
            else:
                rate = minimum + max(0, min(want, self._budget - self._used))
                until = holding[0][0] if holding and rate < maximum else math.inf
            step_end = min(until, deadline)
            if rate * (step_end - at) >= left:
                at, left = at + left / rate, 0.0
                break
            left -= rate * max(0.0, step_end - at)
            at = step_end
            if at >= deadline:
                break
            if at >= self._clock and holding and holding[0][0] <= at:
                released_at, released, released_minimum = heapq.heappop(holding)
                self._used -= released
                self._budget += released_minimum
                self._clock = max(self._clock, released_at)
        self._expected[key] = session.remaining_mws - left
        heapq.heappush(holding, (at, rate - minimum, minimum))
        self._used += rate - minimum
