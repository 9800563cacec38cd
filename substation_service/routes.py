"""HTTP endpoints of a substation: parse, ask the ledger, answer JSON."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from datetime import datetime, timezone

from gridcommon.deadline import DEADLINE_HEADER, parse_deadline
from gridcommon.timefmt import format_time
from gridcommon.validation import (
    SESSION_ID_PATTERN,
    EnergyNeed,
    ValidationError,
    finite_number,
    parse_energy_need,
    parse_lease_seconds,
    parse_session_terms,
)
from gridcommon.web import ApiError, charge_from_body, json_object_body, metrics_response
from substation_service.config import Settings
from substation_service.ledger import (
    CapacityExceeded,
    DeadlinePassed,
    Ledger,
    SessionIdInUse,
    SessionIdRetired,
    SessionReport,
    Snapshot,
    TooManyChanges,
    UnknownSession,
)
from substation_service.metrics import SubstationMetrics

EXTENSION_KEY = "substation_service"

log = logging.getLogger("substation")
blueprint = Blueprint("substation", __name__)


@dataclass(frozen=True)
class Substation:
    """What the endpoints of one app work with, kept in ``app.extensions``."""

    settings: Settings
    ledger: Ledger
    metrics: SubstationMetrics
    # Long polls of GET /sessions waiting now, at most MAX_LONG_POLLS: each holds a server thread.
    long_polls: threading.BoundedSemaphore


def substation() -> Substation:
    return current_app.extensions[EXTENSION_KEY]


# Fields of an energy need: read here against the substation's own clock, not by charge_from_body.
NEED_FIELDS = ("energy_kwh", "departure")


def session_json(report: SessionReport, substation_id: str | None = None) -> dict[str, Any]:
    """A session's answer; ``substation_id`` where no request is being served (a streamed export)."""
    session = report.session
    body: dict[str, Any] = {
        "session_id": session.session_id,
        "substation": substation_id or substation().settings.substation_id,
        "vehicle_id": session.vehicle_id,
        "amount": session.amount_kw,
        "state": report.state.value,
        "allocated_kw": report.allocated_kw,
        "minimum_kw": report.minimum_kw,
        "energy_kwh": round(report.energy_kwh, 6),
        "suspended_seconds": round(report.suspended_seconds, 3),
        "started_at": format_time(session.started_at),
        "ends_at": None if session.ends_at is None else format_time(session.ends_at),
        "duration_seconds": session.duration_seconds,
        "remaining_seconds": None if report.remaining_seconds is None else round(report.remaining_seconds, 3),
    }
    if report.need_kwh is not None or report.ended_at is not None:
        body["delivered_kwh"] = round(report.energy_kwh, 6)
    if report.departure is not None:
        body["departure"] = format_time(report.departure)
    if report.need_kwh is not None:
        # energy_kwh is the need here; what it got so far is delivered_kwh (without a need, energy_kwh is that).
        body["energy_kwh"] = report.need_kwh
        body["still_needed_kwh"] = round(report.still_needed_kwh, 6)
        body["expected_energy_kwh"] = round(report.expected_kwh, 6)
        body["expected_shortfall_kwh"] = round(report.expected_shortfall_kwh, 6)
        body["feasible"] = report.feasible
        if report.ended_at is not None:
            body["need_met"] = report.need_met
    if report.lease_seconds is not None:
        body["lease_seconds"] = report.lease_seconds
        body["lease_expires_at"] = report.lease_expires_at
    if report.ended_at is not None:
        body["ended_at"] = format_time(report.ended_at)
        body["end_reason"] = report.end_reason
    if report.history is not None:
        # Seconds since the epoch at full precision: an audit can order every change exactly.
        body["history"] = [[at, kw] for at, kw in report.history]
    return body


def capacity_json(snapshot: Snapshot) -> dict[str, Any]:
    return {
        "load": snapshot.load_kw,
        "requested_load": snapshot.requested_kw,
        "minimum_load": snapshot.minimum_load_kw,
        "capacity": snapshot.limit_kw,
        "limit_source": snapshot.limit_source.value,
        "total_capacity": snapshot.total_capacity_kw,
        "fair_share_kw": snapshot.fair_share_kw,
        # Rounded for people reading the JSON; the decision used the exact figures.
        "load_percentage": round(snapshot.load_percentage, 2),
        "available": round(snapshot.available_kw, 3),
        "active_chargers": snapshot.active_chargers,
        "charging": snapshot.charging,
        "suspended": snapshot.suspended,
        "curtailed_sessions": snapshot.curtailed,
        "allocation_policy": substation().ledger.policy.value,
        "min_charge_kw": snapshot.min_charge_kw,
        "state_version": snapshot.state_version,
    }


