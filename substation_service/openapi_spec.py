"""OpenAPI 3.1 document of a substation, served at ``GET /openapi.json``.

One source of truth: the app serves this dict (``gridcommon.openapi.install_openapi``),
tests/test_openapi_specs.py checks it against the app's routes, and
tests/test_schemathesis.py fuzzes the running service with it.
"""
from __future__ import annotations

import copy
from typing import Any

from gridcommon.openapi import (
    COUNT,
    FIELD,
    KW,
    NULLABLE_KW,
    OPENAPI_PATH,
    RETRY_AFTER,
    SESSION_ID,
    SUBSTATION_ID,
    TIME,
    body_errors,
    capacity_exceeded_schema,
    capacity_schema,
    charge_request_schema,
    common_components,
    document,
    error_response,
    error_schema,
    health_operation,
    json_request,
    json_response,
    metrics_operation,
    openapi_operation,
    operator_errors,
    path_errors,
    ref,
    schema_ref,
    substation_session_schema,
)
from gridcommon.validation import MAX_ENERGY_KWH, MAX_LEASE_SECONDS, MIN_LEASE_SECONDS
from substation_service.allocation import ALLOCATION_POLICIES
from substation_service.limit_routes import MAX_LIMIT_KW
from substation_service.peering.messages import MIGRATION_ID_PATTERN, NODE_ID_PATTERN
from substation_service.record_routes import CSV_COLUMNS, EXPORT_FORMATS, PAGE_DEFAULT, PAGE_MAX
from substation_service.routes import MAX_RENEWALS, MAX_WAIT_SECONDS

SERVICE = "substation"
X_REQUEST_ID = ref("parameters", "X-Request-ID")
OPERATOR = [{"operatorToken": []}]
PEER_SIGNED = [{"peerSender": [], "peerTimestamp": [], "peerNonce": [], "peerSignature": []}]

SESSION_ID_PARAMETER: dict[str, Any] = {
    "name": "session_id",
    "in": "path",
    "required": True,
    "description": "The session's id (`session_id` of the admission).",
    "schema": {"type": "string"},
}


def _flag(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": f"{description} `0`, `1`, `true` or `false` (default `0`); anything else is a 400.",
        "schema": {"enum": ["0", "1", "true", "false"]},
    }


LEASE_SECONDS = {
    "type": "number",
    "minimum": MIN_LEASE_SECONDS,
    "maximum": MAX_LEASE_SECONDS,
    "description": f"How long the lease holds without renewal: {MIN_LEASE_SECONDS:g} to {MAX_LEASE_SECONDS:g} s.",
}
MINIMUM_KW = {
    "type": "number",
    "description": "The session's own minimum, kW: at least `MIN_CHARGE_KW` (1.4 by default), at most the "
    "amount. A three-phase vehicle needs 6 A x 3 x 230 V, about 4.14 kW. Under `strict` the minimum is the "
    "whole amount anyway.",
}


def _session_schema() -> dict[str, Any]:
    """A substation's record of one session, with a leased session's fields (``routes.session_json``)."""
    schema = copy.deepcopy(substation_session_schema())
    properties = schema["properties"]
    properties["ends_at"] = {"anyOf": [TIME, {"type": "null"}],
                             "description": "When it ends by itself; null for a leased session."}
    properties["duration_seconds"] = {"type": ["number", "null"], "exclusiveMinimum": 0,
                                      "description": "Its fixed length; null for a leased session."}
    properties["remaining_seconds"] = {"type": ["number", "null"], "minimum": 0,
                                       "description": "Seconds until it ends by itself; null for a leased session."}
    properties["end_reason"] = {
        "enum": ["completed", "stopped", "lease_expired", "energy_delivered", "departed"],
        "description": "`completed`: ran its duration; `energy_delivered`: its need was delivered; `departed`: its "
        "departure came first; `stopped`: DELETE; `lease_expired`: its lease lapsed unrenewed.",
    }
    properties["energy_kwh"] = {**KW, "minimum": 0, "description": "With a need: the energy needed, kWh. "
                                "Without one: the energy delivered so far (as `delivered_kwh`)."}
    properties["departure"] = {**TIME, "description": "When the vehicle leaves, as the request stated it."}
    properties["delivered_kwh"] = {**KW, "minimum": 0, "description": "Energy delivered so far, kWh (with a need, "
                                   "and in every finished record)."}
    properties["still_needed_kwh"] = {**KW, "minimum": 0, "description": "With a need: what is still missing."}
    properties["expected_energy_kwh"] = {
        **KW, "minimum": 0,
        "description": "With a need: the energy it is expected to have by its departure if the plan stays as it "
        "is (no arrivals, the same limit); sessions ahead of it finishing only add to it.",
    }
    properties["expected_shortfall_kwh"] = {**KW, "minimum": 0, "description": "`energy_kwh - expected_energy_kwh`, "
                                            "at least 0."}
    properties["feasible"] = {"type": "boolean", "description": "With a need: `expected_energy_kwh >= energy_kwh "
                              "- 0.1`. False: the need is not expected to be met, and the driver is told so."}
    properties["need_met"] = {"type": "boolean", "description": "A finished session with a need: less than "
                              "0.1 kWh missing (ACN-Sim's definition)."}
    properties["lease_seconds"] = {**KW, "description": "A leased session's lease length (its last renewal's)."}
    properties["lease_expires_at"] = {
        "type": ["number", "null"],
        "description": "Seconds since the epoch when the lease lapses unless renewed; null once ended.",
    }
    schema["required"] = [*schema["required"], "remaining_seconds"]
    return schema


