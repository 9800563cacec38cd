"""Transactions of the stations and the substation sessions that carry them. Plain module.

A transaction becomes a session at its station's substation. The session id is derived
from the station id and the transaction id alone, so asking for the session again after
a lost answer, a reconnect or a gateway restart is a replay at the substation, never a
second session. A session the substation ended while its transaction still runs (its
lease lapsed while the gateway was down) cannot be asked for again under its id: the
transaction's ``generation`` goes up and names a new session, just as deterministic.
Power is turned between kW (the substations) and A per phase (OCPP).
"""
from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from gridcommon.timefmt import format_time
from gridcommon.validation import VEHICLE_ID_PATTERN, ValidationError, parse_departure, parse_energy_kwh

log = logging.getLogger("gateway")

_SAFE = re.compile(r"[^A-Za-z0-9_-]")


def session_id_for(station_id: str, transaction_id: str, generation: int = 0) -> str:
    """The substation session id of a transaction: the same for the same pair (and generation), on every
    gateway. Generation 0 is the transaction's own key at the gateway too."""
    name = f"{station_id}\x00{transaction_id}"
    if generation:
        name += f"\x00{generation}"
    digest = hashlib.sha256(name.encode()).hexdigest()
    return f"ocpp-{digest[:32]}"


def vehicle_id_for(station_id: str, connector: int, id_tag: str | None) -> str:
    """A vehicle id the substation accepts: the id tag when it fits, else station and connector."""
    if id_tag and VEHICLE_ID_PATTERN.fullmatch(id_tag):
        return id_tag
    candidate = _SAFE.sub("_", f"{station_id}-{connector}")
    return candidate if VEHICLE_ID_PATTERN.fullmatch(candidate) else f"ev-{hashlib.sha256(candidate.encode()).hexdigest()[:24]}"


def amps_to_kw(amps: float, phases: int, volts: float) -> float:
    return amps * phases * volts / 1000.0


def kw_to_amps(kw: float, phases: int, volts: float, ceiling_a: float) -> float:
    """The current per phase that draws at most ``kw``: rounded DOWN to OCPP's one decimal, capped."""
    amps = math.floor(kw * 1000.0 / (phases * volts) * 10 + 1e-9) / 10
    return max(0.0, min(amps, ceiling_a))


@dataclass
class Transaction:
    """One transaction of one station, as the gateway keeps it (durably)."""

    session_id: str
    station_id: str
    transaction_id: str
    connector: int
    id_tag: str | None
    substation_url: str
    phases: int
    amount_kw: float
    minimum_kw: float
    started_at: float
    admitted: bool = False
    ended_at: float | None = None
    stop_reason: str | None = None
    meter_start_wh: float | None = None
    energy_wh: float | None = None
    power_w: float | None = None
    last_seq_no: int | None = None
    seq_gaps: int = 0
    ev_max_current_a: float | None = None
    ev_min_current_a: float | None = None
    ev_energy_wh: float | None = None
    departure_time: str | None = None
    # How the amount stands at the substation: the station's own amount, or lowered while tapering.
    tapered: bool = False
    below_since: float | None = None
    profile_rejected: bool = False
    # The last TxProfile the station accepted, A per phase: what it holds after a gateway restart.
    limit_a: float | None = None
    # Whether the station knows the transaction id (1.6: once StartTransaction was answered).
    announced: bool = True
    # How many times its session was ended at the substation while it still ran: names the session now.
    generation: int = 0
    allocated_kw: float | None = field(default=None, compare=False)

    @property
    def active(self) -> bool:
        return self.ended_at is None

    @property
    def substation_session_id(self) -> str:
        """The id of its session at the substation now (``session_id`` until a session had to be re-created)."""
        if self.generation == 0:
            return self.session_id
        return session_id_for(self.station_id, self.transaction_id, self.generation)

    def seq_no_gap(self, seq_no: int) -> int:
        """Record a 2.0.1 TransactionEvent's seqNo; returns how many numbers were skipped before it."""
        gap = 0
        if self.last_seq_no is not None and seq_no > self.last_seq_no + 1:
            gap = seq_no - self.last_seq_no - 1
        if self.last_seq_no is None or seq_no > self.last_seq_no:
            self.last_seq_no = seq_no
        self.seq_gaps += gap
        return gap