def capacity_exceeded(rejection: CapacityExceeded) -> ApiError:
    snapshot = rejection.snapshot
    retry_after = snapshot.seconds_until_next_end()
    if rejection.minimum_kw > snapshot.limit_kw:
        advice = "it exceeds this substation's whole limit: ask for less power or try another substation."
    else:
        advice = f"retry in {retry_after} s, when a session ends, or try another substation."
    return ApiError(
        409,
        "capacity_exceeded",
        f"{rejection}; {advice}",
        substation=substation().settings.substation_id,
        **capacity_json(snapshot),
        retry_after_seconds=retry_after,
    ).with_header("Retry-After", str(retry_after))


@blueprint.post("/charge")
def start_charging() -> tuple[Response, int]:
    current = substation()
    body = json_object_body()
    charge = charge_from_body(
        {key: value for key, value in body.items() if key not in NEED_FIELDS},
        current.settings.max_amount_kw, current.settings.max_session_seconds, accept_session_id=True,
    )
    try:
        terms = parse_session_terms(body, charge, current.settings.min_charge_kw)
        need = _need_of(body, current.ledger)
        if need.energy_kwh is not None and need.departure is None and charge.duration_seconds is None:
            raise ValidationError("departure", "energy_kwh needs a departure (or a duration_seconds): by when "
                                               "should the energy be delivered?")
    except ValidationError as exc:
        raise ApiError(400, "invalid_field", exc.message, field=exc.field) from None
    try:
        admission = current.ledger.admit(
            charge.vehicle_id, charge.amount_kw, charge.duration_seconds, charge.session_id,
            deadline=parse_deadline(request.headers.get(DEADLINE_HEADER)),
            lease_seconds=terms.lease_seconds, minimum_kw=terms.minimum_kw,
            energy_kwh=need.energy_kwh, departure=None if need.departure is None else need.departure.timestamp(),
        )
    except ValidationError as exc:
        raise ApiError(400, "invalid_field", exc.message, field=exc.field) from None
    except DeadlinePassed as late:
        # Its caller has given up on the answer: a session admitted now would charge with nobody told.
        log.info("refused session %s for vehicle %s: its deadline passed %.3f s ago",
                 charge.session_id, charge.vehicle_id, late.late_seconds)
        raise ApiError(
            409,
            "deadline_passed",
            "The request's deadline (X-Request-Deadline) has passed: its caller no longer waits for the answer, "
            "so nothing was admitted.",
            **capacity_json(late.snapshot),
        ) from None
    except CapacityExceeded as rejection:
        current.metrics.rejected.inc()
        log.info("rejected %g kW for vehicle %s: %s", charge.amount_kw, charge.vehicle_id, rejection)
        raise capacity_exceeded(rejection) from None
    except SessionIdInUse as conflict:
        raise ApiError(409, "session_id_in_use", str(conflict), session_id=conflict.session.session_id) from None
    except SessionIdRetired as retired:
        log.info("refused a late copy of the request for session %s: %s", retired.session_id, retired)
        raise ApiError(409, "session_id_retired", str(retired), session_id=retired.session_id) from None
    session = admission.session
    if admission.replayed:
        log.info("session %s asked for again: answering with the session already admitted", session.session_id)
        body = {**session_json(admission.report), **capacity_json(admission.snapshot), "replayed": True}
        return jsonify(body), 201
    current.metrics.admitted.inc()
    report = admission.report
    if report.need_kwh is not None:
        log.info("session %s needs %g kWh by %s: %.3g kWh expected under the current plan (%s)",
                 session.session_id, report.need_kwh, format_time(report.departure or 0.0), report.expected_kwh,
                 "feasible" if report.feasible else "it cannot be met: the driver is told")
    log.info(
        "admitted session %s: vehicle %s, up to %g kW %s, %g kW now (load %g of %g kW)",
        session.session_id,
        session.vehicle_id,
        session.amount_kw,
        f"on a {terms.lease_seconds:g} s lease" if session.leased else f"for up to {session.duration_seconds:g} s",
        admission.report.allocated_kw,
        admission.snapshot.load_kw,
        admission.snapshot.limit_kw,
    )
    return jsonify({**session_json(admission.report), **capacity_json(admission.snapshot)}), 201


