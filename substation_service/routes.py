"""HTTP endpoints of a substation: parse, ask the ledger, answer JSON."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from gridcommon.deadline import DEADLINE_HEADER, parse_deadline
from gridcommon.timefmt import format_time
from gridcommon.web import ApiError, metrics_response, parse_charge_body
from substation_service.config import Settings
from substation_service.ledger import (
    CapacityExceeded,
    DeadlinePassed,
    Ledger,
    SessionIdInUse,
    SessionIdRetired,
    SessionReport,
    Snapshot,
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


def substation() -> Substation:
    return current_app.extensions[EXTENSION_KEY]


def session_json(report: SessionReport) -> dict[str, Any]:
    session = report.session
    body: dict[str, Any] = {
        "session_id": session.session_id,
        "substation": substation().settings.substation_id,
        "vehicle_id": session.vehicle_id,
        "amount": session.amount_kw,
        "state": report.state.value,
        "allocated_kw": report.allocated_kw,
        "minimum_kw": report.minimum_kw,
        "energy_kwh": round(report.energy_kwh, 6),
        "suspended_seconds": round(report.suspended_seconds, 3),
        "started_at": format_time(session.started_at),
        "ends_at": format_time(session.ends_at),
        "duration_seconds": session.duration_seconds,
    }
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
    charge = parse_charge_body(
        current.settings.max_amount_kw, current.settings.max_session_seconds, accept_session_id=True
    )
    try:
        admission = current.ledger.admit(
            charge.vehicle_id, charge.amount_kw, charge.duration_seconds, charge.session_id,
            deadline=parse_deadline(request.headers.get(DEADLINE_HEADER)),
        )
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
    log.info(
        "admitted session %s: vehicle %s, up to %g kW for %g s, %g kW now (load %g of %g kW)",
        session.session_id,
        session.vehicle_id,
        session.amount_kw,
        session.duration_seconds,
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
        raise ApiError(
            404,
            "session_not_found",
            f"No active session {session_id!r} at {current.settings.substation_id}: it never existed, "
            "already ended or was stopped. GET /sessions lists the active ones.",
            session_id=session_id,
        ) from None
    log.info("stopped session %s early (load now %g kW)", session_id, release.snapshot.load_kw)
    return jsonify({**session_json(release.report), **capacity_json(release.snapshot)})


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


@blueprint.get("/sessions")
def list_sessions() -> Response:
    """The active sessions and the limit, at one instant; ``?history=1`` and ``?ended=1`` add more."""
    current = substation()
    snapshot, reports = current.ledger.reports(history=_flag("history"), include_ended=_flag("ended"))
    return jsonify(
        {
            "substation": current.settings.substation_id,
            "taken_at": snapshot.taken_at,
            "limit_kw": snapshot.limit_kw,
            "limit_source": snapshot.limit_source.value,
            "load": snapshot.load_kw,
            "sessions": [session_json(report) for report in reports],
        }
    )


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
