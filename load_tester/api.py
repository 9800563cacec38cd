"""The calls the load tester makes to the stack, over one pooled HTTP client."""
from __future__ import annotations

from typing import Any

import requests

from gridcommon.httpclient import HttpClient
from gridcommon.request_context import REQUEST_ID_HEADER

USER_AGENT = "smart-grid-load-tester/0.1"


class StackError(RuntimeError):
    """The stack could not be reached or refused an administrative call; the message says what to do."""


class GridClient:
    """The charge request service (``target``) and the balancer (status and admin API)."""

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

    def charge(self, body: dict[str, Any], request_id: str) -> requests.Response:
        return self.http.post(f"{self.target}/charge", json=body, headers={REQUEST_ID_HEADER: request_id})

    def stop_session(self, session_id: str, request_id: str) -> int:
        """Stop a session through the charge API; 404 means it had already ended."""
        response = self.http.delete(f"{self.target}/sessions/{session_id}", headers={REQUEST_ID_HEADER: request_id})
        return response.status_code

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
        url = f"{self.balancer}/admin/policy"
        try:
            response = self.http.request(method, url, headers={"Authorization": f"Bearer {self.admin_token}"}, **kwargs)
        except requests.RequestException as exc:
            raise StackError(f"cannot reach the balancer's admin API at {url}: {exc.__class__.__name__}") from exc
        try:
            body = response.json()
        except ValueError:
            body = {}
        if not response.ok:
            message = body.get("message") if isinstance(body, dict) else None
            hint = " Set ADMIN_TOKEN to the balancer's admin token." if response.status_code in (401, 403) else ""
            detail = message or response.text[:200]
            raise StackError(f"{method} {url} answered HTTP {response.status_code}: {detail}.{hint}")
        return body if isinstance(body, dict) else {}