@blueprint.delete("/charge/<session_id>")
def stop_charging(session_id: str) -> Response:
    current = substation()
    try:
        release = current.ledger.release(session_id)
    except UnknownSession:
        raise _not_active(session_id) from None
    log.info("stopped session %s early (load now %g kW)", session_id, release.snapshot.load_kw)
    return jsonify({**session_json(release.report), **capacity_json(release.snapshot)})


@blueprint.patch("/charge/<session_id>")
def change_session(session_id: str) -> Response:
    """Change what an active session asks for (a vehicle tapering, its reported maximum current)."""
    current = substation()
    body = json_object_body()
    amount = minimum = None
    if all(body.get(name) is None for name in ("amount", "minimum_kw", *NEED_FIELDS)):
        raise ApiError(400, "invalid_field", "Send amount (kW), minimum_kw (kW), energy_kwh (kWh) with departure "
                       "(ISO 8601 UTC), or any of them together.", field="amount")
    try:
        need = _need_of(body, current.ledger)
    except ValidationError as exc:
        raise ApiError(400, "invalid_field", exc.message, field=exc.field) from None
    if body.get("amount") is not None:
        amount = finite_number(body["amount"])
        if amount is None or not 0 < amount <= current.settings.max_amount_kw:
            raise ApiError(
                400, "invalid_field",
                f"amount must be a number of kW greater than 0 and at most {current.settings.max_amount_kw:g}.",
                field="amount",
            )
    if body.get("minimum_kw") is not None:
        # Its bounds (MIN_CHARGE_KW, the amount, which may be the session's own) are the ledger's to check.
        minimum = finite_number(body["minimum_kw"])
        if minimum is None:
            raise ApiError(400, "invalid_field", "minimum_kw must be a number of kW.", field="minimum_kw")
    try:
        change = current.ledger.change(
            session_id, amount_kw=amount, minimum_kw=minimum, energy_kwh=need.energy_kwh,
            departure=None if need.departure is None else need.departure.timestamp(),
        )
    except UnknownSession:
        raise _not_active(session_id) from None
    except ValidationError as exc:
        raise ApiError(400, "invalid_field", exc.message, field=exc.field) from None
    except CapacityExceeded as rejection:
        log.info("refused a change of session %s: %s", session_id, rejection)
        raise capacity_exceeded(rejection) from None
    except TooManyChanges as exc:
        raise ApiError(409, "too_many_changes", f"{exc}.", session_id=session_id) from None
    report = change.report
    log.info("session %s now asks for %g kW (minimum %g kW): %g kW allocated (load %g of %g kW)",
             session_id, report.session.amount_kw, report.minimum_kw, report.allocated_kw,
             change.snapshot.load_kw, change.snapshot.limit_kw)
    return jsonify({**session_json(report), **capacity_json(change.snapshot)})


def _need_of(body: dict[str, Any], ledger: Ledger) -> EnergyNeed:
    """``energy_kwh`` and ``departure`` of a request, a departure judged by this substation's clock."""
    return parse_energy_need(body, datetime.fromtimestamp(ledger.now(), tz=timezone.utc))


def _not_active(session_id: str) -> ApiError:
    return ApiError(
        404,
        "session_not_found",
        f"No active session {session_id!r} at {substation().settings.substation_id}: it never existed, "
        "already ended or was stopped. GET /sessions lists the active ones.",
        session_id=session_id,
    )


# One renewal covers every session a central system holds here; more is a runaway caller.
MAX_RENEWALS = 5000


@blueprint.post("/leases")
def renew_leases() -> Response:
    """Renew the leases of many leased sessions at once: each lapses ``lease_seconds`` from now."""
    current = substation()
    body = json_object_body()
    ids = body.get("session_ids")
    if (not isinstance(ids, list) or len(ids) > MAX_RENEWALS
            or not all(isinstance(key, str) and SESSION_ID_PATTERN.fullmatch(key) for key in ids)):
        raise ApiError(
            400, "invalid_field",
            f"session_ids must be a list of at most {MAX_RENEWALS} session ids (1 to 64 characters from "
            "A-Z, a-z, 0-9, '_' and '-').",
            field="session_ids",
        )
    try:
        lease = parse_lease_seconds(body.get("lease_seconds"))
    except ValidationError as exc:
        raise ApiError(400, "invalid_field", exc.message, field=exc.field) from None
    renewed, unknown = current.ledger.renew(ids, lease)
    if unknown:
        log.info("renewed %d lease(s) for %g s; %d id(s) are no active leased session here (first: %s)",
                 len(renewed), lease, len(unknown), unknown[0])
    return jsonify({"renewed": renewed, "unknown": unknown, "lease_seconds": lease})


