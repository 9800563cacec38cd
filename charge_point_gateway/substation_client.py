"""Calls to a substation's session API (leased sessions, renewals, changes, the long-polled state).

Every call has a timeout; a substation that cannot be reached is a ``SubstationUnavailable``
saying which one and what went wrong, so the caller can retry later.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import aiohttp


class SubstationUnavailable(RuntimeError):
    """No usable answer from a substation (down, timed out, or an answer that is not JSON)."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]


class SubstationClient:
    def __init__(self, session: aiohttp.ClientSession, timeout_seconds: float) -> None:
        self._http = session
        self._timeout = timeout_seconds

    async def _call(self, method: str, url: str, body: object = None, timeout: float | None = None) -> Answer:
        try:
            async with self._http.request(
                method, url, json=body, timeout=aiohttp.ClientTimeout(total=timeout or self._timeout)
            ) as response:
                try:
                    payload = await response.json(content_type=None)
                except ValueError:
                    payload = None
                if not isinstance(payload, dict):
                    raise SubstationUnavailable(f"{method} {url} answered {response.status} without a JSON object")
                return Answer(response.status, payload)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise SubstationUnavailable(f"{method} {url} failed: {exc.__class__.__name__} {exc}".strip()) from None

    async def start(
        self, base: str, session_id: str, vehicle_id: str, amount_kw: float, minimum_kw: float | None,
        lease_seconds: float, need: dict[str, object] | None = None,
    ) -> Answer:
        """A leased session; ``minimum_kw`` None leaves the substation's own minimum; ``need`` its
        ``energy_kwh`` and ``departure`` when the vehicle told them (``transactions.energy_need``)."""
        body: dict[str, object] = {
            "session_id": session_id,
            "vehicle_id": vehicle_id,
            "amount": round(amount_kw, 3),
            "lease_seconds": lease_seconds,
            **(need or {}),
        }
        if minimum_kw is not None:
            body["minimum_kw"] = round(minimum_kw, 3)
        return await self._call("POST", f"{base}/charge", body)

    async def status(self, base: str) -> Answer:
        return await self._call("GET", f"{base}/status")

    async def stop(self, base: str, session_id: str) -> Answer:
        return await self._call("DELETE", f"{base}/charge/{session_id}")

    async def change(self, base: str, session_id: str, amount_kw: float | None = None,
                     minimum_kw: float | None = None, need: dict[str, object] | None = None) -> Answer:
        body: dict[str, object] = {**(need or {})}
        if amount_kw is not None:
            body["amount"] = round(amount_kw, 3)
        if minimum_kw is not None:
            body["minimum_kw"] = round(minimum_kw, 3)
        return await self._call("PATCH", f"{base}/charge/{session_id}", body)

    async def renew(self, base: str, session_ids: list[str], lease_seconds: float) -> Answer:
        return await self._call("POST", f"{base}/leases", {"session_ids": session_ids, "lease_seconds": lease_seconds})

    async def watch(self, base: str, after_version: int, wait_seconds: float) -> Answer:
        """``GET /sessions`` once its state_version passes ``after_version`` (or after the wait); at once
        when ``after_version`` is negative (nothing seen yet)."""
        if after_version < 0:
            return await self._call("GET", f"{base}/sessions")
        return await self._call(
            "GET", f"{base}/sessions?after_version={after_version}&wait={wait_seconds:g}",
            timeout=wait_seconds + self._timeout,
        )
