"""The operator's API of client keys: create, list, read, change, rotate and revoke (``/client-keys``).

Every endpoint needs the operator token. The key itself is in the answer to
its creation and to each rotation, once: only its SHA-256 is kept, so it
cannot be shown again. Changing a key's quotas or name keeps the key and its
sessions; replicas sharing a database see the change within their reload
period (2 s). Revoking a key leaves its sessions running (the
operator may stop them: ``DELETE /sessions/<id>``); it can never be used again.
"""
from __future__ import annotations

import logging

from flask import Blueprint, Response, jsonify

from charge_request_service.client_keys import ClientKey, KeyRequestError, KeyUsage, Quotas
from charge_request_service.key_access import client_access
from gridcommon.auth import require_operator
from gridcommon.web import ApiError, error_response, json_object_body

log = logging.getLogger("charge")
keys_blueprint = Blueprint("client_keys", __name__)
SERVICE = "charge request service"


@keys_blueprint.before_request
def _operator_only() -> None:
    require_operator(client_access().admin_token, SERVICE)


@keys_blueprint.errorhandler(KeyRequestError)
def _key_request_error(exc: KeyRequestError) -> Response:
    return error_response(exc.status, exc.error, str(exc), **({"field": exc.field} if exc.field else {}))


def _described(key: ClientKey, usage: KeyUsage) -> dict[str, object]:
    return {**key.as_json(), "usage": {"sessions": usage.sessions, "kw": usage.kw, "queued": usage.queued,
                                       "refusals": dict(usage.refusals)}}


def _with_usage(key: ClientKey) -> dict[str, object]:
    return _described(key, client_access().ledger.usage([key.key_id])[key.key_id])


@keys_blueprint.post("/client-keys")
def create_key() -> Response:
    body = json_object_body()
    unknown = sorted(set(body) - {"name", "quotas"})
    if unknown:
        raise ApiError(400, "invalid_field", f"Unknown field {unknown[0]!r}: a key has a name and quotas.",
                       field=unknown[0])
    if "name" not in body:
        raise ApiError(400, "missing_field", "name is required: it names the key in the console and the metrics.",
                       field="name")
    key, secret = client_access().keys.create(body["name"], Quotas.from_json(body.get("quotas")))
    log.info("client key %s (%s) created with quotas %s", key.key_id, key.name, key.quotas.as_json())
    response = jsonify({**key.as_json(), "api_key": secret})
    response.status_code = 201
    response.headers["Location"] = f"/client-keys/{key.key_id}"
    return response


@keys_blueprint.get("/client-keys")
def list_keys() -> Response:
    access = client_access()
    keys = access.keys.all()
    usage = access.ledger.usage([key.key_id for key in keys])
    return jsonify({"client_keys": [_described(key, usage[key.key_id]) for key in keys]})


@keys_blueprint.get("/client-keys/<key_id>")
def show_key(key_id: str) -> Response:
    return jsonify(_with_usage(client_access().keys.get(key_id)))


@keys_blueprint.patch("/client-keys/<key_id>")
def change_key(key_id: str) -> Response:
    body = json_object_body()
    unknown = sorted(set(body) - {"name", "quotas"})
    if unknown:
        raise ApiError(400, "invalid_field", f"Unknown field {unknown[0]!r}: a key's name and quotas can be changed.",
                       field=unknown[0])
    key = client_access().keys.change(key_id, body.get("name"), body.get("quotas"))
    log.info("client key %s (%s) changed: quotas %s", key.key_id, key.name, key.quotas.as_json())
    return jsonify(_with_usage(key))


@keys_blueprint.post("/client-keys/<key_id>/rotate")
def rotate_key(key_id: str) -> Response:
    key, secret = client_access().keys.rotate(key_id)
    log.info("client key %s (%s) rotated: the previous key no longer works", key.key_id, key.name)
    return jsonify({**key.as_json(), "api_key": secret})


@keys_blueprint.delete("/client-keys/<key_id>")
def revoke_key(key_id: str) -> Response:
    access = client_access()
    key = access.keys.revoke(key_id)
    log.info("client key %s (%s) revoked", key.key_id, key.name)
    described = _with_usage(key)
    # Its bookings and figures are of no more use: per-key state stays as bounded as the active keys.
    access.ledger.forget(active.key_id for active in access.keys.active())
    return jsonify(described)
