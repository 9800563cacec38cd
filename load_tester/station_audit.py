"""Did the stations' vehicles ever draw more than their substation's limit? Plain Python, no network.

The witness is what the simulated vehicles physically drew (``station_model``: an exact
step function each), summed per substation and sampled at a fixed rate, against the
limit in force at that instant taken from the substation's own limit history
(``GET /limit``). What a substation reports about its own load is never used.

A limit DROP is the one case where the design allows an excess: the substation cuts
the allocations at once, the gateway pushes the lower profiles (push latency), and the
vehicles follow after their response time. So an excess within ``push latency +
response time`` after a drop, the push latency being the one measured for that drop's
own profiles, is counted apart; any other excess (power moving between stations, a
vehicle arriving or leaving) is a fault of message order.

Push latency is measured from the substation's allocation histories: from each decrease
of a session's allocation to the first TxProfile its station received that fits it.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from load_tester.station_model import TX_DEFAULT_PROFILE, TX_PROFILE, StationModel

# Allocations and limits are sums of floats: forgive rounding noise, nothing more.
TOLERANCE_KW = 1e-6
# A profile "fits" an allocation when its watts are not above it (the gateway rounds amps down).
FIT_TOLERANCE_W = 0.5
# A session's allocation point belongs to a limit change when it carries the same timestamp
# (the substation re-allocates in the same atomic step, stamped once).
SAME_INSTANT_SECONDS = 1e-3
MAX_LISTED_EXCESSES = 20
MAX_SLOWEST = 5


@dataclass(frozen=True)
class StationTrace:
    """One station's run: where it is wired, the id tag of its vehicle, and its model (draw, profiles)."""

    station_id: str
    substation: str  # the substation's URL
    id_tag: str
    model: StationModel


@dataclass(frozen=True)
class SubstationHistory:
    """What a substation says about itself after the run: its limit and its sessions' allocations."""

    url: str
    limits: tuple[tuple[float, float], ...]  # (at, limit kW), in time order
    # vehicle id -> ((at, allocated kW), ...) in time order, ended sessions included
    allocations: Mapping[str, tuple[tuple[float, float], ...]]

    def limit_at(self, t: float) -> float:
        index = bisect.bisect_right(self.limits, (t, math.inf)) - 1
        return self.limits[max(index, 0)][1]

    @classmethod
    def from_json(cls, url: str, limit_body: Mapping[str, Any],
                  sessions_body: Mapping[str, Any]) -> "SubstationHistory":
        """From ``GET /limit`` and ``GET /sessions?history=1&ended=1``."""
        limits = tuple(sorted((float(at), float(kw)) for at, kw, *_ in limit_body.get("history") or []))
        if not limits:
            limits = ((0.0, float(limit_body["limit_kw"])),)
        allocations: dict[str, tuple[tuple[float, float], ...]] = {}
        for session in sessions_body.get("sessions") or []:
            points = tuple(sorted((float(at), float(kw)) for at, kw in session.get("history") or []))
            allocations[session["vehicle_id"]] = allocations.get(session["vehicle_id"], ()) + points
        return cls(url, limits, allocations)


@dataclass(frozen=True)
class Excess:
    substation: str
    t: float  # epoch seconds
    draw_kw: float
    limit_kw: float
    after_drop: bool  # inside the window a limit drop allows

    def describe(self, run_start: float) -> str:
        where = "within a limit drop's allowed window" if self.after_drop else "outside any limit drop: message order"
        return (f"{self.substation} drew {self.draw_kw:.3f} kW under a limit of {self.limit_kw:.3f} kW at "
                f"t={self.t - run_start:.2f} s ({where})")


@dataclass(frozen=True)
class Drop:
    """One limit drop, and how the stations followed it."""

    substation: str
    at: float
    from_kw: float
    to_kw: float
    affected: int  # sessions whose allocation the drop lowered
    push_seconds: float | None  # the last of those sessions' stations told (None: none was affected)
    allowed_seconds: float  # push + vehicle response time: the design's window
    # until the draw was back under the new limit for good (None: not before the next limit change or the end)
    recovery_seconds: float | None


