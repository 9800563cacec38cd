"""Each service's OpenAPI 3.1 document, served at ``GET /openapi.json``.

A service's document is plain Python data (``<service>/openapi_spec.py``,
``SPEC``): the app serves exactly that dict, and the tests validate it, check
it against the app's routes and fuzz the running service with it, so the
document cannot drift from what the service does without a test failing.

:func:`install_openapi` adds the endpoint. The rest of this module holds the
pieces the three documents share: the JSON error every service answers
(``{"error": ..., "message": ...}``, see ``gridcommon.web``), the headers every
answer carries, the operator token, and the substation's session and capacity
records, which the balancer and the charge API pass on unchanged.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from flask import Flask, Response

from gridcommon.validation import (
    DEFAULT_MAX_AMOUNT_KW,
    DEFAULT_MAX_DURATION_SECONDS,
    MAX_DEPARTURE_AHEAD_SECONDS,
    MAX_ENERGY_KWH,
)

OPENAPI_PATH = "/openapi.json"
OPENAPI_VERSION = "3.1.0"
OPENAPI_ENDPOINT = "openapi_document"
JSON = "application/json"

Schema = dict[str, Any]


def install_openapi(app: Flask, spec: Mapping[str, Any]) -> None:
    """Serve ``spec`` as JSON at ``GET /openapi.json`` (serialised once, here)."""
    body = json.dumps(spec, ensure_ascii=False, allow_nan=False).encode("utf-8")

    def openapi_document() -> Response:
        return Response(body, mimetype=JSON)

    app.add_url_rule(OPENAPI_PATH, endpoint=OPENAPI_ENDPOINT, view_func=openapi_document, methods=["GET"])


# References --------------------------------------------------------------------------


def ref(kind: str, name: str) -> dict[str, str]:
    """``{"$ref": "#/components/<kind>/<name>"}``."""
    return {"$ref": f"#/components/{kind}/{name}"}


def schema_ref(name: str) -> dict[str, str]:
    return ref("schemas", name)


# Answers -----------------------------------------------------------------------------


def json_response(
    description: str,
    schema: Mapping[str, Any],
    *,
    headers: Mapping[str, Any] | None = None,
    links: Mapping[str, Any] | None = None,
) -> Schema:
    """A JSON answer; every answer of every service carries ``X-Request-ID``."""
    response: Schema = {
        "description": description,
        "headers": {"X-Request-ID": ref("headers", "X-Request-ID"), **(headers or {})},
        "content": {JSON: {"schema": dict(schema)}},
    }
    if links:
        response["links"] = dict(links)
    return response


def error_schema(codes: Iterable[str], **extra: Mapping[str, Any]) -> Schema:
    """The error shape with ``error`` limited to ``codes``; ``extra`` documents further fields."""
    schema: Schema = {"allOf": [schema_ref("Error"), {"properties": {"error": {"enum": sorted(set(codes))}}}]}
    if extra:
        schema["allOf"][1]["properties"].update({name: dict(value) for name, value in extra.items()})
    return schema


def error_response(
    description: str,
    codes: Iterable[str],
    *,
    headers: Mapping[str, Any] | None = None,
    **extra: Mapping[str, Any],
) -> Schema:
    return json_response(description, error_schema(codes, **extra), headers=headers)


RETRY_AFTER = {"Retry-After": ref("headers", "Retry-After")}
WWW_AUTHENTICATE = {"WWW-Authenticate": ref("headers", "WWW-Authenticate")}
FIELD = {"field": {"type": "string", "description": "The request field (or query parameter) that is wrong."}}


def retry_after_field(description: str) -> Schema:
    return {"type": "integer", "minimum": 1, "description": description}


def operator_errors(service: str) -> dict[str, Schema]:
    """401 and 403 of an endpoint that needs the operator's token (``gridcommon.auth``)."""
    return {
        "401": error_response(
            "The operator token is missing or wrong (`unauthorized`).",
            ["unauthorized"],
            headers=WWW_AUTHENTICATE,
        ),
        "403": error_response(
            f"The operator API of the {service} is off: it was started without `ADMIN_TOKEN` (`admin_disabled`).",
            ["admin_disabled"],
        ),
    }


def body_errors(codes_400: Iterable[str] = ("invalid_json", "invalid_field")) -> dict[str, Schema]:
    """400, 413 and 415 of an endpoint that reads a JSON object (``gridcommon.web.json_object_body``)."""
    return {
        "400": error_response(
            "The body is not one JSON object (`invalid_json`: malformed, not UTF-8, a key given twice, nested "
            "more than 32 levels, not an object) or a field is wrong (`invalid_field`, with `field`).",
            codes_400,
            **FIELD,
        ),
        "413": error_response("The body is larger than 16 KiB (16384 bytes).", ["request_entity_too_large"]),
        "415": error_response(
            "The body is not sent as `Content-Type: application/json` (or there is none).",
            ["unsupported_media_type"],
        ),
    }