SESSION = _session_schema()
SESSION_WITH_CAPACITY = {"allOf": [SESSION, capacity_schema()]}


def _charge_request() -> dict[str, Any]:
    schema = copy.deepcopy(charge_request_schema(with_session_id=True, with_wait=False))
    schema["properties"]["lease_seconds"] = {
        **LEASE_SECONDS,
        "type": ["number", "null"],
        "description": "Hold the session by a lease instead of a duration (an OCPP transaction): it has no "
        f"fixed end and ends when stopped or when the lease lapses unrenewed (`POST /leases`). "
        f"{MIN_LEASE_SECONDS:g} to {MAX_LEASE_SECONDS:g} s; not with `duration_seconds` (400).",
    }
    schema["properties"]["minimum_kw"] = {**MINIMUM_KW, "type": ["number", "null"]}
    return schema


SESSION_LINKS = {
    "GetSession": {"operationId": "showSession", "parameters": {"session_id": "$response.body#/session_id"}},
    "StopSession": {"operationId": "stopSession", "parameters": {"session_id": "$response.body#/session_id"}},
}

RECORDS_PAGE = {
    "type": "object",
    "required": ["substation", "sessions", "next_after"],
    "properties": {
        "substation": SUBSTATION_ID,
        "sessions": {"type": "array", "items": SESSION},
        "next_after": {"type": ["string", "null"]},
    },
}

STATUS = {
    "allOf": [
        capacity_schema(),
        {
            "required": ["substation", "url"],
            "properties": {"substation": SUBSTATION_ID, "url": {"type": "string", "description": "`PUBLIC_URL`."}},
        },
    ]
}

_CAPACITY_BUT_LIMIT = capacity_schema()
_CAPACITY_BUT_LIMIT["required"] = [key for key in _CAPACITY_BUT_LIMIT["required"] if key != "capacity"]
del _CAPACITY_BUT_LIMIT["properties"]["capacity"]

LIMIT = {
    "description": "The limit and what it is made of, with the load under it.",
    "allOf": [
        _CAPACITY_BUT_LIMIT,
        {
            "required": ["substation", "limit_kw", "source", "operator_limit_kw", "substation_kw", "parts"],
            "properties": {
                "substation": SUBSTATION_ID,
                "limit_kw": {**KW, "minimum": 0, "description": "What the vehicles may draw together now."},
                "source": {"enum": ["substation", "operator"]},
                "operator_limit_kw": {**NULLABLE_KW, "description": "The operator's limit; null: none."},
                "substation_kw": {**KW, "minimum": 0, "description": "Transformer + generation + storage + peers."},
                "parts": {
                    "type": "object",
                    "required": ["capacity_kw", "generation_kw", "storage_kw", "peer_kw"],
                    "properties": {"capacity_kw": KW, "generation_kw": KW, "storage_kw": KW, "peer_kw": KW},
                },
                "history": {
                    "type": "array",
                    "description": "`[seconds since the epoch, kW, source]` at every change of the limit.",
                    "items": {
                        "type": "array",
                        "items": {"anyOf": [{"type": "number"}, {"enum": ["substation", "operator"]}]},
                        "minItems": 3,
                        "maxItems": 3,
                    },
                },
            },
        },
    ],
}

