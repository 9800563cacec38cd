"""The operator console at /console: a login form, the page, its live stream and its actions.

Every action is forwarded to the substation's own operator API with the operator token,
after the console login and its CSRF token are checked: the page has no way of its own to
change anything. Substations are named by id and looked up in the latest snapshot, so the
browser never chooses where the server sends a request.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, redirect, render_template, request, stream_with_context

from charge_request_service.console.feed import Feed, StreamsFull
from charge_request_service.console.grid import GridReader
from charge_request_service.console.logins import FormTokens, Login, Logins, csrf_matches
from charge_request_service.console.throttle import LoginThrottle
from gridcommon.auth import token_matches
from gridcommon.httpclient import HttpClient
from gridcommon.validation import SESSION_ID_PATTERN, finite_number
from gridcommon.web import ApiError, json_object_body

log = logging.getLogger("charge.console")
console = Blueprint("console", __name__, url_prefix="/console", template_folder="templates",
                    static_folder="static", static_url_path="/static")

EXTENSION_KEY = "charge_request_service.console"
COOKIE = "console_login"
# The login form's half of its double-submit token; the other half is the form's hidden field.
FORM_COOKIE = "console_form"
CSRF_HEADER = "X-CSRF-Token"
# No inline script or style anywhere, no frame around the page, nothing from elsewhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# How long a new stream's client waits before reconnecting after the stream drops (SSE's retry).
RECONNECT_MILLISECONDS = 1000


class ConsoleState:
    """What the console's endpoints share: the logins, the feed and the client its actions use."""

    def __init__(self, reader: GridReader, logins: Logins, feed: Feed, http: HttpClient, admin_token: str,
                 throttle: LoginThrottle) -> None:
        self.reader = reader
        self.logins = logins
        self.form_tokens = FormTokens()
        self.throttle = throttle
        self.feed = feed
        self.http = http
        self.admin_token = admin_token


def state() -> ConsoleState:
    return current_app.extensions[EXTENSION_KEY]


@console.after_request
def _console_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    if not request.path.startswith("/console/static/"):
        response.headers["Cache-Control"] = "no-store"
    return response


def current_login() -> Login | None:
    return state().logins.find(request.cookies.get(COOKIE))


def require_login() -> Login:
    login = current_login()
    if login is None:
        raise ApiError(401, "console_login_required",
                       "No console login, or it has expired. Open /console and log in with the operator token.")
    return login


def require_action(login: Login) -> None:
    # The page's scripts send it as a header; the logout form, which has no script, as a field.
    given = request.headers.get(CSRF_HEADER) or request.form.get("csrf_token")
    if not csrf_matches(login, given):
        raise ApiError(403, "csrf_token_mismatch",
                       f"The request lacks this login's {CSRF_HEADER} header. Reload /console and try again.")


@console.get("/")
def page() -> Response | str:
    login = current_login()
    if login is None:
        return login_form()
    return render_template("console/page.html", csrf_token=login.csrf_token)


def login_form(problem: str | None = None, status: int = 200) -> Response:
    """The form, with a fresh CSRF token in its hidden field and the matching nonce in a cookie."""
    current = state()
    disabled = not current.admin_token
    nonce, form_token = current.form_tokens.issue()
    body = render_template("console/login.html", problem=problem, disabled=disabled, csrf_token=form_token)
    response = Response(body, status=403 if disabled else status, mimetype="text/html")
    if not disabled:
        response.set_cookie(FORM_COOKIE, nonce, httponly=True, samesite="Strict", secure=request.is_secure,
                            path="/console")
    return response


def login_refused(status: int, code: str, problem: str, retry_after: int | None = None) -> Response:
    """The refusal as the login form (a browser's post) or as the usual JSON error (a client asking for JSON)."""
    if request.accept_mimetypes.best_match(["text/html", "application/json"]) == "application/json":
        extra = {} if retry_after is None else {"retry_after_seconds": retry_after}
        error = ApiError(status, code, problem, **extra)
        if retry_after is not None:
            error.with_header("Retry-After", str(retry_after))
        raise error
    response = login_form(problem, status=status)
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


@console.post("/login")
def log_in() -> Response:
    current = state()
    if not current.admin_token:
        return login_form()
    address = request.remote_addr or "(unknown)"
    refusal = current.throttle.refusal(address)
    if refusal is not None:
        log.warning("console login refused from %s: %s", address, refusal.message)
        return login_refused(429, "too_many_failed_logins", refusal.message, refusal.retry_after_seconds)
    if not current.form_tokens.matches(request.cookies.get(FORM_COOKIE), request.form.get("csrf_token")):
        log.warning("console login refused from %s: the form's CSRF token is missing or stale", address)
        return login_refused(403, "csrf_token_mismatch",
                             "This login form is stale or was not sent from this console. "
                             "Log in again with the form now shown (reload /console).")
    given = request.form.get("token", "")
    if not token_matches(given, current.admin_token):
        current.throttle.failed(address)
        log.warning("console login refused from %s: wrong operator token", address)
        return login_refused(401, "wrong_operator_token",
                             "That is not the operator token. Check ADMIN_TOKEN and try again.")
    login_id, _ = current.logins.open()
    log.info("console login from %s", address)
    response = redirect("/console/", code=303)
    response.delete_cookie(FORM_COOKIE, path="/console", httponly=True, samesite="Strict", secure=request.is_secure)
    response.set_cookie(COOKIE, login_id, httponly=True, samesite="Strict", secure=request.is_secure,
                        path="/console", max_age=int(current.logins.lifetime_seconds))
    return response


