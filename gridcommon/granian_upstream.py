"""``python -m gridcommon.granian_upstream <granian options>``: granian's own command line, serving
on the listening Unix socket gridcommon.serve made and handed down (its descriptor in
UPSTREAM_FD) instead of one granian makes itself.

granian binds its socket at start but listens on it only once its worker has loaded the app, so
until then a connection to it is refused. On a socket already listening, the edge's first
requests wait in its backlog while the app loads instead, as they did when the socket was
gunicorn's. granian's command line has no option for a socket it is given: this sets it.
"""
from __future__ import annotations

import os
import socket

from granian._granian import SocketHolder
from granian.cli import entrypoint
from granian.server import Server

from gridcommon.serve import FD_VARIABLE


def _given_socket(server: Server) -> None:
    """In place of granian's ``_init_shared_socket``: the socket from UPSTREAM_FD, as granian keeps its own."""
    fd = int(os.environ[FD_VARIABLE])
    server._ssp = None
    server._shd = SocketHolder(fd, True, server.backlog)
    server._sfd = fd
    given = socket.socket(fileno=fd)
    given.set_inheritable(True)
    server._sso = given


if __name__ == "__main__":
    Server._init_shared_socket = _given_socket
    entrypoint()
