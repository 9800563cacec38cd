"""OpenAPI 3.1 document of the public charge API, served at ``GET /openapi.json``.

One source of truth: the app serves this dict (``gridcommon.openapi.install_openapi``),
tests/test_openapi_specs.py checks it against the app's routes, and
tests/test_schemathesis.py fuzzes the running service with it.
"""
from __future__ import annotations

from typing import Any

from gridcommon.openapi import (
    COUNT,
    FIELD,
    HISTORY,
    KW,
    OPENAPI_PATH,
    RETRY_AFTER,
    SESSION_ID,
    SUBSTATION_ID,
    TIME,
    VEHICLE_ID,
    WWW_AUTHENTICATE,
    body_errors,
    charge_request_schema,
    common_components,
    document,
    error_response,
    health_operation,
    json_request,
    json_response,
    metrics_operation,
    openapi_operation,
    operator_errors,
    path_errors,
    ref,
    retry_after_field,
    schema_ref,
    session_with_capacity_schema,
)

SERVICE = "charge request service"
X_REQUEST_ID = ref("parameters", "X-Request-ID")
# A client key (PUBLIC_API_AUTH=keys; with open, none is needed) or the operator's token.
CLIENT_ACCESS = [{"clientKey": []}, {"clientKeyBearer": []}, {"operatorToken": []}]
SESSION_ACCESS = [{"clientKey": []}, {"clientKeyBearer": []}, {"sessionToken": []}, {"operatorToken": []}]
WRONG_KEY_CODES = ["api_key_required", "invalid_api_key", "api_key_revoked"]
UNAUTHORIZED_CLIENT = error_response(
    "With `PUBLIC_API_AUTH=keys`, no client key nor operator token was sent (`api_key_required`); with either "
    "mode, a key was sent that this service did not issue or that was rotated (`invalid_api_key`), or one the "
    "operator revoked (`api_key_revoked`). Checked before the body is read; counted in "
    "`client_key_rejections_total{reason}`.",
    WRONG_KEY_CODES,
    headers=WWW_AUTHENTICATE,
)
KEY_ID_PARAMETER: dict[str, Any] = {
    "name": "key_id",
    "in": "path",
    "required": True,
    "description": "The `key_id` of the answer to `POST /client-keys` (`ck_` and 12 hex digits).",
    "schema": {"type": "string", "examples": ["ck_3f2a0c1e9b7d"]},
}
QUOTAS = {
    "type": "object",
    "description": "What a key may hold at once and send. A queued request holds its session and kW from the "
    "moment it queues, since it starts without asking again.",
    "additionalProperties": False,
    "properties": {
        "sessions": {"type": "integer", "minimum": 0, "maximum": 100000, "default": 10,
                     "description": "Sessions at once: waiting in the queue, being forwarded or charging."},
        "kw": {"type": "number", "minimum": 0, "maximum": 1000000, "default": 110,
               "description": "kW those sessions may ask for (`amount`) together, kW."},
        "queued": {"type": "integer", "minimum": 0, "maximum": 100000, "default": 10,
                   "description": "Of those, requests waiting in the queue."},
        "requests_per_second": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 5,
                                "description": "`POST /charge` requests a second (replays of a stored answer "
                                "are not counted)."},
    },
}
CLIENT_KEY = {
    "type": "object",
    "description": "A client key as the operator sees it: never the key itself, nor its hash.",
    "required": ["key_id", "name", "quotas", "created_at", "rotated_at", "revoked_at", "state"],
    "properties": {
        "key_id": {"type": "string", "pattern": "^ck_[0-9a-f]{12}$"},
        "name": {"type": "string"},
        "quotas": {**QUOTAS, "required": ["sessions", "kw", "queued", "requests_per_second"]},
        "created_at": TIME,
        "rotated_at": {"type": ["string", "null"], "format": "date-time"},
        "revoked_at": {"type": ["string", "null"], "format": "date-time"},
        "state": {"enum": ["active", "revoked"]},
        "usage": {
            "type": "object",
            "description": "What the key holds now, and its refusals since this process started, by reason.",
            "properties": {
                "sessions": {"type": "integer", "minimum": 0},
                "kw": {"type": "number", "minimum": 0},
                "queued": {"type": "integer", "minimum": 0},
                "refusals": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
            },
        },
    },
}
API_KEY = {"type": "string", "pattern": "^sgk_[A-Za-z0-9_-]{43}$",
           "description": "The key itself, shown this once: only its SHA-256 is kept. Send it as "
           "`X-API-Key: <key>` or `Authorization: Bearer <key>`."}
