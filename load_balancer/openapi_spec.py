"""OpenAPI 3.1 document of the load balancer, served at ``GET /openapi.json``.

One source of truth: the app serves this dict (``gridcommon.openapi.install_openapi``),
tests/test_openapi_specs.py checks it against the app's routes, and
tests/test_schemathesis.py fuzzes the running service with it.
"""
from __future__ import annotations

from typing import Any

from gridcommon.openapi import (
    COUNT,
    NULLABLE_KW,
    OPENAPI_PATH,
    RETRY_AFTER,
    SUBSTATION_ID,
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
    substation_session_schema,
)
from load_balancer.policies import POLICY_NAMES

SERVICE = "load balancer"
X_REQUEST_ID = ref("parameters", "X-Request-ID")
OPERATOR = [{"operatorToken": []}]

SUBSTATION_ID_PARAMETER: dict[str, Any] = {
    "name": "substation_id",
    "in": "path",
    "required": True,
    "description": "A registered substation's id (`GET /substations`).",
    "schema": {"type": "string", "examples": ["substation-1"]},
}
SESSION_ID_PARAMETER: dict[str, Any] = {
    "name": "session_id",
    "in": "path",
    "required": True,
    "description": "The session's id at that substation.",
    "schema": {"type": "string"},
}

DEADLINE_PARAMETER: dict[str, Any] = {
    "name": "X-Request-Deadline",
    "in": "header",
    "required": False,
    "description": "When the caller stops waiting, seconds since the epoch (`1718000000.125`): routing ends "
    "by then and the substations admit nothing after it. A value that is not a number, or more than an hour "
    "ahead, is ignored.",
    "schema": {"type": "string"},
}

SESSION_LINKS = {
    "GetSession": {
        "operationId": "showSession",
        "parameters": {"substation_id": "$response.body#/substation", "session_id": "$response.body#/session_id"},
    },
    "StopSession": {
        "operationId": "stopSession",
        "parameters": {"substation_id": "$response.body#/substation", "session_id": "$response.body#/session_id"},
    },
}

ROUTED = {
    "allOf": [
        session_with_capacity_schema(),
        {
            "required": ["routing"],
            "properties": {
                "routing": {
                    "type": "object",
                    "required": ["policy", "attempts"],
                    "properties": {
                        "policy": {"enum": list(POLICY_NAMES)},
                        "attempts": {"type": "integer", "minimum": 1, "description": "Substations tried."},
                    },
                },
                "replayed": {"const": True, "description": "The substation had admitted this session already."},
            },
        },
    ]
}

SUBSTATION_STATUS = {
    "type": "object",
    "description": "One substation as the balancer sees it. The figures are null until its first "
    "successful poll.",
    "required": [
        "id", "url", "up", "load", "capacity", "total_capacity", "load_percentage", "available",
        "active_chargers", "reserved_kw", "minimum_load", "suspended", "curtailed", "fair_share_kw",
        "in_flight", "state_version", "last_poll_age_seconds", "consecutive_failures", "last_error",
        "ejected_for_seconds", "ejections",
    ],
    "properties": {
        "id": {"anyOf": [SUBSTATION_ID, {"type": "null"}], "description": "Null until its first poll."},
        "url": {"type": "string"},
        "up": {"type": "boolean", "description": "Routable: its last poll or forward worked."},
        "load": NULLABLE_KW,
        "capacity": NULLABLE_KW,
        "total_capacity": NULLABLE_KW,
        "load_percentage": NULLABLE_KW,
        "available": NULLABLE_KW,
        "active_chargers": {"type": ["integer", "null"], "minimum": 0},
        "reserved_kw": {"type": "number", "description": "kW of requests on their way to it."},
        "minimum_load": NULLABLE_KW,
        "suspended": {"type": ["integer", "null"], "minimum": 0},
        "curtailed": {"type": ["integer", "null"], "minimum": 0},
        "fair_share_kw": NULLABLE_KW,
        "in_flight": COUNT,
        "state_version": {"type": ["integer", "null"]},
        "last_poll_age_seconds": {"type": ["number", "null"], "minimum": 0},
        "consecutive_failures": COUNT,
        "last_error": {"type": ["string", "null"]},
        "ejected_for_seconds": {
            "type": ["number", "null"], "minimum": 0,
            "description": "Time left of its ejection as an outlier (timeouts, 5xx); null when not ejected.",
        },
        "ejections": {**COUNT, "description": "Ejections in a row: each one lasts twice the one before."},
    },
}