ALLOCATION_POLICY = {
    "type": "object",
    "required": ["policy", "available"],
    "properties": {
        "policy": {"enum": list(ALLOCATION_POLICIES)},
        "previous": {"enum": list(ALLOCATION_POLICIES), "description": "After a change: the policy before it."},
        "available": {"type": "array", "items": {"enum": list(ALLOCATION_POLICIES)}},
    },
}

COUNTS_BY_NAME = {"type": "object", "additionalProperties": COUNT}

PEER_BALANCING = {
    "type": "object",
    "description": "FREEDM's load table of this substation and its peers, the message counts and timings.",
    "required": [
        "substation", "enabled", "state", "phase", "round", "synchronized", "leader", "migration_step_kw",
        "load_kw", "rating_kw", "generation_kw", "storage_kw", "net_generation_kw", "gateway_kw",
        "predicted_gateway_kw", "power_imbalance_kw", "peers", "url", "configured", "running", "peer_key_set",
        "off_reason", "unidentified_peers", "load_table", "messages", "migrations", "invariant_blocks", "timings",
    ],
    "properties": {
        "substation": SUBSTATION_ID,
        "enabled": {"type": "boolean"},
        "state": {"enum": ["supply", "demand", "normal"]},
        "phase": COUNT,
        "round": COUNT,
        "synchronized": {"type": "boolean"},
        "leader": SUBSTATION_ID,
        "migration_step_kw": KW,
        "load_kw": KW,
        "rating_kw": KW,
        "generation_kw": KW,
        "storage_kw": KW,
        "net_generation_kw": KW,
        "gateway_kw": KW,
        "predicted_gateway_kw": KW,
        "power_imbalance_kw": KW,
        "peers": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["substation", "member", "state", "flow_kw", "link_epoch", "url"],
                "properties": {
                    "substation": SUBSTATION_ID,
                    "member": {"type": "boolean"},
                    "state": {"enum": ["supply", "demand", "normal", None]},
                    "flow_kw": KW,
                    "link_epoch": KW,
                    "url": {"type": ["string", "null"]},
                },
            },
        },
        "url": {"type": "string"},
        "configured": {"type": "boolean", "description": "`PEERS` lists peers."},
        "running": {"type": "boolean"},
        "peer_key_set": {"type": "boolean"},
        "off_reason": {"type": ["string", "null"], "description": "Why balancing is off although peers are listed."},
        "unidentified_peers": {"type": "array", "items": {"type": "string"}},
        "load_table": {"type": "array", "items": {"type": "string"}},
        "messages": {
            "type": "object",
            "required": ["sent", "received", "rejected", "ignored", "send_failures"],
            "properties": {name: COUNTS_BY_NAME for name in ("sent", "received", "rejected", "ignored", "send_failures")},
        },
        "migrations": COUNTS_BY_NAME,
        "invariant_blocks": COUNT,
        "timings": {
            "type": "object",
            "required": ["phase_seconds", "round_seconds", "rounds_per_phase", "draft_request_timeout_seconds",
                         "clock_tolerance_seconds"],
            "properties": {
                "phase_seconds": KW,
                "round_seconds": KW,
                "rounds_per_phase": {"type": "integer", "minimum": 1},
                "draft_request_timeout_seconds": KW,
                "clock_tolerance_seconds": KW,
            },
        },
    },
}


def _message(message_type: str, description: str, **fields: dict[str, Any]) -> dict[str, Any]:
    """One peer-balancing message (``substation_service.peering.messages``): strict, no extra field."""
    return {
        "type": "object",
        "description": description,
        "additionalProperties": False,
        "required": ["type", "sender", "phase", "round", "epoch", *fields],
        "properties": {
            "type": {"const": message_type},
            "sender": {"type": "string", "pattern": NODE_ID_PATTERN, "description": "The signing substation.",
                       "examples": ["substation-2"]},
            "phase": {"type": "integer", "minimum": 0},
            "round": {"type": "integer", "minimum": 0},
            "epoch": {"type": "number", "minimum": 0, "description": "The sender's link epoch (clock seconds)."},
            **fields,
        },
    }


MIGRATION = {"type": "string", "pattern": MIGRATION_ID_PATTERN}
STEP_KW = {"type": "number", "exclusiveMinimum": 0, "description": "At most one `MIGRATION_STEP_KW`."}