@blueprint.get("/charge/<session_id>")
def show_session(session_id: str) -> Response:
    current = substation()
    try:
        report = current.ledger.session(session_id)
    except UnknownSession:
        raise ApiError(
            404,
            "session_not_found",
            f"No session {session_id!r} at {current.settings.substation_id}: it never existed here, or it "
            "ended too long ago to be kept. GET /sessions lists the active ones.",
            session_id=session_id,
        ) from None
    return jsonify(session_json(report))


# The longest a long poll may wait: below gunicorn's 30 s timeout and any sane client's.
MAX_WAIT_SECONDS = 25.0


@blueprint.get("/sessions")
def list_sessions() -> Response:
    """The active sessions and the limit, at one instant; ``?history=1`` and ``?ended=1`` add more.

    ``?after_version=N&wait=S`` is a long poll: the answer comes as soon as ``state_version``
    passes N (at once if it already has), or after S seconds with the state unchanged.
    """
    current = substation()
    history, ended = _flag("history"), _flag("ended")
    after_version, wait = _long_poll_query()
    if after_version is not None and wait > 0:
        if not current.long_polls.acquire(blocking=False):
            limit = current.settings.max_long_polls
            raise ApiError(
                429, "too_many_long_polls",
                f"{limit} long poll(s) of GET /sessions already wait here (MAX_LONG_POLLS): each holds a server "
                "thread. Keep one watcher per substation, or poll without wait.",
            ).with_header("Retry-After", "1")
        try:
            current.ledger.wait_for_change(after_version, wait)
        finally:
            current.long_polls.release()
    snapshot, reports = current.ledger.reports(history=history, include_ended=ended)
    return jsonify(
        {
            "substation": current.settings.substation_id,
            "taken_at": snapshot.taken_at,
            "state_version": snapshot.state_version,
            "limit_kw": snapshot.limit_kw,
            "limit_source": snapshot.limit_source.value,
            "load": snapshot.load_kw,
            "sessions": [session_json(report) for report in reports],
        }
    )


def _long_poll_query() -> tuple[int | None, float]:
    """``after_version`` (None when absent) and ``wait`` seconds (0 when absent) of a long poll."""
    raw_version, raw_wait = request.args.get("after_version"), request.args.get("wait")
    after_version = None
    if raw_version is not None:
        if not raw_version.isascii() or not raw_version.isdigit() or len(raw_version) > 18:
            raise ApiError(400, "invalid_query", f"after_version must be a whole number of at least 0 (a "
                           f"state_version seen before), got {raw_version!r}.", field="after_version")
        after_version = int(raw_version)
    wait = 0.0
    if raw_wait is not None:
        try:
            wait = float(raw_wait)
        except ValueError:
            wait = -1.0
        if not 0 <= wait <= MAX_WAIT_SECONDS:  # NaN fails this too
            raise ApiError(400, "invalid_query", f"wait must be a number of seconds from 0 to "
                           f"{MAX_WAIT_SECONDS:g}, got {raw_wait!r}.", field="wait")
        if after_version is None:
            raise ApiError(400, "invalid_query", "wait needs after_version: the state_version to wait past.",
                           field="after_version")
    return after_version, wait


def _flag(name: str) -> bool:
    value = request.args.get(name, "0")
    if value not in {"0", "1", "true", "false"}:
        raise ApiError(400, "invalid_query", f"{name} must be 0 or 1 (or true/false), got {value!r}.", field=name)
    return value in {"1", "true"}


@blueprint.get("/status")
def status() -> Response:
    current = substation()
    return jsonify(
        {
            "substation": current.settings.substation_id,
            **capacity_json(current.ledger.snapshot()),
            "url": current.settings.public_url,
        }
    )


@blueprint.get("/health")
def health() -> Response:
    return jsonify({"status": "ok", "substation": substation().settings.substation_id})


@blueprint.get("/metrics")
def metrics() -> Response:
    return metrics_response(substation().metrics.registry)
