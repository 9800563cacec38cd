"""HTTP endpoints of the load balancer: parse, call the domain, answer JSON."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from gridcommon.auth import require_operator
from gridcommon.deadline import DEADLINE_HEADER, parse_deadline
from gridcommon.web import ApiError, json_object_body, metrics_response, parse_charge_body
from load_balancer.policies import POLICY_NAMES
from load_balancer.poller import PollError
from load_balancer.registry import TooManySubstations, UrlNotAllowed
from load_balancer.router import (
    FULL,
    NO_TIME,
    TOO_SLOW,
    UNREACHABLE,
    Admitted,
    Answer,
    ForwardError,
    NoCapacity,
    Refused,
    TooLarge,
    UnknownSubstation,
)
from load_balancer.view import SubstationConflict

if TYPE_CHECKING:
    from load_balancer.app import Balancer

EXTENSION_KEY = "load_balancer"

api = Blueprint("api", __name__)
admin = Blueprint("admin", __name__, url_prefix="/admin")


def _balancer() -> "Balancer":
    return current_app.extensions[EXTENSION_KEY]


def _unknown_substation(substation_id: str) -> ApiError:
    return ApiError(
        404,
        "unknown_substation",
        f"No substation {substation_id!r} is registered; GET /substations lists the registered ones.",
    )


# Charge requests --------------------------------------------------------------


@api.post("/charge")
def charge() -> tuple[Response, int]:
    balancer = _balancer()
    settings = balancer.settings
    try:
        # The caller (the charge API) may choose the session id, so it can ask about or stop exactly that session.
        charge_request = parse_charge_body(settings.max_amount_kw, settings.max_session_seconds, accept_session_id=True)
    except (ApiError, HTTPException):
        balancer.metrics.count_request("invalid")
        raise
    deadline = parse_deadline(request.headers.get(DEADLINE_HEADER))
    try:
        outcome = balancer.router.route(charge_request, deadline=deadline)
    except Exception:
        balancer.metrics.count_request("error")
        raise
    if isinstance(outcome, Admitted):
        balancer.metrics.count_request("routed")
        routing = {"policy": outcome.policy, "attempts": outcome.attempts}
        return jsonify({**outcome.answer.body, "routing": routing}), 201
    if isinstance(outcome, Refused):
        balancer.metrics.count_request("invalid")
        return jsonify(outcome.answer.body), outcome.answer.status
    if isinstance(outcome, TooLarge):
        balancer.metrics.count_request("too_large")
        raise too_large_error(outcome)
    metrics_outcome, error = NOT_PLACED[outcome.reason]
    balancer.metrics.count_request(metrics_outcome)
    raise not_placed_error(outcome, error)


# Why a request was not placed: (metrics outcome, error code) of each NoCapacity reason.
NOT_PLACED = {
    FULL: ("no_capacity", "no_capacity"),
    UNREACHABLE: ("unreachable", "substations_unreachable"),
    TOO_SLOW: ("too_slow", "substations_too_slow"),
    NO_TIME: ("no_time", "deadline_too_short"),
}


def not_placed_error(outcome: NoCapacity, error: str) -> ApiError:
    """503 with the reason's own error code; a full grid's says what is free at each substation."""
    extra: dict[str, Any] = {"retry_after_seconds": outcome.retry_after_seconds}
    if outcome.reason == FULL:
        extra["free_kw"] = outcome.free_kw
    return ApiError(503, error, outcome.message, **extra).with_header("Retry-After", str(outcome.retry_after_seconds))


def too_large_error(outcome: TooLarge) -> ApiError:
    return ApiError(
        409, "exceeds_every_limit", outcome.message, amount=outcome.amount_kw, minimum_kw=outcome.minimum_kw,
        largest_limit_kw=outcome.largest_limit_kw, substation=outcome.substation_id,
    )


@api.post("/charge/check")
def check_charge() -> Response:
    """Whether a request could fit under some substation's limit: for a caller about to queue it."""
    balancer = _balancer()
    settings = balancer.settings
    charge_request = parse_charge_body(settings.max_amount_kw, settings.max_session_seconds, accept_session_id=True)
    too_large = balancer.router.check(charge_request, deadline=parse_deadline(request.headers.get(DEADLINE_HEADER)))
    if too_large is not None:
        raise too_large_error(too_large)
    return jsonify({"fits": True, "amount": charge_request.amount_kw})


@api.delete("/sessions/<session_id>")
def stop_session_anywhere(session_id: str) -> tuple[Response, int]:
    """Stop a session at whichever substation holds it, and retire its id at every one.

    For a caller that gave up waiting on an answer: the session may exist
    somewhere or not yet, and a late copy of its request must not start it.
    """
    answer = _balancer().router.stop_everywhere(session_id)
    if answer is None:
        raise ApiError(
            404,
            "session_not_found",
            f"No substation holds session {session_id!r}; each one will refuse it if its request arrives late.",
            session_id=session_id,
        )
    return jsonify(answer.body), answer.status


