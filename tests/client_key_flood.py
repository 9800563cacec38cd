"""A hostile client of the charge API, in a process of its own so its work does not slow the test's measuring.

``python -m tests.client_key_flood HOST PORT --rate R --seconds S --connections C [--key KEY | --wrong-keys]``
sends ``POST /charge`` for invented vehicle ids at R requests a second (0: as fast as it can) for S
seconds over C kept-alive connections. With ``--key`` every request carries that client key (one
client booking what it can); with ``--wrong-keys`` each carries a new random key in the client-key
format (a flood of guesses). At the end it prints what it saw as one JSON line: answers by status,
requests sent, and the rate it reached.
"""
from __future__ import annotations

import argparse
import json
import secrets
import selectors
import socket
import time
from collections import Counter

HEAD_END = b"\r\n\r\n"


def request_bytes(host: str, port: int, number: int, key: str | None, amount: float) -> bytes:
    body = json.dumps({"vehicle_id": f"flood-{number}-{secrets.token_hex(3)}", "amount": amount,
                       "duration_seconds": 3600}).encode()
    key = key or "sgk_" + secrets.token_urlsafe(32)
    return (f"POST /charge HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"X-API-Key: {key}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=5)
        self.sock.setblocking(False)
        self.buffer = b""
        self.busy = False

    def answer(self) -> int | None:
        """The status of a whole answer in the buffer (and drop it from there), or None if not all came yet."""
        end = self.buffer.find(HEAD_END)
        if end < 0:
            return None
        head = self.buffer[:end].decode("latin-1").split("\r\n")
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if len(self.buffer) < end + 4 + length:
            return None
        self.buffer = self.buffer[end + 4 + length:]
        return int(head[0].split()[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--rate", type=float, default=0)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--amount", type=float, default=11)
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--key")
    who.add_argument("--wrong-keys", action="store_true")
    args = parser.parse_args()

    selector = selectors.DefaultSelector()
    connections = [Connection(args.host, args.port) for _ in range(args.connections)]
    for connection in connections:
        selector.register(connection.sock, selectors.EVENT_READ, connection)
    statuses: Counter[str] = Counter()
    sent = errors = 0
    started = time.monotonic()
    deadline = started + args.seconds
    while True:
        now = time.monotonic()
        if now >= deadline and not any(connection.busy for connection in connections):
            break
        due = sent + 1 if args.rate <= 0 else int((now - started) * args.rate) + 1
        for connection in connections:
            if now < deadline and not connection.busy and sent < due:
                try:
                    connection.sock.sendall(request_bytes(args.host, args.port, sent, args.key, args.amount))
                except OSError:
                    errors += 1
                    continue
                connection.busy = True
                sent += 1
        for selected, _ in selector.select(timeout=0.001):
            connection = selected.data
            try:
                data = connection.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:  # closed by the server: open another in its place
                selector.unregister(connection.sock)
                connection.sock.close()
                errors += connection.busy
                fresh = Connection(args.host, args.port)
                connections[connections.index(connection)] = fresh
                selector.register(fresh.sock, selectors.EVENT_READ, fresh)
                continue
            connection.buffer += data
            while (status := connection.answer()) is not None:
                statuses[str(status)] += 1
                connection.busy = False
        if time.monotonic() > deadline + 30:
            break  # answers that never come are counted as missing below
    elapsed = time.monotonic() - started
    answered = sum(statuses.values())
    print(json.dumps({"sent": sent, "answered": answered, "errors": errors, "statuses": dict(statuses),
                      "seconds": round(elapsed, 3), "rate": round(answered / elapsed, 1)}))


if __name__ == "__main__":
    main()