def path_errors(not_found_codes: Iterable[str], description: str) -> dict[str, Schema]:
    """400 and 404 of an endpoint with ids in its path."""
    return {
        "400": error_response(
            "The decoded path has a control character or a `.`/`..` segment (`invalid_path`).",
            ["invalid_path"],
        ),
        "404": error_response(
            f"{description} `not_found`: the id held a `/` (encoded or not), so the path names no endpoint.",
            [*not_found_codes, "not_found"],
        ),
    }


def json_request(schema: Mapping[str, Any], description: str) -> Schema:
    return {"required": True, "description": description, "content": {JSON: {"schema": dict(schema)}}}


HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
SERVER_REFUSAL = (
    "the edge or the server refused the request before the service saw it, as HTTP it cannot parse (an empty or malformed "
    "`Content-Length`, a control character in a header...): `bad_request`, without `X-Request-ID`."
)


def with_server_refusals(paths: Mapping[str, Any]) -> dict[str, Any]:
    """``paths`` with the edge's or the server's own 400 ``bad_request`` added to every operation's 400.

    Any request can be malformed HTTP, whatever its endpoint; the edge or the server answers it (as JSON, see
    ``gridcommon.web.answer_server_refusals_as_json``) before the app, so without ``X-Request-ID``.
    Operations share response objects: every one gets a new 400.
    """
    refusal = error_schema(["bad_request"])
    finished: dict[str, Any] = {}
    for path, item in paths.items():
        finished[path] = dict(item)
        for method in HTTP_METHODS:
            if method not in item:
                continue
            operation = dict(item[method])
            responses = dict(operation["responses"])
            own = responses.get("400")
            if own is None:
                responses["400"] = {
                    "description": SERVER_REFUSAL,
                    "headers": {"X-Request-ID": ref("headers", "X-Request-ID-Unless-Refused")},
                    "content": {JSON: {"schema": refusal}},
                }
            else:
                responses["400"] = {
                    **own,
                    "description": f"{own['description']} Or: {SERVER_REFUSAL}",
                    "headers": {**own["headers"], "X-Request-ID": ref("headers", "X-Request-ID-Unless-Refused")},
                    "content": {JSON: {"schema": {"anyOf": [own["content"][JSON]["schema"], refusal]}}},
                }
            operation["responses"] = dict(sorted(responses.items()))
            finished[path][method] = operation
    return finished


# Operations every service has --------------------------------------------------------


def health_operation(schema: Mapping[str, Any]) -> Schema:
    return {
        "operationId": "health",
        "tags": ["observability"],
        "summary": "Liveness: 200 while the process answers",
        "security": [],
        "parameters": [ref("parameters", "X-Request-ID")],
        "responses": {"200": json_response("The service is up.", schema)},
    }


