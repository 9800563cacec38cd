"""HTTP endpoints of a substation: parse, ask the ledger, answer JSON."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, current_app, jsonify

from gridcommon.timefmt import format_time
from gridcommon.web import ApiError, metrics_response, parse_charge_body
from substation_service.config import Settings
from substation_service.ledger import (
    CapacityExceeded,
    Ledger,
    Session,
    SessionIdInUse,
    SessionIdRetired,
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


def session_json(session: Session) -> dict[str, Any]:
    return {
        "session_id": session.session_id,
        "substation": substation().settings.substation_id,
        "vehicle_id": session.vehicle_id,
        "amount": session.amount_kw,
        "started_at": format_time(session.started_at),
        "ends_at": format_time(session.ends_at),
        "duration_seconds": session.duration_seconds,
    }


def capacity_json(snapshot: Snapshot) -> dict[str, Any]:
    return {
        "load": snapshot.load_kw,
        "capacity": snapshot.admission_capacity_kw,
        "total_capacity": snapshot.total_capacity_kw,
        # Rounded for people reading the JSON; the decision used the exact figures.
        "load_percentage": round(snapshot.load_percentage, 2),
        "available": round(snapshot.available_kw, 3),
        "active_chargers": snapshot.active_chargers,
        "state_version": snapshot.state_version,
    }


def capacity_exceeded(rejection: CapacityExceeded) -> ApiError:
    snapshot = rejection.snapshot
    retry_after = snapshot.seconds_until_next_end()
    if rejection.amount_kw > snapshot.admission_capacity_kw:
        advice = "it exceeds this substation's whole capacity: ask for less power or try another substation."
    else:
        advice = f"retry in {retry_after} s, when a session ends, or try another substation."
    return ApiError(
        409,
        "capacity_exceeded",
        f"{rejection}; {advice}",
        substation=substation().settings.substation_id,
        load=snapshot.load_kw,
        capacity=snapshot.admission_capacity_kw,
        available=snapshot.available_kw,
        retry_after_seconds=retry_after,
        state_version=snapshot.state_version,
    ).with_header("Retry-After", str(retry_after))


@blueprint.post("/charge")
def start_charging() -> tuple[Response, int]:
    current = substation()
    charge = parse_charge_body(
        current.settings.max_amount_kw, current.settings.max_session_seconds, accept_session_id=True
    )
    try:
        admission = current.ledger.admit(
            charge.vehicle_id, charge.amount_kw, charge.duration_seconds, charge.session_id
        )
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
        body = {**session_json(session), **capacity_json(admission.snapshot), "replayed": True}
        return jsonify(body), 201
    current.metrics.admitted.inc()
    log.info(
        "admitted session %s: vehicle %s, %g kW for %g s (load now %g of %g kW)",
        session.session_id,
        session.vehicle_id,
        session.amount_kw,
        session.duration_seconds,
        admission.snapshot.load_kw,
        admission.snapshot.admission_capacity_kw,
    )
    return jsonify({**session_json(session), **capacity_json(admission.snapshot)}), 201


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
    return jsonify(
        {**session_json(release.session), "ended_at": format_time(release.ended_at), **capacity_json(release.snapshot)}
    )


@blueprint.get("/sessions")
def list_sessions() -> Response:
    current = substation()
    sessions = [session_json(session) for session in current.ledger.sessions()]
    return jsonify({"substation": current.settings.substation_id, "sessions": sessions})


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
