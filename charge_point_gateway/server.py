"""The OCPP-J WebSocket endpoint: who may connect, how many, and over which subprotocol.

Refused before any upgrade, with a plain HTTP answer saying why:
404 for a path that names no registered station (an id over 48 characters or with ':'
names none), 401 for missing or wrong Basic credentials, 403 for a username that is not
the station id, 503 past the global or per-address cap on stations, 429 for an address past
its budget of wrong passwords (``guesses``), and 400 (websockets' own) without ``ocpp1.6``
or ``ocpp2.0.1`` among the offered subprotocols.

Idle and slow clients cost a socket and a timer: a connection whose handshake is not done
within ``OPEN_TIMEOUT_SECONDS`` is reset, and past ``MAX_HANDSHAKING`` such connections in all,
or ``MAX_HANDSHAKING_PER_ADDRESS`` from one address, a new one is answered 503 at once
(``handshakes``). Each connection's deadline and first keepalive
ping are spread at random over a quarter of their period, so a thousand connections opened
in one burst do not all expire (or all get pinged, and dropped, and reconnect) in the same
turn of the event loop, which would hold every connected station's frames for that long.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hmac
import logging
import os
import random
import secrets
import socket
import ssl
from collections import Counter
from collections.abc import Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote
from weakref import WeakKeyDictionary

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from charge_point_gateway.gateway import Gateway
from charge_point_gateway.guesses import GuessBudget
from charge_point_gateway.handshakes import HandshakeSlots
from charge_point_gateway.passwords import verify_password
from charge_point_gateway.protocol import Station16, Station201
from charge_point_gateway.registry import Station, station_id_problem

log = logging.getLogger("ocpp.server")
SUBPROTOCOLS = ["ocpp2.0.1", "ocpp1.6"]
# Password checks at once: scrypt takes ~50 ms of a core and 16 MiB each; half the cores at most, so a storm
# of handshakes always leaves the event loop serving the connected stations a core of its own.
CONCURRENT_PASSWORD_CHECKS = max(1, (os.cpu_count() or 2) // 2)
# Deadlines and first pings land at random within this share of their period (see the module's docstring).
SPREAD = 0.25
# websockets' own write high-water mark: above it a send waits for the station to read. The protocol glue
# drops a station whose unread output passes its own, lower bound (MAX_UNREAD_BYTES) first, so no
# send ever waits on a station that reads nothing.
WRITE_LIMIT_BYTES = 4 * 1024 * 1024
# Connections the kernel holds for the gateway to accept (capped by net.core.somaxconn). asyncio's 100
# overflows when a burst of idle connections arrives while the loop is busy: the kernel then drops the SYN
# of a real station, which tries again only a second later. Set on the listening socket after asyncio's own
# listen(): asyncio also accepts up to its backlog in one turn of the loop, and 100 is the right size there.
LISTEN_BACKLOG = 4096
# The kernel's send buffer of a station's socket (it doubles it for its bookkeeping). Left to autotuning a
# socket's grows to 4 MiB on Linux for a station that reads nothing; OCPP's messages are small, and
# MAX_UNREAD_BYTES on top of this is when a station is deemed not to read at all.
STATION_SEND_BUFFER_BYTES = 64 * 1024
# A request head longer than this is handed to websockets unfinished, which refuses it (its own limits are
# 8 KiB a line and 128 headers).
MAX_HEAD_BYTES = 16 * 1024


class StationConnection(ServerConnection):
    """websockets' server connection, started only once a whole request head has arrived.

    Until then a connection is a socket, a small buffer and a timer: websockets' own machinery
    for it (its handler task, futures, timeout) costs the event loop a third more for every idle
    or slow client (0.22 against 0.165 ms of CPU each, measured), and a thousand of them come and
    go every few seconds. The deadline and the first keepalive ping are spread out (see the
    module's docstring).
    """

    def __init__(self, *args: Any, handshake_seconds: float, on_expired: Callable[[], None], slots: HandshakeSlots,
                 on_refused: Callable[[str], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handshake_seconds = handshake_seconds
        self._on_expired = on_expired
        self._slots = slots
        self._on_refused = on_refused
        self._slot: str | None = None  # the address whose handshake slot this connection holds, until done
        self._deadline: asyncio.TimerHandle | None = None
        self._accepted: asyncio.Transport | None = None
        self._head: bytearray | None = bytearray()  # None once handed to websockets

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._accepted = transport
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        refused = self._slots.take(address)
        if refused is not None:
            self._on_refused(refused)
            transport.write(self._slots.refusal(refused, address))
            transport.close()
            return
        self._slot = address
        delay = self._handshake_seconds * random.uniform(1 - SPREAD, 1.0)
        self._deadline = asyncio.get_running_loop().call_later(delay, self._handshake_expired)

    def data_received(self, data: bytes) -> None:
        if self._slot is None and self._head is not None:
            return  # refused at once: it is being closed
        if self._head is None:
            super().data_received(data)
            return
        self._head += data
        # A head past websockets' own limits is handed over too: websockets refuses it with its own answer.
        if b"\r\n\r\n" in self._head or len(self._head) > MAX_HEAD_BYTES:
            head, self._head = bytes(self._head), None
            assert self._accepted is not None
            sock = self._accepted.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STATION_SEND_BUFFER_BYTES)
            super().connection_made(self._accepted)
            super().data_received(head)

    def eof_received(self) -> bool | None:
        if self._head is None:
            return super().eof_received()
        return False  # closed before a whole head: nothing to answer

    def _handshake_expired(self) -> None:
        if self._head is not None or self.protocol.state is State.CONNECTING:
            self._on_expired()
            assert self._accepted is not None
            self._accepted.abort()  # a reset: its buffers go at once, no closing handshake with a silent peer

    def start_keepalive(self) -> None:
        self._cancel_deadline()
        self._give_back_slot()
        if self.ping_interval is not None:
            self.loop.call_later(random.uniform(0, SPREAD * self.ping_interval), self._start_keepalive_now)

    def _start_keepalive_now(self) -> None:
        if self.protocol.state is State.OPEN and self.keepalive_task is None:
            super().start_keepalive()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        self._give_back_slot()
        if self._head is None:
            super().connection_lost(exc)

    def _give_back_slot(self) -> None:
        if self._slot is not None:
            self._slots.give_back(self._slot)
            self._slot = None

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


class OcppServer:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.settings = gateway.settings
        self._stations: WeakKeyDictionary[ServerConnection, Station] = WeakKeyDictionary()
        self._per_address: Counter[str] = Counter()
        self._open = 0
        self._checks = asyncio.Semaphore(CONCURRENT_PASSWORD_CHECKS)
        # One check at a time per client address, so the global queue holds at most one handshake per address:
        # hundreds of handshakes from one address (a reconnect storm, a guesser) cannot make the stations of
        # other addresses wait past the open timeout. An entry lives while its address has a handshake waiting.
        self._address_checks: dict[str, asyncio.Lock] = {}
        self._address_waiting: Counter[str] = Counter()
        # Station id -> keyed digest of the password it last connected with (and of its stored hash, so a new
        # password registered by the operator misses): a station reconnecting with the same password costs
        # microseconds, not a scrypt. The key lives only in this process.
        self._verified: dict[str, bytes] = {}
        self._verified_key = secrets.token_bytes(32)
        self._guesses = GuessBudget(self.settings.wrong_passwords_per_minute, self.settings.wrong_password_burst)
        self._server: Server | None = None
        self.handshakes = HandshakeSlots(self.settings.max_handshaking, self.settings.max_handshaking_per_address)

    async def start(self) -> Server:
        settings = self.settings
        context = None
        if settings.tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
        self._server = await serve(
            self._handle,
            settings.host,
            settings.ocpp_port,
            subprotocols=SUBPROTOCOLS,  # type: ignore[arg-type]
            process_request=self._process_request,
            create_connection=functools.partial(  # type: ignore[arg-type]
                StationConnection, handshake_seconds=settings.open_timeout_seconds, on_expired=self._expired,
                slots=self.handshakes, on_refused=self._refused_at_once,
            ),
            # websockets' own deadline only backs up StationConnection's, which always comes first.
            open_timeout=settings.open_timeout_seconds + 1,
            write_limit=WRITE_LIMIT_BYTES,
            max_size=settings.max_message_bytes,
            ping_interval=settings.ping_interval_seconds,
            ping_timeout=settings.ping_timeout_seconds,
            # A station that does not complete a closing handshake within the ping timeout is gone anyway.
            close_timeout=settings.ping_timeout_seconds,
            ssl=context,
            server_header=None,
        )
        for listening in self._server.sockets:
            with socket.socket(fileno=os.dup(listening.fileno())) as same:
                same.listen(LISTEN_BACKLOG)
        return self._server

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _expired(self) -> None:
        self.gateway.metrics.refused.labels("timeout").inc()

    def _refused_at_once(self, reason: str) -> None:
        self.gateway.metrics.refused.labels(reason).inc()

    def _refuse(self, connection: ServerConnection, status: HTTPStatus, reason: str, text: str,
                headers: dict[str, str] | None = None) -> Response:
        self.gateway.metrics.refused.labels(reason).inc()
        log.info("refused a station handshake from %s: %s", _address(connection), text)
        response = connection.respond(status, text + "\n")
        for name, value in (headers or {}).items():
            response.headers[name] = value
        return response

    async def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        station_id = unquote(request.path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1])
        problem = station_id_problem(station_id)
        if problem:
            return self._refuse(connection, HTTPStatus.NOT_FOUND, "bad_id",
                                f"No station here: {problem}. Connect to ws(s)://HOST:PORT/<station-id>.")
        station = self.gateway.stations.get(station_id)
        if station is None:
            return self._refuse(connection, HTTPStatus.NOT_FOUND, "unknown_station",
                                f"Station {station_id!r} is not registered: an operator adds it with "
                                "PUT /stations/<station-id> on the gateway's HTTP port.")
        address = _address(connection)
        if self._open >= self.settings.max_connections:
            return self._refuse(connection, HTTPStatus.SERVICE_UNAVAILABLE, "capacity",
                                f"The gateway holds its maximum of {self.settings.max_connections} stations; "
                                "retry later.", {"Retry-After": "30"})
        if self._per_address[address] >= self.settings.max_connections_per_address:
            return self._refuse(connection, HTTPStatus.SERVICE_UNAVAILABLE, "address_capacity",
                                f"Too many connections from {address} "
                                f"(at most {self.settings.max_connections_per_address}); retry later.",
                                {"Retry-After": "30"})
        credentials = _basic_credentials(request.headers)
        challenge = {"WWW-Authenticate": 'Basic realm="OCPP", charset="UTF-8"'}
        if credentials is None:
            return self._refuse(connection, HTTPStatus.UNAUTHORIZED, "no_credentials",
                                "HTTP Basic credentials required: username = station id, password = the "
                                "station's (security profile 1 or 2).", challenge)
        username, password = credentials
        if username != station_id:
            return self._refuse(connection, HTTPStatus.FORBIDDEN, "wrong_username",
                                "The Basic username must be the station id of the URL.")
        digest = hmac.new(self._verified_key, f"{station.password_hash}\0{password}".encode(), "sha256").digest()
        valid = hmac.compare_digest(self._verified.get(station_id, b""), digest)
        if not valid:
            retry_after = self._guesses.retry_after(address)
            if retry_after:
                return self._refuse(connection, HTTPStatus.TOO_MANY_REQUESTS, "wrong_passwords",
                                    f"Too many wrong passwords from {address}; retry in {retry_after} s.",
                                    {"Retry-After": str(retry_after)})
            valid = await self._verify(address, password, station.password_hash)
            if valid:
                self._remember(station_id, digest)
            else:
                self._guesses.failed(address)
        if not valid:
            return self._refuse(connection, HTTPStatus.UNAUTHORIZED, "wrong_password",
                                f"Wrong password for station {station_id!r}.", challenge)
        self._stations[connection] = station
        return None

    def _remember(self, station_id: str, digest: bytes) -> None:
        if len(self._verified) >= len(self.gateway.stations):  # bounded: drop the stations deleted since
            self._verified = {key: value for key, value in self._verified.items() if key in self.gateway.stations}
        self._verified[station_id] = digest

    async def _verify(self, address: str, password: str, password_hash: str) -> bool:
        """scrypt off the event loop: at most ``CONCURRENT_PASSWORD_CHECKS`` at once, one per address."""
        self._address_waiting[address] += 1
        lock = self._address_checks.setdefault(address, asyncio.Lock())
        try:
            async with lock, self._checks:
                return await asyncio.to_thread(verify_password, password, password_hash)
        finally:
            self._address_waiting[address] -= 1
            if self._address_waiting[address] <= 0:
                del self._address_waiting[address]
                del self._address_checks[address]

    async def _handle(self, connection: ServerConnection) -> None:
        station = self._stations.get(connection)
        if station is None or connection.subprotocol not in SUBPROTOCOLS:
            await connection.close(1002, "subprotocol ocpp1.6 or ocpp2.0.1 required")
            return
        address = _address(connection)
        self._open += 1
        self._per_address[address] += 1
        cls = Station16 if connection.subprotocol == "ocpp1.6" else Station201
        link = cls(self.gateway, station, connection)
        previous = self.gateway.links.get(station.station_id)
        if previous is not None:
            log.info("station %s connected again: its earlier connection is closed", station.station_id)
            await previous.disconnect(1000, "replaced by a newer connection of this station")
        self.gateway.connected(station, link)
        log.info("station %s connected from %s over %s", station.station_id, address, connection.subprotocol)
        try:
            await link.start()
        except ConnectionClosed as closed:
            log.info("station %s disconnected (%s)", station.station_id, closed)
        finally:
            self._open -= 1
            self._per_address[address] -= 1
            if self._per_address[address] <= 0:
                del self._per_address[address]
            self.gateway.disconnected(station.station_id, link)


def _address(connection: ServerConnection) -> str:
    remote: Any = connection.remote_address
    return str(remote[0]) if isinstance(remote, tuple) and remote else "unknown"


def _basic_credentials(headers: Headers) -> tuple[str, str] | None:
    scheme, _, encoded = headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    username, colon, password = decoded.partition(":")
    return (username, password) if colon else None
