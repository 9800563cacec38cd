"""HTTP endpoints of peer balancing: the load table and the message inbox.

The inbox checks, in this order, and answers every refusal as JSON
``{"error": <reason>, "message": <what is wrong and what to do>, ...}``,
counted in ``peer_messages_rejected_total{reason=...}``:

| Reason                 | Status | When                                                              |
|------------------------|--------|-------------------------------------------------------------------|
| `peering_off`          | 403    | this substation has no `PEER_KEY`                                  |
| `bad_signature`        | 401    | signature headers missing, malformed, or not made with the key     |
| `stale_timestamp`      | 401    | signed longer ago (or further ahead) than the clock tolerance: a replay |
| `malformed`            | 400/415| not a JSON object, or not a valid message (`field` names what is wrong) |
| `sender_mismatch`      | 401    | the body's `sender` is not the signed `X-Peer-Sender`              |
| `unknown_sender`       | 403    | the sender is not a current member of this substation's group      |
| `implausible_phase`    | 422    | phase more than 2 phases from this clock's, or a round the schedule has not |
| `implausible_epoch`    | 422    | epoch ahead of this clock by more than the clock tolerance         |
| `stale_link`           | 409    | the epoch is of a link this substation has reset since             |
| `duplicate`            | 202    | handled once already: acknowledged (`{"status": "duplicate"}`), acted on once |
| `not_leader`           | 409    | a Collected State from a member that is not the leader here        |
| `amount_out_of_bounds` | 422    | a migration amount above one `MIGRATION_STEP_KW`                    |
| `unsolicited_select`   | 409    | a Draft Select that answers no Draft Age of this substation        |

401: the message does not prove who sent it. 403: it does, but that sender
may not send here. 422: it can never be right, whatever the state. 409: it
contradicts the state this substation is in now (a race can cause it: a new
leader, a link just reset). A duplicate is acknowledged, since a retry of a
delivered message is no failure of its sender; it is counted with the
rejections because it was not acted on.

The answer to a signed membership poll (``GET /metrics``) is signed here
too (``sign_poll_answer``); unsigned scrapes (Prometheus) are left alone.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from gridcommon.validation import ValidationError
from gridcommon.web import ApiError, json_object_body
from substation_service.peering.auth import SIGNATURE_HEADER, AuthError, signed_path
from substation_service.peering.machine import Outcome, Rejection
from substation_service.peering.service import PeeringService
from substation_service.peering.transport import MESSAGES_PATH, METRICS_PATH, POLL_REFUSED_HEADER

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
            "peer_key_set": service.key is not None,
            "off_reason": service.off_reason,
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
                "clock_tolerance_seconds": service.clock_tolerance_seconds,
            },
        }
    )


@blueprint.post(MESSAGES_PATH)
def receive_message() -> tuple[Response, int]:
    service = peering()
    me = service.node.node_id
    if service.key is None:
        service.node.count_rejection(Rejection.PEERING_OFF)
        raise ApiError(
            403,
            Rejection.PEERING_OFF.value,
            f"{me} has no PEER_KEY, so it cannot check who sent this message and takes none: its peer balancing "
            "is off. Give every substation of the group the same PEER_KEY.",
        )
    # The exact bytes received: the signature covers them, not their JSON reading.
    body = request.get_data(cache=True)
    try:
        signed = service.key.verify_request(
            "POST", signed_path(request.path, request.query_string), request.headers, body, service.now(), service.clock_tolerance_seconds
        )
    except AuthError as exc:
        service.node.count_rejection(exc.reason)
        raise ApiError(401, exc.reason.value, f"{me} refused the message: {exc.message}") from None
    try:
        document = json_object_body()
        delivery = service.receive(document, signed.sender)
    except ApiError:
        service.node.count_malformed()
        raise
    except ValidationError as exc:
        raise ApiError(400, "invalid_message", exc.message, field=exc.field) from None
    if delivery.rejected is Rejection.DUPLICATE:
        return jsonify({"status": "duplicate", "reason": Rejection.DUPLICATE.value}), 202
    if delivery.rejected is not None:
        raise _rejection(service, delivery.rejected, document, signed.sender)
    body_out: dict[str, Any] = (
        {"status": "ignored", "reason": delivery.ignored} if delivery.ignored else {"status": "accepted"}
    )
    return jsonify(body_out), 202


@blueprint.after_app_request
def sign_poll_answer(response: Response) -> Response:
    """Sign the /metrics answer to a peer's signed poll, so the poller can trust what it reads there."""
    if request.method != "GET" or request.path != METRICS_PATH or SIGNATURE_HEADER not in request.headers:
        return response
    service = current_app.extensions.get(EXTENSION_KEY)
    if service is None or service.key is None:
        return response  # unsigned: the poller counts it and takes this substation for no member
    try:
        signed = service.key.verify_request(
            "GET", signed_path(request.path, request.query_string), request.headers, b"", service.now(),
            service.clock_tolerance_seconds,
        )
    except AuthError as exc:
        # No signature for a poller that cannot prove it holds the key; it learns why, unsigned.
        service.node.count_rejection(exc.reason)
        response.headers[POLL_REFUSED_HEADER] = exc.reason.value
        return response
    response.headers.update(
        service.key.sign_response(signed.signature, service.node.node_id, response.status_code, response.get_data())
    )
    return response


