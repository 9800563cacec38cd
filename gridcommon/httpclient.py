"""Outgoing HTTP: pooled keep-alive connections, a timeout on every call, request ids passed on.

``HttpClient`` speaks HTTP/1.1 through the standard library's ``http.client`` on
connections it keeps per host: requests' session layer (cookies, hooks,
redirects, proxies from the environment, an adapter lookup per call) and
urllib3's pool bookkeeping are work no call between the services needs, and
they were a third of a forward's CPU. A call can also be split in two:
``send`` puts the request on the wire and ``Exchange.ready`` waits for the
first byte of its answer, so a caller can do something else (hedge it) if the
answer is slow, without a thread per call. Failures are raised as requests'
exceptions (``ConnectTimeout``, ``ReadTimeout``, ``ConnectionError``), the
vocabulary every caller already speaks; ``NotSent`` and ``BrokeBeforeAnswer``
say when the request cannot have reached the server.

``get_bounded`` is for answers the caller cannot trust to be small or quick (a
URL someone registered): the whole exchange has one time limit and the body a
size limit, however slowly or endlessly the other end sends.
"""
from __future__ import annotations

import functools
import http.client
import logging
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests

from gridcommon import jsonfast
from gridcommon.log_sampling import REQUEST_LOGGED_HEADER
from gridcommon.request_context import REQUEST_ID_HEADER, current_request_id, current_request_logged


log = logging.getLogger(__name__)

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


class NotSent(requests.ConnectionError):
    """No connection could be made (refused, unreachable, unknown host): the request was never sent."""


class BrokeBeforeAnswer(requests.ConnectionError):
    """A kept-alive connection turned out closed before any answer: the server never read the request."""


def broke_before_answer(exc: requests.ConnectionError) -> bool:
    """The connection was reset or closed before any answer's headers."""
    return isinstance(exc, BrokeBeforeAnswer)


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
        return jsonfast.loads(self.content)

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise requests.HTTPError(f"HTTP {self.status_code} from {self.url}", response=self)  # type: ignore[arg-type]