KEY_NOT_FOUND = path_errors(["client_key_not_found"], "`client_key_not_found`: no client key with this id; or")

SESSION_ID_PARAMETER: dict[str, Any] = {
    "name": "session_id",
    "in": "path",
    "required": True,
    "description": "The `session_id` of the answer to `POST /charge` (32 lowercase hex digits).",
    "schema": {"type": "string", "examples": ["3f2a0c1e9b7d4e5f8a6b1c2d3e4f5a6b"]},
}

# Links: the session a POST /charge answer names can be read and stopped.
SESSION_LINKS = {
    "GetSession": {
        "operationId": "showSession",
        "parameters": {"session_id": "$response.body#/session_id"},
        "description": "How the admitted or queued session is doing.",
    },
    "StopSession": {
        "operationId": "stopSession",
        "parameters": {"session_id": "$response.body#/session_id"},
        "description": "Stop the session, or take the request out of the queue.",
    },
}

SESSION_TOKEN = {
    "type": "string",
    "minLength": 16,
    "description": "The session's own token, given once: send it as `Authorization: Bearer <session_token>` "
    "to read or stop the session. Only its SHA-256 is kept.",
}

# A session's energy need and how it is expected to go: only for a session that stated one.
NEED = {
    "energy_kwh": {**KW, "minimum": 0, "description": "The energy the vehicle asked for by `departure`, "
                   "kWh. (From a substation, for a session without a need, the energy delivered so far.)"},
    "departure": {**TIME, "description": "When the vehicle leaves: the need is planned to be met by then."},
    "expected_energy_kwh": {**KW, "minimum": 0, "description": "The energy expected by `departure` under the "
                            "substation's current plan, kWh."},
    "feasible": {"type": "boolean", "description": "Whether the need is expected to be met: `expected_energy_kwh` "
                 "at least `energy_kwh` less 0.1 kWh."},
}
NEED_LIVE = {
    **NEED,
    "delivered_kwh": {**KW, "minimum": 0, "description": "Energy delivered so far, kWh."},
    "still_needed_kwh": {**KW, "minimum": 0, "description": "`energy_kwh` less `delivered_kwh`, at least 0."},
    "expected_shortfall_kwh": {**KW, "minimum": 0, "description": "What is expected to be missing at departure."},
    "need_met": {"type": "boolean", "description": "Once ended: less than 0.1 kWh was missing."},
}

ADMISSION = {
    "description": "The substation's record of the new session and its load after it, as the balancer "
    "passed it on, plus how it was routed and the session's token.",
    "allOf": [
        session_with_capacity_schema(),
        {
            "required": ["routing", "session_token"],
            "properties": {
                "routing": {
                    "type": "object",
                    "required": ["policy", "attempts"],
                    "properties": {
                        "policy": {"type": "string", "description": "The balancer's routing policy."},
                        "attempts": {"type": "integer", "minimum": 1},
                    },
                },
                "replayed": {
                    "const": True,
                    "description": "The substation had admitted this session already (a forward the balancer "
                    "sent again).",
                },
                "session_token": SESSION_TOKEN,
                **NEED,
            },
        },
    ],
}