@api.get("/charge/<substation_id>/<session_id>")
def show_session(substation_id: str, session_id: str) -> tuple[Response, int]:
    return _ask_substation(substation_id, "about the session", _balancer().router.show_session, session_id)


@api.delete("/charge/<substation_id>/<session_id>")
def stop_session(substation_id: str, session_id: str) -> tuple[Response, int]:
    return _ask_substation(substation_id, "to stop the session", _balancer().router.stop_session, session_id)


def _ask_substation(
    substation_id: str, what: str, ask: Callable[[str, str], Answer], session_id: str
) -> tuple[Response, int]:
    """The substation's answer about one of its sessions, passed on; 404 or 502 when it cannot be asked."""
    try:
        answer = ask(substation_id, session_id)
    except UnknownSubstation:
        raise _unknown_substation(substation_id) from None
    except ForwardError as exc:
        raise ApiError(
            502,
            "substation_unreachable",
            f"Substation {substation_id} could not be asked {what}: {exc}. Retry in a few seconds.",
        ) from None
    return jsonify(answer.body), answer.status


# Substations ------------------------------------------------------------------


@api.get("/substations")
def list_substations() -> Response:
    return jsonify({"substations": _substation_entries()})


@api.post("/substations")
def register_substation() -> tuple[Response, int]:
    # The balancer polls what is registered and routes by what it reports: an operator's act.
    balancer = _balancer()
    require_operator(balancer.settings.admin_token, "load balancer")
    url = json_object_body().get("url")
    try:
        entry, created = balancer.registry.register(url)
    except ValueError as exc:
        raise ApiError(400, "invalid_field", f"url: {exc}.", field="url") from None
    except UrlNotAllowed as exc:
        raise ApiError(
            403,
            "url_not_allowed",
            f"url: {exc} is not on a host SUBSTATION_URL_ALLOW allows. Register a substation on an allowed "
            "host, or add its host to SUBSTATION_URL_ALLOW and restart the balancer.",
            field="url",
        ) from None
    except TooManySubstations as exc:
        raise ApiError(
            409,
            "too_many_substations",
            f"Not registered: {exc}. DELETE /substations/<id> one that is no longer used, or raise MAX_SUBSTATIONS.",
            max_substations=exc.limit,
        ) from None
    except PollError as exc:
        # PollError's text is the balancer's own account (status, too slow, too large, not a metrics
        # page); it never quotes what the URL sent.
        raise ApiError(
            502,
            "substation_unreachable",
            f"{exc}. Check the URL and that the substation is running, then register it again.",
        ) from None
    except SubstationConflict as exc:
        raise ApiError(409, "substation_conflict", f"{exc}.") from None
    return jsonify(entry.as_status(balancer.view.now())), 201 if created else 200


@api.delete("/substations/<substation_id>")
def deregister_substation(substation_id: str) -> Response:
    balancer = _balancer()
    require_operator(balancer.settings.admin_token, "load balancer")
    removed = balancer.registry.deregister(substation_id)
    if removed is None:
        raise _unknown_substation(substation_id)
    return jsonify(removed.as_status(balancer.view.now()))


def _substation_entries() -> list[dict[str, Any]]:
    view = _balancer().view
    now = view.now()
    return [substation.as_status(now) for substation in view.snapshots()]


# Status -----------------------------------------------------------------------


@api.get("/status")
def status() -> Response:
    balancer = _balancer()
    entries = _substation_entries()
    return jsonify(
        {
            "policy": balancer.router.policy_name,
            "poll_interval_seconds": balancer.settings.poll_interval_seconds,
            "healthy_substations": sum(entry["up"] for entry in entries),
            "substations": entries,
        }
    )


@api.get("/health")
def health() -> Response:
    # The balancer is healthy while it can answer; substations being down is reported by /status.
    return jsonify({"status": "ok", "service": "load_balancer"})


@api.get("/metrics")
def metrics() -> Response:
    return metrics_response(_balancer().metrics.registry)


# Admin ------------------------------------------------------------------------


@admin.before_request
def _require_admin_token() -> None:
    require_operator(_balancer().settings.admin_token, "load balancer")


def _policy_body(**extra: Any) -> Response:
    return jsonify({"policy": _balancer().router.policy_name, **extra, "available": list(POLICY_NAMES)})


@admin.get("/policy")
def get_policy() -> Response:
    return _policy_body()


@admin.put("/policy")
def put_policy() -> Response:
    name = json_object_body().get("policy")
    if not isinstance(name, str) or name not in POLICY_NAMES:
        raise ApiError(
            400,
            "invalid_field",
            f"policy must be one of {', '.join(POLICY_NAMES)}.",
            field="policy",
        )
    previous = _balancer().router.set_policy(name)
    return _policy_body(previous=previous)
