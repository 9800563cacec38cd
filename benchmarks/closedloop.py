"""A closed loop of charge requests: each client sends its next request when its last one is answered.

The clients are coroutines on one event loop speaking plain HTTP/1.1 over one kept-alive
connection each, so the load generator costs little next to the servers it measures and
costs the same whatever it measures.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from dataclasses import dataclass, field

from load_tester.stats import percentile


@dataclass
class LoopResult:
    # (seconds since the loop started at which the request was sent, seconds until its answer)
    requests: list[tuple[float, float]] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    # No answer within the client's timeout, or the connection broke.
    failures: int = 0
    # The bodies of the 201 answers, when the loop was asked to keep them.
    admitted: list[dict] = field(default_factory=list)
    elapsed_seconds: float = 0.0

    @property
    def answers_per_second(self) -> float:
        return sum(self.statuses.values()) / self.elapsed_seconds

    def latency_percentile(self, fraction: float, start: float = 0.0, end: float = float("inf")) -> float:
        """The latency below which ``fraction`` of the requests sent in [start, end) were answered."""
        latencies = [latency for sent, latency in self.requests if start <= sent < end]
        if not latencies:
            return float("nan")
        return percentile(latencies, round(fraction * 100))

    def longest(self, start: float = 0.0, end: float = float("inf")) -> float:
        """The longest wait of a request in flight at any moment of [start, end)."""
        return max((latency for sent, latency in self.requests if sent < end and sent + latency >= start), default=0.0)


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def _run(
    host: str, port: int, clients: int, seconds: float, max_requests: int, timeout: float, amount_kw: float,
    duration_seconds: float, prefix: str, keep_admitted: bool, fleet: int | None, headers: dict[str, str],
) -> LoopResult:
    result = LoopResult()
    numbers = itertools.count()
    started = time.monotonic()
    stop_at = started + seconds
    extra_head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())

    async def client() -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        while time.monotonic() < stop_at:
            number = next(numbers)
            if number >= max_requests:
                break
            vehicle = number if fleet is None else number % fleet
            body = json.dumps({"vehicle_id": f"{prefix}-{vehicle}", "amount": amount_kw,
                               "duration_seconds": duration_seconds}).encode()
            head = (f"POST /charge HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                    f"{extra_head}Content-Length: {len(body)}\r\n\r\n").encode()
            sent = time.monotonic()
            try:
                if writer is None:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
                writer.write(head + body)
                status, answer = await asyncio.wait_for(_read_answer(reader), timeout)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
                result.failures += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            result.requests.append((sent - started, time.monotonic() - sent))
            result.statuses[status] += 1
            if keep_admitted and status == 201:
                result.admitted.append(json.loads(answer))
        if writer is not None:
            writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    result.elapsed_seconds = time.monotonic() - started
    return result


def closed_loop(
    url: str, clients: int, seconds: float, *, max_requests: int = 1_000_000, timeout: float = 10.0,
    amount_kw: float = 1.0, duration_seconds: float = 5.0, prefix: str = "EV-loop", keep_admitted: bool = False,
    fleet: int | None = None, headers: dict[str, str] | None = None,
) -> LoopResult:
    """``clients`` clients sending ``POST /charge`` to ``url`` for ``seconds`` or ``max_requests`` in all.

    Every request names a vehicle of its own (``prefix``-number), so none is refused as a repeat;
    with ``fleet``, the vehicles of a fleet that size take turns instead. ``keep_admitted`` keeps
    the body of every 201; ``headers`` go with every request (a client key, say).
    """
    host_port = url.split("://", 1)[1].rstrip("/")
    host, _, port = host_port.partition(":")
    return asyncio.run(_run(host, int(port), clients, seconds, max_requests, timeout, amount_kw,
                            duration_seconds, prefix, keep_admitted, fleet, headers or {}))
