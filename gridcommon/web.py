"""What every service's Flask app shares: JSON errors, request ids, access log,
body limits and the /metrics endpoint.

Errors always leave as JSON of one shape::

    {"error": "<machine-readable code>", "message": "<what went wrong and what to do>", ...}

so clients never see an HTML page or a traceback, whatever the path or method.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from flask import Flask, Response, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from werkzeug.exceptions import HTTPException

from gridcommon.validation import ChargeRequest, ValidationError, parse_charge_request
from gridcommon.request_context import (
    REQUEST_ID_HEADER,
    choose_request_id,
    reset_request_id,
    set_request_id,
)

MAX_BODY_BYTES = 16 * 1024

access_log = logging.getLogger("access")
error_log = logging.getLogger("errors")


class ApiError(Exception):
    """An error the client should see, with its status code and JSON body."""

    def __init__(self, status: int, error: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.extra = extra
        self.headers: dict[str, str] = {}

    def with_header(self, name: str, value: str) -> "ApiError":
        self.headers[name] = value
        return self


def error_response(status: int, error: str, message: str, **extra: Any) -> Response:
    response = jsonify({"error": error, "message": message, **extra})
    response.status_code = status
    return response


_HTTP_ERROR_MESSAGES = {
    404: "No such endpoint. See the README's endpoint table for what this service offers.",
    405: "This endpoint does not accept that HTTP method.",
    413: f"Request body too large: at most {MAX_BODY_BYTES} bytes are accepted.",
    415: "Send the body as JSON with the header 'Content-Type: application/json'.",
}


# Scraped or called every few seconds: their access lines only appear at DEBUG level.
ROUTINE_PATHS = frozenset({"/metrics", "/health"})


def install_common(app: Flask, routine_paths: frozenset[str] = ROUTINE_PATHS) -> None:
    """Attach request ids, access logging, JSON errors and the body size limit."""
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False  # keep fields in the order the code builds them

    @app.before_request
    def _start_request() -> None:
        g.request_id = choose_request_id(request.headers.get(REQUEST_ID_HEADER))
        g.request_id_token = set_request_id(g.request_id)
        g.started = time.perf_counter()

    @app.after_request
    def _finish_request(response: Response) -> Response:
        request_id = g.get("request_id")
        if request_id:
            response.headers[REQUEST_ID_HEADER] = request_id
        started = g.get("started")
        if started is not None:
            level = logging.DEBUG if request.path in routine_paths else logging.INFO
            access_log.log(
                level,
                "%s %s -> %s in %.1f ms",
                request.method,
                request.path,
                response.status_code,
                (time.perf_counter() - started) * 1000,
            )
        return response

    @app.teardown_request
    def _forget_request_id(_exc: BaseException | None) -> None:
        token = g.pop("request_id_token", None)
        if token is not None:
            reset_request_id(token)

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        response = error_response(exc.status, exc.error, exc.message, **exc.extra)
        response.headers.update(exc.headers)
        return response

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        message = _HTTP_ERROR_MESSAGES.get(status) or exc.description or exc.name
        response = error_response(status, exc.name.lower().replace(" ", "_"), message)
        if status == 405 and exc.valid_methods:  # type: ignore[attr-defined]
            response.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
        return response

    @app.errorhandler(Exception)
    def _unexpected_error(exc: Exception) -> Response:
        error_log.exception("unhandled error while serving %s %s", request.method, request.path)
        return error_response(
            500,
            "internal_error",
            "The service hit an unexpected error; it has been logged with this request's "
            "X-Request-ID. Retry, and report the id if it persists.",
        )


def json_object_body() -> dict[str, Any]:
    """The request body as a JSON object, or an ApiError saying what is wrong."""
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", _HTTP_ERROR_MESSAGES[415])
    body = request.get_json(silent=True)
    if body is None:
        raise ApiError(400, "invalid_json", "The request body is not valid JSON.")
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "The request body must be a JSON object.")
    return body


def metrics_response(registry: CollectorRegistry) -> Response:
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)


def parse_charge_body(
    max_amount_kw: float, max_duration_seconds: float, accept_session_id: bool = False
) -> ChargeRequest:
    """The request's body as a validated charge request, or a 4xx ApiError naming the field."""
    return charge_from_body(json_object_body(), max_amount_kw, max_duration_seconds, accept_session_id)


def charge_from_body(
    body: dict[str, Any], max_amount_kw: float, max_duration_seconds: float, accept_session_id: bool = False
) -> ChargeRequest:
    """A JSON object already read as a validated charge request, or a 400 ApiError naming the field."""
    try:
        return parse_charge_request(body, max_amount_kw, max_duration_seconds, accept_session_id)
    except ValidationError as exc:
        raise ApiError(400, "invalid_field", exc.message, field=exc.field) from None
