"""Outgoing HTTP: pooled connections, a timeout on every call, request ids passed on.

``HttpClient`` speaks through urllib3's connection pools directly: requests' session
layer (cookies, hooks, redirects, proxies from the environment, a new adapter
lookup per call) is work no call between the services needs, and it was a third
of a forward's CPU. Failures are raised as requests' exceptions (``ConnectTimeout``,
``ReadTimeout``, ``ConnectionError``), the vocabulary every caller already speaks.

``get_bounded`` is for answers the caller cannot trust to be small or quick (a
URL someone registered): the whole exchange has one time limit and the body a
size limit, however slowly or endlessly the other end sends.
"""
from __future__ import annotations

import functools
import http.client
import json as json_module
import logging
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    LocationParseError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)

from gridcommon.log_sampling import REQUEST_LOGGED_HEADER
from gridcommon.request_context import REQUEST_ID_HEADER, current_request_id, current_request_logged


log = logging.getLogger(__name__)

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


def broke_before_answer(exc: requests.ConnectionError) -> bool:
    """The connection was reset or closed before any answer's headers (urllib3's ProtocolError)."""
    return bool(exc.args) and isinstance(exc.args[0], ProtocolError)


class BoundedGetError(Exception):
    """A bounded GET got no usable answer; the message says why, never quoting what came back."""


class AnswerTooSlow(BoundedGetError):
    """The whole exchange took longer than its total time limit."""


class AnswerTooLarge(BoundedGetError):
    """The body is larger than the caller accepts."""


@dataclass(frozen=True)
class BoundedAnswer:
    status: int
    body: bytes


class _Deadline:
    """Makes every socket operation wait at most the time left until one moment.

    requests' timeouts apply to each socket operation, so a server that sends one
    byte a second (of its headers or its body) keeps a call going for ever. Here
    every read and write is armed with ``min(per operation, time left)`` first.
    """

    _deadline: float
    _per_operation: float

    def _arm(self) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("total time limit reached")
        self.settimeout(min(self._per_operation, left))  # type: ignore[attr-defined]

    def recv_into(self, *args: Any, **kwargs: Any) -> int:
        self._arm()
        return super().recv_into(*args, **kwargs)  # type: ignore[misc]

    def recv(self, *args: Any, **kwargs: Any) -> bytes:
        self._arm()
        return super().recv(*args, **kwargs)  # type: ignore[misc]

    def send(self, *args: Any, **kwargs: Any) -> int:
        self._arm()
        return super().send(*args, **kwargs)  # type: ignore[misc]

    def sendall(self, *args: Any, **kwargs: Any) -> None:
        self._arm()
        return super().sendall(*args, **kwargs)  # type: ignore[misc]


class _DeadlineSocket(_Deadline, socket.socket):
    pass


class _DeadlineSSLSocket(_Deadline, ssl.SSLSocket):
    pass


@functools.lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    # The wrapped socket keeps the deadline: SSLContext builds its sockets from this class.
    context.sslsocket_class = _DeadlineSSLSocket
    return context


def _open_socket(
    scheme: str, host: str, port: int, deadline: float, connect_timeout: float, read_timeout: float
) -> socket.socket:
    """A connected socket (TLS for https) whose every operation respects ``deadline``."""
    last_error: OSError = OSError(f"{host} has no address")
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = _DeadlineSocket(family, kind, proto)
        sock._deadline, sock._per_operation = deadline, connect_timeout
        try:
            sock._arm()
            sock.connect(address)
        except OSError as exc:
            sock.close()
            last_error = exc
            if isinstance(exc, TimeoutError):
                break  # the time is used up; another address would only overrun it
            continue
        sock._per_operation = read_timeout
        if scheme != "https":
            return sock
        left = deadline - time.monotonic()
        if left <= 0:
            sock.close()
            raise TimeoutError("total time limit reached")
        # The handshake runs inside the ssl module; its timeout is one deadline for the whole of it.
        sock.settimeout(min(connect_timeout + read_timeout, left))
        tls = _tls_context().wrap_socket(sock, server_hostname=host)
        tls._deadline, tls._per_operation = deadline, read_timeout
        return tls
    raise last_error


