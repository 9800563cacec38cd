"""Outgoing HTTP: pooled connections, a timeout on every call, request ids passed on."""
from __future__ import annotations

from typing import Any

import requests
from requests.adapters import HTTPAdapter

from gridcommon.request_context import REQUEST_ID_HEADER, current_request_id


class HttpClient:
    """A thin wrapper over a pooled ``requests.Session`` that never calls without a timeout.

    ``timeout`` is ``(connect, read)`` in seconds, as requests takes it.
    """

    def __init__(self, user_agent: str, timeout: tuple[float, float], pool_size: int = 32) -> None:
        self.timeout = timeout
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["User-Agent"] = user_agent

    def request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        headers = dict(kwargs.pop("headers", None) or {})
        request_id = current_request_id()
        if request_id != "-":
            headers.setdefault(REQUEST_ID_HEADER, request_id)
        kwargs.setdefault("timeout", self.timeout)
        return self.session.request(method, url, headers=headers, **kwargs)

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> requests.Response:
        return self.request("DELETE", url, **kwargs)

    def close(self) -> None:
        self.session.close()