QUEUED_SESSION = {
    "type": "object",
    "description": "A request waiting for power, first come first served.",
    "required": ["session_id", "state", "position", "vehicle_id", "amount", "duration_seconds", "queued_at",
                 "expires_at"],
    "properties": {
        "session_id": SESSION_ID,
        "state": {"const": "queued"},
        "position": {"type": "integer", "minimum": 1, "description": "1: the next to start."},
        "vehicle_id": VEHICLE_ID,
        "amount": KW,
        "duration_seconds": {"type": ["number", "null"]},
        "queued_at": TIME,
        "expires_at": {**TIME, "description": "When it leaves the queue unserved (`QUEUE_TIMEOUT_SECONDS`, or its "
                       "`departure` if that comes first)."},
        "energy_kwh": NEED["energy_kwh"],
        "departure": NEED["departure"],
    },
}

ACTIVE_SESSION = {
    "type": "object",
    "description": "A session this service started that still runs.",
    "required": ["session_id", "vehicle_id", "substation", "amount", "started_at", "ends_at", "remaining_seconds"],
    "properties": {
        "session_id": SESSION_ID,
        "vehicle_id": VEHICLE_ID,
        "substation": SUBSTATION_ID,
        "amount": KW,
        "started_at": TIME,
        "ends_at": TIME,
        "remaining_seconds": {"type": "number", "minimum": 0},
        "queued_at": {**TIME, "description": "Only for a session that waited in the queue."},
        "queue_wait_seconds": {"type": "number", "minimum": 0},
        **NEED,
    },
}

SESSION_VIEW = {
    "type": "object",
    "description": "The session as it is now. A queued request has `position` and `expires_at`; a running "
    "one this service's record plus the substation's live figures (`live`: true while they still change; "
    "false when the substation could not be asked, then only this service's record, or once the session has "
    "ended); a finished one (`ended`, `expired`, `cancelled`) has `finished_at`, `live: false` and, once read, "
    "the substation's last record.",
    "required": ["session_id", "vehicle_id", "amount"],
    "properties": {
        "session_id": SESSION_ID,
        "vehicle_id": VEHICLE_ID,
        "amount": KW,
        "state": {"enum": ["queued", "charging", "suspended", "ended", "expired", "cancelled"]},
        "position": {"type": "integer", "minimum": 1},
        "duration_seconds": {"type": ["number", "null"]},
        "queued_at": TIME,
        "expires_at": TIME,
        "substation": SUBSTATION_ID,
        "started_at": TIME,
        "ends_at": TIME,
        "remaining_seconds": {"type": "number", "minimum": 0},
        "queue_wait_seconds": {"type": "number", "minimum": 0},
        "finished_at": TIME,
        "allocated_kw": {**KW, "minimum": 0},
        "minimum_kw": {**KW, "minimum": 0},
        "suspended_seconds": {**KW, "minimum": 0},
        "ended_at": TIME,
        "end_reason": {"enum": ["completed", "stopped", "lease_expired", "energy_delivered", "departed"],
                       "description": "As the substation gives it: `completed` ran its duration, `energy_delivered` "
                       "its need was delivered, `departed` its departure came first, `stopped` by DELETE, "
                       "`lease_expired` its lease lapsed."},
        "history": {**HISTORY, "description": "With `?history=1`: the allocation's changes."},
        "live": {"type": "boolean", "description": "false: these figures are not current (the substation could "
                 "not be asked, or the session has ended); `expected_energy_kwh` and `feasible` are then those "
                 "of the admission."},
        **NEED_LIVE,
    },
}

CANCELLED = {
    "type": "object",
    "description": "A queued request taken out of the queue.",
    "required": ["session_id", "state", "vehicle_id"],
    "properties": {"session_id": SESSION_ID, "state": {"const": "cancelled"}, "vehicle_id": VEHICLE_ID},
}

