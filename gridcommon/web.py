"""What every service's Flask app shares: JSON errors, request ids, access log,
body limits and the /metrics endpoint.

Errors always leave as JSON of one shape::

    {"error": "<machine-readable code>", "message": "<what went wrong and what to do>", ...}

so clients never see an HTML page or a traceback, whatever the path, method or
body. Hostile input is a 4xx like any other mistake: a body nested thousands of
levels deep, a key given twice, bytes that are not UTF-8, a path with a control
character in it. Error bodies say what was wrong without naming an internal host,
URL or exception class.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any

import orjson
from flask import Flask, Request, Response, g, jsonify, request
from flask.json.provider import DefaultJSONProvider
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge
from werkzeug.wsgi import LimitedStream

from gridcommon import jsonfast, logs
from gridcommon.log_sampling import REQUEST_LOGGED_HEADER
from gridcommon.request_context import (
    REQUEST_ID_HEADER,
    choose_request_id,
    reset_request_id,
    reset_request_logged,
    set_request_id,
    set_request_logged,
)
from gridcommon.sqlitestate import StateFileError
from gridcommon.validation import ChargeRequest, ValidationError, parse_charge_request

MAX_BODY_BYTES = 16 * 1024
# No request of any service nests deeper than a few levels; a deep one is an attack on the
# parser (Python's json raises RecursionError, which is not a ValueError) or on whoever
# walks the result later.
MAX_JSON_DEPTH = 32

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


class InvalidJson(ValueError):
    """A request body that is not one well-formed JSON document; the message says why."""


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # With a key given twice, two parsers can read two different requests from one body
    # (which "amount" counts?); none of our clients ever sends one.
    body = dict(pairs)
    if len(body) != len(pairs):
        raise InvalidJson("an object in it has the same key more than once")
    return body


def _nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests objects or arrays more than ``limit`` levels deep (no recursion)."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > limit:
            return True
        pending.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


NOT_UTF8 = "it is not UTF-8 text (UTF-16 and UTF-32 are not accepted)"


def utf8_text(data: bytes | bytearray) -> str:
    """``data`` decoded as UTF-8, or an :class:`InvalidJson` saying it is not.

    json.loads would read bytes in UTF-16 or UTF-32 as well (it guesses the encoding from the
    first bytes), so a body the docs refuse would be admitted. A NUL byte never occurs in UTF-8
    JSON (it is not allowed even inside a string) but fills every UTF-16 or UTF-32 character
    of ASCII text, BOM or not. A UTF-8 byte order mark is tolerated, as RFC 8259 allows.
    """
    if b"\x00" in data:
        raise InvalidJson(NOT_UTF8)
    try:
        return bytes(data).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidJson(NOT_UTF8) from None


def loads_request_json(data: str | bytes, **kwargs: Any) -> Any:
    """Parse a request body; every way it can fail is an :class:`InvalidJson` saying how.

    NaN and Infinity are still read (as Python's json does): the fields' own checks refuse
    them, naming the field.
    """
    kwargs.setdefault("object_pairs_hook", _refuse_duplicate_keys)
    if isinstance(data, (bytes, bytearray)):
        data = utf8_text(data)
    try:
        value = json.loads(data, **kwargs)
    except InvalidJson:
        raise
    except RecursionError:
        raise InvalidJson(f"it is nested more than {MAX_JSON_DEPTH} levels deep") from None
    except json.JSONDecodeError as exc:
        # exc.msg names the problem ("Expecting value") without quoting the body.
        raise InvalidJson(f"{exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except (ValueError, TypeError):
        # e.g. an integer of more than 4300 digits
        raise InvalidJson("it could not be read as JSON") from None
    if isinstance(value, (dict, list)) and _nested_deeper_than(value, MAX_JSON_DEPTH):
        raise InvalidJson(f"it is nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def invalid_json(exc: ValueError) -> ApiError:
    reason = str(exc) if isinstance(exc, InvalidJson) else "it could not be read as JSON"
    return ApiError(400, "invalid_json", f"The request body is not valid JSON: {reason}. Send one JSON object.")


# Types Flask's JSON converts its own way (dates as HTTP dates, dataclasses as dicts): orjson hands them over.
FLASK_CONVERTS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


class StrictJSONProvider(DefaultJSONProvider):
    """Flask's JSON, reading request bodies with :func:`loads_request_json`'s rules, writing with orjson.

    Covers ``request.get_json()`` wherever an endpoint calls it, not only
    :func:`json_object_body`. Answers follow ``sort_keys`` as Flask's do, and
    dates and dataclasses go through Flask's own conversion, so they read as before.
    """

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return loads_request_json(s, **kwargs)

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        if kwargs:  # indentation or other json.dumps options: the standard library's
            return super().dumps(obj, **kwargs)
        return self._encode(obj).decode()

    def response(self, *args: Any, **kwargs: Any) -> Response:
        if (self.compact is None and self._app.debug) or self.compact is False:
            return super().response(*args, **kwargs)  # indented for reading
        body = self._encode(self._prepare_response_obj(args, kwargs))
        return self._app.response_class(body + b"\n", mimetype=self.mimetype)

    def _encode(self, obj: Any) -> bytes:
        return jsonfast.dumps(obj, sort_keys=self.sort_keys, default=self.default, passthrough=FLASK_CONVERTS)


class JsonErrorRequest(Request):
    """A request whose JSON failures are the same JSON errors as everywhere else."""

    # Whether a body sent without Content-Length went on past the size limit; None until read.
    _over_limit: bool | None = None

    def get_data(  # type: ignore[override]
        self, cache: bool = True, as_text: bool = False, parse_form_data: bool = False
    ) -> bytes | str:
        data = super().get_data(cache=cache, as_text=as_text, parse_form_data=parse_form_data)
        if self._over_limit is None:
            self._over_limit = self._stream_went_past_limit()
        if self._over_limit:
            raise RequestEntityTooLarge()
        return data

    def _stream_went_past_limit(self) -> bool:
        # A chunked body (no Content-Length) is read through werkzeug's LimitedStream, whose
        # read-all stops at MAX_CONTENT_LENGTH and hands back what it has without a 413: the
        # body, cut short, would then be refused as invalid JSON. One byte more tells.
        stream = self.stream
        if self.content_length is not None or not isinstance(stream, LimitedStream) or not stream.is_exhausted:
            return False
        return self.input_stream.read(1) != b""

    def get_json(self, force: bool = False, silent: bool = False, cache: bool = True) -> Any:
        try:
            return super().get_json(force=force, silent=silent, cache=cache)
        except RequestEntityTooLarge:
            # silent=True promises None instead of an error, but werkzeug raises a body's size
            # anyway: a caller peeking at the body (a rate limiter's key) would fail on it. The
            # endpoint's own read of the body still answers 413.
            if silent:
                return None
            raise

    def on_json_loading_failed(self, e: ValueError | None) -> Any:
        if e is None:
            raise ApiError(415, "unsupported_media_type", _HTTP_ERROR_MESSAGES[415])
        raise invalid_json(e)


# A control character (a newline, NUL, ESC, NEL...) or Unicode line separator anywhere in the
# decoded path: no endpoint has an id like that, and in a log line it would start a forged one.
_UNSAFE_IN_PATH = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _check_path(path: str) -> None:
    if _UNSAFE_IN_PATH.search(path) or any(segment in (".", "..") for segment in path.split("/")):
        raise ApiError(
            400,
            "invalid_path",
            "The URL path contains a control character or a '.' or '..' segment; no endpoint takes one. "
            "Ids in paths are made of letters, digits, '.', '_' and '-'.",
        )


_HTTP_ERROR_MESSAGES = {
    404: "No such endpoint. GET /openapi.json lists what this service offers.",
    405: "This endpoint does not accept that HTTP method.",
    413: f"Request body too large: at most {MAX_BODY_BYTES} bytes are accepted.",
    415: "Send the body as JSON with the header 'Content-Type: application/json'.",
}


# An answer that took this long has its access line written even when its request is not sampled.
SLOW_REQUEST_SECONDS = 1.0

# How long a client is asked to wait when the state file cannot be written.
STATE_RETRY_SECONDS = 5
# Scraped or called every few seconds: their access lines only appear at DEBUG level.
ROUTINE_PATHS = frozenset({"/metrics", "/health"})


def allow_header(methods: Iterable[str]) -> str:
    """The Allow header of a 405: the path's methods, sorted, without OPTIONS.

    Flask gives every rule OPTIONS, and werkzeug lists a path's methods in set order, which
    changes from one process to the next; but OPTIONS is itself answered 405 here, so a 405
    to PATCH or HEAD must not offer it, and every service must list the same methods alike.
    """
    return ", ".join(sorted(set(methods) - {"OPTIONS"}))


def install_common(app: Flask, routine_paths: frozenset[str] = ROUTINE_PATHS) -> None:
    """Attach request ids, access logging, JSON errors, strict JSON bodies and the body size limit."""
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json = StrictJSONProvider(app)
    app.json.sort_keys = False  # keep fields in the order the code builds them
    app.request_class = JsonErrorRequest
    answer_server_refusals_as_json()

    @app.before_request
    def _start_request() -> None:
        named = request.headers.get(REQUEST_ID_HEADER)
        g.request_id = choose_request_id(named)
        g.request_id_token = set_request_id(g.request_id)
        g.request_logged_token = set_request_logged(
            logs.request_sampler.decide(request.headers.get(REQUEST_LOGGED_HEADER), g.request_id == named)
        )
        g.started = time.perf_counter()
        _check_path(request.path)
        if request.method == "OPTIONS" and request.url_rule is not None:
            # Flask would answer an empty 200 on its own; no client here needs CORS preflights,
            # and every answer is JSON. Allow lists the methods of every rule for this path (GET,
            # PUT and DELETE /limit are three rules), as Flask's own 405 does.
            methods = app.create_url_adapter(request).allowed_methods()  # type: ignore[union-attr]
            raise MethodNotAllowed(valid_methods=methods)

    @app.after_request
    def _finish_request(response: Response) -> Response:
        request_id = g.get("request_id")
        if request_id:
            response.headers[REQUEST_ID_HEADER] = request_id
        started = g.get("started")
        if started is not None:
            elapsed = time.perf_counter() - started
            level = logging.DEBUG if request.path in routine_paths else logging.INFO
            # Refusals, failures and slow answers are written even for a request left out of the sample.
            always = response.status_code >= 400 or elapsed >= SLOW_REQUEST_SECONDS
            token = set_request_logged(True) if always else None
            access_log.log(
                level,
                "%s %s -> %s in %.1f ms from %s",
                request.method,
                request.path,
                response.status_code,
                elapsed * 1000,
                request.remote_addr or "-",  # the client's own address, behind the edge too (gridcommon.serve)
            )
            if token is not None:
                reset_request_logged(token)
        return response

    @app.teardown_request
    def _forget_request_id(_exc: BaseException | None) -> None:
        token = g.pop("request_id_token", None)
        if token is not None:
            reset_request_id(token)
        token = g.pop("request_logged_token", None)
        if token is not None:
            reset_request_logged(token)

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
            response.headers["Allow"] = allow_header(exc.valid_methods)  # type: ignore[attr-defined]
        return response

    @app.errorhandler(StateFileError)
    def _state_unavailable(exc: StateFileError) -> Response:
        # A full or broken disk: the change was not committed, so nobody may be told it was made.
        error_log.error("serving %s %s: %s", request.method, request.path, exc)
        response = error_response(
            503,
            "state_unavailable",
            f"The service could not record the change, so it did not answer it as made: {exc}. Retry later; "
            f"the operator should check {exc.operator_check}.",
            retry_after_seconds=STATE_RETRY_SECONDS,
        )
        response.headers["Retry-After"] = str(STATE_RETRY_SECONDS)
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
    """The request body as a JSON object, or an ApiError saying what is wrong (never a 500)."""
    # Parsed once per request: a rate limit that needs the vehicle reads it before the endpoint does.
    body = g.get("json_object_body")
    if body is not None:
        return body
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", _HTTP_ERROR_MESSAGES[415])
    # Parsed here rather than with request.get_json(), so the rules hold even in an app
    # that did not install StrictJSONProvider. get_data() enforces MAX_CONTENT_LENGTH (413).
    try:
        body = loads_request_json(request.get_data(cache=True))
    except InvalidJson as exc:
        raise invalid_json(exc) from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "The request body must be a JSON object.")
    g.json_object_body = body
    return body


def metrics_response(registry: CollectorRegistry) -> Response:
    """The registry's page; with ``name[]=...`` in the query, only those series (as prometheus-client's own
    exporter does). Pollers that read a few families ask for them: the page is built for them alone."""
    names = request.args.getlist("name[]")
    page = generate_latest(registry.restricted_registry(names) if names else registry)
    # content_type, not mimetype: prometheus-client's type already names its charset; Werkzeug would add another.
    return Response(page, content_type=CONTENT_TYPE_LATEST)


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


# Refusals by gunicorn itself ---------------------------------------------------------

# gunicorn answers a request it cannot parse (a raw newline or NUL in a header or the request
# line, a header over 8190 bytes, a request line over 4094) before any app sees it, with an
# HTML page that quotes the offending line. These say the same without quoting anything.
_SERVER_REFUSALS = {
    400: ("bad_request", "The request is not valid HTTP/1.1: its request line, method or a header is malformed "
                         "(control characters are not allowed in any of them). Fix the request and send it again."),
    403: ("forbidden", "The request was refused before it reached the service."),
    414: ("uri_too_long", "The request line is too long: keep the URL under 4 KiB."),
    417: ("expectation_failed", "The request's Expect header is not supported; send the request without it."),
    431: ("request_header_fields_too_large", "A request header is too large, or there are too many of them: "
                                             "keep each header under 8 KiB."),
    501: ("not_implemented", "The request's Transfer-Encoding is not supported; send the body with a "
                             "Content-Length instead."),
}


def _write_server_refusal(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    from gunicorn import util  # only ever called by gunicorn, so it is there

    error, message = _SERVER_REFUSALS.get(
        status_int,
        ("internal_error", "The server could not handle the request. Retry; report it if it persists.")
        if status_int >= 500
        else ("bad_request", _SERVER_REFUSALS[400][1]),
    )
    body = json.dumps({"error": error, "message": message}).encode()
    # reason is gunicorn's own fixed phrase ("Bad Request"), never the client's text.
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


def answer_server_refusals_as_json() -> None:
    """Make gunicorn's own refusals JSON errors of the usual shape (in a gunicorn worker only).

    gunicorn offers no hook for them: its workers call ``gunicorn.util.write_error``,
    which this replaces. Outside gunicorn (tests' Flask clients) it does nothing.
    """
    util = sys.modules.get("gunicorn.util")
    if util is None or not callable(getattr(util, "write_error", None)) or not hasattr(util, "write_nonblock"):
        return
    util.write_error = _write_server_refusal