class _BoundedConnection(http.client.HTTPConnection):
    """http.client on a socket of ours; no proxies, no redirects followed, no pooling."""

    def __init__(self, host: str, port: int, open_socket: Any) -> None:
        super().__init__(host, port)
        self._open_socket = open_socket

    def connect(self) -> None:
        self.sock = self._open_socket()


def _read_limited(response: http.client.HTTPResponse, max_bytes: int) -> bytes:
    declared = response.getheader("Content-Length", "")
    if declared.strip().isdigit() and int(declared) > max_bytes:
        raise AnswerTooLarge(f"its answer is larger than {max_bytes} bytes")
    body = bytearray()
    while True:
        chunk = response.read(min(64 * 1024, max_bytes + 1 - len(body)))
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > max_bytes:
            raise AnswerTooLarge(f"its answer is larger than {max_bytes} bytes")


@dataclass(frozen=True)
class HttpResponse:
    """An answer, read whole: what the services need of requests' ``Response``."""

    status_code: int
    # Case-insensitive, as HTTP's header names are.
    headers: Mapping[str, str]
    content: bytes
    url: str

    @property
    def ok(self) -> bool:
        return self.status_code < 400

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body as JSON; ``ValueError`` if it is not (bytes that are not UTF-8 included)."""
        return json_module.loads(self.content)

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise requests.HTTPError(f"HTTP {self.status_code} from {self.url}", response=self)  # type: ignore[arg-type]


class HttpClient:
    """Pooled keep-alive connections per host; never a call without a timeout.

    ``timeout`` is ``(connect, read)`` in seconds, as requests takes it. Redirects
    are not followed and nothing is retried here: the callers decide what may be
    sent twice.
    """

    def __init__(self, user_agent: str, timeout: tuple[float, float], pool_size: int = 32) -> None:
        self.timeout = timeout
        self.user_agent = user_agent
        # One pool per host; a balancer may know many substations.
        self._pools = urllib3.PoolManager(num_pools=64, maxsize=pool_size, block=False, retries=False)
        self._headers = {"User-Agent": user_agent, "Accept": "application/json, text/plain;q=0.9, */*;q=0.1"}

    def request(
        self,
        method: str,
        url: str,
        *,
        resend_if_broken: bool | None = None,
        json: Any = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: tuple[float, float] | None = None,
    ) -> HttpResponse:
        """Send the request; once more on a new connection if a pooled one broke before any answer.

        A pooled connection may already be closed at the server's end (its
        keep-alive ran out, perhaps while a network cut swallowed the FIN); the
        request then never reached the server. Sending again is safe for
        idempotent methods, and for others when the caller says so
        (``resend_if_broken``), e.g. because the body carries an id the server
        de-duplicates on. A timeout is never sent again.
        """
        sent_headers = {**self._headers, **(headers or {})}
        request_id = current_request_id()
        if request_id != "-":
            sent_headers.setdefault(REQUEST_ID_HEADER, request_id)
            # Logged here, logged at the next hop too (gridcommon.log_sampling).
            sent_headers.setdefault(REQUEST_LOGGED_HEADER, "1" if current_request_logged() else "0")
        body = data
        if json is not None:
            body = json_module.dumps(json).encode()
            sent_headers.setdefault("Content-Type", "application/json")
        connect_timeout, read_timeout = timeout or self.timeout
        limits = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        if resend_if_broken is None:
            resend_if_broken = method.upper() in IDEMPOTENT_METHODS
        try:
            return self._send(method, url, body, sent_headers, limits)
        except requests.ConnectionError as exc:
            if not (resend_if_broken and broke_before_answer(exc)):
                raise
            log.info("connection to %s broke before an answer; sending the request again on a new one", url)
            # urllib3 put a fresh slot in place of the broken connection, on top of its LIFO pool.
            return self._send(method, url, body, sent_headers, limits)

    def _send(
        self, method: str, url: str, body: bytes | None, headers: dict[str, str], limits: urllib3.Timeout
    ) -> HttpResponse:
        try:
            answer = self._pools.request(
                method, url, body=body, headers=headers, timeout=limits, redirect=False, preload_content=True
            )
        # NewConnectionError is a ConnectTimeoutError to urllib3: nothing was sent either way.
        except NewConnectionError as exc:
            raise requests.ConnectionError(exc) from None
        except ConnectTimeoutError as exc:
            raise requests.ConnectTimeout(exc) from None
        except ReadTimeoutError as exc:
            raise requests.ReadTimeout(exc) from None
        except (LocationParseError, urllib3.exceptions.LocationValueError) as exc:
            raise requests.exceptions.InvalidURL(str(exc)) from None
        except urllib3.exceptions.SSLError as exc:
            raise requests.exceptions.SSLError(exc) from None
        except (ProtocolError, urllib3.exceptions.HTTPError, OSError) as exc:
            raise requests.ConnectionError(exc) from None
        return HttpResponse(answer.status, answer.headers, answer.data, url)

    def get_bounded(
        self,
        url: str,
        *,
        max_bytes: int,
        total_seconds: float,
        headers: dict[str, str] | None = None,
    ) -> BoundedAnswer:
        """GET ``url`` on a new connection, all of it within ``total_seconds`` and ``max_bytes``.

        Connecting waits at most this client's connect timeout, each read at most its
        read timeout, and everything together at most ``total_seconds``: a server
        that trickles its headers or body is cut off there. A body past
        ``max_bytes`` is refused while it streams in, before it is all read.
        Redirects are not followed. Raises :class:`BoundedGetError` (or its
        :class:`AnswerTooSlow` and :class:`AnswerTooLarge`) with a message that
        says what went wrong without quoting the answer.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BoundedGetError("the URL is not an http(s) URL with a host")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        deadline = time.monotonic() + total_seconds
        connect_timeout, read_timeout = self.timeout
        sent_headers = {
            "User-Agent": self.user_agent,
            "Accept": "text/plain, */*;q=0.1",
            # One connection per call: nothing idle is left to break, nothing is shared with a slow server.
            "Connection": "close",
            **(headers or {}),
        }
        request_id = current_request_id()
        if request_id != "-":
            sent_headers.setdefault(REQUEST_ID_HEADER, request_id)
        connection = _BoundedConnection(
            parts.hostname,
            port,
            lambda: _open_socket(parts.scheme, parts.hostname, port, deadline, connect_timeout, read_timeout),
        )
        try:
            connection.request("GET", path, headers=sent_headers)
            response = connection.getresponse()
            body = _read_limited(response, max_bytes)
            return BoundedAnswer(response.status, body)
        except TimeoutError:
            if time.monotonic() >= deadline:
                raise AnswerTooSlow(f"no complete answer within {total_seconds:g} s") from None
            raise BoundedGetError("no answer within the timeout") from None
        except socket.gaierror:
            raise BoundedGetError("its host name could not be resolved") from None
        except ssl.SSLError:
            raise BoundedGetError("the TLS connection failed (certificate or protocol)") from None
        except http.client.RemoteDisconnected:
            raise BoundedGetError("it closed the connection without answering") from None
        except http.client.IncompleteRead:
            raise BoundedGetError("its answer ended before the length it announced") from None
        except http.client.HTTPException:
            # A status line that is not HTTP's, headers too long or too many, a broken chunk.
            raise BoundedGetError("it did not answer with valid HTTP") from None
        except OSError:
            raise BoundedGetError("connection refused or broken (is it running?)") from None
        except ValueError:
            raise BoundedGetError("the request could not be sent (a malformed URL or header)") from None
        finally:
            connection.close()

    def get(self, url: str, **kwargs: Any) -> HttpResponse:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> HttpResponse:
        return self.request("POST", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> HttpResponse:
        return self.request("DELETE", url, **kwargs)

    def close(self) -> None:
        self._pools.clear()