STATUS = {
    "type": "object",
    "required": ["service", "load_balancer", "active_sessions", "queued_requests", "sessions", "charge_requests",
                 "failed_requests"],
    "properties": {
        "service": {"const": "charge_request_service"},
        "load_balancer": {
            "type": "object",
            "required": ["healthy"],
            "properties": {"healthy": {"type": "boolean", "description": "Whether any load balancer answers."}},
        },
        "active_sessions": COUNT,
        "queued_requests": COUNT,
        "sessions": {
            "type": "object",
            "required": ["recorded", "stopped", "expired", "active"],
            "properties": {"recorded": COUNT, "stopped": COUNT, "expired": COUNT, "active": COUNT},
        },
        "charge_requests": {
            "type": "object",
            "description": "`POST /charge` answers so far, by HTTP status.",
            "propertyNames": {"pattern": "^[1-5][0-9][0-9]$"},
            "additionalProperties": COUNT,
        },
        "failed_requests": {**COUNT, "description": "Requests the balancer failed (502)."},
    },
}

REPLAYED = {
    "Idempotent-Replayed": {
        "description": "`true`: the answer to an earlier request with the same `Idempotency-Key`.",
        "schema": {"const": "true"},
    }
}

UNAUTHORIZED_SESSION = error_response(
    "No client key and no `Authorization: Bearer` credential (`unauthorized`). Asked before anything else, so "
    "the answer never tells whether a session exists. A client key that opens nothing: `invalid_api_key`, "
    "`api_key_revoked`.",
    ["unauthorized", "invalid_api_key", "api_key_revoked"],
    headers=WWW_AUTHENTICATE,
)
FORBIDDEN_SESSION = error_response(
    "The token is neither this session's `session_token` nor the operator's (`forbidden`).",
    ["forbidden"],
)
BALANCER_UNAVAILABLE = error_response(
    "The load balancer could not be reached, was too slow or answered something unusable "
    "(`load_balancer_unavailable`). Retry in a few seconds.",
    ["load_balancer_unavailable"],
)

