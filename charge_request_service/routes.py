"""HTTP endpoints of the charge request service: validate, ask the balancer, track sessions, answer JSON."""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from charge_request_service.access import new_session_token
from charge_request_service.balancer import BalancerClient, BalancerReply, BalancerUnavailable, NoAnswer
from charge_request_service.idempotency import KEY_HEADER, KEY_PATTERN, Idempotency, KeyBusy, KeyMisused, fingerprint
from charge_request_service.config import Settings
from charge_request_service.key_access import (
    book_queued,
    book_session,
    check_request_rate,
    check_vehicle_rate,
    database_quotas,
    idempotency_scope,
    may_see,
    over_database_quota,
    owner_id,
    require_credential,
    require_session_owner,
)
from charge_request_service.metrics import ChargeMetrics
from charge_request_service.queue import QueueFull, WaitingQueue
from charge_request_service.reconcile import Reconciler
from charge_request_service.store import QuotaExceeded
from charge_request_service.sessions import (
    ChargeSession,
    InvalidAdmission,
    SessionTracker,
    VehicleBusy,
    format_time,
)
from charge_request_service.waiting import Dispatcher
from gridcommon.auth import require_operator
from gridcommon.validation import ChargeRequest
from gridcommon.web import ApiError, charge_from_body, error_response, json_object_body, metrics_response

EXTENSION_KEY = "charge_request_service"
SERVICE_NAME = "charge_request_service"
# Less time than this left after a lost answer is not worth a second attempt.
RETRY_NEEDS_SECONDS = 1.0
# Kept back from a balancer for each one after it, should it not answer: the stop of its session through
# the next one (milliseconds), a forward there (the balancer's shortest is 1.5 s) and the answer's grace.
FAILOVER_RESERVE_SECONDS = 3.0

log = logging.getLogger("charge")
blueprint = Blueprint("charge", __name__)