PEER_MESSAGES = {
    "StateChange": _message("StateChange", "The sender's state, to every group member.",
                            state={"enum": ["supply", "demand", "normal"]}),
    "DraftRequest": _message("DraftRequest", "A supplier asks the demand peers what they lack."),
    "DraftAge": _message("DraftAge", "A demand peer says what it lacks (kW, 0 if nothing).",
                         age={"type": "number", "minimum": 0}),
    "DraftSelect": _message("DraftSelect", "A supplier offers one step of power.", migration=MIGRATION, amount=STEP_KW),
    "DraftAccept": _message("DraftAccept", "The demand peer takes the offer.", migration=MIGRATION, amount=STEP_KW),
    "TooLate": _message("TooLate", "The demand peer no longer needs the offer.", migration=MIGRATION, amount=STEP_KW),
    "CollectedState": _message("CollectedState", "The leader's sum of the group's gateways.",
                               gateway_total_kw={"type": "number"}),
}

PEER_MESSAGE = {
    "oneOf": [schema_ref(name) for name in PEER_MESSAGES],
    "discriminator": {
        "propertyName": "type",
        "mapping": {name: f"#/components/schemas/{name}" for name in PEER_MESSAGES},
    },
}

SENDER = {"sender": {"type": "string", "description": "The body's `sender`, when the body was read."}}

PEER_HEADERS_IN = [
    {
        "name": name,
        "in": "header",
        "required": False,
        "description": f"{description} Only on a peer's signed membership poll; see the `peer*` security schemes.",
        "schema": {"type": "string"},
    }
    for name, description in (
        ("X-Peer-Sender", "The polling substation's id."),
        ("X-Peer-Timestamp", "When the poll was signed."),
        ("X-Peer-Nonce", "A new random value per poll."),
        ("X-Peer-Signature", "HMAC-SHA256 of the poll under `PEER_KEY`."),
    )
]

