"""Attackers of the gateway's OCPP port, each run as a process of its own for a fixed time.

``python -m tests.gateway_attack sockets HOST PORT --idle N --slow M --half-open K ...`` keeps
N connections that send nothing, M WebSocket handshakes sent one byte every 2 s, and K
half-open WebSocket connections (a whole handshake with valid credentials, then silence:
what arrives is read and dropped, no pong is ever sent), each replaced when the gateway
lets go of it. ``python -m tests.gateway_attack hostile HOST PORT ...`` runs hostile
stations in a loop (malformed frames, wrong schemas, unknown actions, oversized frames,
floods of CALLs from a station that reads its answers and from one that reads nothing,
another station's id, bad ids), at most one round every ``--round-seconds``, and records
what the gateway answered. Either prints what it saw as one JSON line at the end
(``sockets`` also on SIGTERM). It runs in a process of its own at the lowest CPU priority
(the test starts it under ``nice``): on a real network an attacker's work is done on its
own machines, and what is measured is what the gateway does to its other stations.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import errno
import json
import os
import resource
import selectors
import signal
import socket
import sys
import time
from collections import Counter
from typing import Any

import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

SLOW_INTERVAL_SECONDS = 2.0
# Connects tried per pass, so the loop never stalls on a burst of refused or pending ones.
CONNECTS_PER_PASS = 200
# How long a hostile station waits for any one answer before it counts the gateway as silent.
ANSWER_TIMEOUT_SECONDS = 10.0
# A flooding station that read nothing while it sent has stalled its own connection's answers (the gateway's
# writes wait for it to read): it waits longer for the close.
FLOOD_CLOSE_TIMEOUT_SECONDS = 30.0
# A station that floods and never reads: how long it stays deaf before it looks at what came back.
MUTE_SECONDS = 3.0


def masked_text(text: str) -> bytes:
    """One client-to-server text frame (RFC 6455: a client masks every frame)."""
    payload = text.encode()
    key = os.urandom(4)
    length = len(payload)
    head = bytes([0x81]) + (bytes([0x80 | length]) if length < 126 else bytes([0x80 | 126]) + length.to_bytes(2, "big"))
    return head + key + bytes(byte ^ key[index % 4] for index, byte in enumerate(payload))


def handshake(host: str, port: int, station_id: str, password: str) -> bytes:
    token = base64.b64encode(f"{station_id}:{password}".encode()).decode()
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET /{station_id} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: ocpp1.6\r\n"
            f"Authorization: Basic {token}\r\n\r\n").encode()


class SocketAttack:
    """Idle, slow and half-open connections; ``half_open`` names the stations whose credentials they use."""

    def __init__(self, host: str, port: int, source: str, idle: int, slow: int,
                 half_open: dict[str, str], password: str) -> None:
        self.host, self.port, self.source, self.password = host, port, source, password
        self.half_open_source = half_open  # station id -> the address its connections come from
        self.wanted = {"idle": idle, "slow": slow, "half_open": len(half_open)}
        self.free_ids = list(half_open)
        # Socket -> [bytes still to send, when it last sent, station id or None].
        self.open: dict[str, dict[socket.socket, list[Any]]] = {kind: {} for kind in self.wanted}
        self.selector = selectors.DefaultSelector()
        self.counts: Counter[str] = Counter()

    def connect(self, kind: str) -> None:
        station_id = self.free_ids.pop() if kind == "half_open" else None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.bind((self.half_open_source[station_id] if station_id else self.source, 0))
            error = sock.connect_ex((self.host, self.port))
            if error not in (0, errno.EINPROGRESS):
                raise OSError(error, "connect")
        except OSError:
            sock.close()
            self.counts["connect_failures"] += 1
            if station_id is not None:
                self.free_ids.append(station_id)
            return
        self.counts[f"{kind}_opened"] += 1
        head = b"" if kind == "idle" else handshake(self.host, self.port, station_id or "slow", self.password)
        self.open[kind][sock] = [head, 0.0, station_id]
        self.selector.register(sock, selectors.EVENT_READ, kind)

    def drop(self, sock: socket.socket, kind: str) -> None:
        self.selector.unregister(sock)
        _, _, station_id = self.open[kind].pop(sock)
        if station_id is not None:
            self.free_ids.append(station_id)
        sock.close()

    def run(self, seconds: float) -> dict[str, int]:
        deadline = time.monotonic() + seconds
        stopped: list[int] = []
        signal.signal(signal.SIGTERM, lambda number, _: stopped.append(number))  # SIGTERM: stop now, report
        while time.monotonic() < deadline and not stopped:
            for kind, wanted in self.wanted.items():
                for _ in range(min(CONNECTS_PER_PASS, wanted - len(self.open[kind]))):
                    self.connect(kind)
            for key, _ in self.selector.select(timeout=0.2):
                sock, kind = key.fileobj, key.data
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if kind == "half_open" and data:
                    if data.startswith(b"HTTP/1.1 101"):
                        self.counts["half_open_upgraded"] += 1
                    elif data.startswith(b"HTTP/1.1 "):
                        self.counts["half_open_refused"] += 1
                    continue  # pings and the close frame: read and ignored, never answered
                self.counts[f"{kind}_closed_by_server"] += 1
                self.drop(sock, kind)
            self.send_pending()
        for kind in self.open:
            for sock in list(self.open[kind]):
                self.drop(sock, kind)
        return dict(self.counts)

    def send_pending(self) -> None:
        now = time.monotonic()
        for kind in ("slow", "half_open"):
            for sock, state in list(self.open[kind].items()):
                pending, sent = state[0], state[1]
                if not pending or (kind == "slow" and now - sent < SLOW_INTERVAL_SECONDS):
                    continue
                try:
                    written = sock.send(pending[:1] if kind == "slow" else pending)
                except (BlockingIOError, InterruptedError):
                    continue  # still connecting: the next pass tries again
                except OSError:
                    self.counts[f"{kind}_closed_by_server"] += 1
                    self.drop(sock, kind)
                    continue
                state[0], state[1] = pending[written:], now
                if kind == "slow":
                    self.counts["slow_bytes_sent"] += written


# --- hostile stations -------------------------------------------------------------------------------


async def _answer(ws: Any) -> list:
    """The next CALLRESULT or CALLERROR; the gateway's own CALLs (profiles at connect) are accepted."""
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), ANSWER_TIMEOUT_SECONDS))
        if frame[0] in (3, 4):
            return frame
        await ws.send(json.dumps([3, frame[1], {"status": "Accepted"}]))


