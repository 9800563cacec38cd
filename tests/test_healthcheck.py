"""The containers' healthcheck command, run as compose runs it, against a real HTTP server."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

# path -> (status, body) the server answers with.
ANSWERS = {
    "/health": (200, b'{"status": "ok"}'),
    "/polled": (200, json.dumps({"healthy_substations": 2}).encode()),
    "/not-yet": (200, json.dumps({"healthy_substations": 0}).encode()),
    "/odd": (200, json.dumps({"healthy_substations": True}).encode()),
    "/text": (200, b"ok"),
    "/down": (503, b'{"error": "unavailable"}'),
}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        status, body = ANSWERS.get(self.path, (404, b"{}"))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def healthcheck(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gridcommon.healthcheck", *args],
                          capture_output=True, text=True, timeout=30)  # fmt: skip


def test_a_2xx_answer_is_healthy(base_url: str) -> None:
    result = healthcheck(f"{base_url}/health")
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.parametrize("path", ["/down", "/missing"])
def test_an_error_status_is_unhealthy_and_named(base_url: str, path: str) -> None:
    result = healthcheck(f"{base_url}{path}")
    assert result.returncode == 1
    assert f"{base_url}{path} answered HTTP" in result.stderr


def test_nothing_listening_is_unhealthy(base_url: str) -> None:
    result = healthcheck("http://127.0.0.1:9/health")
    assert result.returncode == 1 and "no answer from http://127.0.0.1:9/health" in result.stderr


def test_a_field_at_its_minimum_or_above_is_healthy(base_url: str) -> None:
    assert healthcheck("--at-least", "healthy_substations=1", f"{base_url}/polled").returncode == 0
    assert healthcheck("--at-least", "healthy_substations=2", f"{base_url}/polled").returncode == 0


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("/not-yet", "reports healthy_substations = 0, and at least 1 is needed"),
        ("/odd", "reports healthy_substations = True, and at least 1 is needed"),
        ("/health", "gave no JSON object with a 'healthy_substations' field"),
        ("/text", "gave no JSON object with a 'healthy_substations' field"),
    ],
)
def test_a_field_below_its_minimum_or_missing_is_unhealthy_and_said(base_url: str, path: str, says: str) -> None:
    result = healthcheck("--at-least", "healthy_substations=1", f"{base_url}{path}")
    assert result.returncode == 1
    assert result.stderr.strip() == f"unhealthy: {base_url}{path} {says}"


@pytest.mark.parametrize("args", [[], ["a", "b"], ["--at-least", "healthy_substations", "URL"],
                                  ["--at-least", "=1", "URL"], ["--at-least", "x=nan", "URL"]])
def test_a_wrong_command_line_exits_2_with_the_usage(args: list[str]) -> None:
    result = healthcheck(*args)
    assert result.returncode == 2 and "usage: python -m gridcommon.healthcheck" in result.stderr