POLICY = {
    "type": "object",
    "required": ["policy", "available"],
    "properties": {
        "policy": {"enum": list(POLICY_NAMES)},
        "previous": {"enum": list(POLICY_NAMES), "description": "After a change: the policy before it."},
        "available": {"type": "array", "items": {"enum": list(POLICY_NAMES)}},
    },
}

TOO_LARGE = error_response(
    "The request's minimum (its whole amount under strict allocation, at most MIN_CHARGE_KW under fair "
    "sharing) exceeds every substation's limit now (`exceeds_every_limit`): it could never start while the "
    "limits stay as they are. Ask for at most `largest_limit_kw`; the limits move, so the same request may "
    "fit later.",
    ["exceeds_every_limit"],
    amount={"type": "number", "description": "The kW asked for."},
    minimum_kw={"type": "number", "description": "The least a session of that amount would get anywhere."},
    largest_limit_kw={"type": "number", "exclusiveMinimum": 0, "description": "The largest limit on the grid now."},
    substation={**SUBSTATION_ID, "description": "The substation with the largest limit."},
)

SUBSTATION_UNREACHABLE = error_response(
    "The substation could not be asked: unreachable, too slow, or it answered something unusable "
    "(`substation_unreachable`). Retry in a few seconds.",
    ["substation_unreachable"],
)

SESSION_PATH_ERRORS = path_errors(
    ["unknown_substation", "session_not_found"],
    "No substation of that id is registered (`unknown_substation`), the substation has no such session "
    "(`session_not_found`, with `session_id`), or",
)

