"""What each vehicle got: energy delivered against energy asked for, and how fairly. Plain Python, no network.

A vehicle asks for ``amount × duration`` (kW × hours); it gets what its session
delivered, read from the substation's own record once the session ended (or
from the charge API). Jain's fairness index of the energies,
``(Σx)² / (n·Σx²)``, is 1 when every vehicle got the same and ``1/n`` when one
got everything.

A vehicle with an energy need (the ``workplace-day`` scenario) asks for that need
instead, and is judged as ACN-Sim judges a schedule: the share of the energy asked
for that was delivered, the share of the demands met (less than 0.1 kWh missing,
scaled with a compressed day's energies), and Jain's index of each vehicle's
delivered ÷ requested, so a vehicle that needed little counts as much as one that
needed much.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from load_tester.records import RequestResult, SessionRecord, SubstationAudit, with_energy
from load_tester.stats import percentile

SUBSTATION = "substation"
CHARGE_API = "charge_api"


def jain_index(values: Sequence[float]) -> float | None:
    """Jain's fairness index; None for no values, or when all are 0 (nobody got anything: no share to compare)."""
    if not values:
        return None
    squares = math.fsum(x * x for x in values)
    if squares == 0:
        return None
    return math.fsum(values) ** 2 / (len(values) * squares)


def sessions_by_place(audits: Iterable[SubstationAudit]) -> dict[tuple[str, str], SessionRecord]:
    """Every session record by (substation, session id).

    One id may be on two substations' records: a hedged forward admitted at both, and the copy
    that was not used stopped at once. A request's record is the one where its client was told.
    """
    return {(audit.substation, session.session_id): session for audit in audits for session in audit.sessions}


def _record_of(result: RequestResult, sessions: dict[tuple[str, str], SessionRecord]) -> SessionRecord | None:
    if not result.served:
        return None
    return sessions.get((result.substation or "", result.session_id or ""))


def attach_energy(results: Sequence[RequestResult], audits: Iterable[SubstationAudit]) -> tuple[RequestResult, ...]:
    """Each served request with the energy its session delivered, as its substation recorded it.

    Matched by substation and session id: the charge API names the session, and the substation
    the client was told keeps that name. Requests whose session it does not list keep
    ``energy_kwh`` None (or what they had).
    """
    sessions = sessions_by_place(audits)
    attached = []
    for result in results:
        session = _record_of(result, sessions)
        attached.append(with_energy(result, session.energy_kwh, SUBSTATION) if session is not None else result)
    return tuple(attached)


def unfinished_sessions(results: Sequence[RequestResult], audits: Iterable[SubstationAudit]) -> int:
    """Served sessions that were still charging when the substations were read: their energy is not final."""
    sessions = sessions_by_place(audits)
    return sum(1 for r in results if (record := _record_of(r, sessions)) is not None and not record.ended)


@dataclass(frozen=True)
class Shares:
    """The distribution of each served vehicle's delivered / requested energy."""

    min: float
    p5: float
    p50: float
    p95: float


@dataclass(frozen=True)
class EnergyFigures:
    vehicles_requested: int
    vehicles_served: int
    energy_requested_kwh: float
    energy_delivered_kwh: float
    # Served vehicles whose delivered energy could not be read: left out of the figures below.
    vehicles_energy_unknown: int
    jain_index_served: float | None
    jain_index_all: float | None
    share_of_request: Shares | None
    queued: int
    queue_wait_p50_seconds: float | None
    queue_wait_p95_seconds: float | None
    # Vehicles with an energy need: how many, how many had it met, and Jain's index of delivered ÷ need
    # over all of them (unserved as 0). None without such vehicles.
    demands: int = 0
    demands_met: int | None = None
    jain_index_of_shares: float | None = None

    @property
    def demands_met_ratio(self) -> float | None:
        return None if not self.demands or self.demands_met is None else self.demands_met / self.demands

    @property
    def energy_delivered_ratio(self) -> float | None:
        if self.energy_requested_kwh <= 0:
            return None
        return self.energy_delivered_kwh / self.energy_requested_kwh


def energy_figures(results: Sequence[RequestResult], need_met_within_kwh: float = 0.1) -> EnergyFigures:
    """Vehicles served out of requested, energy delivered out of requested, fairness, queue waits.

    Requested counts every vehicle of the run (planned); an unserved one got 0 kWh. Jain's index is
    given over the served vehicles, and over all requested ones (unserved as 0). For vehicles with an
    energy need, demands met are those missing less than ``need_met_within_kwh``.
    """
    served = [r for r in results if r.served]
    known = [r for r in served if r.energy_kwh is not None]
    delivered = [r.energy_kwh or 0.0 for r in known]
    unserved = len(results) - len(served)
    shares = sorted(
        (r.energy_kwh or 0.0) / r.energy_requested_kwh for r in known if r.energy_requested_kwh > 0
    )
    waits = [r.queue_wait_seconds for r in served if r.queued and r.queue_wait_seconds is not None]
    return EnergyFigures(
        vehicles_requested=len(results),
        vehicles_served=len(served),
        energy_requested_kwh=round(math.fsum(r.energy_requested_kwh for r in results), 6),
        energy_delivered_kwh=round(math.fsum(delivered), 6),
        vehicles_energy_unknown=len(served) - len(known),
        jain_index_served=jain_index(delivered),
        jain_index_all=jain_index([*delivered, *([0.0] * unserved)]),
        share_of_request=(
            Shares(min=shares[0], p5=percentile(shares, 5), p50=percentile(shares, 50), p95=percentile(shares, 95))
            if shares
            else None
        ),
        queued=sum(1 for r in results if r.queued),
        queue_wait_p50_seconds=percentile(waits, 50) if waits else None,
        queue_wait_p95_seconds=percentile(waits, 95) if waits else None,
        **_demand_fields(results, need_met_within_kwh),
    )


def _demand_fields(results: Sequence[RequestResult], need_met_within_kwh: float) -> dict[str, object]:
    """Demands met and Jain's index of delivered ÷ need, over every vehicle that stated a need."""
    demands = [r for r in results if r.need_kwh is not None]
    if not demands:
        return {}
    # An unserved vehicle got nothing; a served one whose energy is unknown is not judged either way.
    delivered = [(r.energy_kwh if r.served else 0.0, r.need_kwh or 0.0) for r in demands]
    judged = [(got, need) for got, need in delivered if got is not None]
    met = sum(1 for got, need in judged if need - got < need_met_within_kwh)
    return {
        "demands": len(demands),
        "demands_met": met if len(judged) == len(demands) else None,
        "jain_index_of_shares": (
            jain_index([got / need for got, need in judged if need > 0])
            if len(judged) == len(demands) else None
        ),
    }


def average_power_kw(result: RequestResult) -> float | None:
    """What the vehicle drew on average over its session (kWh delivered over the session's hours)."""
    if result.energy_kwh is None or result.duration_seconds <= 0:
        return None
    return result.energy_kwh / (result.duration_seconds / 3600.0)


def vehicle_histories(
    results: Sequence[RequestResult], audits: Iterable[SubstationAudit], run_start: float | None
) -> dict[int, list[tuple[float, float]]]:
    """Per served request (its index): its allocation over time, (seconds since the run started, kW)."""
    sessions = sessions_by_place(audits)
    start = run_start or 0.0
    histories = {}
    for result in results:
        session = _record_of(result, sessions)
        if session is not None:
            histories[result.index] = [(round(at - start, 3), kw) for at, kw in session.history]
    return histories
