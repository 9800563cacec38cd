"""Outgoing HTTP: pooled connections, a timeout on every call, request ids passed on."""
from __future__ import annotations

import logging
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ProtocolError

from gridcommon.request_context import REQUEST_ID_HEADER, current_request_id


log = logging.getLogger(__name__)

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


def broke_before_answer(exc: requests.ConnectionError) -> bool:
    """The connection was reset or closed before any answer's headers (urllib3's ProtocolError)."""
    return bool(exc.args) and isinstance(exc.args[0], ProtocolError)


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

    def request(
        self, method: str, url: str, *, resend_if_broken: bool | None = None, **kwargs: Any
    ) -> requests.Response:
        """Send the request; once more on a new connection if a pooled one broke before any answer.

        A pooled connection may already be closed at the server's end (its
        keep-alive ran out, perhaps while a network cut swallowed the FIN); the
        request then never reached the server. Sending again is safe for
        idempotent methods, and for others when the caller says so
        (``resend_if_broken``), e.g. because the body carries an id the server
        de-duplicates on. A timeout is never sent again.
        """
        headers = dict(kwargs.pop("headers", None) or {})
        request_id = current_request_id()
        if request_id != "-":
            headers.setdefault(REQUEST_ID_HEADER, request_id)
        kwargs.setdefault("timeout", self.timeout)
        if resend_if_broken is None:
            resend_if_broken = method.upper() in IDEMPOTENT_METHODS
        try:
            return self.session.request(method, url, headers=headers, **kwargs)
        except requests.ConnectionError as exc:
            if not (resend_if_broken and broke_before_answer(exc)):
                raise
            log.info("connection to %s broke before an answer; sending the request again on a new one", url)
            # urllib3 put a fresh slot in place of the broken connection, on top of its LIFO pool.
            return self.session.request(method, url, headers=headers, **kwargs)

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> requests.Response:
        return self.request("DELETE", url, **kwargs)

    def close(self) -> None:
        self.session.close()