@dataclass
class SubstationDraw:
    substation: str
    samples: int = 0
    peak_draw_kw: float = 0.0
    peak_percentage: float | None = None
    excess_instants: int = 0
    excess_after_drop: int = 0
    excesses: list[Excess] = field(default_factory=list)

    @property
    def excess_by_order(self) -> int:
        return self.excess_instants - self.excess_after_drop


@dataclass
class StationAudit:
    hz: float
    response_seconds: float
    substations: list[SubstationDraw]
    drops: list[Drop]
    push_seconds: list[float]  # one per allocation decrease whose profile arrived
    unmatched_decreases: int  # decreases superseded (or the run ended) before a fitting profile arrived
    slowest_pushes: list[tuple[float, str, float]] = field(default_factory=list)  # (seconds, station, at)

    @property
    def excess_by_order(self) -> int:
        return sum(s.excess_by_order for s in self.substations)

    @property
    def excess_after_drop(self) -> int:
        return sum(s.excess_after_drop for s in self.substations)


def _draw_kw(traces: Sequence[StationTrace], t: float) -> float:
    return sum(trace.model.draw_w(t) for trace in traces) / 1000.0


def _told_a(model: StationModel, at: float) -> float:
    """What the station was told for its transaction at ``at``: its last TxProfile, before one its last
    TxDefaultProfile, else its own maximum."""
    for purpose in (TX_PROFILE, TX_DEFAULT_PROFILE):
        told = [r.limit_a for r in model.received if r.purpose == purpose and r.at <= at]
        if told:
            return told[-1]
    return model.station_max_a


def push_latencies(trace: StationTrace, allocations: Sequence[tuple[float, float]],
                   until: float) -> tuple[list[tuple[float, float]], list[float]]:
    """``[(decrease at, seconds until a fitting TxProfile arrived)]``, and the instants of the decreases
    that never got one (superseded by the next change first, or the run ended)."""
    model = trace.model

    def fits(limit_a: float, kw: float) -> bool:
        return limit_a * model.volts * model.phases <= kw * 1000 + FIT_TOLERANCE_W

    profiles = [(r.at, r.limit_a) for r in model.received if r.purpose == TX_PROFILE]
    found: list[tuple[float, float]] = []
    missing: list[float] = []
    for index in range(1, len(allocations)):
        at, kw = allocations[index]
        if kw >= allocations[index - 1][1] - TOLERANCE_KW:
            continue
        next_at = allocations[index + 1][0] if index + 1 < len(allocations) else until
        if model.stopped_at is not None:
            next_at = min(next_at, model.stopped_at)
        if fits(_told_a(model, at), kw):
            continue  # already told no more than this: nothing had to be pushed
        arrival = next((when for when, limit_a in profiles if at < when <= next_at and fits(limit_a, kw)), None)
        if arrival is None:
            missing.append(at)
        else:
            found.append((at, arrival - at))
    return found, missing


def audit(traces: Sequence[StationTrace], histories: Mapping[str, SubstationHistory], start: float, end: float,
          hz: float, response_seconds: float) -> StationAudit:
    """Sample the vehicles' draw at ``hz`` from ``start`` to ``end`` against each substation's limit."""
    by_substation: dict[str, list[StationTrace]] = {}
    for trace in traces:
        by_substation.setdefault(trace.substation, []).append(trace)
    all_push: list[tuple[float, str, float]] = []
    unmatched = 0
    drops: list[Drop] = []
    results: list[SubstationDraw] = []
    for url, members in sorted(by_substation.items()):
        history = histories[url]
        decreases: list[tuple[float, float]] = []
        for trace in members:
            found, missing = push_latencies(trace, history.allocations.get(trace.id_tag, ()), end)
            decreases.extend(found)
            all_push.extend((seconds, trace.station_id, at) for at, seconds in found)
            unmatched += len(missing)
        own_drops = _drops(url, history, members, decreases, start, end, response_seconds)
        drops.extend(own_drops)
        windows = [(d.at, d.at + d.allowed_seconds) for d in own_drops]
        result = SubstationDraw(url)
        count = int(math.floor((end - start) * hz)) + 1
        for k in range(count):
            t = start + k / hz
            draw, limit = _draw_kw(members, t), history.limit_at(t)
            result.samples += 1
            result.peak_draw_kw = max(result.peak_draw_kw, draw)
            if limit > 0:
                share = 100.0 * draw / limit
                result.peak_percentage = share if result.peak_percentage is None else max(result.peak_percentage, share)
            if draw > limit + TOLERANCE_KW:
                after_drop = any(a <= t <= b for a, b in windows)
                result.excess_instants += 1
                result.excess_after_drop += after_drop
                # The first few of each kind: a drop's allowed excess must not hide one of message order.
                if sum(e.after_drop == after_drop for e in result.excesses) < MAX_LISTED_EXCESSES:
                    result.excesses.append(Excess(url, t, draw, limit, after_drop))
        results.append(result)
    all_push.sort()
    return StationAudit(hz, response_seconds, results, drops, [p[0] for p in all_push], unmatched,
                        all_push[-MAX_SLOWEST:][::-1])