async def _until_closed(ws: Any, send: list[str]) -> int | None:
    """Send ``send`` (stopping at a close), then read until the gateway closes; its close code."""
    try:
        for frame in send:
            await ws.send(frame)
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), ANSWER_TIMEOUT_SECONDS))
            if frame[0] == 2:
                await ws.send(json.dumps([3, frame[1], {"status": "Accepted"}]))
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None


class Hostile:
    def __init__(self, host: str, port: int, password: str, victim: str, source: str) -> None:
        self.base = f"ws://{host}:{port}"
        self.password, self.victim, self.source = password, victim, source
        self.outcomes: dict[str, Counter[str]] = {}

    def note(self, scenario: str, outcome: str) -> None:
        self.outcomes.setdefault(scenario, Counter())[outcome] += 1

    async def connect(self, station_id: str, user: str | None = None, password: str | None = None,
                      subprotocol: str = "ocpp2.0.1") -> Any:
        token = base64.b64encode(f"{user or station_id}:{password or self.password}".encode()).decode()
        return await websockets.connect(f"{self.base}/{station_id}", subprotocols=[subprotocol],
                                        additional_headers={"Authorization": f"Basic {token}"},
                                        open_timeout=ANSWER_TIMEOUT_SECONDS, max_size=None,
                                        ping_interval=None, local_addr=(self.source, 0))

    async def refused(self, scenario: str, station_id: str, **kwargs: Any) -> None:
        try:
            ws = await self.connect(station_id, **kwargs)
        except InvalidStatus as refusal:
            self.note(scenario, f"http_{refusal.response.status_code}")
            return
        self.note(scenario, "accepted")
        await ws.close()

    async def garbage(self) -> None:
        """Frames that are not OCPP, until the gateway closes the connection."""
        async with await self.connect("hostile-garbage") as ws:
            await ws.send("{this is not json")
            answer = await _answer(ws)
            self.note("malformed_frame", f"callerror_{answer[2]}" if answer[0] == 4 else "result")
            code = await _until_closed(ws, ["garbage"] * 20)
            self.note("malformed_frames_repeated", f"close_{code}")

    async def schemas(self) -> None:
        """Schema-invalid CALLs and unknown actions: each a CALLERROR, the connection kept."""
        async with await self.connect("hostile-schema") as ws:
            for scenario, frame in (
                ("wrong_schema", [2, "s1", "BootNotification", {"reason": "PowerUp"}]),
                ("wrong_type", [2, "s2", "Heartbeat", {"customData": 5}]),
                ("unknown_action", [2, "s3", "NoSuchAction", {}]),
            ):
                await ws.send(json.dumps(frame))
                answer = await _answer(ws)
                self.note(scenario, f"callerror_{answer[2]}" if answer[0] == 4 else "result")

    async def oversized(self) -> None:
        async with await self.connect("hostile-big") as ws:
            frame = json.dumps([2, "big", "Heartbeat", {"pad": "x" * 200_000}])
            self.note("oversized", f"close_{await _until_closed(ws, [frame])}")

    async def flood(self) -> None:
        """CALLs sent back to back without waiting: those past the budget refused (GenericError), and the
        connection closed once five bursts' worth were refused within 10 s; a gateway slowed enough to read
        the flood more slowly than that answers every CALL instead."""
        sent, answered, refused = 600, 0, 0
        async with await self.connect("hostile-flood", subprotocol="ocpp1.6") as ws:
            try:
                for number in range(sent):
                    await ws.send(json.dumps([2, f"f{number}", "Heartbeat", {}]))
                while answered < sent:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), FLOOD_CLOSE_TIMEOUT_SECONDS))
                    if frame[0] == 2:
                        await ws.send(json.dumps([3, frame[1], {"status": "Accepted"}]))
                        continue
                    answered += 1
                    refused += frame[0] == 4 and frame[2] == "GenericError"
            except ConnectionClosed as closed:
                self.note("call_flood", f"close_{closed.rcvd.code if closed.rcvd else None}")
                return
            except asyncio.TimeoutError:  # neither an answer nor a close: named, so the test shows where
                self.note("call_flood", f"silent_after_{answered}_answers_{refused}_refused")
                return
        self.note("call_flood", "every_call_answered_some_refused" if refused else "every_call_answered")

    async def mute_flood(self) -> None:
        """CALLs back to back from a station that reads nothing (a tiny receive buffer, never read): the
        gateway must neither wait on it nor hold it open; it ends with a close frame or a reset."""
        outcome = await asyncio.to_thread(self._mute_flood)
        self.note("mute_flood", outcome)

    def _mute_flood(self) -> str:
        host, port = self.base.removeprefix("ws://").rsplit(":", 1)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.bind((self.source, 0))
            sock.settimeout(ANSWER_TIMEOUT_SECONDS)
            sock.connect((host, int(port)))
            sock.sendall(handshake(host, int(port), "hostile-mute", self.password))
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(1)
                if not chunk:
                    return "refused_at_handshake"
                head += chunk
            if not head.startswith(b"HTTP/1.1 101"):
                return "refused_at_handshake"
            try:
                for number in range(600):
                    sock.sendall(masked_text(json.dumps([2, f"m{number}", "Heartbeat", {}])))
            except OSError:
                return "reset_while_sending"
            time.sleep(MUTE_SECONDS)
            received = b""
            try:
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    received += chunk
            except ConnectionResetError:
                return "reset"
            except TimeoutError:
                return "left_open"
        return "close_1008" if b"\x88" in received and (1008).to_bytes(2, "big") in received else "closed_no_frame"

    async def impostors(self) -> None:
        # Another station's id: with the attacker's own credentials, then with a guessed password.
        await self.refused("other_station_id", self.victim, user="hostile-schema")
        await self.refused("wrong_password", self.victim, password="guessed-password-of-20")
        for bad in ("bad:id", "x" * 49, "no-such-station"):
            await self.refused("bad_id", bad)

    async def run(self, seconds: float, max_rounds: int, round_seconds: float) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        rounds = 0
        while time.monotonic() < deadline and rounds < max_rounds:
            rounds += 1
            started = time.monotonic()
            for scenario in (self.garbage, self.schemas, self.oversized, self.flood, self.mute_flood,
                             self.impostors):
                try:
                    await scenario()
                except (OSError, asyncio.TimeoutError, ConnectionClosed, InvalidStatus) as exc:
                    self.note(scenario.__name__, f"failed_{type(exc).__name__}")
            await asyncio.sleep(max(0.0, min(round_seconds - (time.monotonic() - started),
                                             deadline - time.monotonic())))
        return {"rounds": rounds, "outcomes": {name: dict(counts) for name, counts in self.outcomes.items()}}


