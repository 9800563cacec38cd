"""How many connections may wait for their WebSocket handshake at once: in all, and per client address.

An idle or slow connection costs a socket and a timer until ``OPEN_TIMEOUT_SECONDS`` resets it, so
without a bound one address could open connections until the process runs out of file descriptors,
and then no station could connect at all. Past a bound a new connection is answered at once with a
plain 503 saying which bound, and closed. The bounds are far above what stations need (a reconnect
storm of every station of a site comes from one address for a few seconds at most) and below the
descriptors the process may open. Plain Python: no asyncio, no websockets.
"""
from __future__ import annotations

from collections import Counter


class HandshakeSlots:
    """Connections accepted whose handshake is not done, counted in all and per address."""

    def __init__(self, most: int, most_per_address: int) -> None:
        if most < 1 or most_per_address < 1:
            raise ValueError("the bounds on waiting handshakes must be at least 1")
        self.most = most
        self.most_per_address = most_per_address
        self._per_address: Counter[str] = Counter()
        self._waiting = 0

    @property
    def waiting(self) -> int:
        return self._waiting

    def take(self, address: str) -> str | None:
        """Count a new connection from ``address``; None if it may wait for its handshake, else why not
        (``handshaking_capacity`` or ``address_handshaking_capacity``), and then it is not counted."""
        if self._waiting >= self.most:
            return "handshaking_capacity"
        if self._per_address[address] >= self.most_per_address:
            return "address_handshaking_capacity"
        self._waiting += 1
        self._per_address[address] += 1
        return None

    def give_back(self, address: str) -> None:
        """The connection's handshake is done, or the connection is gone."""
        self._waiting -= 1
        self._per_address[address] -= 1
        if self._per_address[address] <= 0:
            del self._per_address[address]

    def refusal(self, reason: str, address: str) -> bytes:
        """The whole HTTP answer for a connection past a bound: what happened and what to do."""
        if reason == "handshaking_capacity":
            text = (f"The gateway has {self.most} connections waiting for their handshake, its maximum; "
                    "retry in a few seconds.")
        else:
            text = (f"{address} has {self.most_per_address} connections waiting for their handshake, the most "
                    "one address may have; finish or close those, then retry.")
        body = (text + "\n").encode()
        return (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Type: text/plain; charset=utf-8\r\n"
                b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
