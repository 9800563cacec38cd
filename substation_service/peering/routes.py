"""HTTP endpoints of peer balancing: the load table and the message inbox."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

from flask import Blueprint, Response, current_app, jsonify

from gridcommon.validation import ValidationError
from gridcommon.web import ApiError, json_object_body
from substation_service.peering.machine import Outcome, Rejection
from substation_service.peering.service import PeeringService
from substation_service.peering.transport import MESSAGES_PATH

EXTENSION_KEY = "substation_peering"

blueprint = Blueprint("peering", __name__)


def peering() -> PeeringService:
    return current_app.extensions[EXTENSION_KEY]


@blueprint.get("/peer-balancing")
def load_table() -> Response:
    service = peering()
    report = service.node.report()
    directory = service.membership.directory()
    url_of = {peer_id: url for url, peer_id in directory.items() if peer_id is not None}
    table = asdict(report.table)
    table["peers"] = [{**peer, "url": url_of.get(peer["substation"])} for peer in table["peers"]]
    schedule = service.settings.schedule
    return jsonify(
        {
            **table,
            "url": service.own_url,
            "configured": service.configured,
            "running": service.running,
            "unidentified_peers": [url for url, peer_id in directory.items() if peer_id is None],
            "load_table": report.table.lines(),
            "messages": {
                "sent": report.sent,
                "received": report.received,
                "rejected": report.rejected,
                "ignored": report.ignored,
                "send_failures": report.send_failures,
            },
            "migrations": {outcome.value: report.outcomes.get(outcome.value, 0) for outcome in Outcome},
            "invariant_blocks": report.invariant_blocks,
            "timings": {
                "phase_seconds": schedule.phase_seconds,
                "round_seconds": schedule.round_seconds,
                "rounds_per_phase": schedule.rounds_per_phase,
                "draft_request_timeout_seconds": service.settings.draft_request_timeout_seconds,
            },
        }
    )


@blueprint.post(MESSAGES_PATH)
def receive_message() -> tuple[Response, int]:
    service = peering()
    try:
        document = json_object_body()
        delivery = service.receive(document)
    except ApiError:
        service.node.count_malformed()
        raise
    except ValidationError as exc:
        raise ApiError(400, "invalid_message", exc.message, field=exc.field) from None
    if delivery.rejected is not None:
        raise _rejection(service, delivery.rejected, document)
    body: dict[str, Any] = {"status": "ignored", "reason": delivery.ignored} if delivery.ignored else {"status": "accepted"}
    return jsonify(body), 202


def _rejection(service: PeeringService, reason: Rejection, document: dict[str, Any]) -> ApiError:
    me = service.node.node_id
    sender = document.get("sender")
    if reason is Rejection.STALE_LINK:
        return ApiError(
            409,
            "stale_link",
            f"{me} has reset its link to {sender} since this message's epoch; {sender} adopts the new epoch "
            f"from {me}'s /metrics on its next membership poll, then messages flow again.",
            sender=sender,
        )
    return ApiError(
        403,
        "unknown_sender",
        f"{sender} is not in {me}'s peer-balancing group: list its URL in {me}'s PEERS, or wait until "
        "the membership poll has seen it answer.",
        sender=sender,
    )