def raise_open_files(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SystemExit(f"gateway_attack: needs {needed} open files, the hard limit is {hard}")
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["sockets", "hostile"])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--password", default="")
    parser.add_argument("--idle", type=int, default=0)
    parser.add_argument("--slow", type=int, default=0)
    parser.add_argument("--idle-source", default="127.0.0.2")
    parser.add_argument("--half-open", default="", help="comma-separated station ids, one connection each")
    parser.add_argument("--half-open-sources", default="127.0.0.3",
                        help="comma-separated addresses the half-open connections take in turn")
    parser.add_argument("--victim", default="", help="a normal station's id the hostile ones try to take")
    parser.add_argument("--source", default="127.0.0.4")
    parser.add_argument("--max-rounds", type=int, default=1000)
    parser.add_argument("--round-seconds", type=float, default=0.0, help="least time one hostile round takes")
    options = parser.parse_args(argv)
    if options.kind == "hostile":
        result = asyncio.run(Hostile(options.host, options.port, options.password, options.victim,
                                     options.source).run(options.seconds, options.max_rounds,
                                                         options.round_seconds))
    else:
        names = [name for name in options.half_open.split(",") if name]
        sources = options.half_open_sources.split(",")
        half_open = {name: sources[number % len(sources)] for number, name in enumerate(names)}
        raise_open_files(options.idle + options.slow + len(half_open) + 64)
        result = SocketAttack(options.host, options.port, options.idle_source, options.idle, options.slow, half_open,
                              options.password).run(options.seconds)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