def _rejection(service: PeeringService, reason: Rejection, document: dict[str, Any], signed_by: str) -> ApiError:
    me = service.node.node_id
    sender = document.get("sender")
    step = service.settings.balancing.migration_step_kw
    explanations: dict[Rejection, tuple[int, str]] = {
        Rejection.SENDER_MISMATCH: (
            401,
            f"The message says it is from {sender} but {signed_by} signed it: a substation may only send as "
            "itself.",
        ),
        Rejection.UNKNOWN_SENDER: (
            403,
            f"{sender} is not in {me}'s peer-balancing group: list its URL in {me}'s PEERS, or wait until "
            "the membership poll has seen it answer.",
        ),
        Rejection.IMPLAUSIBLE_PHASE: (
            422,
            f"Phase {document.get('phase')} round {document.get('round')} is not one {me}'s clock could be near "
            f"(phases are wall-clock aligned; at most 2 phases apart). Check that {sender} has the same "
            "PHASE_SECONDS and ROUND_SECONDS and a synchronised clock.",
        ),
        Rejection.IMPLAUSIBLE_EPOCH: (
            422,
            f"Link epoch {document.get('epoch')} lies ahead of {me}'s clock by more than "
            f"{service.clock_tolerance_seconds:g} s: epochs are read from clocks, so this one is wrong. "
            "Check the substations' clocks.",
        ),
        Rejection.STALE_LINK: (
            409,
            f"{me} has reset its link to {sender} since this message's epoch; {sender} adopts the new epoch "
            f"from {me}'s /metrics on its next membership poll, then messages flow again.",
        ),
        Rejection.NOT_LEADER: (
            409,
            f"{sender} is not the leader {me} sees, so its Collected State is not taken; the leader is the "
            "lowest id among the members. This settles once both see the same members.",
        ),
        Rejection.AMOUNT_OUT_OF_BOUNDS: (
            422,
            f"A migration moves one step, at most {step:g} kW here; {document.get('amount')} kW is not one. "
            "Every substation of the group needs the same MIGRATION_STEP_KW.",
        ),
        Rejection.UNSOLICITED_SELECT: (
            409,
            f"{me} sent {sender} no Draft Age for phase {document.get('phase')} round {document.get('round')} on "
            "this link, or has already had its one offer for it: a supplier offers power only to a need it was told.",
        ),
    }
    status, message = explanations.get(reason, (409, f"{me} refused the message ({reason.value})."))
    return ApiError(status, reason.value, message, sender=sender)
