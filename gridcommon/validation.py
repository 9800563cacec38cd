"""Validation of a charge request, shared by every service that receives one.

The charge request service is the public gate; the balancer and the substations
check again with the same rules, so none of them trusts its caller blindly.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from gridcommon.timefmt import format_time, parse_time, utc_now

# \A and \Z, used with fullmatch: "^...$" with match() also takes "EV-1\n", because "$"
# matches before a trailing newline, and that newline would then travel into logs and URLs.
VEHICLE_ID_PATTERN = re.compile(r"\A[A-Za-z0-9_-]{1,64}\Z")
SESSION_ID_PATTERN = VEHICLE_ID_PATTERN
# A substation's id travels in the balancer's URLs (DELETE /charge/<substation>/<session>),
# in metric labels and in log lines; the balancer reads it from a /metrics page it polls.
SUBSTATION_ID_PATTERN = re.compile(r"\A[A-Za-z0-9._-]{1,64}\Z")
DEFAULT_MAX_AMOUNT_KW = 350.0
DEFAULT_MAX_DURATION_SECONDS = 3600.0
# Times are reported in milliseconds: a shorter session (5e-324 s is a valid JSON number) would
# start and end at the same instant, and its duration would read as 0.
MIN_DURATION_SECONDS = 0.001
# An energy need: the most a vehicle may ask for (a large truck's battery), and how far
# ahead its departure may be. A need beyond these is a typo or a unit error (Wh sent as kWh).
MAX_ENERGY_KWH = 500.0
MAX_DEPARTURE_AHEAD_SECONDS = 7 * 24 * 3600.0
# An ISO 8601 time is about 30 characters; a longer string is not one.
MAX_TIME_TEXT = 64


class ValidationError(ValueError):
    """A field of the request is wrong; ``field`` names it for the client."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class ChargeRequest:
    vehicle_id: str
    amount_kw: float
    duration_seconds: float | None = None
    # Chosen by the balancer, never by the public: the same id on a retried forward makes the
    # substation answer with the session it already admitted instead of admitting it twice.
    session_id: str | None = None
    # The vehicle's need: this much energy by its departure (both optional; see parse_energy_need).
    energy_kwh: float | None = None
    departure: datetime | None = None

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"vehicle_id": self.vehicle_id, "amount": self.amount_kw}
        if self.duration_seconds is not None:
            body["duration_seconds"] = self.duration_seconds
        if self.session_id is not None:
            body["session_id"] = self.session_id
        if self.energy_kwh is not None:
            body["energy_kwh"] = self.energy_kwh
        if self.departure is not None:
            # Always the absolute form: "seconds from now" would mean later at every hop it passes.
            body["departure"] = format_time(self.departure)
        return body


def is_substation_id(value: object) -> bool:
    """Whether ``value`` is a valid substation id: 1 to 64 of A-Z, a-z, 0-9, '.', '_' and '-'."""
    return isinstance(value, str) and SUBSTATION_ID_PATTERN.fullmatch(value) is not None


def finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a finite JSON number, else None.

    bool is an int in Python, but ``true`` is not an amount of power; and an
    integer too large for a float (JSON allows 400 digits) is not one either.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def parse_charge_request(
    body: dict[str, Any],
    max_amount_kw: float = DEFAULT_MAX_AMOUNT_KW,
    max_duration_seconds: float = DEFAULT_MAX_DURATION_SECONDS,
    accept_session_id: bool = False,
) -> ChargeRequest:
    """The validated request; ``session_id`` is read only where ``accept_session_id`` (internal hops)."""
    vehicle_id = body.get("vehicle_id")
    if not isinstance(vehicle_id, str) or not VEHICLE_ID_PATTERN.fullmatch(vehicle_id):
        raise ValidationError(
            "vehicle_id",
            "vehicle_id must be a string of 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-'.",
        )
    amount = finite_number(body.get("amount"))
    if amount is None or not 0 < amount <= max_amount_kw:
        raise ValidationError(
            "amount",
            f"amount must be a number of kW greater than 0 and at most {max_amount_kw:g}.",
        )
    raw_duration = body.get("duration_seconds")
    duration = finite_number(raw_duration)
    if raw_duration is not None and (duration is None or not MIN_DURATION_SECONDS <= duration <= max_duration_seconds):
        raise ValidationError(
            "duration_seconds",
            f"duration_seconds, when given, must be a number of seconds from {MIN_DURATION_SECONDS:g} "
            f"to {max_duration_seconds:g}.",
        )
    session_id = body.get("session_id") if accept_session_id else None
    if session_id is not None and (not isinstance(session_id, str) or not SESSION_ID_PATTERN.fullmatch(session_id)):
        raise ValidationError(
            "session_id",
            "session_id, when given, must be a string of 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-'.",
        )
    need = parse_energy_need(body)
    if need.energy_kwh is not None and need.departure is None and duration is None:
        raise ValidationError(
            "departure",
            "energy_kwh needs a departure (or a duration_seconds): by when should the energy be delivered?",
        )
    return ChargeRequest(
        vehicle_id=vehicle_id,
        amount_kw=amount,
        duration_seconds=duration,
        session_id=session_id,
        energy_kwh=need.energy_kwh,
        departure=need.departure,
    )


