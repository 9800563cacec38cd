"""Calls from the charge request service to the load balancers.

There may be several balancers (``LOAD_BALANCER_URL`` lists them): calls go
to the one that answered last and fail over to the next on a connection
error, and, for calls that are safe to repeat, on a timeout. A charge request
whose answer never came may have been admitted: ``NoAnswer`` tells the caller,
who stops that session everywhere before trying again.

Every answer is checked before anyone uses it: a status the balancer's API
does not give, a body that is not a JSON object, or an error without
``error`` and ``message`` all count as the balancer being unavailable, so the
client gets one clear 502 instead of whatever came back.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import requests

from gridcommon.deadline import DEADLINE_HEADER, format_deadline
from gridcommon.httpclient import HttpClient, HttpResponse, NotSent
from gridcommon.validation import ChargeRequest

# Used when a 503 arrives without the header; Retry-After is whole seconds >= 1.
DEFAULT_RETRY_AFTER = "1"
# The balancer answers by the deadline; this much longer lets its answer travel back.
ANSWER_GRACE_SECONDS = 0.5
# A session's live figures are worth a short wait only: past it, the stored record answers, marked not current.
SHOW_READ_SECONDS = 2.0


class BalancerUnavailable(Exception):
    """The load balancer could not be reached or answered something unusable."""


class NoAnswer(BalancerUnavailable):
    """A charge request was sent but its answer never came: it may have been admitted."""


@dataclass(frozen=True)
class BalancerReply:
    status: int
    body: dict[str, Any]
    retry_after: str | None = None


class BalancerClient:
    def __init__(self, base_urls: tuple[str, ...], http: HttpClient, health_timeout: tuple[float, float]) -> None:
        if not base_urls:
            raise ValueError("at least one load balancer URL is needed")
        self.base_urls = base_urls
        self._http = http
        self._health_timeout = health_timeout
        self._preferred = 0
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        """The balancer calls go to first: the one that answered last."""
        return self.base_urls[self._preferred]

    def start_charge(self, charge: ChargeRequest, wait_until: float | None = None) -> BalancerReply:
        """POST /charge: 201 admitted, 400 refused as invalid, 409 larger than every substation's limit,
        503 not placed (the grid is full, unreachable or too slow; the error code says which).

        ``wait_until`` (seconds since the epoch) is when this service stops waiting for the answer.
        The balancer is told a deadline a moment earlier, so its answer arrives in time: no balancer
        or substation admits after it. Raises ``NoAnswer`` when a balancer got the request but did
        not answer.
        """
        headers: dict[str, str] = {}
        timeout = None
        if wait_until is not None:
            headers[DEADLINE_HEADER] = format_deadline(wait_until - ANSWER_GRACE_SECONDS)
            connect, read = self._http.timeout
            timeout = (connect, max(0.05, min(read, wait_until - time.time())))
        reply = self._call("POST", "/charge", expected={201, 400, 409, 503}, repeatable=False,
                           json=charge.as_json(), headers=headers, **({"timeout": timeout} if timeout else {}))
        if reply.status == 503 and reply.retry_after is None:
            return BalancerReply(reply.status, reply.body, DEFAULT_RETRY_AFTER)
        return reply

    def check_charge(self, charge: ChargeRequest) -> BalancerReply:
        """POST /charge/check: 200 it fits under some substation's limit, 409 under none (400 invalid).

        Nothing is reserved or started, so it is asked again elsewhere after any failure.
        """
        return self._call("POST", "/charge/check", expected={200, 400, 409}, repeatable=True, json=charge.as_json())

    def stop_everywhere(self, session_id: str) -> bool:
        """Stop the session wherever it is, and have every substation refuse it from now on.

        True when a balancer answered (the session is stopped, or held nowhere); False when none could
        be asked.
        """
        try:
            self._call("DELETE", f"/sessions/{quote(session_id, safe='')}", expected={200, 404}, repeatable=True)
        except BalancerUnavailable:
            return False
        return True

    def stop_charge(self, substation: str, session_id: str) -> BalancerReply:
        """DELETE /charge/<substation>/<session_id>: 200 stopped, 404 the substation no longer has it.

        A 404 because the balancer no longer knows the substation (deregistered)
        says nothing about the session, which may still be charging there: that
        is ``BalancerUnavailable``, not a 404.
        """
        path = f"/charge/{quote(substation, safe='')}/{quote(session_id, safe='')}"
        reply = self._call("DELETE", path, expected={200, 404}, repeatable=True)
        if reply.status == 404 and reply.body.get("error") != "session_not_found":
            raise BalancerUnavailable(
                f"the load balancer cannot reach substation {substation} to stop the session "
                f"({reply.body.get('message', reply.body.get('error'))})"
            )
        return reply

    def show_charge(self, substation: str, session_id: str) -> BalancerReply:
        """GET /charge/<substation>/<session_id>: 200 the substation's record, 404 it has none."""
        path = f"/charge/{quote(substation, safe='')}/{quote(session_id, safe='')}"
        connect, read = self._http.timeout
        reply = self._call("GET", path, expected={200, 404}, repeatable=True,
                           timeout=(connect, min(read, SHOW_READ_SECONDS)))
        if reply.status == 404 and reply.body.get("error") != "session_not_found":
            raise BalancerUnavailable(
                f"the load balancer cannot reach substation {substation} "
                f"({reply.body.get('message', reply.body.get('error'))})"
            )
        return reply

    def is_healthy(self) -> bool:
        """Whether any balancer answers /health."""
        for base_url in self.base_urls:
            try:
                if self._http.get(f"{base_url}/health", timeout=self._health_timeout).ok:
                    return True
            except requests.RequestException:
                continue
        return False

    def _call(self, method: str, path: str, expected: set[int], repeatable: bool, **kwargs: Any) -> BalancerReply:
        """Ask the balancers in turn, the last one that answered first.

        A connection that could not be made means the request was never sent: the next balancer is
        asked. A timeout or a connection broken after sending is asked again elsewhere only when the
        call is ``repeatable``; otherwise it is ``NoAnswer``.
        """
        failures: list[str] = []
        with self._lock:
            first = self._preferred
        order = [(first + offset) % len(self.base_urls) for offset in range(len(self.base_urls))]
        for index in order:
            base_url = self.base_urls[index]
            try:
                response = self._http.request(method, f"{base_url}{path}", **kwargs)
            except requests.RequestException as exc:
                never_sent = isinstance(exc, (requests.ConnectTimeout, NotSent))
                if not never_sent and not repeatable:
                    self._avoid(index)
                    kind = "did not answer in time" if isinstance(exc, requests.Timeout) else "broke the connection"
                    raise NoAnswer(f"the load balancer at {base_url} {kind} for {method} {path}") from None
                failures.append(f"{base_url}: {_describe(exc)}")
                continue
            with self._lock:
                self._preferred = index
            return self._checked(method, path, expected, response)
        raise BalancerUnavailable(f"no load balancer answered {method} {path} ({'; '.join(failures)})")

    def _avoid(self, index: int) -> None:
        with self._lock:
            if self._preferred == index:
                self._preferred = (index + 1) % len(self.base_urls)

    def _checked(self, method: str, path: str, expected: set[int], response: HttpResponse) -> BalancerReply:
        if response.status_code not in expected:
            raise BalancerUnavailable(
                f"the load balancer answered {method} {path} with unexpected HTTP {response.status_code}"
            )
        body = _json_object(response)
        if body is None:
            raise BalancerUnavailable(
                f"the load balancer answered {method} {path} with a body that is not a JSON object"
            )
        if response.status_code >= 400 and not _is_error_body(body):
            raise BalancerUnavailable(
                f"the load balancer answered {method} {path} with HTTP {response.status_code} but no error and message"
            )
        return BalancerReply(response.status_code, body, response.headers.get("Retry-After"))


def _describe(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.Timeout):
        return "no answer in time"
    if isinstance(exc, requests.ConnectionError):
        return "could not be reached"
    return f"request failed ({type(exc).__name__})"


def _json_object(response: HttpResponse) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _is_error_body(body: dict[str, Any]) -> bool:
    return isinstance(body.get("error"), str) and isinstance(body.get("message"), str)
