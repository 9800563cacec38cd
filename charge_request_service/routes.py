"""HTTP endpoints of the charge request service: validate, ask the balancer, track sessions, answer JSON."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from flask import Blueprint, Response, current_app, g, jsonify, request

from charge_request_service.balancer import BalancerClient, BalancerReply, BalancerUnavailable
from charge_request_service.config import Settings
from charge_request_service.metrics import ChargeMetrics
from charge_request_service.sessions import ChargeSession, InvalidAdmission, SessionTracker, format_time
from gridcommon.web import ApiError, error_response, metrics_response, parse_charge_body

EXTENSION_KEY = "charge_request_service"
SERVICE_NAME = "charge_request_service"

log = logging.getLogger("charge")
blueprint = Blueprint("charge", __name__)


@dataclass(frozen=True)
class ChargeService:
    """What the endpoints of one app work with, kept in ``app.extensions``."""

    settings: Settings
    tracker: SessionTracker
    balancer: BalancerClient
    metrics: ChargeMetrics


def charge_service() -> ChargeService:
    return current_app.extensions[EXTENSION_KEY]


@blueprint.after_request
def _count_charge_request(response: Response) -> Response:
    # Runs for answers made by the error handlers too, so 400/413/415/502 are counted like 201.
    if request.endpoint == "charge.start_charging":
        charge_service().metrics.charge_answered(response.status_code, time.perf_counter() - g.started)
    return response


@blueprint.errorhandler(BalancerUnavailable)
def _balancer_unavailable(exc: BalancerUnavailable) -> Response:
    charge_service().metrics.balancer_failed()
    log.warning("%s %s failed: %s", request.method, request.path, exc)
    return error_response(
        502,
        "load_balancer_unavailable",
        f"Could not complete the request: {exc}. Retry in a few seconds; if it keeps failing, check that the "
        "load balancer (LOAD_BALANCER_URL) is running: GET /status shows whether it answers.",
    )


def passed_on(reply: BalancerReply) -> Response:
    """The balancer's answer, unchanged, for the client."""
    response = jsonify(reply.body)
    response.status_code = reply.status
    if reply.retry_after is not None:
        response.headers["Retry-After"] = reply.retry_after
    return response


def admitted_session(reply: BalancerReply) -> ChargeSession:
    try:
        return ChargeSession.from_admission(reply.body)
    except InvalidAdmission as exc:
        raise BalancerUnavailable(f"the load balancer admitted the request but its answer is unusable: {exc}") from None


def active_session(current: ChargeService, session_id: str) -> ChargeSession:
    session = current.tracker.get(session_id)
    if session is None:
        raise ApiError(
            404,
            "session_not_found",
            f"No active session {session_id!r} here: it was never started through this service, has ended or "
            "was stopped. GET /sessions lists the active ones.",
            session_id=session_id,
        )
    return session


@blueprint.post("/charge")
def start_charging() -> Response:
    current = charge_service()
    charge = parse_charge_body(current.settings.max_amount_kw, current.settings.max_session_seconds)
    reply = current.balancer.start_charge(charge)
    if reply.status != 201:
        log.info(
            "vehicle %s, %g kW not admitted (HTTP %s): %s",
            charge.vehicle_id,
            charge.amount_kw,
            reply.status,
            reply.body["message"],
        )
        return passed_on(reply)
    session = admitted_session(reply)
    current.tracker.record(session)
    log.info(
        "session %s started: vehicle %s, %g kW at %s until %s",
        session.session_id,
        session.vehicle_id,
        session.amount_kw,
        session.substation,
        format_time(session.ends_at),
    )
    return passed_on(reply)


@blueprint.get("/sessions")
def list_sessions() -> Response:
    current = charge_service()
    now = current.tracker.now()
    return jsonify({"sessions": [session.as_json(now) for session in current.tracker.active()]})


@blueprint.get("/sessions/<session_id>")
def show_session(session_id: str) -> Response:
    current = charge_service()
    return jsonify(active_session(current, session_id).as_json(current.tracker.now()))


@blueprint.delete("/sessions/<session_id>")
def stop_session(session_id: str) -> Response:
    current = charge_service()
    session = active_session(current, session_id)
    # A failed call raises before forget(), so the session stays tracked and the client can retry.
    reply = current.balancer.stop_charge(session.substation, session.session_id)
    current.tracker.forget(session_id)
    if reply.status == 404:
        log.info("session %s had already ended at %s", session_id, session.substation)
        raise ApiError(
            404,
            "session_not_found",
            f"Session {session_id!r} was no longer running at {session.substation} (the load balancer says: "
            f"{reply.body['message']}). Nothing charges for it any more, and it is no longer tracked here.",
            session_id=session_id,
            substation=session.substation,
        )
    log.info("session %s stopped at %s", session_id, session.substation)
    return passed_on(reply)


@blueprint.get("/status")
def status() -> Response:
    current = charge_service()
    counts = current.tracker.counts()
    return jsonify(
        {
            "service": SERVICE_NAME,
            "load_balancer": {"url": current.settings.load_balancer_url, "healthy": current.balancer.is_healthy()},
            "active_sessions": counts.active,
            "sessions": counts.as_json(),
            "charge_requests": current.metrics.requests_by_status(),
            "failed_requests": current.metrics.failed_requests(),
        }
    )


@blueprint.get("/health")
def health() -> Response:
    return jsonify({"status": "ok", "service": SERVICE_NAME})


@blueprint.get("/metrics")
def metrics() -> Response:
    return metrics_response(charge_service().metrics.registry)
