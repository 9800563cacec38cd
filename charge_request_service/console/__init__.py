"""The operator console: the grid live in a browser, served by the charge API's process at /console.

It is a Flask app of its own, mounted under /console in front of the charge API's: the JSON API
keeps its OpenAPI document and its fuzzing to itself, and the console shares the process, its
port and edge, and nothing else but the length of the charge queue.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask

from charge_request_service.config import Settings
from charge_request_service.console.feed import Feed
from charge_request_service.console.grid import GridReader, Sources
from charge_request_service.console.logins import Logins
from charge_request_service.console.routes import EXTENSION_KEY, ConsoleState, console
from charge_request_service.console.throttle import LoginThrottle
from gridcommon.httpclient import HttpClient
from gridcommon.web import install_common

MOUNT = "/console"
# One snapshot of the grid at most this often, shared by every console watching.
SNAPSHOT_SECONDS = 0.5
# A login lasts 8 hours at most and ends after 30 minutes without a request; at most 64 at once.
LOGIN_SECONDS = 8 * 3600.0
LOGIN_IDLE_SECONDS = 30 * 60.0
MAX_LOGINS = 64


def install_console(app: Flask, settings: Settings, queue_length: Callable[[], int],
                    client_keys: Callable[[], list[dict[str, Any]]] = list) -> Flask:
    """Mount the console at /console in front of ``app``; the gatherer starts with the first console watching."""
    # Short timeouts: a source that hangs must not hold the snapshot every console waits for.
    reads = HttpClient("charge_request_service-console/1", timeout=(0.5, 2.0), pool_size=8)
    actions = HttpClient("charge_request_service-console/1",
                         timeout=(settings.connect_timeout_seconds, settings.request_timeout_seconds))
    sources = Sources(
        balancer_urls=settings.load_balancer_urls,
        gateway_url=settings.gateway_url or None,
        prometheus_url=settings.prometheus_url or None,
        admin_token=settings.admin_token,
    )
    reader = GridReader(sources, reads, queue_length, client_keys=client_keys)
    feed = Feed(reader.snapshot, SNAPSHOT_SECONDS, settings.console_max_streams)
    console_app = Flask(__name__)
    install_common(console_app)
    console_app.extensions[EXTENSION_KEY] = ConsoleState(
        reader, Logins(MAX_LOGINS, LOGIN_SECONDS, LOGIN_IDLE_SECONDS), feed, actions, settings.admin_token,
        LoginThrottle(settings.rate_limit_storage_uri),
    )
    console_app.register_blueprint(console)
    app.wsgi_app = Mounted(app.wsgi_app, console_app.wsgi_app)  # type: ignore[method-assign]
    return console_app


class Mounted:
    """Requests under /console to the console's app, the rest to the charge API's.

    The path is left whole (unlike werkzeug's DispatcherMiddleware), so the access log names it
    as the client sent it.
    """

    def __init__(self, api: Any, console_app: Any) -> None:
        self.api = api
        self.console_app = console_app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == MOUNT or path.startswith(MOUNT + "/"):
            return self.console_app(environ, start_response)
        return self.api(environ, start_response)
