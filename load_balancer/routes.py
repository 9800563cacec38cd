"""HTTP endpoints of the load balancer: parse, call the domain, answer JSON."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from gridcommon.auth import require_operator
from gridcommon.web import ApiError, json_object_body, metrics_response, parse_charge_body
from load_balancer.policies import POLICY_NAMES
from load_balancer.poller import PollError
from load_balancer.router import Admitted, ForwardError, Refused, UnknownSubstation
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
    try:
        outcome = balancer.router.route(charge_request)
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
    balancer.metrics.count_request("no_capacity")
    raise ApiError(
        503, "no_capacity", outcome.message, retry_after_seconds=outcome.retry_after_seconds
    ).with_header("Retry-After", str(outcome.retry_after_seconds))


@api.get("/charge/<substation_id>/<session_id>")
def show_session(substation_id: str, session_id: str) -> tuple[Response, int]:
    try:
        answer = _balancer().router.show_session(substation_id, session_id)
    except UnknownSubstation:
        raise _unknown_substation(substation_id) from None
    except ForwardError as exc:
        raise ApiError(
            502,
            "substation_unreachable",
            f"Substation {substation_id} could not be asked about the session: {exc}. Retry in a few seconds.",
        ) from None
    return jsonify(answer.body), answer.status


@api.delete("/charge/<substation_id>/<session_id>")
def stop_session(substation_id: str, session_id: str) -> tuple[Response, int]:
    try:
        answer = _balancer().router.stop_session(substation_id, session_id)
    except UnknownSubstation:
        raise _unknown_substation(substation_id) from None
    except ForwardError as exc:
        raise ApiError(
            502,
            "substation_unreachable",
            f"Substation {substation_id} could not be asked to stop the session: {exc}. Retry in a few seconds.",
        ) from None
    return jsonify(answer.body), answer.status


# Substations ------------------------------------------------------------------


@api.get("/substations")
def list_substations() -> Response:
    return jsonify({"substations": _substation_entries()})


@api.post("/substations")
def register_substation() -> tuple[Response, int]:
    balancer = _balancer()
    url = json_object_body().get("url")
    try:
        entry, created = balancer.registry.register(url)
    except ValueError as exc:
        raise ApiError(400, "invalid_field", f"url: {exc}.", field="url") from None
    except PollError as exc:
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
