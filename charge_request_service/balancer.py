"""Calls from the charge request service to the load balancer.

Every answer is checked before anyone uses it: a status the balancer's API
does not give, a body that is not a JSON object, or an error without
``error`` and ``message`` all count as the balancer being unavailable, so the
client gets one clear 502 instead of whatever came back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import requests

from gridcommon.httpclient import HttpClient
from gridcommon.validation import ChargeRequest

# Used when a 503 arrives without the header; Retry-After is whole seconds >= 1.
DEFAULT_RETRY_AFTER = "1"


class BalancerUnavailable(Exception):
    """The load balancer could not be reached or answered something unusable."""


@dataclass(frozen=True)
class BalancerReply:
    status: int
    body: dict[str, Any]
    retry_after: str | None = None


class BalancerClient:
    def __init__(self, base_url: str, http: HttpClient, health_timeout: tuple[float, float]) -> None:
        self.base_url = base_url
        self._http = http
        self._health_timeout = health_timeout

    def start_charge(self, charge: ChargeRequest) -> BalancerReply:
        """POST /charge: 201 admitted, 400 refused as invalid, 503 no capacity anywhere."""
        reply = self._call("POST", "/charge", expected={201, 400, 503}, json=charge.as_json())
        if reply.status == 503 and reply.retry_after is None:
            return BalancerReply(reply.status, reply.body, DEFAULT_RETRY_AFTER)
        return reply

    def stop_charge(self, substation: str, session_id: str) -> BalancerReply:
        """DELETE /charge/<substation>/<session_id>: 200 stopped, 404 the substation no longer has it.

        A 404 because the balancer no longer knows the substation (deregistered)
        says nothing about the session, which may still be charging there: that
        is ``BalancerUnavailable``, not a 404.
        """
        path = f"/charge/{quote(substation, safe='')}/{quote(session_id, safe='')}"
        reply = self._call("DELETE", path, expected={200, 404})
        if reply.status == 404 and reply.body.get("error") != "session_not_found":
            raise BalancerUnavailable(
                f"the load balancer cannot reach substation {substation} to stop the session "
                f"({reply.body.get('message', reply.body.get('error'))})"
            )
        return reply

    def show_charge(self, substation: str, session_id: str) -> BalancerReply:
        """GET /charge/<substation>/<session_id>: 200 the substation's record, 404 it has none."""
        path = f"/charge/{quote(substation, safe='')}/{quote(session_id, safe='')}"
        reply = self._call("GET", path, expected={200, 404})
        if reply.status == 404 and reply.body.get("error") != "session_not_found":
            raise BalancerUnavailable(
                f"the load balancer cannot reach substation {substation} "
                f"({reply.body.get('message', reply.body.get('error'))})"
            )
        return reply

    def is_healthy(self) -> bool:
        try:
            return self._http.get(f"{self.base_url}/health", timeout=self._health_timeout).ok
        except requests.RequestException:
            return False

    def _call(self, method: str, path: str, expected: set[int], **kwargs: Any) -> BalancerReply:
        url = f"{self.base_url}{path}"
        try:
            response = self._http.request(method, url, **kwargs)
        except requests.Timeout:
            raise BalancerUnavailable(
                f"the load balancer at {self.base_url} did not answer {method} {path} in time"
            ) from None
        except requests.RequestException as exc:
            raise BalancerUnavailable(
                f"the load balancer at {self.base_url} could not be reached ({type(exc).__name__})"
            ) from None
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


def _json_object(response: requests.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _is_error_body(body: dict[str, Any]) -> bool:
    return isinstance(body.get("error"), str) and isinstance(body.get("message"), str)