def metrics_operation(description: str, *, parameters: Iterable[Any] = (), headers: Mapping[str, Any] | None = None) -> Schema:
    return {
        "operationId": "metrics",
        "tags": ["observability"],
        "summary": "Prometheus metrics (text exposition format)",
        "description": description,
        "security": [],
        "parameters": [ref("parameters", "X-Request-ID"), *parameters],
        "responses": {
            "200": {
                "description": "The metrics, in Prometheus's text format (`text/plain; version=...`).",
                "headers": {"X-Request-ID": ref("headers", "X-Request-ID"), **(headers or {})},
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
    }


def openapi_operation() -> Schema:
    return {
        "operationId": "openapi",
        "tags": ["observability"],
        "summary": "This OpenAPI document",
        "security": [],
        "parameters": [ref("parameters", "X-Request-ID")],
        "responses": {
            "200": json_response(
                "The OpenAPI 3.1 document of this service.",
                {"type": "object", "required": ["openapi", "info", "paths"], "properties": {"openapi": {"const": OPENAPI_VERSION}}},
            )
        },
    }


def common_components(operator_description: str) -> Schema:
    """``components`` entries every document has; a service adds its own schemas to it."""
    return {
        "schemas": {
            "Error": {
                "type": "object",
                "description": "Every error of every service: a machine-readable `error` code and a `message` "
                "saying what went wrong and what to do. Some errors add fields (`field`, `session_id`, "
                "`retry_after_seconds`...).",
                "required": ["error", "message"],
                "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
            },
        },
        "headers": {
            "X-Request-ID": {
                "description": "The request's id: the caller's `X-Request-ID` when it was acceptable, else a new "
                "one. Logged with every line about the request and passed on to the services it calls.",
                "required": True,
                "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
            },
            "X-Request-ID-Unless-Refused": {
                "description": "The request's id, as on every answer, unless the edge or the server refused the request as "
                "malformed HTTP before the service saw it.",
                "required": False,
                "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
            },
            "Retry-After": {
                "description": "Whole seconds to wait before asking again.",
                "required": True,
                "schema": {"type": "integer", "minimum": 1},
            },
            "WWW-Authenticate": {
                "description": "The bearer realm the request must authenticate to.",
                "required": True,
                "schema": {"type": "string", "pattern": "^Bearer realm=\"[^\"]+\"$"},
            },
        },
        "parameters": {
            "X-Request-ID": {
                "name": "X-Request-ID",
                "in": "header",
                "required": False,
                "description": "Optional id for the request, kept when it is 1 to 128 of `A-Z a-z 0-9 . _ : -` "
                "(anything else is replaced by a new id, never refused).",
                "schema": {"type": "string"},
            },
        },
        "securitySchemes": {
            "operatorToken": {"type": "http", "scheme": "bearer", "description": operator_description},
        },
    }


def info_description(summary: str) -> str:
    """The document's description: ``summary``, then what holds for every endpoint."""
    return (
        f"{summary}\n\n"
        "Every answer is JSON (except `/metrics`) and carries `X-Request-ID`. Errors have the shape "
        "`{\"error\": \"<code>\", \"message\": \"<what to do>\", ...}`, whatever went wrong: an unknown path is a "
        "404 `not_found`, a method an endpoint does not take (OPTIONS included) a 405 `method_not_allowed` with "
        "`Allow`, and a request the edge or the server cannot parse (a control character in a header, a request line over 4 KiB, "
        "a header over 8 KiB) a 400/414/431 of the same shape. Every GET also answers HEAD. A 500 "
        "`internal_error` would be a bug: it is never part of an endpoint's contract."
    )


# Records that pass through several services ------------------------------------------

VEHICLE_ID: Schema = {
    "type": "string",
    "pattern": "^[A-Za-z0-9_-]{1,64}$",
    "description": "1 to 64 of A-Z, a-z, 0-9, `_` and `-`.",
    "examples": ["EV-1"],
}
SESSION_ID: Schema = {
    "type": "string",
    "pattern": "^[A-Za-z0-9_-]{1,64}$",
    "description": "1 to 64 of A-Z, a-z, 0-9, `_` and `-`.",
}
SUBSTATION_ID: Schema = {
    "type": "string",
    "pattern": "^[A-Za-z0-9._-]{1,64}$",
    "description": "1 to 64 of A-Z, a-z, 0-9, `.`, `_` and `-`.",
    "examples": ["substation-1"],
}
TIME: Schema = {"type": "string", "format": "date-time", "description": "UTC, ISO 8601 with milliseconds and `Z`."}
KW: Schema = {"type": "number"}
NULLABLE_KW: Schema = {"type": ["number", "null"]}
COUNT: Schema = {"type": "integer", "minimum": 0}


def charge_request_schema(
    *, with_session_id: bool, with_wait: bool, max_amount_kw: float = DEFAULT_MAX_AMOUNT_KW,
    max_duration_seconds: float = DEFAULT_MAX_DURATION_SECONDS,
) -> Schema:
    """A charge request as ``gridcommon.validation.parse_charge_request`` reads it; other fields are ignored."""
    properties: Schema = {
        "vehicle_id": VEHICLE_ID,
        "amount": {
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": max_amount_kw,
            "description": f"kW asked for: more than 0, at most `MAX_AMOUNT_KW` ({max_amount_kw:g} by default).",
            "examples": [11],
        },
        "duration_seconds": {
            "type": ["number", "null"],
            "exclusiveMinimum": 0,
            "maximum": max_duration_seconds,
            "description": "How long the session lasts: more than 0, at most `MAX_SESSION_SECONDS` "
            f"({max_duration_seconds:g} by default). Absent or null: the substation's `SESSION_SECONDS`, "
            "or with `energy_kwh` and `departure`, until the energy is delivered or the vehicle departs.",
        },
        "energy_kwh": {
            "type": ["number", "null"],
            "exclusiveMinimum": 0,
            "maximum": MAX_ENERGY_KWH,
            "description": f"The energy the vehicle needs, kWh: more than 0, at most {MAX_ENERGY_KWH:g}. Needs a "
            "`departure` (or a `duration_seconds`): by when. The session is planned to deliver it by then, and "
            "the answer says whether that is expected (`expected_energy_kwh`, `feasible`).",
            "examples": [30],
        },
        "departure": {
            "type": ["string", "number", "null"],
            "description": "When the vehicle leaves: an ISO 8601 time (without a zone, UTC) or a number of "
            f"seconds from now; after now and at most {MAX_DEPARTURE_AHEAD_SECONDS / 86400:g} days ahead. "
            "Passed on as the absolute UTC time. Alone (without `energy_kwh`), the session lasts until then.",
            "examples": ["2026-12-06T17:30:00Z", 28800],
        },
    }
    if with_session_id:
        properties["session_id"] = {
            **SESSION_ID,
            "description": "The id the session gets (the caller chooses it, so a retried request is admitted "
            "once); absent: a new one.",
        }
    if with_wait:
        properties["wait"] = {
            "type": "boolean",
            "default": False,
            "description": "true: when no substation has room, wait in the queue (202) instead of a 503.",
        }
    return {"type": "object", "required": ["vehicle_id", "amount"], "properties": properties}


SESSION_STATES = ["charging", "suspended", "ended"]
HISTORY: Schema = {
    "type": "array",
    "description": "`[seconds since the epoch, kW]` at every change of the session's allocation.",
    "items": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
}


def substation_session_schema() -> Schema:
    """A substation's record of one session (``substation_service.routes.session_json``)."""
    return {
        "type": "object",
        "required": [
            "session_id", "substation", "vehicle_id", "amount", "state", "allocated_kw", "minimum_kw",
            "energy_kwh", "suspended_seconds", "started_at", "ends_at", "duration_seconds",
        ],
        "properties": {
            "session_id": SESSION_ID,
            "substation": SUBSTATION_ID,
            "vehicle_id": VEHICLE_ID,
            "amount": {**KW, "description": "kW asked for."},
            "state": {"enum": SESSION_STATES},
            "allocated_kw": {**KW, "minimum": 0, "description": "kW the session may draw now."},
            "minimum_kw": {**KW, "minimum": 0, "description": "The least it gets while it charges."},
            "energy_kwh": {**KW, "minimum": 0},
            "suspended_seconds": {**KW, "minimum": 0},
            "started_at": TIME,
            "ends_at": TIME,
            "duration_seconds": {**KW, "exclusiveMinimum": 0},
            "ended_at": TIME,
            "end_reason": {"enum": ["completed", "stopped"]},
            "history": HISTORY,
        },
    }


def capacity_schema() -> Schema:
    """A substation's load and limit at one instant (``substation_service.routes.capacity_json``)."""
    return {
        "type": "object",
        "required": [
            "load", "requested_load", "minimum_load", "capacity", "limit_source", "total_capacity",
            "fair_share_kw", "load_percentage", "available", "active_chargers", "charging", "suspended",
            "curtailed_sessions", "allocation_policy", "min_charge_kw", "state_version",
        ],
        "properties": {
            "load": {**KW, "description": "kW the charging sessions draw together."},
            "requested_load": {**KW, "description": "kW the active sessions ask for together."},
            "minimum_load": {**KW, "description": "Sum of the active sessions' minimums."},
            "capacity": {**KW, "description": "The substation's limit now (operator limit, supply, peers)."},
            "limit_source": {"enum": ["substation", "operator"]},
            "total_capacity": {**KW, "description": "Transformer capacity (`CAPACITY_KW`)."},
            "fair_share_kw": {**NULLABLE_KW, "description": "The max-min fair level; null when nobody is curtailed."},
            "load_percentage": {"type": "number", "minimum": 0},
            "available": {**KW, "minimum": 0},
            "active_chargers": COUNT,
            "charging": COUNT,
            "suspended": COUNT,
            "curtailed_sessions": COUNT,
            "allocation_policy": {"enum": ["fair_share", "strict"]},
            "min_charge_kw": {**NULLABLE_KW, "description": "The least a new session gets."},
            "state_version": COUNT,
        },
    }


def session_with_capacity_schema() -> Schema:
    """What a substation answers to an admission or a stop: the session and the capacity after it."""
    return {"allOf": [substation_session_schema(), capacity_schema()]}


def capacity_exceeded_schema() -> Schema:
    """A substation's 409 ``capacity_exceeded``: the error, the capacity, and when to retry."""
    return {
        "allOf": [
            error_schema(["capacity_exceeded"], substation=SUBSTATION_ID),
            capacity_schema(),
            {"required": ["substation", "retry_after_seconds"],
             "properties": {"retry_after_seconds": retry_after_field("Seconds until a session ends by itself.")}},
        ]
    }


def document(title: str, summary: str, tags: list[tuple[str, str]], paths: Mapping[str, Any],
             components: dict[str, Any]) -> dict[str, Any]:
    """A service's whole OpenAPI document: its title, what it does, its tags, paths and components."""
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": "1.0.0", "description": info_description(summary)},
        "servers": [{"url": "/"}],
        "tags": [{"name": name, "description": description} for name, description in tags],
        "paths": with_server_refusals(paths),
        "components": components,
    }