@dataclass(frozen=True)
class EnergyNeed:
    """What a vehicle needs: ``energy_kwh`` by ``departure`` (UTC); either may be None."""

    energy_kwh: float | None = None
    departure: datetime | None = None


def parse_energy_kwh(value: Any) -> float:
    """An energy need in kWh, or ``ValidationError`` naming ``energy_kwh``."""
    energy = finite_number(value)
    if energy is None or not 0 < energy <= MAX_ENERGY_KWH:
        raise ValidationError(
            "energy_kwh",
            f"energy_kwh must be a number of kWh greater than 0 and at most {MAX_ENERGY_KWH:g} "
            f"(got {_shown(value)}).",
        )
    return energy


def parse_departure(value: Any, now: datetime | None = None) -> datetime:
    """A departure as an absolute UTC time, or ``ValidationError`` naming ``departure``.

    ``value`` is an ISO 8601 time (one without a zone is UTC) or a number of seconds from ``now``;
    either way it must be after ``now`` and at most ``MAX_DEPARTURE_AHEAD_SECONDS`` later.
    """
    now = now or utc_now()
    latest = now + timedelta(seconds=MAX_DEPARTURE_AHEAD_SECONDS)
    rule = (f"departure must be an ISO 8601 time (e.g. \"{format_time(now + timedelta(hours=8))}\") or a number "
            f"of seconds from now, after now and at most {MAX_DEPARTURE_AHEAD_SECONDS / 86400:g} days ahead")
    if isinstance(value, str) and len(value) <= MAX_TIME_TEXT:
        try:
            # In UTC at once: a time at the edge of the calendar overflows here, not in a later message.
            departure = parse_time(value.strip()).astimezone(timezone.utc)
        except (ValueError, OverflowError):
            raise ValidationError("departure", f"{rule}; {_shown(value)} is not an ISO 8601 time.") from None
    else:
        seconds = finite_number(value)
        if seconds is None:
            raise ValidationError("departure", f"{rule}; got {_shown(value)}.")
        if not 0 < seconds <= MAX_DEPARTURE_AHEAD_SECONDS:
            raise ValidationError("departure", f"{rule}; {seconds:g} seconds from now is not.")
        departure = now + timedelta(seconds=seconds)
    if departure <= now:
        raise ValidationError("departure", f"{rule}; {format_time(departure)} has already passed.")
    if departure > latest:
        raise ValidationError("departure", f"{rule}; {format_time(departure)} is later than {format_time(latest)}.")
    return departure


def parse_energy_need(body: dict[str, Any], now: datetime | None = None) -> EnergyNeed:
    """``energy_kwh`` and ``departure`` of a request, each None when absent or null."""
    energy = None if body.get("energy_kwh") is None else parse_energy_kwh(body["energy_kwh"])
    departure = None if body.get("departure") is None else parse_departure(body["departure"], now)
    return EnergyNeed(energy, departure)


def _shown(value: Any) -> str:
    """``value`` as a client sent it, cut short: an error quotes it, never a whole document."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# An open-ended session (OCPP) is held by a lease its caller renews; a lease outside these bounds is a typo.
MIN_LEASE_SECONDS = 5.0
MAX_LEASE_SECONDS = 600.0


@dataclass(frozen=True)
class SessionTerms:
    """A substation's optional terms of a session: held by a lease instead of a duration, its own minimum."""

    lease_seconds: float | None = None
    minimum_kw: float | None = None


def parse_lease_seconds(value: Any) -> float:
    """A lease length from a request, or ``ValidationError`` naming ``lease_seconds``."""
    lease = finite_number(value)
    if lease is None or not MIN_LEASE_SECONDS <= lease <= MAX_LEASE_SECONDS:
        raise ValidationError(
            "lease_seconds",
            f"lease_seconds must be a number of seconds from {MIN_LEASE_SECONDS:g} to {MAX_LEASE_SECONDS:g}.",
        )
    return lease


def parse_minimum_kw(value: Any, min_charge_kw: float, amount_kw: float) -> float:
    """A session's own minimum from a request, or ``ValidationError`` naming ``minimum_kw``.

    At least the substation's ``min_charge_kw`` (a minimum below it would undercut every other
    session's guarantee) and at most the session's ``amount_kw``.
    """
    minimum = finite_number(value)
    if minimum is None or not min_charge_kw <= minimum <= amount_kw:
        raise ValidationError(
            "minimum_kw",
            f"minimum_kw must be a number of kW from this substation's MIN_CHARGE_KW ({min_charge_kw:g}) "
            f"to the session's amount ({amount_kw:g}).",
        )
    return minimum


def parse_session_terms(body: dict[str, Any], charge: ChargeRequest, min_charge_kw: float) -> SessionTerms:
    """``lease_seconds`` and ``minimum_kw`` of a charge request already read by ``parse_charge_request``."""
    lease = None
    if body.get("lease_seconds") is not None:
        if charge.duration_seconds is not None:
            raise ValidationError(
                "lease_seconds",
                "lease_seconds and duration_seconds exclude each other: a leased session has no fixed end. "
                "Send one of them.",
            )
        lease = parse_lease_seconds(body["lease_seconds"])
    minimum = None
    if body.get("minimum_kw") is not None:
        minimum = parse_minimum_kw(body["minimum_kw"], min_charge_kw, charge.amount_kw)
    return SessionTerms(lease_seconds=lease, minimum_kw=minimum)
