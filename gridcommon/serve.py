"""``python -m gridcommon.serve 'package:create_app()'``: one service, behind its edge.

How every service is run, in compose, in local mode (the Procfile) and in the tests: granian
(WSGI) on a Unix socket in a fresh private folder, and nginx (see gridcommon.edge) on HOST:PORT in
front of it. This process starts both, passes a stop on to them, and stops the other when one
dies, so whatever supervises it sees one service that is up or down. Started as root it still
serves as root.

granian runs one worker process: each service keeps its state (sessions, the balancer's view of
the grid, the peer-balancing state machine) in memory, so a single process makes admission atomic
under one lock and keeps the Prometheus metrics exact. THREADS (16) blocking threads give the
concurrency. What granian leaves out for a server facing clients (a body timeout, caps per
address) the edge does: granian only ever hears whole requests, from the edge.
"""
from __future__ import annotations

import ctypes
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gridcommon.edge import SHUTDOWN_SECONDS, EdgeSettings, edge_user, render_nginx_conf, upstream_socket_path
from gridcommon.settings import SettingsError, env_int, env_log_level

# How long a stopping worker may take to finish its requests before granian kills it (as gunicorn's
# graceful_timeout did), and the margin after it before this process kills granian itself.
WORKER_STOP_SECONDS = 5
SERVER_STOP_SECONDS = WORKER_STOP_SECONDS + 2.0
PR_SET_PDEATHSIG = 1
# Requests the edge may have waiting for granian's worker to take them (gunicorn's default backlog).
UPSTREAM_BACKLOG = 2048
# The app granian's worker loads (see app_from_env): set by this process for granian only.
APP_VARIABLE = "SERVE_APP"
# The listening socket's descriptor, handed to granian (see gridcommon.granian_upstream).
FD_VARIABLE = "UPSTREAM_FD"

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Any]


def load_app(target: str) -> WSGIApp:
    """The WSGI app ``target`` names: ``package:name`` or ``package:factory()`` (called without arguments)."""
    module_name, separator, expression = target.partition(":")
    call = expression.endswith("()")
    name = expression[:-2] if call else expression
    if not separator or not module_name or not name.isidentifier():
        raise SettingsError(f"{target!r} is not an app: give 'package:create_app()' or 'package:app'")
    found = getattr(importlib.import_module(module_name), name, None)
    if found is None:
        raise SettingsError(f"{target!r}: {module_name} has no {name!r}")
    return found() if call else found


