"""The id of the request being served, readable without Flask.

Set by the web layer for each incoming request; read by the log formatter and
by outgoing HTTP calls so one id follows a charge request through every service.
"""
from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

REQUEST_ID_HEADER = "X-Request-ID"

_current_request_id: ContextVar[str] = ContextVar("request_id", default="-")
# Whether the request's log lines below WARNING are written (gridcommon.log_sampling); lines
# written outside any request always are.
_current_request_logged: ContextVar[bool] = ContextVar("request_logged", default=True)

# Ids passed in by clients end up in log lines and in the answer's header: keep them short
# and printable. \Z, not $: "$" also matches before a trailing newline.
_ACCEPTABLE_ID = re.compile(r"\A[A-Za-z0-9._:-]{1,128}\Z")


def current_request_id() -> str:
    return _current_request_id.get()


def set_request_id(request_id: str) -> object:
    return _current_request_id.set(request_id)


def reset_request_id(token: object) -> None:
    _current_request_id.reset(token)  # type: ignore[arg-type]


def current_request_logged() -> bool:
    return _current_request_logged.get()


def set_request_logged(logged: bool) -> object:
    return _current_request_logged.set(logged)


def reset_request_logged(token: object) -> None:
    _current_request_logged.reset(token)  # type: ignore[arg-type]


def choose_request_id(incoming: str | None) -> str:
    """Keep a caller's id when it is sane, otherwise make a new one."""
    if incoming and _ACCEPTABLE_ID.fullmatch(incoming):
        return incoming
    return uuid.uuid4().hex