class _HostConnections:
    """The idle keep-alive connections to one host, the last used first (it is the least likely closed)."""

    def __init__(self, scheme: str, host: str, port: int, keep: int) -> None:
        self._scheme, self._host, self._port, self._keep = scheme, host, port, keep
        self._idle: deque[http.client.HTTPConnection] = deque()
        self._lock = threading.Lock()

    def take(self, connect_timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        """A connection and whether it was used before (and may have been closed at the other end).

        An idle connection with something to read has been closed by the server (its keep-alive
        ran out): it is dropped here, as urllib3 does, rather than found broken by a request.
        """
        while True:
            with self._lock:
                if not self._idle:
                    break
                connection = self._idle.pop()
            if connection.sock is not None and not _readable(connection.sock, 0.0):
                return connection, True
            connection.close()
        if self._scheme == "https":
            return http.client.HTTPSConnection(self._host, self._port, timeout=connect_timeout), False
        return http.client.HTTPConnection(self._host, self._port, timeout=connect_timeout), False

    def give_back(self, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self._keep:
                self._idle.append(connection)
                return
        connection.close()

    def close(self) -> None:
        with self._lock:
            while self._idle:
                self._idle.pop().close()


class Exchange:
    """A request on the wire; its answer is read by ``finish``, at once or after ``ready`` says it came."""

    def __init__(self, connections: _HostConnections, connection: http.client.HTTPConnection, reused: bool,
                 url: str, read_timeout: float) -> None:
        self._connections = connections
        self._connection = connection
        self._reused = reused
        self.url = url
        self._read_timeout = read_timeout
        self._waited = 0.0

    def ready(self, seconds: float) -> bool:
        """Whether the answer began to arrive within ``seconds`` (waiting no longer than its read timeout)."""
        sock = self._connection.sock
        if sock is None:
            return True  # closed under it: finish() says how
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        wait = max(0.0, min(seconds, self._read_timeout - self._waited))
        readable = _readable(sock, wait)
        self._waited += wait
        return readable or self._waited >= self._read_timeout

    def finish(self) -> HttpResponse:
        """The answer, read whole; raises requests' ``ReadTimeout`` or ``ConnectionError``."""
        connection = self._connection
        try:
            if self._waited >= self._read_timeout and not self._answer_waiting():
                raise TimeoutError("no answer within the read timeout")
            answer = connection.getresponse()
            body = answer.read()
        except TimeoutError as exc:
            connection.close()
            raise requests.ReadTimeout(f"{self.url}: no answer within {self._read_timeout:g} s") from exc
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
            connection.close()
            if self._reused:
                raise BrokeBeforeAnswer(f"{self.url}: the kept-alive connection was closed ({exc})") from None
            raise requests.ConnectionError(f"{self.url}: the connection broke ({exc})") from None
        except (http.client.HTTPException, OSError) as exc:
            connection.close()
            raise requests.ConnectionError(f"{self.url}: the answer could not be read ({type(exc).__name__})") from None
        if answer.will_close:
            connection.close()
        else:
            self._connections.give_back(connection)
        return HttpResponse(answer.status, answer.headers, body, self.url)

    def abandon(self) -> None:
        """Give up on the answer: the connection cannot carry another request, so it is closed."""
        self._connection.close()

    def _answer_waiting(self) -> bool:
        sock = self._connection.sock
        return sock is not None and _readable(sock, 0.0)


def _readable(sock: socket.socket, seconds: float) -> bool:
    """Whether ``sock`` has something to read (or was closed) within ``seconds``.

    poll, not select: select cannot watch a descriptor numbered 1024 or more.
    """
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(seconds * 1000))


class HttpClient:
    """Kept-alive connections per host; never a call without a timeout.

    ``timeout`` is ``(connect, read)`` in seconds, as requests takes it. Redirects
    are not followed and nothing is retried here but a request on a kept-alive
    connection found closed: the callers decide what may be sent twice.
    """

    def __init__(self, user_agent: str, timeout: tuple[float, float], pool_size: int = 32) -> None:
        self.timeout = timeout
        self.user_agent = user_agent
        self._pool_size = pool_size
        self._hosts: dict[tuple[str, str, int], _HostConnections] = {}
        self._hosts_lock = threading.Lock()
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
        """Send the request and read its answer; once more if a kept-alive connection broke before any answer.

        A kept-alive connection may already be closed at the server's end (its
        keep-alive ran out, perhaps while a network cut swallowed the FIN); the
        request then never reached the server. Sending again is safe for
        idempotent methods, and for others when the caller says so
        (``resend_if_broken``), e.g. because the body carries an id the server
        de-duplicates on. A timeout is never sent again.
        """
        if resend_if_broken is None:
            resend_if_broken = method.upper() in IDEMPOTENT_METHODS
        try:
            return self.send(method, url, json=json, data=data, headers=headers, timeout=timeout).finish()
        except BrokeBeforeAnswer:
            if not resend_if_broken:
                raise
            log.info("connection to %s broke before an answer; sending the request again on a new one", url)
            return self.send(method, url, json=json, data=data, headers=headers, timeout=timeout,
                             fresh=True).finish()

    def send(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: tuple[float, float] | None = None,
        fresh: bool = False,
    ) -> Exchange:
        """Put the request on the wire; its answer is the returned ``Exchange``'s to read.

        Raises ``NotSent`` when no connection can be made, ``ConnectTimeout`` when
        making it takes too long, ``BrokeBeforeAnswer`` when a kept-alive one is found
        closed. ``fresh`` skips the kept-alive connections.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise requests.exceptions.InvalidURL(f"{url!r} is not an http(s) URL with a host")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        sent_headers = {**self._headers, **(headers or {})}
        request_id = current_request_id()
        if request_id != "-":
            sent_headers.setdefault(REQUEST_ID_HEADER, request_id)
            # Logged here, logged at the next hop too (gridcommon.log_sampling).
            sent_headers.setdefault(REQUEST_LOGGED_HEADER, "1" if current_request_logged() else "0")
        body = data
        if json is not None:
            body = jsonfast.dumps(json)
            sent_headers.setdefault("Content-Type", "application/json")
        connect_timeout, read_timeout = timeout or self.timeout
        connections = self._connections(parts.scheme, parts.hostname, port)
        connection, reused = connections.take(connect_timeout)
        if fresh and reused:
            connection.close()
            reused = False
        if connection.sock is None:
            connection.timeout = connect_timeout
            try:
                connection.connect()
            except TimeoutError:
                connection.close()
                raise requests.ConnectTimeout(f"{url}: no connection within {connect_timeout:g} s") from None
            except ssl.SSLError as exc:
                connection.close()
                raise requests.exceptions.SSLError(f"{url}: TLS failed ({exc.reason})") from None
            except OSError as exc:
                connection.close()
                raise NotSent(f"{url}: cannot connect ({exc.strerror or type(exc).__name__})") from None
        connection.sock.settimeout(read_timeout)
        try:
            connection.request(method, path, body=body, headers=sent_headers)
        except (ConnectionResetError, BrokenPipeError, http.client.HTTPException, OSError) as exc:
            connection.close()
            if reused:
                raise BrokeBeforeAnswer(f"{url}: the kept-alive connection was closed ({exc})") from None
            raise requests.ConnectionError(f"{url}: the request could not be sent ({type(exc).__name__})") from None
        return Exchange(connections, connection, reused, url, read_timeout)

    def _connections(self, scheme: str, host: str, port: int) -> _HostConnections:
        key = (scheme, host, port)
        connections = self._hosts.get(key)
        if connections is None:
            with self._hosts_lock:
                connections = self._hosts.setdefault(key, _HostConnections(scheme, host, port, self._pool_size))
        return connections

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
        with self._hosts_lock:
            for connections in self._hosts.values():
                connections.close()