class ActiveTransactions:
    """The running transactions by their key (``session_id``), indexed by substation, by station and by
    (station, connector), so an allocation change at one substation touches its own transactions only."""

    def __init__(self, transactions: Iterable[Transaction] = ()) -> None:
        self._all: dict[str, Transaction] = {}
        self._by_substation: dict[str, dict[str, Transaction]] = {}
        self._by_station: dict[str, dict[str, Transaction]] = {}
        self._on_connector: dict[tuple[str, int], Transaction] = {}
        for transaction in transactions:
            self.add(transaction)

    def add(self, transaction: Transaction) -> None:
        """Keep ``transaction`` (it replaces one with the same key, and the one on its connector)."""
        self.remove(transaction.session_id)
        self._all[transaction.session_id] = transaction
        self._by_substation.setdefault(transaction.substation_url, {})[transaction.session_id] = transaction
        self._by_station.setdefault(transaction.station_id, {})[transaction.session_id] = transaction
        self._on_connector[(transaction.station_id, transaction.connector)] = transaction

    def remove(self, session_id: str) -> Transaction | None:
        """Drop the transaction with this key from every index; returns it (None when not kept)."""
        transaction = self._all.pop(session_id, None)
        if transaction is None:
            return None
        for index, name in ((self._by_substation, transaction.substation_url),
                            (self._by_station, transaction.station_id)):
            group = index.get(name)
            if group is not None:
                group.pop(session_id, None)
                if not group:
                    del index[name]
        key = (transaction.station_id, transaction.connector)
        if self._on_connector.get(key) is transaction:
            del self._on_connector[key]
        return transaction

    def get(self, session_id: str) -> Transaction | None:
        return self._all.get(session_id)

    def values(self) -> list[Transaction]:
        return list(self._all.values())

    def of_substation(self, substation_url: str) -> list[Transaction]:
        return list(self._by_substation.get(substation_url, {}).values())

    def of_station(self, station_id: str) -> list[Transaction]:
        return list(self._by_station.get(station_id, {}).values())

    def on_connector(self, station_id: str, connector: int) -> Transaction | None:
        return self._on_connector.get((station_id, connector))

    def __len__(self) -> int:
        return len(self._all)

    def __iter__(self) -> Iterator[Transaction]:
        return iter(self.values())


@dataclass(frozen=True)
class TaperDecision:
    """What to ask the substation for a session's amount: ``amount_kw`` (None: leave it)."""

    amount_kw: float | None
    tapered: bool


def taper_decision(
    transaction: Transaction,
    full_amount_kw: float,
    now: float,
    ratio: float,
    hold_seconds: float,
    margin_kw: float,
) -> TaperDecision:
    """Lower a session's amount to what its vehicle draws (plus a margin) once it has drawn below
    ``ratio`` of its allocation for ``hold_seconds``; give the whole amount back when it draws near
    its allocation again. Updates ``below_since`` on the transaction."""
    allocated = transaction.allocated_kw
    drawn = None if transaction.power_w is None else transaction.power_w / 1000.0
    if allocated is None or drawn is None or allocated <= 0:
        transaction.below_since = None
        return TaperDecision(None, transaction.tapered)
    if transaction.tapered and drawn >= allocated * 0.9:
        # Drawing near what it was given: it may want more again.
        transaction.below_since = None
        return TaperDecision(full_amount_kw, False)
    if drawn < allocated * ratio:
        if transaction.below_since is None:
            transaction.below_since = now
        if now - transaction.below_since >= hold_seconds:
            lowered = max(transaction.minimum_kw, min(full_amount_kw, drawn + margin_kw))
            if lowered < transaction.amount_kw - 1e-9:
                return TaperDecision(round(lowered, 3), True)
        return TaperDecision(None, transaction.tapered)
    transaction.below_since = None
    return TaperDecision(None, transaction.tapered)


def energy_need(transaction: Transaction) -> dict[str, object] | None:
    """The need a 2.0.1 vehicle reported (NotifyEVChargingNeeds) as a substation takes it, or None.

    ``energyAmount`` (Wh) becomes ``energy_kwh`` and ``departureTime`` ``departure``, by the rules of
    every charge request (gridcommon.validation). Only both together make a need: an energy without a
    departure cannot be planned by (a leased session has no end), and a departure alone would end the
    session there while the vehicle may charge on. A value out of bounds is left out with a warning:
    the vehicle's limits still apply, only the planning by departure is lost.
    """
    if transaction.ev_energy_wh is None or transaction.departure_time is None:
        return None
    try:
        departure = parse_departure(transaction.departure_time)
        energy_kwh = parse_energy_kwh(transaction.ev_energy_wh / 1000.0)
    except (ValidationError, TypeError) as exc:
        log.warning("the energy need station %s reported for transaction %s is left out: %s",
                    transaction.station_id, transaction.transaction_id, getattr(exc, "message", exc))
        return None
    return {"energy_kwh": energy_kwh, "departure": format_time(departure)}