PATHS: dict[str, Any] = {
    "/charge": {
        "post": {
            "operationId": "startCharging",
            "tags": ["sessions"],
            "summary": "Ask for power for a vehicle",
            "description": "The balancer routes the request to a substation with room. Without room anywhere "
            "the answer is a 503, or with `\"wait\": true` a place in the queue (202); while anyone waits, a "
            "new request without `wait` is a 503 too (nobody overtakes the queue). With `PUBLIC_API_AUTH=keys` "
            "(the default but on a loopback address) it needs a client key or the operator token; a key's quotas "
            "(sessions, kW, queued requests, requests a second) are booked before the request goes anywhere, and "
            "the session belongs to the key. Limited per key and vehicle (`RATE_LIMIT_PER_VEHICLE`, 2/second and "
            "30/minute by default; valid requests only) and optionally per client address.",
            "security": CLIENT_ACCESS,
            "parameters": [
                X_REQUEST_ID,
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "description": "1 to 255 printable ASCII characters, each client key's own. A repeat with the "
                    "same key and body from the same client gets the first answer again (`Idempotent-Replayed: "
                    "true`), books nothing new and is not rate limited; kept are "
                    "201, 202 and errors in the request itself (400, 413, 415, 422), while a 409, 429, 502 or "
                    "503 may be different a moment later, so a repeat of those is tried again.",
                    "schema": {"type": "string", "examples": ["7c0e2b7c-2f64-4b8e-9f1d-0d5b6a1c9e21"]},
                },
            ],
            "requestBody": json_request(
                charge_request_schema(with_session_id=False, with_wait=True),
                "The charge request; fields not listed are ignored.",
            ),
            "responses": {
                "201": json_response(
                    "Admitted: the session charges now.", ADMISSION, headers=REPLAYED, links=SESSION_LINKS
                ),
                "202": json_response(
                    "Queued (`\"wait\": true` and no room): `Location` is the session to poll.",
                    {"allOf": [QUEUED_SESSION, {"required": ["session_token"],
                                                "properties": {"session_token": SESSION_TOKEN}}]},
                    headers={"Location": ref("headers", "Location"), **REPLAYED},
                    links=SESSION_LINKS,
                ),
                **body_errors(),
                "400": error_response(
                    "The body is not one JSON object (`invalid_json`: malformed, not UTF-8, a key given twice, "
                    "nested more than 32 levels, not an object), a field is wrong (`invalid_field`, with "
                    "`field`), or the `Idempotency-Key` is not 1 to 255 printable ASCII characters "
                    "(`invalid_header`).",
                    ["invalid_json", "invalid_field", "invalid_header"],
                    headers=REPLAYED,
                    **FIELD,
                ),
                "401": UNAUTHORIZED_CLIENT,
                "409": error_response(
                    "The vehicle has a session already, queued or charging (`vehicle_already_charging`, with "
                    "its `session_id` when the asking key owns it, or to the operator), a request with this "
                    "`Idempotency-Key` is still being answered "
                    "(`idempotency_key_in_use`, with `Retry-After`), or the request could never start while the "
                    "limits stay as they are (`exceeds_every_limit`): its minimum (the whole amount under strict "
                    "allocation, at most `MIN_CHARGE_KW` under fair sharing) exceeds every substation's limit. "
                    "That one is not queued, even with `\"wait\": true`: ask for at most `largest_limit_kw`. "
                    "The limits move, so it is not kept for a repeat with the same `Idempotency-Key`.",
                    ["vehicle_already_charging", "idempotency_key_in_use", "exceeds_every_limit"],
                    headers={"Retry-After": {"description": "With `idempotency_key_in_use`: retry after this "
                                             "many seconds.", "schema": {"type": "integer", "minimum": 1}}},
                    session_id=SESSION_ID,
                    amount={"type": "number", "description": "With `exceeds_every_limit`: the kW asked for."},
                    minimum_kw={"type": "number", "description": "With `exceeds_every_limit`: the least a session "
                                "of that amount would get anywhere."},
                    largest_limit_kw={"type": "number", "description": "With `exceeds_every_limit`: the largest "
                                      "limit on the grid now."},
                    substation={"type": "string", "description": "With `exceeds_every_limit`: the substation "
                                "with the largest limit."},
                ),
                "422": error_response(
                    "This `Idempotency-Key` came before with another body (`idempotency_key_reused`).",
                    ["idempotency_key_reused"],
                ),
                "429": error_response(
                    "Too many charge requests for this vehicle (or client address) (`too_many_requests`), or the "
                    "request would pass a quota of its client key (`quota_exceeded`, naming it in `quota`: "
                    "`sessions`, `kw`, `queued` or `requests_per_second`); retry after `Retry-After` (for "
                    "`sessions` and `kw`, when the key's first session ends).",
                    ["too_many_requests", "quota_exceeded"],
                    headers=RETRY_AFTER,
                    retry_after_seconds=retry_after_field("Same as Retry-After."),
                    quota={"enum": ["sessions", "kw", "queued", "requests_per_second"],
                           "description": "With `quota_exceeded`: the quota met."},
                    limit={"type": "number", "description": "With `quota_exceeded`: the key's quota."},
                    in_use={"type": "number", "description": "With `quota_exceeded` for `sessions`, `kw` or "
                            "`queued`: how much of it the key holds."},
                ),
                "502": BALANCER_UNAVAILABLE,
                "503": error_response(
                    "Not started, and why: no substation has room (`no_capacity`, with `free_kw` when the "
                    "balancer says what each has free; also while others wait in the queue), no substation could "
                    "be reached (`substations_unreachable`), they answered too slowly (`substations_too_slow`), "
                    "the request's time ran out before a substation could be asked (`deadline_too_short`), or the "
                    "queue is full (`queue_full`, `MAX_QUEUED`). Retry after `Retry-After`; with `\"wait\": true` "
                    "every one of these but `queue_full` queues the request instead.",
                    ["no_capacity", "substations_unreachable", "substations_too_slow", "deadline_too_short",
                     "queue_full"],
                    headers=RETRY_AFTER,
                    retry_after_seconds=retry_after_field("Same as Retry-After."),
                    free_kw={
                        "type": "object",
                        "additionalProperties": {"type": "number", "minimum": 0},
                        "description": "With `no_capacity` from the balancer: kW free for a new session's minimum "
                        "at each substation that is up, by id.",
                    },
                ),
            },
        }
    },
    "/sessions": {
        "get": {
            "operationId": "listSessions",
            "tags": ["sessions"],
            "summary": "Every active session (operator only)",
            "security": [{"operatorToken": []}],
            "parameters": [X_REQUEST_ID],
            "responses": {
                "200": json_response(
                    "The active sessions started here, oldest first.",
                    {"type": "object", "required": ["sessions"],
                     "properties": {"sessions": {"type": "array", "items": schema_ref("ActiveSession")}}},
                ),
                **operator_errors(SERVICE),
            },
        }
    },
    "/sessions/{session_id}": {
        "parameters": [SESSION_ID_PARAMETER],
        "get": {
            "operationId": "showSession",
            "tags": ["sessions"],
            "summary": "One session, queued, running or finished",
            "description": "With the client key that created it, the session's own `session_token` or the "
            "operator token. Another key's session is answered 404, as if it did not exist.",
            "security": SESSION_ACCESS,
            "parameters": [
                X_REQUEST_ID,
                {
                    "name": "history",
                    "in": "query",
                    "required": False,
                    "description": "`1` or `true`: add the allocation's history; any other value: leave it out.",
                    "schema": {"type": "string", "examples": ["1"]},
                },
            ],
            "responses": {
                "200": json_response("The session now.", schema_ref("SessionView")),
                "401": UNAUTHORIZED_SESSION,
                "403": FORBIDDEN_SESSION,
                **path_errors(
                    ["session_not_found"],
                    "`session_not_found` (with `session_id`): never started here, or finished too long ago; or",
                ),
            },
        },
        "delete": {
            "operationId": "stopSession",
            "tags": ["sessions"],
            "summary": "Stop a session, or cancel a queued request",
            "description": "With the client key that created it, the session's own `session_token` or the "
            "operator token. Another key's session is answered 404, as if it did not exist.",
            "security": SESSION_ACCESS,
            "parameters": [X_REQUEST_ID],
            "responses": {
                "200": json_response(
                    "Cancelled (it was queued), or stopped: the substation's last record of it and its load after.",
                    {"anyOf": [CANCELLED, session_with_capacity_schema()]},
                ),
                "401": UNAUTHORIZED_SESSION,
                "403": FORBIDDEN_SESSION,
                **path_errors(
                    ["session_not_found"],
                    "`session_not_found` (with `session_id`, and `substation` when it had ended there already): "
                    "not active here; or",
                ),
                "502": BALANCER_UNAVAILABLE,
            },
        },
    },
    "/status": {
        "get": {
            "operationId": "status",
            "tags": ["observability"],
            "summary": "Sessions, queue, balancer health and answer counts",
            "description": "With `PUBLIC_API_AUTH=keys`, for a client key or the operator.",
            "security": CLIENT_ACCESS,
            "parameters": [X_REQUEST_ID],
            "responses": {"200": json_response("The service's state.", schema_ref("Status")),
                          "401": UNAUTHORIZED_CLIENT},
        }
    },
    "/health": {
        "get": health_operation({
            "type": "object",
            "required": ["status", "service"],
            "properties": {"status": {"const": "ok"}, "service": {"const": "charge_request_service"}},
        })
    },
    "/metrics": {
        "get": metrics_operation(
            "`charge_requests_total{status}`, `requests_duration_seconds`, `failed_requests_total`, "
            "`active_sessions`, the queue's gauges, `charge_queue_wait_seconds{outcome}`, "
            "`client_key_rejections_total{reason}` and, per active client key (at most `MAX_CLIENT_KEYS`), "
            "`client_key_info{key,name}`, `client_key_sessions`, `client_key_allocated_kw`, `client_key_queued`, "
            "their quotas (`client_key_sessions_limit`, `client_key_allocated_kw_limit`, `client_key_queued_limit`) "
            "and `client_key_refusals_total{key,reason}`."
        )
    },
    "/client-keys": {
        "post": {
            "operationId": "createClientKey",
            "tags": ["client keys"],
            "summary": "Create a client key (operator only)",
            "description": "The answer holds the key itself, once. At most `MAX_CLIENT_KEYS` keys are active.",
            "security": [{"operatorToken": []}],
            "parameters": [X_REQUEST_ID],
            "requestBody": json_request(
                {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
                    "name": {"type": "string", "pattern": r"^[\w .,:@()/+-]{1,80}$",
                             "description": "Who holds it, for the console and the metrics."},
                    "quotas": QUOTAS}},
                "The key's name and quotas; a quota not given takes its default.",
            ),
            "responses": {
                "201": json_response("Created: `api_key` is the key, shown this once.",
                                     {"allOf": [schema_ref("ClientKey"), {"required": ["api_key"],
                                                                           "properties": {"api_key": API_KEY}}]},
                                     headers={"Location": {"description": "`/client-keys/<key_id>`.",
                                                           "schema": {"type": "string"}}}),
                **body_errors(("invalid_json", "invalid_field", "missing_field")),
                "409": error_response("`MAX_CLIENT_KEYS` keys are active already (`too_many_client_keys`): "
                                      "revoke one first.", ["too_many_client_keys"]),
                **operator_errors(SERVICE),
            },
        },
        "get": {
            "operationId": "listClientKeys",
            "tags": ["client keys"],
            "summary": "Every client key, revoked ones included, with what each holds (operator only)",
            "security": [{"operatorToken": []}],
            "parameters": [X_REQUEST_ID],
            "responses": {
                "200": json_response("The keys, oldest first.", {
                    "type": "object", "required": ["client_keys"],
                    "properties": {"client_keys": {"type": "array", "items": schema_ref("ClientKey")}}}),
                **operator_errors(SERVICE),
            },
        },
    },
    "/client-keys/{key_id}": {
        "parameters": [KEY_ID_PARAMETER],
        "get": {
            "operationId": "showClientKey",
            "tags": ["client keys"],
            "summary": "One client key and what it holds (operator only)",
            "security": [{"operatorToken": []}],
            "parameters": [X_REQUEST_ID],
            "responses": {
                "200": json_response("The key.", schema_ref("ClientKey")),
                **operator_errors(SERVICE),
                **KEY_NOT_FOUND,
            },
        },
        "patch": {
            "operationId": "changeClientKey",
            "tags": ["client keys"],
            "summary": "Change a client key's name or quotas (operator only)",
            "description": "The quotas given replace the key's values of those quotas; the others stay. The key, "
            "its secret and its sessions stay: sessions already held past a lowered quota run on, and the key's "
            "next request is refused until it is under. Replicas sharing a database count the change within 2 s.",
            "security": [{"operatorToken": []}],
            "parameters": [X_REQUEST_ID],
            "requestBody": json_request(
                {"type": "object", "additionalProperties": False, "properties": {
                    "name": {"type": "string", "pattern": r"^[\w .,:@()/+-]{1,80}$",
                             "description": "Who holds it, for the console and the metrics."},
                    "quotas": QUOTAS}},
                "What changes: the name, some quotas, or both.",
            ),
            "responses": {
                "200": json_response("The key as it is now.", schema_ref("ClientKey")),
                **body_errors(),
                **KEY_NOT_FOUND,
                "400": error_response(
                    "The body is not one JSON object (`invalid_json`), a field is wrong (`invalid_field`, with "
                    "`field`: `name`, `quotas` or `quotas.<name>`), or the decoded path has a control character or "
                    "a `.`/`..` segment (`invalid_path`).",
                    ["invalid_json", "invalid_field", "invalid_path"],
                    **FIELD,
                ),
                "409": error_response("The key is revoked (`client_key_revoked`): create a new one.",
                                      ["client_key_revoked"]),
                **operator_errors(SERVICE),
            },
        },
        "delete": {
            "operationId": "revokeClientKey",
            "tags": ["client keys"],
            "summary": "Revoke a client key (operator only)",
            "description": "It opens nothing from now on; its sessions run on (stop them with "
            "`DELETE /sessions/<id>` and the operator token). Revoking it again changes nothing.",
            "security": [{"operatorToken": []}],
            "parameters": [X_REQUEST_ID],
            "responses": {
                "200": json_response("The key, revoked.", schema_ref("ClientKey")),
                **operator_errors(SERVICE),
                **KEY_NOT_FOUND,
            },
        },
    },
    "/client-keys/{key_id}/rotate": {
        "parameters": [KEY_ID_PARAMETER],
        "post": {
            "operationId": "rotateClientKey",
            "tags": ["client keys"],
            "summary": "Give a client key a new secret (operator only)",
            "description": "The previous secret stops working at once; the key's id, quotas and sessions stay.",
            "security": [{"operatorToken": []}],
            "parameters": [X_REQUEST_ID],
            "responses": {
                "200": json_response("Rotated: `api_key` is the new key, shown this once.",
                                     {"allOf": [schema_ref("ClientKey"), {"required": ["api_key"],
                                                                           "properties": {"api_key": API_KEY}}]}),
                "409": error_response("The key is revoked (`client_key_revoked`): create a new one.",
                                      ["client_key_revoked"]),
                **operator_errors(SERVICE),
                **KEY_NOT_FOUND,
            },
        },
    },
    OPENAPI_PATH: {"get": openapi_operation()},
}


