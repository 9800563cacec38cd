"""Which charge requests a load test sends, and when: plain Python, no network.

Everything random comes from one ``random.Random(seed)``, so the same seed and
options always give the same vehicles, amounts and send times: two runs (or two
routing policies) can be compared request for request.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from load_tester.workplace_day import DAY_SECONDS, compress, workplace_day

# The charge API refuses more; the tool checks options against the same limits.
MAX_AMOUNT_KW = 350.0
MAX_SESSION_SECONDS = 3600.0
# An open-loop run stops adding arrivals here whatever the rate and duration.
MAX_REQUESTS = 100_000
WORKPLACE_DAY = "workplace-day"
# The workplace day played this many times faster by default: 24 hours in two minutes.
DEFAULT_COMPRESSION = 720.0
# A need is met when less than this is missing (ACN-Sim's definition), in a day played at full speed.
NEED_MET_WITHIN_KWH = 0.1


@dataclass(frozen=True)
class Scenario:
    """A named preset; every field can be overridden on the command line."""

    name: str
    description: str
    requests: int
    concurrency: int
    ramp_up_seconds: float
    duration_seconds: float
    # Set for open-loop scenarios: requests arrive at this mean rate whatever the answers.
    arrival_rate: float | None = None
    # Lower one substation's limit to half during the run (operator PUT /limit), then lift it.
    derate: bool = False
    # Vehicles of a seeded workplace day (load_tester.workplace_day), each with an energy need by its departure.
    workplace: bool = False


SCENARIOS: dict[str, Scenario] = {
    scenario.name: scenario
    for scenario in (
        Scenario("rush-hour", "100 EVs plug in at the same moment", 100, 100, 0.0, 120.0),
        Scenario("normal", "100 requests, 10 at a time, ramped up over 60 s", 100, 10, 60.0, 180.0),
        Scenario("high", "500 requests, 50 at a time, ramped up over 120 s", 500, 50, 120.0, 300.0),
        Scenario("burst", "200 requests, 20 at a time, no ramp-up", 200, 20, 0.0, 120.0),
        Scenario(
            "sustained",
            "open loop: arrivals at a steady mean rate for the whole duration",
            MAX_REQUESTS,
            50,
            0.0,
            120.0,
            arrival_rate=2.0,
        ),
        Scenario(
            WORKPLACE_DAY,
            "a seeded workplace car park's day, time-compressed: arrivals peak in the morning, stays of hours, "
            "each vehicle needing kWh by its departure",
            60,
            100,
            0.0,
            DAY_SECONDS / DEFAULT_COMPRESSION,
            workplace=True,
        ),
        Scenario(
            "derate",
            "rush hour, and meanwhile one substation's limit is halved for a while (needs ADMIN_TOKEN)",
            100,
            100,
            0.0,
            120.0,
            derate=True,
        ),
    )
}

# Defaults of the derate, as shares of the session length: it starts once every session of the rush
# charges and ends while they all still do, so both the cut and the restoration hit live sessions.
DERATE_AT_SHARE = 0.25
DERATE_FOR_SHARE = 0.25
DERATE_FACTOR = 0.5


@dataclass(frozen=True)
class DeratePlan:
    """When, for how long and where a substation's limit is lowered to ``factor`` of what it is then."""

    at_seconds: float
    for_seconds: float
    # None: the substation with the highest limit when the derate starts.
    substation: str | None = None
    factor: float = DERATE_FACTOR

    @property
    def until_seconds(self) -> float:
        return self.at_seconds + self.for_seconds


def default_derate(session_seconds: float) -> tuple[float, float]:
    """``(at, for)`` seconds for sessions of ``session_seconds``."""
    return round(session_seconds * DERATE_AT_SHARE, 3), round(session_seconds * DERATE_FOR_SHARE, 3)


@dataclass(frozen=True)
class LoadPlan:
    """The resolved options of one run."""

    scenario: str
    requests: int
    concurrency: int
    ramp_up_seconds: float
    duration_seconds: float
    amount_min_kw: float
    amount_max_kw: float
    session_seconds: float
    seed: int
    arrival_rate: float | None = None
    # Send "wait": true: with no room anywhere the charge API queues the request (202) instead of a 503.
    wait: bool = False
    derate: DeratePlan | None = None
    # Workplace day only: how many times faster than real time it is played.
    compression: float | None = None

    @property
    def open_loop(self) -> bool:
        return self.arrival_rate is not None

    @property
    def need_met_within_kwh(self) -> float:
        """What may be missing from a met need: ACN-Sim's 0.1 kWh, shrunk with the day's energies when compressed."""
        return NEED_MET_WITHIN_KWH / (self.compression or 1.0)