PATHS: dict[str, Any] = {
    "/charge": {
        "post": {
            "operationId": "admitCharge",
            "tags": ["charging"],
            "summary": "Admit a charging session",
            "description": "Under `fair_share` a session is admitted while every session, the new one "
            "included, can get its minimum (`MIN_CHARGE_KW`, or its amount if smaller); under `strict` only "
            "with its whole amount free. The same `session_id` sent again answers the session already admitted "
            "(`replayed`).",
            "security": [],
            "parameters": [
                X_REQUEST_ID,
                {
                    "name": "X-Request-Deadline",
                    "in": "header",
                    "required": False,
                    "description": "When the caller stops waiting, seconds since the epoch: past it, nothing is "
                    "admitted (409 `deadline_passed`). Not a number, or more than an hour ahead: ignored.",
                    "schema": {"type": "string"},
                },
            ],
            "requestBody": json_request(
                _charge_request(),
                "The charge request; other fields are ignored.",
            ),
            "responses": {
                "201": json_response(
                    "Admitted: the session and the substation's load after it. A replay of a leased "
                    "session renews its lease.",
                    {"allOf": [SESSION_WITH_CAPACITY,
                               {"properties": {"replayed": {"const": True}}}]},
                    links=SESSION_LINKS,
                ),
                **body_errors(),
                "409": json_response(
                    "No room for its minimum (`capacity_exceeded`, with the capacity, `retry_after_seconds` and "
                    "`Retry-After`), its `session_id` belongs to another session (`session_id_in_use`), the id "
                    "was used by a session that ended or was retired (`session_id_retired`), or its "
                    "`X-Request-Deadline` has passed (`deadline_passed`, with the capacity).",
                    {
                        "oneOf": [
                            capacity_exceeded_schema(),
                            {"allOf": [error_schema(["deadline_passed"]), capacity_schema()]},
                            {"allOf": [schema_ref("Error"),
                                       {"required": ["session_id"],
                                        "properties": {"error": {"enum": ["session_id_in_use", "session_id_retired"]},
                                                       "session_id": {"type": "string"}}}]},
                        ]
                    },
                    headers={"Retry-After": {
                        "description": "With `capacity_exceeded`: whole seconds until a session ends by itself.",
                        "schema": {"type": "integer", "minimum": 1},
                    }},
                ),
            },
        }
    },
    "/charge/{session_id}": {
        "parameters": [SESSION_ID_PARAMETER],
        "get": {
            "operationId": "showSession",
            "tags": ["charging"],
            "summary": "A session, running or ended",
            "security": [],
            "parameters": [X_REQUEST_ID],
            "responses": {
                "200": json_response(
                    "The session with its allocation history.",
                    {"allOf": [SESSION, {"required": ["history"]}]},
                ),
                **path_errors(["session_not_found"], "`session_not_found` (with `session_id`): never here, or "
                                                     "ended too long ago; or"),
            },
        },
        "delete": {
            "operationId": "stopSession",
            "tags": ["charging"],
            "summary": "Stop a session early",
            "security": [],
            "parameters": [X_REQUEST_ID],
            "responses": {
                "200": json_response(
                    "Stopped: its last record and the load after.", SESSION_WITH_CAPACITY
                ),
                **path_errors(["session_not_found"], "`session_not_found` (with `session_id`): not active here; or"),
            },
        },
        "patch": {
            "operationId": "changeSession",
            "tags": ["charging"],
            "summary": "Change what an active session asks for",
            "description": "A vehicle tapering near full asks for less; a vehicle's reported maximum current "
            "sets its amount or minimum. The sessions are re-allocated at once, and the sum of the allocations "
            "never passes the limit. An amount alone below the session's minimum lowers the minimum with it.",
            "security": [],
            "parameters": [X_REQUEST_ID],
            "requestBody": json_request(
                {"type": "object", "properties": {
                    "amount": {"type": ["number", "null"], "exclusiveMinimum": 0,
                               "description": "kW asked for from now on, at most `MAX_AMOUNT_KW`."},
                    "minimum_kw": {**MINIMUM_KW, "type": ["number", "null"]},
                    "energy_kwh": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": MAX_ENERGY_KWH,
                                   "description": "The session's whole need, kWh (OCPP's `energyAmount` / 1000); "
                                   "a session without a need must also be given `departure`."},
                    "departure": {"type": ["string", "null"], "description": "When the vehicle leaves (ISO 8601 "
                                  "UTC; OCPP's `departureTime`): after now, at most 7 days ahead."},
                }},
                "`amount`, `minimum_kw`, a need (`energy_kwh`, `departure`), or several; other fields are ignored.",
            ),
            "responses": {
                "200": json_response("Changed: the session and the load after.", SESSION_WITH_CAPACITY),
                **body_errors(),
                **path_errors(["session_not_found"], "`session_not_found` (with `session_id`): not active here; or"),
                "400": error_response(
                    "The body is not one JSON object (`invalid_json`), a field is wrong (`invalid_field`, with "
                    "`field`: neither `amount` nor `minimum_kw` given, or one out of range), or the decoded path "
                    "has a control character or a `.`/`..` segment (`invalid_path`).",
                    ["invalid_json", "invalid_field", "invalid_path"],
                    **FIELD,
                ),
                "409": json_response(
                    "A raised minimum (or amount under `strict`) does not fit beside the other charging "
                    "sessions' minimums (`capacity_exceeded`; nothing was changed), or the session changed "
                    "its amount 1,000 times already (`too_many_changes`).",
                    {"oneOf": [
                        capacity_exceeded_schema(),
                        {"allOf": [error_schema(["too_many_changes"]),
                                   {"required": ["session_id"], "properties": {"session_id": SESSION_ID}}]},
                    ]},
                    headers={"Retry-After": {
                        "description": "With `capacity_exceeded`: whole seconds until a session ends by itself.",
                        "schema": {"type": "integer", "minimum": 1},
                    }},
                ),
            },
        },
    },
    "/leases": {
        "post": {
            "operationId": "renewLeases",
            "tags": ["charging"],
            "summary": "Renew the leases of leased sessions",
            "description": "Each listed active leased session's lease lapses `lease_seconds` from now unless "
            "renewed again; renew every third of a lease or so. Renewing changes no allocation, so "
            "`state_version` does not move.",
            "security": [],
            "parameters": [X_REQUEST_ID],
            "requestBody": json_request(
                {"type": "object", "required": ["session_ids", "lease_seconds"], "properties": {
                    "session_ids": {"type": "array", "maxItems": MAX_RENEWALS, "items": SESSION_ID},
                    "lease_seconds": LEASE_SECONDS,
                }},
                f"Up to {MAX_RENEWALS} session ids and the lease they get.",
            ),
            "responses": {
                "200": json_response(
                    "Renewed; `unknown` lists the ids of no active leased session here (ended, stopped, lapsed, "
                    "never admitted, or admitted with a fixed duration).",
                    {"type": "object", "required": ["renewed", "unknown", "lease_seconds"], "properties": {
                        "renewed": {"type": "array", "items": SESSION_ID},
                        "unknown": {"type": "array", "items": SESSION_ID},
                        "lease_seconds": LEASE_SECONDS,
                    }},
                ),
                **body_errors(),
            },
        }
    },
    "/sessions": {
        "get": {
            "operationId": "listSessions",
            "tags": ["charging"],
            "summary": "The active sessions and the limit, at one instant",
            "security": [],
            "parameters": [
                X_REQUEST_ID,
                _flag("history", "Add each session's allocation history."),
                _flag("ended", "Add the ended sessions kept in memory (the newest) for audits. With `since`, "
                      "`limit` or `after`: a page of finished records instead (operator only)."),
                {"name": "since", "in": "query", "required": False, "schema": {"type": "string"},
                 "description": "With `ended=1`: records of sessions that ended at or after this ISO 8601 time."},
                {"name": "limit", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 1, "maximum": PAGE_MAX},
                 "description": f"With `ended=1`: records per page, 1 to {PAGE_MAX} (default {PAGE_DEFAULT})."},
                {"name": "after", "in": "query", "required": False, "schema": {"type": "string"},
                 "description": "With `ended=1`: the `next_after` of the page before."},
                {
                    "name": "after_version",
                    "in": "query",
                    "required": False,
                    "description": "A long poll: the `state_version` last seen. With `wait`, the answer comes "
                    "as soon as the state_version is greater (at once if it already is).",
                    "schema": {"type": "integer", "minimum": 0},
                },
                {
                    "name": "wait",
                    "in": "query",
                    "required": False,
                    "description": f"Seconds to wait for a change past `after_version`, 0 to "
                    f"{MAX_WAIT_SECONDS:g}; the state as it is then if nothing changed. Needs `after_version`.",
                    "schema": {"type": "number", "minimum": 0, "maximum": MAX_WAIT_SECONDS},
                },
            ],
            "responses": {
                "200": json_response(
                    "Every session at one instant; or, with `since`, `limit` or `after`, a page of records "
                    "(`next_after`: the cursor of the next page, null on the last).",
                    {"anyOf": [RECORDS_PAGE, {
                        "type": "object",
                        "required": ["substation", "taken_at", "state_version", "limit_kw", "limit_source", "load",
                                     "sessions"],
                        "properties": {
                            "substation": SUBSTATION_ID,
                            "taken_at": {"type": "number", "description": "Seconds since the epoch."},
                            "state_version": {**COUNT, "description": "Grows with every change of any session's "
                                              "allocation: the `after_version` of the next long poll."},
                            "limit_kw": {**KW, "minimum": 0},
                            "limit_source": {"enum": ["substation", "operator"]},
                            "load": KW,
                            "sessions": {"type": "array", "items": SESSION},
                        },
                    }]},
                ),
                "400": error_response("A flag is not 0, 1, true or false, or `after_version`/`wait` is not a "
                                      "number in range, or `since`/`limit`/`after` is not one "
                                      "(`invalid_query`, with `field`).",
                                      ["invalid_query"], **FIELD),
                **operator_errors(SERVICE),
                "429": error_response("`MAX_LONG_POLLS` long polls already wait (`too_many_long_polls`): "
                                      "retry, or poll without `wait`.", ["too_many_long_polls"],
                                      headers=RETRY_AFTER),
            },
        }
    },
    "/sessions/export": {
        "get": {
            "operationId": "exportRecords",
            "tags": ["charging"],
            "summary": "Every finished record since a time, as CSV or JSON lines (operator only)",
            "description": "Oldest first, streamed. The CSV columns: " + ", ".join(f"`{c}`" for c in CSV_COLUMNS)
            + ". Records stay `SESSION_RECORDS_RETENTION_DAYS` (90), at most `SESSION_RECORDS_MAX_ROWS`.",
            "security": OPERATOR,
            "parameters": [
                X_REQUEST_ID,
                {"name": "format", "in": "query", "required": False, "schema": {"enum": list(EXPORT_FORMATS)},
                 "description": "`jsonl` (default) or `csv`."},
                {"name": "since", "in": "query", "required": False, "schema": {"type": "string"},
                 "description": "Only sessions that ended at or after this ISO 8601 time."},
            ],
            "responses": {
                "200": {"description": "The records.", "headers": {"X-Request-ID": ref("headers", "X-Request-ID")},
                        "content": {"text/csv": {"schema": {"type": "string"}},
                                    "application/x-ndjson": {"schema": {"type": "string"}}}},
                "400": error_response("`format` or `since` is not one (`invalid_query`, with `field`).",
                                      ["invalid_query"], **FIELD),
                **operator_errors(SERVICE),
            },
        }
    },
    "/sessions/{session_id}": {
        "parameters": [SESSION_ID_PARAMETER],
        "get": {
            "operationId": "showRecord",
            "tags": ["charging"],
            "summary": "A session, running or finished (its record, from the state file when it is older)",
            "security": [],
            "parameters": [X_REQUEST_ID],
            "responses": {
                "200": json_response("The session with its allocation history.",
                                     {"allOf": [SESSION, {"required": ["history"]}]}),
                **path_errors(["session_not_found"], "`session_not_found` (with `session_id`): never here, or past "
                                                     "its retention; or"),
            },
        },
    },
    "/status": {
        "get": {
            "operationId": "status",
            "tags": ["observability"],
            "summary": "Load, limit and allocation now",
            "security": [],
            "parameters": [X_REQUEST_ID],
            "responses": {"200": json_response("The substation now.", STATUS)},
        }
    },
    "/health": {
        "get": health_operation({
            "type": "object",
            "required": ["status", "substation"],
            "properties": {"status": {"const": "ok"}, "substation": SUBSTATION_ID},
        })
    },
    "/metrics": {
        "get": metrics_operation(
            "Load, limit, allocation and session gauges and counters, labelled `substation`, and the peer "
            "balancing's metrics. A peer's membership poll is signed (`X-Peer-*` headers): its answer is "
            "signed too (`X-Peer-Sender`, `X-Peer-Signature`), or says why not (`X-Peer-Refused`).",
            parameters=PEER_HEADERS_IN,
            headers={
                "X-Peer-Sender": {"description": "This substation's id, on the answer to a good signed poll.",
                                  "schema": {"type": "string", "pattern": NODE_ID_PATTERN}},
                "X-Peer-Signature": {"description": "HMAC-SHA256 of the answer, bound to the poll's signature.",
                                     "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
                "X-Peer-Refused": {"description": "Why a signed poll's answer is not signed.",
                                   "schema": {"enum": ["bad_signature", "stale_timestamp"]}},
            },
        )
    },
    "/limit": {
        "get": {
            "operationId": "showLimit",
            "tags": ["limit"],
            "summary": "The limit, its parts and its history",
            "security": [],
            "parameters": [X_REQUEST_ID],
            "responses": {"200": json_response("The limit now, with its history.",
                                               {"allOf": [LIMIT, {"required": ["history"]}]})},
        },
        "put": {
            "operationId": "setLimit",
            "tags": ["limit"],
            "summary": "Cap what the vehicles may draw together (operator only)",
            "description": "The sessions are re-allocated in the same step: their allocations never pass the "
            "new limit. The token is checked before the body is read.",
            "security": OPERATOR,
            "parameters": [X_REQUEST_ID],
            "requestBody": json_request(
                {"type": "object", "required": ["limit_kw"],
                 "properties": {"limit_kw": {"type": "number", "minimum": 0, "maximum": MAX_LIMIT_KW}}},
                "The operator's limit in kW.",
            ),
            "responses": {"200": json_response("The limit now.", LIMIT), **body_errors(), **operator_errors(SERVICE)},
        },
        "delete": {
            "operationId": "liftLimit",
            "tags": ["limit"],
            "summary": "Lift the operator's limit (operator only)",
            "security": OPERATOR,
            "parameters": [X_REQUEST_ID],
            "responses": {"200": json_response("The limit now.", LIMIT), **operator_errors(SERVICE)},
        },
    },
    "/allocation-policy": {
        "get": {
            "operationId": "showAllocationPolicy",
            "tags": ["limit"],
            "summary": "How the limit is shared among the sessions",
            "security": [],
            "parameters": [X_REQUEST_ID],
            "responses": {"200": json_response("The policy in force.", ALLOCATION_POLICY)},
        },
        "put": {
            "operationId": "setAllocationPolicy",
            "tags": ["limit"],
            "summary": "Switch between fair_share and strict (operator only)",
            "description": "The token is checked before the body is read.",
            "security": OPERATOR,
            "parameters": [X_REQUEST_ID],
            "requestBody": json_request(
                {"type": "object", "required": ["policy"],
                 "properties": {"policy": {"enum": list(ALLOCATION_POLICIES)}}},
                "The policy to allocate by from now on.",
            ),
            "responses": {
                "200": json_response("Switched.", ALLOCATION_POLICY),
                **body_errors(),
                **operator_errors(SERVICE),
            },
        },
    },
    "/peer-balancing": {
        "get": {
            "operationId": "peerBalancing",
            "tags": ["peering"],
            "summary": "The load table, message counts and timings of peer balancing",
            "security": [],
            "parameters": [X_REQUEST_ID],
            "responses": {"200": json_response("Peer balancing now.", PEER_BALANCING)},
        }
    },
    "/peer-balancing/messages": {
        "post": {
            "operationId": "receivePeerMessage",
            "tags": ["peering"],
            "summary": "A peer's balancing message (signed with the group's PEER_KEY)",
            "description": "Checked in this order: this substation has a `PEER_KEY` (403 `peering_off`), "
            "the signature and its timestamp (401), the body (413, 415, 400), the sender is the signer (401) "
            "and a group member (403), then the message against this substation's state (422, 409). A message "
            "handled once already is acknowledged again (202 `duplicate`) without being acted on.",
            "security": PEER_SIGNED,
            "parameters": [X_REQUEST_ID],
            "requestBody": json_request(PEER_MESSAGE, "One message; the signature covers its exact bytes."),
            "responses": {
                "202": json_response(
                    "Taken: acted on (`accepted`), ignored as outdated or unasked for (`ignored`, with `reason`), "
                    "or handled once already (`duplicate`).",
                    {
                        "type": "object",
                        "required": ["status"],
                        "properties": {
                            "status": {"enum": ["accepted", "ignored", "duplicate"]},
                            "reason": {"type": "string"},
                        },
                    },
                ),
                "400": error_response(
                    "Not a JSON object (`invalid_json`) or not a valid message (`invalid_message`, with `field`).",
                    ["invalid_json", "invalid_message"],
                    **FIELD,
                ),
                "401": error_response(
                    "Unsigned or badly signed (`bad_signature`), signed outside the clock tolerance "
                    "(`stale_timestamp`), or the body's `sender` is not the signer (`sender_mismatch`).",
                    ["bad_signature", "stale_timestamp", "sender_mismatch"],
                    **SENDER,
                ),
                "403": error_response(
                    "This substation has no `PEER_KEY` (`peering_off`), or the sender is not in its group "
                    "(`unknown_sender`).",
                    ["peering_off", "unknown_sender"],
                    **SENDER,
                ),
                "409": error_response(
                    "The message contradicts this substation's state now: a link reset since "
                    "(`stale_link`), a Collected State from a non-leader (`not_leader`), a Draft Select nobody "
                    "asked for (`unsolicited_select`).",
                    ["stale_link", "not_leader", "unsolicited_select"],
                    **SENDER,
                ),
                "413": body_errors()["413"],
                "415": body_errors()["415"],
                "422": error_response(
                    "The message can never be right: a phase or round this clock cannot be near "
                    "(`implausible_phase`), an epoch ahead of this clock (`implausible_epoch`), a migration "
                    "larger than one step (`amount_out_of_bounds`).",
                    ["implausible_phase", "implausible_epoch", "amount_out_of_bounds"],
                    **SENDER,
                ),
            },
        }
    },
    OPENAPI_PATH: {"get": openapi_operation()},
}


