"""Idle and slow clients against one port, from one source address, for a fixed time.

``python -m tests.edge_attack HOST PORT --idle N --slow M --seconds S --source ADDR`` keeps N
connections open that send nothing (opening a new one whenever the server closes one) and M
that send a POST's headers with ``Content-Length: 500``, then one byte of body every 2 s
(again replaced when closed). It runs in a process of its own, so its work does not slow the
test's measuring threads; at the end it prints what it saw as one JSON line.
"""
from __future__ import annotations

import argparse
import errno
import json
import resource
import selectors
import socket
import sys
import time

SLOW_BODY_BYTES = 500
SLOW_INTERVAL_SECONDS = 2.0
# Connects tried per pass, so the loop never stalls on a burst of refused or pending ones.
CONNECTS_PER_PASS = 200


def slow_head(host: str, port: int) -> bytes:
    return (f"POST /charge HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {SLOW_BODY_BYTES}\r\n\r\n").encode()


class Attack:
    def __init__(self, host: str, port: int, source: str, idle: int, slow: int) -> None:
        self.host, self.port, self.source = host, port, source
        self.wanted = {"idle": idle, "slow": slow}
        # Socket -> when it last sent; for a slow one still connecting, None: its head is not sent yet.
        self.open: dict[str, dict[socket.socket, float | None]] = {"idle": {}, "slow": {}}
        self.selector = selectors.DefaultSelector()
        self.counts = {"opened": 0, "closed_by_server": 0, "connect_failures": 0, "body_bytes_sent": 0}

    def connect(self, kind: str) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.bind((self.source, 0))
            error = sock.connect_ex((self.host, self.port))
            if error not in (0, errno.EINPROGRESS):
                raise OSError(error, "connect")
        except OSError:
            sock.close()
            self.counts["connect_failures"] += 1
            return
        self.counts["opened"] += 1
        self.open[kind][sock] = None if kind == "slow" else time.monotonic()
        self.selector.register(sock, selectors.EVENT_READ, kind)

    def drop(self, sock: socket.socket, kind: str) -> None:
        self.selector.unregister(sock)
        self.open[kind].pop(sock, None)
        sock.close()

    def run(self, seconds: float) -> dict[str, int]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for kind, wanted in self.wanted.items():
                for _ in range(min(CONNECTS_PER_PASS, wanted - len(self.open[kind]))):
                    self.connect(kind)
            for key, _ in self.selector.select(timeout=0.2):
                sock, kind = key.fileobj, key.data
                try:
                    sock.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                # An answer (a refusal) or a close: either way the server let go of it.
                self.counts["closed_by_server"] += 1
                self.drop(sock, kind)
            now = time.monotonic()
            for sock, sent in list(self.open["slow"].items()):
                if sent is not None and now - sent < SLOW_INTERVAL_SECONDS:
                    continue
                try:
                    if sent is None:
                        sock.send(slow_head(self.host, self.port))
                    else:
                        self.counts["body_bytes_sent"] += sock.send(b" ")
                    self.open["slow"][sock] = now
                except (BlockingIOError, InterruptedError):
                    pass  # still connecting, or the server reads nothing: the next pass tries again
                except OSError:
                    self.drop(sock, "slow")
        for kind in self.open:
            for sock in list(self.open[kind]):
                self.drop(sock, kind)
        return self.counts


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--idle", type=int, default=0)
    parser.add_argument("--slow", type=int, default=0)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--source", default="127.0.0.1")
    options = parser.parse_args(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = options.idle + options.slow + 64
    if hard != resource.RLIM_INFINITY and hard < needed:
        print(f"edge_attack: needs {needed} open files, the hard limit is {hard}", file=sys.stderr)
        return 2
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else hard, hard))
    counts = Attack(options.host, options.port, options.source, options.idle, options.slow).run(options.seconds)
    print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
