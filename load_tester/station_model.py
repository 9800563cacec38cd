"""One simulated charging station and its vehicle: the profiles it keeps and what it physically draws.

Plain module, no network and no OCPP library: ``load_tester.stations`` feeds it what
arrives over OCPP. The station keeps the charging profiles it is sent as a real one does
(a TxDefaultProfile for connector/EVSE 0 or its own, a TxProfile per transaction, a
ChargePointMaxProfile / ChargingStationMaxProfile), and its composite limit is the lowest
of its own maximum, the max profile, the transaction's TxProfile (or, before it has one,
the TxDefaultProfile) and the vehicle's own maximum.

The vehicle follows that limit ``response_seconds`` late, both ways (a real vehicle takes
a moment to change its current), and below 6 A it draws nothing (IEC 61851). What it
draws is therefore a step function of time known exactly: ``draw_w(t)`` is the composite
limit in force at ``t - response_seconds`` turned into watts, and 0 once the vehicle has
stopped (it stops drawing the instant it decides to leave, before its StopTransaction).
All times are seconds since the epoch, the clock the substations' histories use.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

# IEC 61851: below this current per phase a vehicle does not charge.
MIN_CHARGING_A = 6.0
# Phase voltage of the stations, as the gateway assumes it (its VOLTS setting).
VOLTS = 230.0
TX_PROFILE = "TxProfile"
TX_DEFAULT_PROFILE = "TxDefaultProfile"
MAX_PROFILES = ("ChargePointMaxProfile", "ChargingStationMaxProfile")


@dataclass(frozen=True)
class Profile:
    """One charging profile as a station keeps it: its limit in A per phase from ``starts_at`` on."""

    profile_id: int
    purpose: str
    stack_level: int
    connector: int  # 0: the whole station
    transaction_id: str | None
    # (seconds after starts_at, A per phase), in order: the period in force is the last one begun.
    periods: tuple[tuple[float, float], ...]
    starts_at: float

    def limit_at(self, now: float) -> float | None:
        """The limit in force at ``now`` (None before the schedule starts)."""
        elapsed = now - self.starts_at
        limit = None
        for start, amps in self.periods:
            if start <= elapsed + 1e-9:
                limit = amps
        return limit


@dataclass
class Received:
    """A profile as it arrived: when, for which transaction, with which limit (A per phase)."""

    at: float
    purpose: str
    transaction_id: str | None
    limit_a: float


@dataclass
class StationModel:
    station_max_a: float
    vehicle_max_a: float
    phases: int
    response_seconds: float
    volts: float = VOLTS
    connector: int = 1
    profiles: dict[int, Profile] = field(default_factory=dict)
    transaction_id: str | None = None
    started_at: float | None = None
    stopped_at: float | None = None
    # (time, composite limit in A) at every change of the limit the station applies; 0 before any.
    changes: list[tuple[float, float]] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)

    # What arrives -------------------------------------------------------------------------

    def set_profile(self, profile: Profile, now: float) -> None:
        """A SetChargingProfile the station accepts: it replaces the profile of the same id (or same
        purpose, stack level and connector, as OCPP says)."""
        for key, kept in list(self.profiles.items()):
            if (kept.purpose, kept.stack_level, kept.connector) == (profile.purpose, profile.stack_level,
                                                                   profile.connector):
                if profile.purpose != TX_PROFILE or kept.transaction_id == profile.transaction_id:
                    del self.profiles[key]
        self.profiles[profile.profile_id] = profile
        limit = profile.limit_at(now)
        self.received.append(Received(now, profile.purpose, profile.transaction_id,
                                      math.nan if limit is None else limit))
        self._note(now)

    def clear_profiles(self, now: float, profile_id: int | None = None, purpose: str | None = None) -> int:
        """ClearChargingProfile: how many were removed."""
        doomed = [key for key, p in self.profiles.items()
                  if (profile_id is None or key == profile_id) and (purpose is None or p.purpose == purpose)]
        for key in doomed:
            del self.profiles[key]
        self._note(now)
        return len(doomed)

    def start(self, transaction_id: str | None, now: float) -> None:
        """The transaction starts (1.6: before the central system has numbered it, ``None``)."""
        self.transaction_id, self.started_at = transaction_id, now
        self._note(now)

    def transaction_known(self, transaction_id: str, now: float) -> None:
        """1.6: the central system numbered the transaction; its TxProfiles name that number."""
        self.transaction_id = transaction_id
        self._note(now)

    def stop(self, now: float) -> None:
        """The vehicle leaves: it draws nothing from this instant, and the transaction's profiles go."""
        self.stopped_at = now
        self.profiles = {k: p for k, p in self.profiles.items() if p.purpose != TX_PROFILE}
        self._note(now)

    # What follows -------------------------------------------------------------------------

    def composite_a(self, now: float) -> float:
        """The limit the station applies at ``now``: 0 without a running transaction."""
        if self.started_at is None or self.stopped_at is not None:
            return 0.0
        limits = [self.station_max_a, self.vehicle_max_a]
        tx = self._strongest(TX_PROFILE, now, self.transaction_id)
        if tx is not None:
            limits.append(tx)
        else:
            default = self._strongest(TX_DEFAULT_PROFILE, now, None)
            if default is not None:
                limits.append(default)
        for purpose in MAX_PROFILES:
            cap = self._strongest(purpose, now, None)
            if cap is not None:
                limits.append(cap)
        return max(0.0, min(limits))

    def _strongest(self, purpose: str, now: float, transaction_id: str | None) -> float | None:
        best: tuple[int, int, float] | None = None
        for p in self.profiles.values():
            if p.purpose != purpose or p.connector not in (0, self.connector):
                continue
            if purpose == TX_PROFILE and p.transaction_id is not None and p.transaction_id != transaction_id:
                continue
            limit = p.limit_at(now)
            if limit is None:
                continue
            # The highest stack level wins; at one level a connector's own profile beats the station's.
            rank = (p.stack_level, p.connector)
            if best is None or rank > best[:2]:
                best = (*rank, limit)
        return None if best is None else best[2]

    def _note(self, now: float) -> None:
        limit = self.composite_a(now)
        if not self.changes or self.changes[-1][1] != limit:
            if self.changes and now < self.changes[-1][0]:
                now = self.changes[-1][0]  # the clock never runs backwards in the record
            self.changes.append((now, limit))

    def watts(self, amps: float) -> float:
        return amps * self.volts * self.phases if amps >= MIN_CHARGING_A else 0.0

    def draw_w(self, t: float) -> float:
        """What the vehicle physically draws at ``t``, exactly."""
        if self.stopped_at is not None and t >= self.stopped_at:
            return 0.0
        index = bisect.bisect_right(self.changes, (t - self.response_seconds, math.inf)) - 1
        return 0.0 if index < 0 else self.watts(self.changes[index][1])

    def breakpoints(self) -> list[float]:
        """Every instant at which ``draw_w`` may change."""
        points = [at + self.response_seconds for at, _ in self.changes]
        if self.stopped_at is not None:
            points.append(self.stopped_at)
        return sorted(points)

    def energy_wh(self, until: float) -> float:
        """What the vehicle has drawn up to ``until``: the integral of ``draw_w``."""
        total = 0.0
        points = [p for p in self.breakpoints() if p < until]
        for begin, end in zip(points, [*points[1:], until]):
            total += self.draw_w(begin) * (end - begin)
        return total / 3600.0