def behind_edge(target: str) -> WSGIApp:
    """The WSGI app ``target`` names, seeing each client's own address as REMOTE_ADDR.

    granian hears every request from the edge over a Unix socket, so its REMOTE_ADDR is empty;
    the edge sets X-Real-IP to the connecting address (replacing any the client sent), and
    nothing but the edge can reach that socket. Per-address rate limits count by it.
    """
    app = load_app(target)

    def with_client_address(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        client = environ.get("HTTP_X_REAL_IP")
        if client:
            environ["REMOTE_ADDR"] = client
        return app(environ, start_response)

    return with_client_address


def app_from_env() -> WSGIApp:
    """granian's factory: the app this process named in SERVE_APP, behind the edge."""
    return behind_edge(os.environ[APP_VARIABLE])


def granian_command(socket_path: Path, env: dict[str, str]) -> list[str]:
    """granian serving app_from_env on ``socket_path``: one worker, THREADS threads, HTTP/1.1 only."""
    threads = env_int(env, "THREADS", 16, minimum=1, maximum=256)
    return [
        sys.executable, "-m", "gridcommon.granian_upstream",
        "--interface", "wsgi", "--factory", "--http", "1", "--no-ws",
        # The socket itself is the one this process hands down; the path is for granian's log.
        "--uds", str(socket_path), "--backlog", str(UPSTREAM_BACKLOG),
        # No --backpressure below its default (the backlog): granian counts it per connection, and the
        # edge keeps idle connections open; with fewer, requests on the edge's newer connections wait
        # unaccepted while the older ones sit idle. The threads bound the requests run at once.
        "--workers", "1", "--blocking-threads", str(threads),
        "--workers-kill-timeout", str(WORKER_STOP_SECONDS),
        # The services write their own access line with the request id; granian's would repeat it.
        "--no-access-log", "--log-level", env_log_level(env),
        "gridcommon.serve:app_from_env",
    ]


def _die_with_parent() -> None:
    """In a child, before exec: get SIGTERM when this process dies, however it dies (even SIGKILL)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def find_nginx(name: str) -> str:
    found = shutil.which(name) or (shutil.which(name, path="/usr/sbin:/sbin") if "/" not in name else None)
    if found is None:
        raise SettingsError(
            f"nginx ({name!r}) was not found: every service is served behind it. Install Debian's nginx-light "
            "(`make nginx`, or apt-get install nginx-light), or set EDGE_NGINX to the nginx program."
        )
    return found


class Served:
    """granian and its edge for one app, and how to stop them."""

    def __init__(self, target: str, env: dict[str, str]) -> None:
        self.settings = EdgeSettings.from_env(env)
        self.nginx_program = find_nginx(self.settings.nginx)
        base = env.get("EDGE_RUN_DIR") or None
        if base:
            Path(base).mkdir(parents=True, exist_ok=True)
        # mkdtemp: mode 0700, so only this user (and so the edge) can reach granian's socket.
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"edge-{self.settings.port}-", dir=base))
        self.socket = upstream_socket_path(self.run_dir)
        self.conf = self.run_dir / "nginx.conf"
        self.conf.write_text(render_nginx_conf(self.settings, self.run_dir, self.socket, edge_user()))
        self.target = target
        self.env = env
        self.command = granian_command(self.socket, env)
        self.server: subprocess.Popen | None = None
        self.nginx: subprocess.Popen | None = None
        self.stop_asked = False

    def start(self) -> None:
        # The socket is made here and handed to granian (see gridcommon.granian_upstream), so the edge
        # can take requests at once: they wait in its backlog while granian's worker loads the app.
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.socket))
        listener.listen(UPSTREAM_BACKLOG)
        self.server = subprocess.Popen(
            self.command, env={**self.env, APP_VARIABLE: self.target, FD_VARIABLE: str(listener.fileno())},
            pass_fds=(listener.fileno(),), preexec_fn=_die_with_parent,
        )
        listener.close()
        # -e: nginx opens its compiled-in log file before reading the config; stderr needs no rights.
        self.nginx = subprocess.Popen(
            [self.nginx_program, "-e", "stderr", "-p", str(self.run_dir), "-c", str(self.conf)],
            env=self.env,
            preexec_fn=_die_with_parent,
        )

    def wait(self) -> int:
        """Until a stop is asked for or either process ends; then stop both. The exit code to end with."""
        assert self.server is not None and self.nginx is not None
        while not self.stop_asked:
            for name, process in (("granian", self.server), ("nginx", self.nginx)):
                code = process.poll()
                # A stop sent to the whole process group reaches both before this process sees it.
                if code is not None and not self.stop_asked:
                    print(f"serve: {name} exited with code {code}, so the service is stopping; its log above "
                          "says why. Whatever supervises it will start it again.", file=sys.stderr, flush=True)
                    self.stop()
                    return code or 1
            time.sleep(0.2)
        self.stop()
        return 0

    def ask_stop(self, *_: object) -> None:
        self.stop_asked = True

    def stop(self) -> None:
        """The edge first (it finishes the requests it holds, then closes), then granian."""
        _signal(self.nginx, signal.SIGQUIT)
        _wait(self.nginx, SHUTDOWN_SECONDS + 2.0)
        _signal(self.server, signal.SIGTERM)
        _wait(self.server, SERVER_STOP_SECONDS)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def _signal(process: subprocess.Popen | None, sig: int) -> None:
    if process is not None and process.poll() is None:
        try:
            process.send_signal(sig)
        except ProcessLookupError:
            pass


def _wait(process: subprocess.Popen | None, seconds: float) -> None:
    if process is None:
        return
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m gridcommon.serve 'package:create_app()'", file=sys.stderr)
        return 2
    try:
        served = Served(argv[0], dict(os.environ))
    except SettingsError as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, served.ask_stop)
    signal.signal(signal.SIGINT, served.ask_stop)
    served.start()
    return served.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