@dataclass(frozen=True)
class ChargeService:
    """What the endpoints of one app work with, kept in ``app.extensions``."""

    settings: Settings
    tracker: SessionTracker
    balancer: BalancerClient
    metrics: ChargeMetrics
    queue: WaitingQueue
    dispatcher: Dispatcher
    idempotency: Idempotency
    reconciler: Reconciler


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
    # The details (URLs, what broke) are for the operator's log, not for the public answer.
    log.warning("%s %s failed: %s", request.method, request.path, exc)
    return error_response(
        502,
        "load_balancer_unavailable",
        "The grid's load balancer could not be reached or did not answer in time, so the request could not "
        "be completed. Retry in a few seconds; if it keeps failing, tell the operator (GET /status shows "
        "whether the load balancer answers).",
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
        require_credential()
        raise no_active_session(session_id)
    return session


def no_active_session(session_id: str) -> ApiError:
    return ApiError(
        404,
        "session_not_found",
        f"No active session {session_id!r} here: it was never started through this service, has ended or "
        "was stopped.",
        session_id=session_id,
    )


def no_session(session_id: str) -> ApiError:
    return ApiError(
        404,
        "session_not_found",
        f"No session {session_id!r} here: it was never started through this service, or it ended too long "
        "ago to be kept.",
        session_id=session_id,
    )


def owner_of(current: ChargeService, session_id: str) -> str | None:
    """The client key that holds the session a vehicle has (pending, queued or active)."""
    if (session := current.tracker.get(session_id)) is not None:
        return session.owner
    if (waiting := current.queue.get(session_id)) is not None:
        return waiting[0].owner
    return next((pending.owner for pending in current.tracker.pending() if pending.session_id == session_id), None)


# Fields of the substation's record that say how a session is doing now.
LIVE_FIELDS = ("state", "allocated_kw", "minimum_kw", "energy_kwh", "suspended_seconds", "ended_at", "end_reason",
               # and, for a session with an energy need, how that need is doing
               "departure", "delivered_kwh", "still_needed_kwh", "expected_energy_kwh", "expected_shortfall_kwh",
               "feasible", "need_met")


@blueprint.post("/charge")
def start_charging() -> Response:
    """Charge, queue or refuse; with an ``Idempotency-Key``, a repeat gets the first answer again."""
    current = charge_service()
    key = request.headers.get(KEY_HEADER)
    if key is None:
        check_request_rate()
        return answer_charge(current, json_object_body())
    if not KEY_PATTERN.fullmatch(key):
        raise ApiError(400, "invalid_header", f"{KEY_HEADER} must be 1 to 255 printable ASCII characters.",
                       field=KEY_HEADER)
    # Each client's keys are its own: the same Idempotency-Key from another client is another request.
    key = idempotency_scope(key)
    body = json_object_body()
    body_print = fingerprint(body)
    try:
        stored = current.idempotency.begin(key, body_print)
    except KeyMisused:
        raise ApiError(422, "idempotency_key_reused", f"This {KEY_HEADER} was used before with another body. "
                       "Use a new key for a new request.") from None
    except KeyBusy:
        raise ApiError(409, "idempotency_key_in_use", f"A request with this {KEY_HEADER} is still being "
                       "answered. Retry in a moment to get its answer.").with_header("Retry-After", "1") from None
    if stored is not None:
        response = jsonify(stored.body)
        response.status_code = stored.status
        response.headers.update(stored.headers)
        response.headers["Idempotent-Replayed"] = "true"
        return response
    try:
        # A replay (above) is not counted: a client retrying after a timeout gets its answer, not a 429.
        check_request_rate()
        response = answer_charge(current, body)
    except ApiError as exc:
        response = error_response(exc.status, exc.error, exc.message, **exc.extra)
        response.headers.update(exc.headers)
    except BaseException:
        current.idempotency.finish(key, body_print, 500, {}, {})  # not kept: a repeat tries again
        raise
    kept_headers = {name: response.headers[name] for name in ("Location", "Retry-After") if name in response.headers}
    current.idempotency.finish(key, body_print, response.status_code, response.get_json(), kept_headers)
    return response


def answer_charge(current: ChargeService, body: dict[str, Any]) -> Response:
    wait = body.get("wait", False)
    if not isinstance(wait, bool):
        raise ApiError(400, "invalid_field", "wait, when given, must be true or false.", field="wait")
    charge = charge_from_body(body, current.settings.max_amount_kw, current.settings.max_session_seconds)
    check_vehicle_rate(charge.vehicle_id)  # valid requests only: a broken one never counts against a vehicle
    # The budget counts from when the request arrived; every hop after this one admits nothing past it.
    deadline = time.time() - (time.perf_counter() - g.started) + current.settings.request_timeout_seconds
    # This service names the session, so it can ask about it and stop exactly it later.
    charge = replace(charge, session_id=uuid.uuid4().hex)
    book_session(charge)  # the key's quotas, booked before the request goes anywhere
    try:
        current.tracker.reserve(charge.session_id, charge.vehicle_id, charge.amount_kw, owner_id(), database_quotas())
    except QuotaExceeded as exc:
        raise over_database_quota(exc) from None
    except VehicleBusy as busy:
        if may_see(owner_of(current, busy.session_id)):
            raise ApiError(
                409,
                "vehicle_already_charging",
                f"Vehicle {busy.vehicle_id} already has session {busy.session_id}, waiting or charging. One "
                "vehicle has one session at a time: stop that one first (DELETE /sessions/<id>) or wait until it "
                "ends.",
                session_id=busy.session_id,
            ) from None
        # Whose session it is, and its id, are not this client's to know.
        raise ApiError(
            409,
            "vehicle_already_charging",
            f"Vehicle {busy.vehicle_id} already has a session, waiting or charging, that this client did not "
            "start. One vehicle has one session at a time: retry once it has ended, or ask the operator.",
        ) from None
    token, digest = new_session_token()
    waiting = len(current.queue)
    if waiting and (too_large := fits_nowhere(current, charge)) is not None:
        current.tracker.release(charge.session_id)
        return passed_on(too_large)
    if waiting:
        # First come, first served: nobody overtakes a vehicle that is already waiting.
        if wait:
            return queued(current, charge, token, digest)
        current.tracker.release(charge.session_id)
        raise ApiError(
            503,
            "no_capacity",
            f"{waiting} vehicle(s) are waiting for power ahead of this request. Send it with \"wait\": true "
            f"to join the queue, or retry later.",
            retry_after_seconds=max(1, round(current.settings.queue_retry_seconds)),
        ).with_header("Retry-After", str(max(1, round(current.settings.queue_retry_seconds))))
    charge, reply = forward(current, charge, deadline)
    if reply.status == 503 and wait:
        return queued(current, charge, token, digest)
    if reply.status != 201:
        current.tracker.release(charge.session_id)
        log.info(
            "vehicle %s, %g kW not admitted (HTTP %s): %s",
            charge.vehicle_id,
            charge.amount_kw,
            reply.status,
            reply.body["message"],
        )
        return passed_on(reply)
    session = admitted_session(reply).with_token(digest).owned_by(owner_id())
    if session.energy_kwh is None and charge.energy_kwh is not None:
        # A substation that did not answer for the need: the record keeps what was asked all the same.
        session = replace(session, energy_kwh=charge.energy_kwh, departure=charge.departure)
    current.tracker.record(session)
    log.info(
        "session %s started: vehicle %s, up to %g kW at %s until %s",
        session.session_id,
        session.vehicle_id,
        session.amount_kw,
        session.substation,
        format_time(session.ends_at),
    )
    response = passed_on(reply)
    response.set_data(jsonify({**reply.body, "session_token": token}).get_data())
    return response


def forward(current: ChargeService, charge: ChargeRequest, deadline: float) -> tuple[ChargeRequest, BalancerReply]:
    """Send the request to a balancer; after a lost answer, stop that session everywhere and try again.

    The retry carries a new session id: the old one is retired at every substation, so a copy
    of it still on its way can never start a second session. Returns the request as last sent.
    """
    attempts = len(current.balancer.base_urls)
    for attempt in range(attempts):
        # A balancer gets all the time left but what a failover to each further one needs, so it can
        # refresh its view before it answers 503; never less than an even share.
        now = time.time()
        left, later = deadline - now, attempts - attempt - 1
        attempt_deadline = now + max(left / (later + 1), left - later * FAILOVER_RESERVE_SECONDS)
        try:
            return charge, current.balancer.start_charge(charge, attempt_deadline)
        except NoAnswer as exc:
            log.warning("%s; stopping session %s wherever it is before trying again", exc, charge.session_id)
            settled = current.balancer.stop_everywhere(charge.session_id)
            if not settled:
                # Kept as pending: the reconciler stops it once a balancer answers again.
                raise
            if attempt + 1 == attempts or deadline - time.time() < RETRY_NEEDS_SECONDS:
                current.tracker.release(charge.session_id)
                raise BalancerUnavailable(f"{exc}, and no time was left to try again") from None
            renamed = replace(charge, session_id=uuid.uuid4().hex)
            current.tracker.rekey(charge.session_id, renamed.session_id)
            charge = renamed
        except BalancerUnavailable:
            # No balancer took the request at all: nothing can be charging under its id.
            current.tracker.release(charge.session_id)
            raise
    current.tracker.release(charge.session_id)
    raise BalancerUnavailable("every load balancer lost its answer to the request")


def fits_nowhere(current: ChargeService, charge: ChargeRequest) -> BalancerReply | None:
    """The balancer's 409 when the request fits under no substation's limit, so is not worth queueing.

    None when it fits, or when no balancer can tell now: then it queues, and is refused when it
    reaches the head.
    """
    try:
        reply = current.balancer.check_charge(charge)
    except BalancerUnavailable as exc:
        log.info("could not ask whether %g kW fits under a substation's limit (%s); it may queue",
                 charge.amount_kw, exc)
        return None
    return reply if reply.status == 409 else None


def queued(current: ChargeService, charge: ChargeRequest, token: str, digest: str) -> Response:
    """202: the request waits for power; its Location tells how it is doing."""
    retry_after = max(1, round(current.settings.queue_retry_seconds))
    try:
        book_queued(retry_after)
        entry, position = current.queue.add(charge, digest, owner_id(), database_quotas())
    except QuotaExceeded as exc:
        current.tracker.release(charge.session_id)
        raise over_database_quota(exc, retry_after) from None
    except QueueFull as exc:
        current.tracker.release(charge.session_id)
        raise ApiError(
            503, "queue_full", f"{exc}. Retry in {retry_after} s or later.", retry_after_seconds=retry_after
        ).with_header("Retry-After", str(retry_after)) from None
    except ApiError:
        current.tracker.release(charge.session_id)
        raise
    current.tracker.queued(entry.session_id, entry.to_record())
    if position == 1:
        current.dispatcher.request_queued()
    log.info("vehicle %s, %g kW waits for power as session %s (position %d)",
             charge.vehicle_id, charge.amount_kw, entry.session_id, position)
    response = jsonify({**entry.as_json(position), "session_token": token})
    response.status_code = 202
    response.headers["Location"] = f"/sessions/{entry.session_id}"
    return response


@blueprint.get("/sessions")
def list_sessions() -> Response:
    """Every active session: the operator's view, since it names every vehicle."""
    current = charge_service()
    require_operator(current.settings.admin_token, "charge request service")
    now = current.tracker.now()
    return jsonify({"sessions": [session.as_json(now) for session in current.tracker.active()]})


@blueprint.get("/sessions/<session_id>")
def show_session(session_id: str) -> Response:
    """Queued, charging, suspended, ended, expired or cancelled: the session as it is now."""
    current = charge_service()
    waiting = current.queue.get(session_id)
    if waiting is not None:
        entry, position = waiting
        require_session_owner(entry.owner, entry.token_digest, no_session(session_id))
        return jsonify(entry.as_json(position))
    with_history = request.args.get("history") in {"1", "true"}
    session = current.tracker.get(session_id)
    if session is not None:
        require_session_owner(session.owner, session.token_digest, no_session(session_id))
        body = session.as_json(current.tracker.now())
        return jsonify({**body, **live_record(current, session, with_history)})
    finished = current.tracker.finished(session_id)
    if finished is None:
        require_credential()
        raise no_session(session_id)
    require_session_owner(finished.owner, finished.token_digest, no_session(session_id))
    body = finished.as_json()
    if finished.session is None:
        return jsonify(body)
    final = finished.final
    if final is None:
        final = live_record(current, finished.session, with_history=True)
        if final.get("state") == "ended":  # the substation's last word: its figures no longer change
            current.tracker.remember_final(session_id, final)
    if not with_history:
        final = {key: value for key, value in final.items() if key != "history"}
    state = body["state"]
    # Records kept before "live" meant "still changing" say true: an ended session's figures are final.
    return jsonify({**body, **final, "state": state, "live": False})


def live_record(current: ChargeService, session: ChargeSession, with_history: bool) -> dict[str, Any]:
    """What the substation says of the session now, ``live`` while its figures still change.

    ``{"live": False}`` when the substation cannot be asked; ``live`` is false too once the
    session has ended there, since its figures are then final.
    """
    try:
        reply = current.balancer.show_charge(session.substation, session.session_id)
    except BalancerUnavailable as exc:
        log.info("could not read session %s at %s: %s", session.session_id, session.substation, exc)
        return {"live": False}
    if reply.status != 200:
        return {"live": False}
    record = {key: reply.body[key] for key in LIVE_FIELDS if key in reply.body}
    if with_history and isinstance(reply.body.get("history"), list):
        record["history"] = reply.body["history"]
    return {**record, "live": record.get("state") not in (None, "ended")}


@blueprint.delete("/sessions/<session_id>")
def stop_session(session_id: str) -> Response:
    current = charge_service()
    waiting = current.queue.get(session_id)
    if waiting is not None:
        require_session_owner(waiting[0].owner, waiting[0].token_digest, no_active_session(session_id))
    waiting_entry = current.queue.finish(session_id, "cancelled", current.tracker) if waiting is not None else None
    if waiting_entry is not None:
        waiting = waiting_entry
        current.metrics.left_queue("cancelled", max(0.0, (current.tracker.now() - waiting.queued_at).total_seconds()))
        log.info("queued request %s cancelled by its client", session_id)
        return jsonify({"session_id": session_id, "state": "cancelled", "vehicle_id": waiting.request.vehicle_id})
    finished = current.tracker.finished(session_id)
    if finished is not None and current.tracker.get(session_id) is None:
        # Only its own client (or the operator) may learn that it is over.
        require_session_owner(finished.owner, finished.token_digest, no_active_session(session_id))
    session = active_session(current, session_id)
    require_session_owner(session.owner, session.token_digest, no_active_session(session_id))
    # A failed call raises before forget(), so the session stays tracked and the client can retry.
    reply = current.balancer.stop_charge(session.substation, session.session_id)
    current.tracker.forget(session_id)
    if reply.status == 404:
        log.info("session %s had already ended at %s", session_id, session.substation)
        raise ApiError(
            404,
            "session_not_found",
            f"Session {session_id!r} was no longer running at {session.substation}: it had already ended. Nothing "
            "charges for it any more.",
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
            # Whether the grid can be reached, not where: the balancers' addresses are not the public's business.
            "load_balancer": {"healthy": current.balancer.is_healthy()},
            "active_sessions": counts.active,
            "queued_requests": len(current.queue),
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
