"""What every service answers the same way, as gunicorn processes: bodies that are not UTF-8, chunked
bodies past the size limit, and the methods a path takes (405, OPTIONS and HEAD).

Requests go out byte for byte over a socket, so the encoding and the framing of each body are
exactly what the test says. The methods a path takes come from each service's own OpenAPI
document, not from the Flask rules the code builds its answers from.
"""
from __future__ import annotations

import http.client
import json
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests

from tests.harness import Service, Stack, sessions_at, start_stack

pytestmark = pytest.mark.integration

MAX_BODY_BYTES = 16 * 1024  # the documented limit, whatever gridcommon.web says
# A body every service reads to the end and refuses for its amount: no session is ever admitted,
# and an invalid_field answer proves the whole body was read and parsed.
REFUSED_CHARGE = {"vehicle_id": "EV-conformance", "amount": -1}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # No per-vehicle rate limit: every body here must reach the parser, not a 429.
    stack = start_stack(tmp_path_factory.mktemp("http-conformance"), capacities=(50.0,),
                        charge_env={"RATE_LIMIT_PER_VEHICLE": ""})
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def bare_substation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A substation served by gunicorn alone, as the benchmarks' reference chain runs it: no edge buffers
    its bodies, so a chunked one reaches the app still chunked."""
    service = Service("bare-substation", "substation_service:create_app()",
                      {"SUBSTATION_ID": "substation-bare", "CAPACITY_KW": "50"},
                      tmp_path_factory.mktemp("http-conformance-bare"), edge=False).start()  # fmt: skip
    yield service
    service.stop()


def services(stack: Stack) -> list[Service]:
    return [stack.charge, stack.balancer, stack.substations[0]]


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def post(service: Service, body: bytes, chunks: list[int] | None = None) -> Answer:
    """POST /charge with ``body`` as JSON: with Content-Length, or chunked in pieces of ``chunks`` bytes.

    The connection is kept alive and the answer read by its Content-Length: the service may
    answer before reading the whole body, and closing it then would reset the connection.
    """
    head = [b"POST /charge HTTP/1.1", b"Host: 127.0.0.1", b"Content-Type: application/json"]
    if chunks is None:
        head.append(b"Content-Length: %d" % len(body))
        payload = body
    else:
        head.append(b"Transfer-Encoding: chunked")
        pieces, at = [], 0
        for size in chunks:
            pieces.append(b"%x\r\n%s\r\n" % (len(body[at:at + size]), body[at:at + size]))
            at += size
        assert at >= len(body), "the chunks must cover the body"
        payload = b"".join(pieces) + b"0\r\n\r\n"
    with socket.create_connection((service.host, service.port), timeout=10) as sock:
        sock.sendall(b"\r\n".join(head) + b"\r\n\r\n" + payload)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return Answer(response.status, dict(response.headers), response.read())


def bodiless(service: Service, method: str, path: str) -> Answer:
    """``method path`` without a body; the connection closes, so every byte after the head is the body."""
    request = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    received = b""
    with socket.create_connection((service.host, service.port), timeout=10) as sock:
        sock.sendall(request)
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.title(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return Answer(int(status_line.split()[1]), headers, body)


def padded(size: int) -> bytes:
    """REFUSED_CHARGE as UTF-8 JSON of exactly ``size`` bytes (spaces before the closing brace)."""
    text = json.dumps(REFUSED_CHARGE).encode()
    return text[:-1] + b" " * (size - len(text)) + b"}"


# Bodies that are not UTF-8 -------------------------------------------------------------------


NOT_UTF8 = {
    "UTF-16 with a byte order mark": "utf-16",
    "UTF-16LE without one": "utf-16-le",
    "UTF-16BE without one": "utf-16-be",
    "UTF-32 with a byte order mark": "utf-32",
    "UTF-32BE without one": "utf-32-be",
}


def test_a_body_that_is_not_utf8_is_400_invalid_json_on_every_service(stack: Stack) -> None:
    text = json.dumps(REFUSED_CHARGE)
    for service in services(stack):
        # The same document in UTF-8 is read: its amount is what is refused.
        read = post(service, text.encode())
        assert (read.status, read.json()["error"], read.json()["field"]) == (400, "invalid_field", "amount")
        for label, encoding in NOT_UTF8.items():
            answer = post(service, text.encode(encoding))
            assert answer.status == 400, f"{service.name}, {label}: {answer.body[:200]!r}"
            error = answer.json()
            assert error["error"] == "invalid_json", f"{service.name}, {label}: {error}"
            assert "not UTF-8" in error["message"], error["message"]
    # A valid request in UTF-16 is refused before it is read, so nothing is admitted anywhere.
    valid = json.dumps({"vehicle_id": "EV-utf16", "amount": 5, "duration_seconds": 60}).encode("utf-16")
    for service in services(stack):
        answer = post(service, valid)
        assert (answer.status, answer.json()["error"]) == (400, "invalid_json"), service.name
    assert sessions_at(stack.substations[0]) == []


def test_a_body_that_is_not_utf8_is_400_without_the_edge_too(bare_substation: Service) -> None:
    answer = post(bare_substation, json.dumps(REFUSED_CHARGE).encode("utf-16"))
    assert (answer.status, answer.json()["error"]) == (400, "invalid_json")
    assert sessions_at(bare_substation) == []


# Bodies past the size limit ------------------------------------------------------------------


def test_a_chunked_body_over_the_limit_is_413_like_one_with_a_content_length(
    stack: Stack, bare_substation: Service
) -> None:
    for service in [*services(stack), bare_substation]:
        # At the limit, chunked or not, the body is read whole: its amount is refused, not its size.
        for chunks in (None, [1000] * 17, [MAX_BODY_BYTES]):
            at_limit = post(service, padded(MAX_BODY_BYTES), chunks)
            assert (at_limit.status, at_limit.json().get("field")) == (400, "amount"), (service.name, chunks)
        # One byte more, in one chunk, in many, or with a Content-Length: 413, never a cut-off body's 400.
        for size, chunks in [(MAX_BODY_BYTES + 1, None), (MAX_BODY_BYTES + 1, [1000] * 17),
                             (MAX_BODY_BYTES + 1, [MAX_BODY_BYTES + 1]), (20_000, [4096] * 5),
                             (MAX_BODY_BYTES + 1, [MAX_BODY_BYTES, 1])]:
            answer = post(service, padded(size), chunks)
            assert answer.status == 413, f"{service.name}, {size} bytes in {chunks}: {answer.body[:200]!r}"
            error = answer.json()
            assert error["error"] == "request_entity_too_large" and str(MAX_BODY_BYTES) in error["message"]
        assert requests.get(f"{service.url}/health", timeout=5).ok


# Methods: 405, OPTIONS and HEAD ----------------------------------------------------------------

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


def documented_paths(service: Service) -> dict[str, set[str]]:
    """Each path of the service's OpenAPI document, its parameters filled in, with the methods it lists."""
    document = requests.get(f"{service.url}/openapi.json", timeout=5).json()
    return {
        re.sub(r"\{[^}]+\}", "x", path): {method.upper() for method in operations if method in HTTP_METHODS}
        for path, operations in document["paths"].items()
    }