@dataclass(frozen=True)
class PlannedRequest:
    index: int
    vehicle_id: str
    amount_kw: float
    duration_seconds: float
    # Seconds after the start of the run at which the request is due.
    offset_seconds: float
    # A vehicle with an energy need asks for this much (kWh) by its departure, ``duration_seconds`` after
    # it is sent, instead of power for a fixed time.
    need_kwh: float | None = None

    def body(self, wait: bool = False) -> dict[str, object]:
        body: dict[str, object] = {"vehicle_id": self.vehicle_id, "amount": self.amount_kw}
        if self.need_kwh is None:
            body["duration_seconds"] = self.duration_seconds
        else:
            # Seconds from now: the departure counts from when the request is sent, however late that is.
            body["energy_kwh"] = self.need_kwh
            body["departure"] = self.duration_seconds
        if wait:
            body["wait"] = True
        return body

    @property
    def energy_kwh(self) -> float:
        """What the vehicle asks for: its need, or its amount for its whole session."""
        if self.need_kwh is not None:
            return self.need_kwh
        return self.amount_kw * self.duration_seconds / 3600.0


def generate_requests(plan: LoadPlan) -> list[PlannedRequest]:
    """The requests of a run, in the order they are due."""
    if plan.compression is not None:
        return workplace_requests(plan)
    rng = random.Random(plan.seed)
    offsets = _open_loop_offsets(plan, rng) if plan.open_loop else _ramp_offsets(plan)
    return [
        PlannedRequest(
            index=index,
            vehicle_id=f"ev-{plan.seed}-{index + 1:05d}",
            amount_kw=_amount(rng, plan.amount_min_kw, plan.amount_max_kw),
            duration_seconds=plan.session_seconds,
            offset_seconds=offset,
        )
        for index, offset in enumerate(offsets)
    ]


def workplace_requests(plan: LoadPlan) -> list[PlannedRequest]:
    """The seeded workplace day, ``plan.compression`` times faster, from its first arrival on.

    Each vehicle asks for its on-board charger's power, its need and its departure; the night before
    the first arrival is skipped, and arrivals after the time limit are not planned.
    """
    assert plan.compression is not None
    day = compress(workplace_day(plan.seed, plan.requests), plan.compression)
    first = day[0].arrival
    planned = []
    for index, session in enumerate(day):
        offset = round(session.arrival - first, 6)
        if offset >= plan.duration_seconds:
            break
        planned.append(PlannedRequest(
            index=index,
            vehicle_id=f"ev-{plan.seed}-{index + 1:05d}",
            amount_kw=round(session.max_kw, 3),
            duration_seconds=round(session.departure - session.arrival, 3),
            offset_seconds=offset,
            # Never 0 once rounded: a need of 0 kWh is no need (and the charge API refuses it).
            need_kwh=max(round(session.energy_kwh, 6), 1e-6),
        ))
    return planned


def _ramp_offsets(plan: LoadPlan) -> list[float]:
    # Linear ramp: request i is due i/n of the way through the ramp-up.
    step = plan.ramp_up_seconds / plan.requests
    return [round(index * step, 6) for index in range(plan.requests)]


# Open-loop arrivals end this long before the time limit, so one that starts a little late (less
# than the lateness the report warns about) still leaves before the limit instead of racing it.
ARRIVAL_MARGIN_SECONDS = 0.25


def _open_loop_offsets(plan: LoadPlan, rng: random.Random) -> list[float]:
    # Poisson arrivals: independent drivers, exponential gaps at the given mean rate.
    assert plan.arrival_rate is not None
    offsets: list[float] = []
    now = rng.expovariate(plan.arrival_rate)
    while now < plan.duration_seconds - ARRIVAL_MARGIN_SECONDS and len(offsets) < min(plan.requests, MAX_REQUESTS):
        offsets.append(round(now, 6))
        now += rng.expovariate(plan.arrival_rate)
    return offsets


def _amount(rng: random.Random, low: float, high: float) -> float:
    # Whole tenths of a kW read well in logs; rounding must not leave the range.
    return min(max(round(rng.uniform(low, high), 1), low), high)
