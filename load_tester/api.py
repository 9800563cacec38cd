"""The calls the load tester makes to the stack, over one pooled HTTP client.

Every call goes through ``HttpClient``, which never sends without a timeout.
"""
from __future__ import annotations

from typing import Any
from urllib.parse import urljoin

import requests

from gridcommon.httpclient import HttpClient, HttpResponse
from gridcommon.request_context import REQUEST_ID_HEADER

USER_AGENT = "smart-grid-load-tester/0.1"


class StackError(RuntimeError):
    """The stack could not be reached or refused an administrative call; the message says what to do."""


class GridClient:
    """The charge request service (``target``), the balancer (status and admin API) and, at the URLs the
    balancer lists, the substations (their sessions, limits and allocation policy)."""

    def __init__(
        self,
        target: str,
        balancer: str,
        *,
        admin_token: str = "",
        connect_timeout: float = 2.0,
        read_timeout: float = 10.0,
        pool_size: int = 32,
    ) -> None:
        self.target = target.rstrip("/")
        self.balancer = balancer.rstrip("/")
        self.admin_token = admin_token
        self.http = HttpClient(USER_AGENT, timeout=(connect_timeout, read_timeout), pool_size=pool_size)

    def close(self) -> None:
        self.http.close()

    def charge(self, body: dict[str, Any], request_id: str) -> HttpResponse:
        """``POST /charge``; with ``PUBLIC_API_AUTH=keys`` the charge API needs a client key or the operator's
        token: the tester, run by the operator, asks as the operator when it has the token (no key quotas)."""
        headers = {REQUEST_ID_HEADER: request_id}
        if self.admin_token:
            headers["Authorization"] = f"Bearer {self.admin_token}"
        return self.http.post(f"{self.target}/charge", json=body, headers=headers)

    def follow(self, location: str, request_id: str, session_token: str | None = None) -> HttpResponse:
        """``GET`` a session at the charge API (a queued request's ``Location``: ``/sessions/<id>``)."""
        return self.http.get(self._at_target(location), headers=self._session_headers(request_id, session_token))

    def cancel(self, location: str, request_id: str, session_token: str | None = None) -> HttpResponse:
        """``DELETE`` a queued request's ``Location``: it leaves the queue (or stops, if it just started)."""
        return self.http.delete(self._at_target(location), headers=self._session_headers(request_id, session_token))

    def _at_target(self, location: str) -> str:
        return urljoin(f"{self.target}/", location)

    def _session_headers(self, request_id: str, session_token: str | None) -> dict[str, str]:
        """The session's own token (from the answer that started it), else the operator's, if any."""
        headers = {REQUEST_ID_HEADER: request_id}
        token = session_token or self.admin_token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def stop_session(self, session_id: str, request_id: str, session_token: str | None = None) -> int:
        """Stop a session through the charge API; 404 means it had already ended."""
        return self.cancel(f"/sessions/{session_id}", request_id, session_token).status_code

    def balancer_status(self) -> dict[str, Any]:
        url = f"{self.balancer}/status"
        try:
            response = self.http.get(url)
            response.raise_for_status()
            body = response.json()
        except requests.RequestException as exc:
            raise StackError(f"cannot read {url} ({exc.__class__.__name__}): is the balancer running?") from exc
        except ValueError as exc:
            raise StackError(f"{url} did not answer JSON: is --balancer the balancer's URL?") from exc
        if not isinstance(body, dict):
            raise StackError(f"{url} answered something other than a JSON object: is --balancer the balancer's URL?")
        return body

    def substations(self) -> list[tuple[str, str]]:
        """(id, url) of every substation the balancer knows, from its ``GET /substations``."""
        body = self._get_json(f"{self.balancer}/substations", "the balancer", "--balancer")
        entries = body.get("substations")
        found = []
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict) and isinstance(entry.get("id"), str) and isinstance(entry.get("url"), str):
                found.append((entry["id"], entry["url"].rstrip("/")))
        return found

    def substation_sessions(self, url: str, *, history: bool = False, ended: bool = False) -> dict[str, Any]:
        query = "&".join(name for name, wanted in (("history=1", history), ("ended=1", ended)) if wanted)
        return self._get_json(f"{url}/sessions{'?' + query if query else ''}", "the substation", url)

    def substation_limit(self, url: str) -> dict[str, Any]:
        return self._get_json(f"{url}/limit", "the substation", url)

    def set_substation_limit(self, url: str, limit_kw: float) -> dict[str, Any]:
        return self._operator("PUT", f"{url}/limit", "the substation", json={"limit_kw": limit_kw})

    def lift_substation_limit(self, url: str) -> dict[str, Any]:
        return self._operator("DELETE", f"{url}/limit", "the substation")

    def allocation_policy(self, url: str) -> tuple[str, list[str] | None]:
        """A substation's allocation policy, and the ones it offers if it lists them."""
        body = self._get_json(f"{url}/allocation-policy", "the substation", url)
        policy = body.get("policy")
        if not isinstance(policy, str):
            raise StackError(f"{url}/allocation-policy did not name a policy: {body}")
        available = body.get("available")
        offered = [name for name in available if isinstance(name, str)] if isinstance(available, list) else None
        return policy, offered

    def set_allocation_policy(self, url: str, policy: str) -> dict[str, Any]:
        return self._operator("PUT", f"{url}/allocation-policy", "the substation", json={"policy": policy})

    def _get_json(self, url: str, name: str, where: str) -> dict[str, Any]:
        try:
            response = self.http.get(url)
            response.raise_for_status()
            body = response.json()
        except requests.RequestException as exc:
            raise StackError(f"cannot read {url} ({exc.__class__.__name__}): is {name} at {where} running?") from exc
        except ValueError as exc:
            raise StackError(f"{url} did not answer JSON: is {where} {name}'s URL?") from exc
        if not isinstance(body, dict):
            raise StackError(f"{url} answered something other than a JSON object: is {where} {name}'s URL?")
        return body

    def check_reachable(self, name: str, url: str, option: str) -> None:
        try:
            response = self.http.get(f"{url}/health")
        except requests.RequestException as exc:
            raise StackError(
                f"cannot reach the {name} at {url} ({exc.__class__.__name__}). "
                f"Start the stack (make run, or docker compose up) or point {option} at it."
            ) from exc
        if not response.ok:
            raise StackError(f"the {name} at {url} answered /health with HTTP {response.status_code}: is it healthy?")

    def policies(self) -> tuple[str, list[str] | None]:
        """The balancer's current routing policy, and the ones it offers if it lists them."""
        body = self._admin("GET")
        policy = body.get("policy")
        if not isinstance(policy, str):
            raise StackError(f"the balancer's GET /admin/policy did not name a policy: {body}")
        available = body.get("available")
        offered = [name for name in available if isinstance(name, str)] if isinstance(available, list) else None
        return policy, offered

    def set_policy(self, policy: str) -> None:
        self._admin("PUT", json={"policy": policy})

    def _admin(self, method: str, **kwargs: Any) -> dict[str, Any]:
        return self._operator(method, f"{self.balancer}/admin/policy", "the balancer", **kwargs)

    def _operator(self, method: str, url: str, name: str, **kwargs: Any) -> dict[str, Any]:
        """A call of an operator API, with the ``ADMIN_TOKEN`` as its bearer token."""
        try:
            response = self.http.request(method, url, headers={"Authorization": f"Bearer {self.admin_token}"}, **kwargs)
        except requests.RequestException as exc:
            raise StackError(f"cannot reach the operator API of {name} at {url}: {exc.__class__.__name__}") from exc
        try:
            body = response.json()
        except ValueError:
            body = {}
        if not response.ok:
            message = body.get("message") if isinstance(body, dict) else None
            hint = f" Set ADMIN_TOKEN to {name}'s admin token." if response.status_code in (401, 403) else ""
            detail = message or response.text[:200]
            raise StackError(f"{method} {url} answered HTTP {response.status_code}: {detail}.{hint}")
        return body if isinstance(body, dict) else {}
