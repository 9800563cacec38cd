"""Transactions of the stations and the substation sessions that carry them. Plain module.

A transaction becomes a session at its station's substation. The session id is derived
from the station id and the transaction id alone, so asking for the session again after
a lost answer, a reconnect or a gateway restart is a replay at the substation, never a
second session. Power is turned between kW (the substations) and A per phase (OCPP).
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field

from gridcommon.validation import VEHICLE_ID_PATTERN

_SAFE = re.compile(r"[^A-Za-z0-9_-]")


def session_id_for(station_id: str, transaction_id: str) -> str:
    """The substation session id of a transaction: the same for the same pair, on every gateway."""
    digest = hashlib.sha256(f"{station_id}\x00{transaction_id}".encode()).hexdigest()
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
    allocated_kw: float | None = field(default=None, compare=False)

    @property
    def active(self) -> bool:
        return self.ended_at is None

    def seq_no_gap(self, seq_no: int) -> int:
        """Record a 2.0.1 TransactionEvent's seqNo; returns how many numbers were skipped before it."""
        gap = 0
        if self.last_seq_no is not None and seq_no > self.last_seq_no + 1:
            gap = seq_no - self.last_seq_no - 1
        if self.last_seq_no is None or seq_no > self.last_seq_no:
            self.last_seq_no = seq_no
        self.seq_gaps += gap
        return gap


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