def _drops(url: str, history: SubstationHistory, members: Sequence[StationTrace],
           decreases: Sequence[tuple[float, float]], start: float, end: float, response_seconds: float) -> list[Drop]:
    drops = []
    limits = history.limits
    points = sorted({p for trace in members for p in trace.model.breakpoints()})
    for index in range(1, len(limits)):
        at, kw = limits[index]
        before = limits[index - 1][1]
        if kw >= before - TOLERANCE_KW or not start <= at <= end:
            continue
        own = [seconds for when, seconds in decreases if abs(when - at) <= SAME_INSTANT_SECONDS]
        push = max(own) if own else None
        next_change = limits[index + 1][0] if index + 1 < len(limits) else end
        allowed = (push or 0.0) + response_seconds
        # The draw is a step function: constant from one breakpoint to the next. It is back under the new
        # limit from the start of the last step under it that no step over it follows within the allowed
        # window (an increase sent before the drop may still take effect after it, a vehicle being late
        # both ways); past the window, any excess is one of message order, counted by the samples.
        recovery: float | None = None
        for t in [at, *(p for p in points if at < p < next_change)]:
            over = _draw_kw(members, t) > kw + TOLERANCE_KW
            if over:
                recovery = None
            elif recovery is None:
                recovery = t - at
            if recovery is not None and t >= at + allowed:
                break
        drops.append(Drop(url, at, before, kw, len(own), push, allowed, recovery))
    return drops


def percentile(values: Sequence[float], share: float) -> float | None:
    """The nearest-rank percentile (``share`` in 0..1) of ``values``, None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


def summary(result: StationAudit, run_start: float) -> dict[str, Any]:
    """The audit as JSON for the report."""
    push = result.push_seconds
    return {
        "sample_hz": result.hz,
        "vehicle_response_seconds": result.response_seconds,
        "excess_instants_by_message_order": result.excess_by_order,
        "excess_instants_after_limit_drops": result.excess_after_drop,
        "push_latency_seconds": {
            "count": len(push), "p50": percentile(push, 0.5), "p99": percentile(push, 0.99),
            "max": max(push) if push else None, "unmatched_decreases": result.unmatched_decreases,
            "slowest": [{"station": station, "t": round(at - run_start, 3), "seconds": round(seconds, 3)}
                        for seconds, station, at in result.slowest_pushes],
        },
        "substations": [
            {"substation": s.substation, "samples": s.samples, "peak_draw_kw": round(s.peak_draw_kw, 3),
             "peak_percentage_of_limit": None if s.peak_percentage is None else round(s.peak_percentage, 2),
             "excess_instants": s.excess_instants, "excess_after_drop": s.excess_after_drop,
             "excesses": [e.describe(run_start) for e in s.excesses]}
            for s in result.substations
        ],
        "limit_drops": [
            {"substation": d.substation, "t": round(d.at - run_start, 3), "from_kw": d.from_kw, "to_kw": d.to_kw,
             "affected_sessions": d.affected, "push_seconds": d.push_seconds,
             "allowed_seconds": round(d.allowed_seconds, 3), "recovery_seconds": d.recovery_seconds}
            for d in result.drops
        ],
    }
