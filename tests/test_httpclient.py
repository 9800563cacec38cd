"""The services' HTTP client against real sockets: kept-alive connections, split sends, what each failure raises."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from gridcommon.httpclient import BrokeBeforeAnswer, HttpClient, NotSent
from tests.harness import free_port


class CountingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.server.connections.add(self.client_address)  # type: ignore[attr-defined]
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET  # noqa: N815

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), CountingHandler)
    httpd.connections = set()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def url_of(httpd: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}/x"


def test_calls_reuse_one_kept_alive_connection(server: ThreadingHTTPServer) -> None:
    client = HttpClient("test", (1.0, 1.0))
    for _ in range(5):
        answer = client.get(url_of(server))
        assert answer.status_code == 200 and answer.json() == {"ok": True}
        assert answer.headers.get("content-type") == "application/json"
    assert len(server.connections) == 1  # type: ignore[attr-defined]


class OneAnswerPerConnection:
    """Answers the first request of each connection, promising keep-alive; then, with ``close_idle``,
    closes the connection at once (a keep-alive that ran out), else closes it when the next request
    arrives, unanswered (a server going away just as the request reached it)."""

    def __init__(self, close_idle: bool) -> None:
        self.close_idle = close_idle
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}/x"

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            with connection:
                if self._read_request(connection):
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                       b"Content-Length: 2\r\nConnection: keep-alive\r\n\r\n{}")
                    if not self.close_idle:
                        self._read_request(connection)

    @staticmethod
    def _read_request(connection: socket.socket) -> bool:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = connection.recv(4096)
            if not chunk:
                return False
            request += chunk
        return True

    def close(self) -> None:
        self.listener.close()


def test_an_idle_connection_the_server_closed_is_not_used_again() -> None:
    server = OneAnswerPerConnection(close_idle=True)
    try:
        client = HttpClient("test", (1.0, 1.0))
        assert client.get(server.url).json() == {}
        time.sleep(0.1)  # the server has closed its end by now
        assert client.post(server.url, json={"a": 1}).status_code == 200, "found closed before use: a new one"
        assert server.connections == 2
    finally:
        server.close()


def test_a_connection_that_breaks_before_any_answer_is_sent_again_only_when_that_is_safe() -> None:
    server = OneAnswerPerConnection(close_idle=False)
    try:
        client = HttpClient("test", (1.0, 1.0))
        assert client.get(server.url).status_code == 200
        with pytest.raises(BrokeBeforeAnswer):
            client.post(server.url, json={"a": 1})  # not idempotent: the caller decides whether to send again
        assert client.get(server.url).status_code == 200  # a new connection
        assert client.get(server.url).status_code == 200, "an idempotent call is sent again on a new connection"
        # The first; the one after the POST (which broke on the first); the one the last GET was sent again on.
        assert server.connections == 3
    finally:
        server.close()


def test_nothing_listening_is_not_sent() -> None:
    with pytest.raises(NotSent):
        HttpClient("test", (1.0, 1.0)).get(f"http://127.0.0.1:{free_port()}/x")


def test_a_silent_server_is_a_read_timeout_and_ready_says_no_answer_yet() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        client = HttpClient("test", (1.0, 0.3))
        exchange = client.send("POST", f"http://127.0.0.1:{listener.getsockname()[1]}/charge", json={"a": 1})
        assert not exchange.ready(0.05), "the kernel took the request; nobody answered"
        with pytest.raises(requests.ReadTimeout):
            exchange.finish()
    finally:
        listener.close()