def _components() -> dict[str, Any]:
    components = common_components(
        "The operator's token (`ADMIN_TOKEN`): `PUT`/`DELETE /limit` and `PUT /allocation-policy`. Without "
        "`ADMIN_TOKEN` they are off (403)."
    )
    for scheme, header, description in (
        ("peerSender", "X-Peer-Sender", "The signing substation's id."),
        ("peerTimestamp", "X-Peer-Timestamp", "The signer's clock, seconds since the epoch (e.g. `1718000000.125`)."),
        ("peerNonce", "X-Peer-Nonce", "16 to 64 lowercase hex digits, new for every request."),
        (
            "peerSignature",
            "X-Peer-Signature",
            "64 lowercase hex digits: HMAC-SHA256 under the group's `PEER_KEY` of `peer-request-v1`, the "
            "method, the path, the sender, the timestamp, the nonce and the SHA-256 of the body, joined by "
            "newlines (`substation_service/peering/auth.py`).",
        ),
    ):
        components["securitySchemes"][scheme] = {"type": "apiKey", "in": "header", "name": header,
                                                 "description": description}
    components["schemas"].update(PEER_MESSAGES)
    return components


SPEC: dict[str, Any] = document(
    "Smart Grid substation",
    "One simulated substation: admits charging sessions while its limit allows, shares the limit "
    "among them, takes an operator's limit, and balances power with its peers.",
    [
        ("charging", "Sessions."),
        ("limit", "The limit and how it is shared."),
        ("peering", "Peer-to-peer power balancing."),
        ("observability", "Health, status and metrics."),
    ],
    PATHS,
    _components(),
)

__all__ = ["SPEC"]
