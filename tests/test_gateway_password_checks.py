"""Password checks never stall the gateway's event loop: scrypt runs in a thread, so the loop
keeps serving every other station while a registration (or a handshake) is being hashed."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from charge_point_gateway.config import Settings
from charge_point_gateway.gateway import Gateway as GatewayCore
from charge_point_gateway.http_api import create_http_app
from charge_point_gateway.store import GatewayStore
from charge_point_gateway.substation_client import SubstationClient
from tests.harness import OPERATOR, OPERATOR_TOKEN, free_port
from tests.ocpp_support import PASSWORD

def test_a_registration_hashes_its_password_off_the_event_loop(tmp_path: Path) -> None:
    """The loop keeps turning while scrypt runs: no pause of the loop comes near the time one
    registration takes (a hash on the loop would stop it for all of that time)."""
    settings = Settings(state_dir=str(tmp_path), admin_token=OPERATOR_TOKEN)
    store = GatewayStore(settings.state_file)
    port = free_port()

    async def scenario() -> tuple[list[float], list[float]]:
        async with aiohttp.ClientSession() as http:
            app = create_http_app(GatewayCore(settings, store, SubstationClient(http, 1.0)))
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            gaps: list[float] = []
            done = asyncio.Event()

            async def ticker() -> None:
                while not done.is_set():
                    started = time.perf_counter()
                    await asyncio.sleep(0.002)
                    gaps.append(time.perf_counter() - started)

            ticking = asyncio.create_task(ticker())
            durations = []
            try:
                for number in range(3):
                    started = time.perf_counter()
                    async with http.put(f"http://127.0.0.1:{port}/stations/cp-{number}", headers=OPERATOR,
                                        json={"substation_url": "http://127.0.0.1:9", "max_current_a": 16,
                                              "password": PASSWORD}, timeout=aiohttp.ClientTimeout(30)) as answer:
                        assert answer.status == 201, await answer.text()
                    durations.append(time.perf_counter() - started)
            finally:
                done.set()
                await ticking
                await runner.cleanup()
            return gaps, durations

    try:
        gaps, durations = asyncio.run(scenario())
    finally:
        store.close()
    print(f"\nregistrations took {[round(1000 * d, 1) for d in durations]} ms; "
          f"the loop's longest pause {1000 * max(gaps):.1f} ms over {len(gaps)} turns")
    assert max(gaps) < 0.75 * min(durations), (max(gaps), durations)
