"""``python -m gridcommon.serve 'package:create_app()'``: one service, behind its edge.

How every service is run, in compose, in local mode (the Procfile) and in the tests: gunicorn
with gridcommon.gunicorn_conf on a Unix socket in a fresh private folder, and nginx (see
gridcommon.edge) on HOST:PORT in front of it. This process starts both, passes a stop on to
them, and stops the other when one dies, so whatever supervises it sees one service that is up
or down. Started as root it still serves as root, as gunicorn alone would.
"""
from __future__ import annotations

import ctypes
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
from gridcommon.settings import SettingsError

GUNICORN_CONF = "python:gridcommon.gunicorn_conf"
# gunicorn's graceful stop (graceful_timeout) plus a margin, after the edge has let its requests finish.
GUNICORN_STOP_SECONDS = 7.0
PR_SET_PDEATHSIG = 1
# Requests the edge may have waiting for gunicorn to accept them (gunicorn's own default backlog).
UPSTREAM_BACKLOG = 2048

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Any]


def behind_edge(target: str) -> WSGIApp:
    """The WSGI app ``target`` names, seeing each client's own address as REMOTE_ADDR.

    gunicorn hears every request from the edge over a Unix socket, so its REMOTE_ADDR is empty;
    the edge sets X-Real-IP to the connecting address (replacing any the client sent), and
    nothing but the edge can reach that socket. Per-address rate limits count by it.
    """
    from gunicorn.util import import_app

    app = import_app(target)

    def with_client_address(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        client = environ.get("HTTP_X_REAL_IP")
        if client:
            environ["REMOTE_ADDR"] = client
        return app(environ, start_response)

    return with_client_address


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
    """gunicorn and its edge for one app, and how to stop them."""

    def __init__(self, target: str, env: dict[str, str]) -> None:
        self.settings = EdgeSettings.from_env(env)
        self.nginx_program = find_nginx(self.settings.nginx)
        base = env.get("EDGE_RUN_DIR") or None
        if base:
            Path(base).mkdir(parents=True, exist_ok=True)
        # mkdtemp: mode 0700, so only this user (and so the edge) can reach gunicorn's socket.
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"edge-{self.settings.port}-", dir=base))
        self.socket = upstream_socket_path(self.run_dir)
        self.conf = self.run_dir / "nginx.conf"
        self.conf.write_text(render_nginx_conf(self.settings, self.run_dir, self.socket, edge_user()))
        self.target = target
        self.env = env
        self.gunicorn: subprocess.Popen | None = None
        self.nginx: subprocess.Popen | None = None
        self.stop_asked = False

    def start(self) -> None:
        # The socket is made here and handed to gunicorn, so the edge can take requests at once: they
        # wait in its backlog while gunicorn loads the app, as they would in gunicorn's own port's.
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.socket))
        listener.listen(UPSTREAM_BACKLOG)
        gunicorn_env = {**self.env, "EDGE_UPSTREAM_FD": str(listener.fileno())}
        app = f"gridcommon.serve:behind_edge({self.target!r})"
        self.gunicorn = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", GUNICORN_CONF, app], env=gunicorn_env,
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
        assert self.gunicorn is not None and self.nginx is not None
        while not self.stop_asked:
            for name, process in (("gunicorn", self.gunicorn), ("nginx", self.nginx)):
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
        """The edge first (it finishes the requests it holds, then closes), then gunicorn."""
        _signal(self.nginx, signal.SIGQUIT)
        _wait(self.nginx, SHUTDOWN_SECONDS + 2.0)
        _signal(self.gunicorn, signal.SIGTERM)
        _wait(self.gunicorn, GUNICORN_STOP_SECONDS)
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