@console.post("/logout")
def log_out() -> Response:
    login = require_login()
    require_action(login)
    state().logins.close(request.cookies.get(COOKIE))
    response = redirect("/console/", code=303)
    response.delete_cookie(COOKIE, path="/console", httponly=True, samesite="Strict", secure=request.is_secure)
    return response


@console.get("/snapshot")
def snapshot() -> Response:
    require_login()
    latest = state().feed.latest(timeout=5.0)
    if latest is None:
        raise ApiError(503, "snapshot_unavailable", "The grid could not be read yet; retry in a second.")
    return current_app.json.response(latest)


@console.get("/events")
def events() -> Response:
    require_login()
    feed = state().feed
    try:
        feed.open_stream()
    except StreamsFull:
        raise ApiError(
            503, "too_many_streams",
            f"{feed.max_streams} console(s) already follow the live stream (CONSOLE_MAX_STREAMS), each holding "
            "a server thread. Close a console tab, or raise CONSOLE_MAX_STREAMS.",
        ).with_header("Retry-After", "5") from None

    def stream() -> Iterator[bytes]:
        try:
            yield f"retry: {RECONNECT_MILLISECONDS}\n\n".encode()
            number = 0
            while True:
                number, event = feed.next_event(number)
                yield event
        finally:
            feed.close_stream()

    response = Response(stream_with_context(stream()), mimetype="text/event-stream")
    # nginx (the edge) would otherwise buffer the stream; no cache may keep it either.
    response.headers["X-Accel-Buffering"] = "no"
    response.headers["Cache-Control"] = "no-store"
    return response


# Actions --------------------------------------------------------------------------


def substation_url(substation_id: Any) -> str:
    latest = state().feed.latest(timeout=5.0) or {}
    for card in latest.get("substations", []):
        if card.get("id") == substation_id and card.get("url"):
            return card["url"]
    raise ApiError(404, "substation_not_found", f"No substation {substation_id!r} is known to the balancers now.",
                   field="substation")


def forward(method: str, url: str, body: dict[str, Any] | None = None) -> Response:
    current = state()
    try:
        answer = current.http.request(method, url, json=body,
                                      headers={"Authorization": f"Bearer {current.admin_token}"})
    except Exception as exc:  # noqa: BLE001 - any failure to reach the substation is one answer
        log.warning("console action %s %s failed: %s", method, url, exc)
        raise ApiError(502, "substation_unreachable",
                       "The substation did not answer the action in time; nothing may have changed. "
                       "Check its health on the page and retry.") from None
    try:
        payload = answer.json()
    except ValueError:
        payload = {"error": "invalid_answer", "message": "The substation's answer was not JSON."}
    log.info("console action %s %s -> %d", method, url, answer.status_code)
    response = current_app.json.response(payload)
    response.status_code = answer.status_code
    return response


@console.post("/actions/limit")
def set_limit() -> Response:
    require_action(require_login())
    body = json_object_body()
    if body.get("limit_kw") is None:
        return forward("DELETE", f"{substation_url(body.get('substation'))}/limit")
    limit_kw = finite_number(body.get("limit_kw"))
    if limit_kw is None or limit_kw < 0:
        raise ApiError(400, "invalid_field", "limit_kw must be a number of kW of at least 0, or null to clear it.",
                       field="limit_kw")
    return forward("PUT", f"{substation_url(body.get('substation'))}/limit", {"limit_kw": limit_kw})


@console.post("/actions/stop")
def stop_session() -> Response:
    require_action(require_login())
    body = json_object_body()
    session_id = body.get("session_id")
    if not isinstance(session_id, str) or not SESSION_ID_PATTERN.fullmatch(session_id):
        raise ApiError(400, "invalid_field", "session_id must be a session id (A-Z, a-z, 0-9, '_', '-').",
                       field="session_id")
    url = substation_url(body.get("substation"))
    return forward("DELETE", f"{url}/charge/{session_id}")


@console.post("/actions/policy")
def set_policy() -> Response:
    require_action(require_login())
    body = json_object_body()
    policy = body.get("policy")
    if not isinstance(policy, str) or not policy:
        raise ApiError(400, "invalid_field", "policy must name an allocation policy.", field="policy")
    url = substation_url(body.get("substation"))
    return forward("PUT", f"{url}/allocation-policy", {"policy": policy})
