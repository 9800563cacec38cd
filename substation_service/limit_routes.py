"""The substation's limit and allocation policy: read by anyone, changed by the operator.

``PUT /limit {"limit_kw": …}`` caps what this substation's vehicles may draw
together, below what its transformer, local power and peers could give (a
DSO's signal, OCPP's ``ChargingStationExternalConstraints``). The ledger
re-allocates in the same atomic step, so the sessions' allocations never
pass the new limit, not even for an instant.
"""
from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response, jsonify

from gridcommon.auth import require_operator
from gridcommon.validation import finite_number
from gridcommon.web import ApiError, json_object_body
from substation_service.allocation import ALLOCATION_POLICIES, AllocationPolicy
from substation_service.ledger import Snapshot
from substation_service.routes import capacity_json, substation

log = logging.getLogger("substation")
limit_blueprint = Blueprint("limit", __name__)

# A limit beyond any substation's reach is a typo, not an instruction.
MAX_LIMIT_KW = 1_000_000.0


def limit_json(snapshot: Snapshot, history: bool = False) -> dict[str, Any]:
    parts = snapshot.parts
    body: dict[str, Any] = {
        "substation": substation().settings.substation_id,
        "limit_kw": snapshot.limit_kw,
        "source": snapshot.limit_source.value,
        "operator_limit_kw": parts.operator_limit_kw,
        "substation_kw": max(0.0, parts.substation_kw),
        "parts": {
            "capacity_kw": parts.capacity_kw,
            "generation_kw": parts.generation_kw,
            "storage_kw": parts.storage_kw,
            "peer_kw": parts.peer_kw,
        },
        **{key: value for key, value in capacity_json(snapshot).items() if key != "capacity"},
    }
    if history:
        body["history"] = [[at, kw, source] for at, kw, source in substation().ledger.limit_history()]
    return body


@limit_blueprint.get("/limit")
def show_limit() -> Response:
    return jsonify(limit_json(substation().ledger.snapshot(), history=True))


@limit_blueprint.put("/limit")
def set_limit() -> Response:
    current = substation()
    require_operator(current.settings.admin_token, "substation")
    value = json_object_body().get("limit_kw")
    limit_kw = finite_number(value)
    if limit_kw is None or not 0 <= limit_kw <= MAX_LIMIT_KW:
        raise ApiError(
            400,
            "invalid_field",
            f"limit_kw must be a number of kW from 0 to {MAX_LIMIT_KW:g}; DELETE /limit lifts the limit.",
            field="limit_kw",
        )
    snapshot = current.ledger.set_operator_limit(limit_kw)
    log.warning(
        "operator limit set to %g kW: %g kW allocated now, %d charging, %d suspended",
        limit_kw, snapshot.load_kw, snapshot.charging, snapshot.suspended,
    )
    return jsonify(limit_json(snapshot))


@limit_blueprint.delete("/limit")
def lift_limit() -> Response:
    current = substation()
    require_operator(current.settings.admin_token, "substation")
    snapshot = current.ledger.set_operator_limit(None)
    log.warning("operator limit lifted: the limit is %g kW again", snapshot.limit_kw)
    return jsonify(limit_json(snapshot))


@limit_blueprint.get("/allocation-policy")
def show_policy() -> Response:
    return jsonify({"policy": substation().ledger.policy.value, "available": list(ALLOCATION_POLICIES)})


@limit_blueprint.put("/allocation-policy")
def set_policy() -> Response:
    """Switch between deadline, fair_share and strict at run time, e.g. to compare them on one grid."""
    current = substation()
    require_operator(current.settings.admin_token, "substation")
    name = json_object_body().get("policy")
    if not isinstance(name, str) or name not in ALLOCATION_POLICIES:
        raise ApiError(
            400, "invalid_field", f"policy must be one of {', '.join(ALLOCATION_POLICIES)}.", field="policy"
        )
    previous = current.ledger.policy.value
    snapshot = current.ledger.set_policy(AllocationPolicy(name))
    log.warning("allocation policy switched from %s to %s (%d charging, %d suspended)",
                previous, name, snapshot.charging, snapshot.suspended)
    return jsonify({"policy": name, "previous": previous, "available": list(ALLOCATION_POLICIES)})