def _components() -> dict[str, Any]:
    components = common_components(
        "The operator's token (`ADMIN_TOKEN`): lists every session and reads or stops any one. Without "
        "`ADMIN_TOKEN` the operator API is off (403)."
    )
    components["securitySchemes"]["clientKey"] = {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "A client key (`sgk_...`), from the operator (`POST /client-keys`): starts sessions, which "
        "then belong to it, within its quotas. Needed with `PUBLIC_API_AUTH=keys`; with `open`, optional.",
    }
    components["securitySchemes"]["clientKeyBearer"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "The same client key, sent as `Authorization: Bearer <key>`.",
    }
    components["securitySchemes"]["sessionToken"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "The `session_token` of the answer that started the session: reads and stops that "
        "session only.",
    }
    components["headers"]["Location"] = {
        "description": "The queued session: `/sessions/<session_id>`.",
        "required": True,
        "schema": {"type": "string", "pattern": "^/sessions/[A-Za-z0-9_-]{1,64}$"},
    }
    components["schemas"].update(
        {"ActiveSession": ACTIVE_SESSION, "SessionView": SESSION_VIEW, "Status": STATUS, "ClientKey": CLIENT_KEY}
    )
    return components


SPEC: dict[str, Any] = document(
    "Smart Grid charge API",
    "The public API of the smart grid: a vehicle asks for power (`POST /charge`), gets a session and "
    "its token, reads how it charges and stops it. Requests go to the load balancer, which places them "
    "at a substation with room.",
    [
        ("sessions", "Charging sessions."),
        ("observability", "Health, status and metrics."),
        ("client keys", "The operator's keys for clients of the API, and their quotas."),
    ],
    PATHS,
    _components(),
)

__all__ = ["SPEC"]