PATHS: dict[str, Any] = {
    "/charge": {
        "post": {
            "operationId": "routeCharge",
            "tags": ["charging"],
            "summary": "Place a charge request at a substation with room",
            "description": "Tries the routing policy's candidates until one admits the request, within "
            "`ROUTE_DEADLINE_SECONDS`. The same `session_id` sent twice is admitted once. A request with an "
            "energy need (`energy_kwh` with a `departure` or `duration_seconds`) is offered first where the need "
            "is expected to be met (the power it would get there now, held until then, covers it), then where "
            "it gets the most power; equal candidates keep the policy's order.",
            "security": [],
            "parameters": [X_REQUEST_ID, ref("parameters", "X-Request-Deadline")],
            "requestBody": json_request(
                charge_request_schema(with_session_id=True, with_wait=False),
                "The charge request (the charge API's, with the session id it chose); other fields are ignored.",
            ),
            "responses": {
                "201": json_response(
                    "Admitted: the substation's answer and how it was routed.", ROUTED, links=SESSION_LINKS
                ),
                # A substation's own 400 is passed on unchanged: the same codes.
                **body_errors(),
                "409": TOO_LARGE,
                "503": error_response(
                    "Not placed, and why: every substation is full (`no_capacity`, with `free_kw`: what each "
                    "substation that is up has free for a new session's minimum), none could be reached or "
                    "used (`substations_unreachable`), they answered too slowly or not at all "
                    "(`substations_too_slow`), or the request's deadline left no time to ask one "
                    "(`deadline_too_short`).",
                    ["no_capacity", "substations_unreachable", "substations_too_slow", "deadline_too_short"],
                    headers=RETRY_AFTER,
                    retry_after_seconds=retry_after_field("Same as Retry-After."),
                    free_kw={
                        "type": "object",
                        "additionalProperties": {"type": "number", "minimum": 0},
                        "description": "With `no_capacity`: kW free for a new session's minimum at each substation "
                        "that is up, by id. Asking for at most the largest of them starts at once.",
                    },
                ),
            },
        }
    },
    "/charge/check": {
        "post": {
            "operationId": "checkCharge",
            "tags": ["charging"],
            "summary": "Whether a charge request fits under some substation's limit",
            "description": "Nothing is reserved or sent to a substation: for a caller that queues the request "
            "and wants to refuse at once one that could never start. Read from the balancer's view (refreshed "
            "first when it says the request fits nowhere).",
            "security": [],
            "parameters": [X_REQUEST_ID, ref("parameters", "X-Request-Deadline")],
            "requestBody": json_request(
                charge_request_schema(with_session_id=True, with_wait=False),
                "The charge request, as for `POST /charge`; other fields are ignored.",
            ),
            "responses": {
                "200": json_response(
                    "It fits under the limit of at least one substation (it may still have to wait for room).",
                    {
                        "type": "object",
                        "required": ["fits", "amount"],
                        "properties": {"fits": {"const": True}, "amount": {"type": "number"}},
                    },
                ),
                **body_errors(),
                "409": TOO_LARGE,
            },
        }
    },
    "/sessions/{session_id}": {
        "parameters": [SESSION_ID_PARAMETER],
        "delete": {
            "operationId": "stopSessionEverywhere",
            "tags": ["charging"],
            "summary": "Stop a session wherever it is, and retire its id at every substation",
            "description": "For a caller whose charge request got no answer: the session may exist "
            "somewhere or not yet. Every reachable substation stops it if it holds it and refuses its id from "
            "then on; an unreachable one is asked again after its next successful poll.",
            "security": [],
            "parameters": [X_REQUEST_ID],
            "responses": {
                "200": json_response(
                    "A substation held it: its last record and the load there after the stop.",
                    session_with_capacity_schema(),
                ),
                **path_errors(["session_not_found"], "No reachable substation held it (`session_not_found`, "
                                                     "with `session_id`), or"),
            },
        },
    },
    "/charge/{substation_id}/{session_id}": {
        "parameters": [SUBSTATION_ID_PARAMETER, SESSION_ID_PARAMETER],
        "get": {
            "operationId": "showSession",
            "tags": ["charging"],
            "summary": "A session's record at its substation",
            "security": [],
            "parameters": [X_REQUEST_ID],
            "responses": {
                "200": json_response(
                    "The substation's record of the session, with its allocation history.",
                    substation_session_schema(),
                ),
                **SESSION_PATH_ERRORS,
                "502": SUBSTATION_UNREACHABLE,
            },
        },
        "delete": {
            "operationId": "stopSession",
            "tags": ["charging"],
            "summary": "Stop a session at its substation",
            "security": [],
            "parameters": [X_REQUEST_ID],
            "responses": {
                "200": json_response(
                    "Stopped: the session's last record and the substation's load after.",
                    session_with_capacity_schema(),
                ),
                **SESSION_PATH_ERRORS,
                "502": SUBSTATION_UNREACHABLE,
            },
        },
    },
    "/substations": {
        "get": {
            "operationId": "listSubstations",
            "tags": ["substations"],
            "summary": "Every tracked substation",
            "security": [],
            "parameters": [X_REQUEST_ID],
            "responses": {
                "200": json_response(
                    "Known ids first in id order, then URLs not polled successfully yet.",
                    {"type": "object", "required": ["substations"],
                     "properties": {"substations": {"type": "array", "items": schema_ref("SubstationStatus")}}},
                )
            },
        },
        "post": {
            "operationId": "registerSubstation",
            "tags": ["substations"],
            "summary": "Register a substation (operator only)",
            "description": "The URL is checked (`http(s)://host[:port][/prefix]`, a host `SUBSTATION_URL_ALLOW` "
            "allows, room under `MAX_SUBSTATIONS`) before anything is sent to it, then polled once: it is "
            "routable from then on.",
            "security": OPERATOR,
            "parameters": [X_REQUEST_ID],
            "requestBody": json_request(
                {
                    "type": "object",
                    "required": ["url"],
                    "properties": {"url": {"type": "string", "format": "uri",
                                           "description": "The substation's base URL.",
                                           "examples": ["http://127.0.0.1:5011"]}},
                },
                "The substation to register.",
            ),
            "responses": {
                "200": json_response(
                    "Already registered: polled again.",
                    schema_ref("SubstationStatus"),
                    links={"DeregisterSubstation": {"operationId": "deregisterSubstation",
                                                    "parameters": {"substation_id": "$response.body#/id"}}},
                ),
                "201": json_response(
                    "Registered.",
                    schema_ref("SubstationStatus"),
                    links={"DeregisterSubstation": {"operationId": "deregisterSubstation",
                                                    "parameters": {"substation_id": "$response.body#/id"}}},
                ),
                **body_errors(),
                "401": operator_errors(SERVICE)["401"],
                "403": error_response(
                    "The operator API is off (`admin_disabled`), or the URL's host is not one "
                    "`SUBSTATION_URL_ALLOW` allows (`url_not_allowed`, with `field`).",
                    ["admin_disabled", "url_not_allowed"],
                    field={"const": "url"},
                ),
                "409": error_response(
                    "`MAX_SUBSTATIONS` are tracked already (`too_many_substations`, with `max_substations`), or "
                    "the substation reports an id another registered URL has (`substation_conflict`).",
                    ["too_many_substations", "substation_conflict"],
                    max_substations={"type": "integer", "minimum": 1},
                ),
                "502": SUBSTATION_UNREACHABLE,
            },
        },
    },
    "/substations/{substation_id}": {
        "parameters": [SUBSTATION_ID_PARAMETER],
        "delete": {
            "operationId": "deregisterSubstation",
            "tags": ["substations"],
            "summary": "Stop routing to a substation (operator only)",
            "security": OPERATOR,
            "parameters": [X_REQUEST_ID],
            "responses": {
                "200": json_response("Deregistered: its last status.", schema_ref("SubstationStatus")),
                **operator_errors(SERVICE),
                **path_errors(["unknown_substation"], "No substation of that id is registered "
                                                      "(`unknown_substation`), or"),
            },
        },
    },
    "/status": {
        "get": {
            "operationId": "status",
            "tags": ["observability"],
            "summary": "Routing policy and every substation's state",
            "security": [],
            "parameters": [X_REQUEST_ID],
            "responses": {
                "200": json_response(
                    "The balancer's view of the grid.",
                    {
                        "type": "object",
                        "required": ["policy", "poll_interval_seconds", "healthy_substations", "substations"],
                        "properties": {
                            "policy": {"enum": list(POLICY_NAMES)},
                            "poll_interval_seconds": {"type": "number", "exclusiveMinimum": 0},
                            "healthy_substations": COUNT,
                            "substations": {"type": "array", "items": schema_ref("SubstationStatus")},
                        },
                    },
                )
            },
        }
    },
    "/health": {
        "get": health_operation({
            "type": "object",
            "required": ["status", "service"],
            "properties": {"status": {"const": "ok"}, "service": {"const": "load_balancer"}},
        })
    },
    "/metrics": {
        "get": metrics_operation(
            "Routing counts and failures, each substation's polled figures, polling durations, lost "
            "sessions freed."
        )
    },
    "/admin/policy": {
        "get": {
            "operationId": "getPolicy",
            "tags": ["admin"],
            "summary": "The routing policy (operator only)",
            "security": OPERATOR,
            "parameters": [X_REQUEST_ID],
            "responses": {"200": json_response("The policy in force.", POLICY), **operator_errors(SERVICE)},
        },
        "put": {
            "operationId": "setPolicy",
            "tags": ["admin"],
            "summary": "Switch the routing policy at run time (operator only)",
            "description": "The token is checked before the body is read.",
            "security": OPERATOR,
            "parameters": [X_REQUEST_ID],
            "requestBody": json_request(
                {"type": "object", "required": ["policy"], "properties": {"policy": {"enum": list(POLICY_NAMES)}}},
                "The policy to route by from now on.",
            ),
            "responses": {
                "200": json_response("Switched.", POLICY),
                **body_errors(),
                **operator_errors(SERVICE),
            },
        },
    },
    OPENAPI_PATH: {"get": openapi_operation()},
}


def _components() -> dict[str, Any]:
    components = common_components(
        "The operator's token (`ADMIN_TOKEN`): the admin API and `POST`/`DELETE /substations`. Without "
        "`ADMIN_TOKEN` all of them are off (403)."
    )
    components["schemas"]["SubstationStatus"] = SUBSTATION_STATUS
    components["parameters"]["X-Request-Deadline"] = DEADLINE_PARAMETER
    return components


SPEC: dict[str, Any] = document(
    "Smart Grid load balancer",
    "Routes charge requests to the substations it polls, by a routing policy; registers and "
    "deregisters substations at run time. Called by the charge API, not by the public.",
    [
        ("charging", "Charge requests and sessions, forwarded to substations."),
        ("substations", "Which substations are balanced over."),
        ("admin", "Operator settings."),
        ("observability", "Health, status and metrics."),
    ],
    PATHS,
    _components(),
)

__all__ = ["SPEC"]
