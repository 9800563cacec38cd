"""Which charge requests a load test sends, and when: plain Python, no network.

Everything random comes from one ``random.Random(seed)``, so the same seed and
options always give the same vehicles, amounts and send times: two runs (or two
routing policies) can be compared request for request.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

# The charge API refuses more; the tool checks options against the same limits.
MAX_AMOUNT_KW = 350.0
MAX_SESSION_SECONDS = 3600.0
# An open-loop run stops adding arrivals here whatever the rate and duration.
MAX_REQUESTS = 100_000


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

    @property
    def open_loop(self) -> bool:
        return self.arrival_rate is not None


@dataclass(frozen=True)
class PlannedRequest:
    index: int
    vehicle_id: str
    amount_kw: float
    duration_seconds: float
    # Seconds after the start of the run at which the request is due.
    offset_seconds: float

    def body(self, wait: bool = False) -> dict[str, object]:
        body: dict[str, object] = {
            "vehicle_id": self.vehicle_id, "amount": self.amount_kw, "duration_seconds": self.duration_seconds
        }
        if wait:
            body["wait"] = True
        return body

    @property
    def energy_kwh(self) -> float:
        """What the vehicle asks for: its amount for its whole session."""
        return self.amount_kw * self.duration_seconds / 3600.0


def generate_requests(plan: LoadPlan) -> list[PlannedRequest]:
    """The requests of a run, in the order they are due."""
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