def test_405_options_and_head_agree_on_every_path_of_every_service(stack: Stack) -> None:
    problems = []
    for service in services(stack):
        paths = documented_paths(service)
        assert "/charge" in paths and paths["/charge"] == {"POST"}, service.name
        for path, methods in paths.items():
            # Every GET also answers HEAD; OPTIONS is answered 405 like any method a path does not take.
            allowed = ", ".join(sorted(methods | ({"HEAD"} if "GET" in methods else set())))
            where = f"{service.name} {path}"
            # A method the path does not take, OPTIONS, and HEAD where there is no GET.
            foreign = next(method for method in ("PATCH", "PUT", "POST") if method not in methods)
            refused = [foreign, "OPTIONS"] + ([] if "GET" in methods else ["HEAD"])
            for method in refused:
                answer = bodiless(service, method, path)
                if answer.status != 405 or answer.headers.get("Allow") != allowed:
                    problems.append(f"{where}: {method} -> {answer.status}, Allow {answer.headers.get('Allow')!r}, "
                                    f"expected 405 and {allowed!r}")
                elif method != "HEAD" and json.loads(answer.body)["error"] != "method_not_allowed":
                    problems.append(f"{where}: {method} -> {answer.body[:120]!r}")
                elif method == "HEAD" and answer.body:
                    problems.append(f"{where}: HEAD answered with a body: {answer.body[:120]!r}")
            if "GET" in methods:
                head, get = bodiless(service, "HEAD", path), bodiless(service, "GET", path)
                if head.status != get.status or head.body:
                    problems.append(f"{where}: HEAD -> {head.status} with {len(head.body)} body bytes, "
                                    f"GET -> {get.status}")
    assert problems == [], "\n".join(problems)
