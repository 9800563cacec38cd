"""The gateway against real substations (gunicorn) and simulated stations over real WebSockets.

A transaction becomes a leased session at its station's substation, every allocation
change reaches the station as a TxProfile, and what the stations are allowed to draw
(sum of amps × 230 V × phases, sampled at 20 Hz) never passes the substation's limit.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from charge_point_gateway.transactions import kw_to_amps, session_id_for
from tests.harness import OPERATOR_TOKEN, Service, get_json, start_all, stop_all
from tests.ocpp_support import Gateway, Station16, Station201, connect, metric_sum

pytestmark = pytest.mark.integration

VOLTS = 230.0
FAST = {
    # Short enough for a test to see several renewals and profile rounds in seconds.
    "LEASE_SECONDS": "15",
    "WATCH_WAIT_SECONDS": "5",
    "MIN_PROFILE_INTERVAL_SECONDS": "0.5",
    "VEHICLE_RESPONSE_SECONDS": "0.2",
    "SUBSTATION_TIMEOUT_SECONDS": "3",
}


def substation(log_dir: Path, name: str, capacity_kw: float, **env: str) -> Service:
    return Service(name=name, app="substation_service:create_app()", log_dir=log_dir, env={
        "SUBSTATION_ID": name, "CAPACITY_KW": str(capacity_kw), "ADMIN_TOKEN": OPERATOR_TOKEN,
        "STATE_DIR": str(log_dir / "state"), **env,
    })


@pytest.fixture
def services(tmp_path: Path):
    started: list[Any] = []
    yield started
    for item in reversed(started):
        item.stop() if isinstance(item, Gateway) else stop_all([item])


def session_at(sub: Service, session_id: str) -> dict[str, Any]:
    return get_json(f"{sub.url}/charge/{session_id}")


async def until(condition, timeout: float, what: str) -> None:  # noqa: ANN001 - any predicate
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(0.02)


async def session_of(sub: Service, session_id: str) -> dict[str, Any]:
    return await asyncio.to_thread(session_at, sub, session_id)


def test_transactions_become_leased_sessions_and_follow_the_allocation(tmp_path: Path, services: list) -> None:
    sub = substation(tmp_path, "substation-1", 30.0)
    start_all([sub])
    services.append(sub)
    gw = Gateway(tmp_path / "gw", env=FAST).start()
    services.append(gw)
    gw.register("cp-a", sub.url, phases=3, max_current_a=32)
    gw.register("cp-b", sub.url, phases=3, max_current_a=32)

    async def scenario() -> None:
        ws_a = await connect(gw.ws_url("cp-a"), "cp-a", "ocpp1.6")
        ws_b = await connect(gw.ws_url("cp-b"), "cp-b", "ocpp2.0.1")
        a, b = Station16("cp-a", ws_a), Station201("cp-b", ws_b)
        loops = [asyncio.create_task(a.start()), asyncio.create_task(b.start())]
        await a.boot()
        await b.boot()
        tx_a = str(await a.start_transaction(1, meter_start=1000))
        sid_a = session_id_for("cp-a", tx_a)
        # Alone, it gets what the station can draw: 32 A × 3 × 230 V = 22.08 kW.
        await until(lambda: a.tx_a.get(tx_a) == 32.0, 10, "station A told 32 A")
        session = await session_of(sub, sid_a)
        assert session["amount"] == pytest.approx(22.08) and session["minimum_kw"] == pytest.approx(4.14)
        assert session["lease_expires_at"] > time.time() and session["duration_seconds"] is None
        # A second transaction: 15 kW each, 21.7 A (rounded down, never more).
        await b.start_transaction(1, "tx-b-1")
        sid_b = session_id_for("cp-b", "tx-b-1")
        share = kw_to_amps(15.0, 3, VOLTS, 32)
        await until(lambda: a.tx_a.get(tx_a) == share and b.tx_a.get("tx-b-1") == share, 10, "both at 21.7 A")
        # Meter values become the session's measured power and energy.
        await a.meter(1, power_w=14000.0, energy_wh=3500.0)
        view = (await asyncio.to_thread(gw.stations))["cp-a"]["transactions"][0]
        assert view["measured_kw"] == 14.0 and view["energy_wh"] == 2500.0 and view["session_id"] == sid_a
        # The 2.0.1 vehicle reports at most 10 A: its amount drops, A gets the rest.
        from ocpp.v201 import call as call201
        needs = await b.call(call201.NotifyEVChargingNeeds(evse_id=1, charging_needs={
            "requested_energy_transfer": "AC_three_phase", "departure_time": "2030-01-01T08:00:00Z",
            "ac_charging_parameters": {"energy_amount": 20000, "ev_min_current": 6, "ev_max_current": 10,
                                       "ev_max_voltage": 400}}))
        assert needs.status == "Accepted"
        await until(lambda: b.tx_a.get("tx-b-1") == 10.0 and a.tx_a.get(tx_a) == 32.0, 10, "B at 10 A, A at 32 A")
        session_b = await session_of(sub, sid_b)
        assert session_b["amount"] == pytest.approx(6.9)
        # Leases are renewed while the gateway lives: past one whole lease the sessions are still there.
        await asyncio.sleep(16)
        assert (await session_of(sub, sid_a)).get("ended_at") is None
        await a.stop_transaction(1, meter_stop=5000)
        await until(lambda: session_at(sub, sid_a).get("end_reason") == "stopped", 10, "A's session stopped")
        await b.stop_transaction(1)
        await until(lambda: session_at(sub, sid_b).get("end_reason") == "stopped", 10, "B's session stopped")
        for loop in loops:
            loop.cancel()
        await ws_a.close()
        await ws_b.close()

    asyncio.run(scenario())
    page = requests.get(f"{gw.http}/metrics", timeout=5).text
    assert metric_sum(page, "gateway_profile_latency_seconds_count") >= 4
    assert metric_sum(page, "gateway_active_transactions") == 0


def test_a_station_that_rejects_profiles_is_counted_at_its_maximum(tmp_path: Path, services: list) -> None:
    sub = substation(tmp_path, "substation-1", 30.0)
    start_all([sub])
    services.append(sub)
    gw = Gateway(tmp_path / "gw", env=FAST).start()
    services.append(gw)
    gw.register("stubborn", sub.url, max_current_a=32)
    gw.register("polite", sub.url, max_current_a=32)

    async def scenario() -> None:
        ws_s = await connect(gw.ws_url("stubborn"), "stubborn", "ocpp1.6")
        ws_p = await connect(gw.ws_url("polite"), "polite", "ocpp1.6")
        stubborn = Station16("stubborn", ws_s, reject_profiles=True)
        polite = Station16("polite", ws_p)
        loops = [asyncio.create_task(stubborn.start()), asyncio.create_task(polite.start())]
        tx_p = str(await polite.start_transaction(1))
        await until(lambda: polite.tx_a.get(tx_p) == 32.0, 10, "polite alone at 32 A")
        tx_s = str(await stubborn.start_transaction(1))
        sid_s = session_id_for("stubborn", tx_s)
        # The stubborn one refuses its 21.7 A: the substation is told it draws 22.08 kW, the polite one
        # gets what is left: 30 - 22.08 = 7.92 kW, 11.4 A.
        await until(lambda: polite.tx_a.get(tx_p) == kw_to_amps(30 - 22.08, 3, VOLTS, 32), 15,
                    "polite curtailed to what the stubborn one leaves")
        session = await session_of(sub, sid_s)
        assert session["minimum_kw"] == pytest.approx(22.08) and session["allocated_kw"] == pytest.approx(22.08)
        view = (await asyncio.to_thread(gw.stations))["stubborn"]["transactions"][0]
        assert view["profile_rejected"] is True
        for loop in loops:
            loop.cancel()
        await ws_s.close()
        await ws_p.close()

    asyncio.run(scenario())
    page = requests.get(f"{gw.http}/metrics", timeout=5).text
    assert metric_sum(page, "gateway_profiles_rejected_total", kind="rejected") >= 1
    assert "refused a" in gw.log_text()


def test_stations_never_draw_more_than_the_limit(tmp_path: Path, services: list) -> None:
    """Decrease before increase, checked from what the stations were told, at 20 Hz."""
    limit_kw = 40.0
    sub = substation(tmp_path, "substation-1", limit_kw)
    start_all([sub])
    services.append(sub)
    # The default fallback current is 0 A: a new transaction draws nothing until its own profile, and its
    # first profile is an increase like any other.
    # The gateway waits longer for a vehicle to slow down (0.5 s) than the simulated ones take (0.3 s).
    gw = Gateway(tmp_path / "gw", env={**FAST, "VEHICLE_RESPONSE_SECONDS": "0.5"}).start()
    services.append(gw)
    names = [f"cp-{n}" for n in range(5)]
    for name in names:
        gw.register(name, sub.url, max_current_a=32)

    async def scenario() -> tuple[float, int, float]:
        stations: list[Any] = []
        for number, name in enumerate(names):
            version = "ocpp1.6" if number % 2 else "ocpp2.0.1"
            ws = await connect(gw.ws_url(name), name, version)
            station = (Station16 if number % 2 else Station201)(name, ws)
            asyncio.create_task(station.start())
            await station.boot()
            stations.append(station)
        await until(lambda: all(s.default_a is not None for s in stations), 10, "the fallback profiles")
        worst = 0.0
        peak_seen = 0.0
        samples = 0
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal worst, samples, peak_seen
            while not done.is_set():
                drawn = sum(s.told_a(1) * VOLTS * 3 / 1000 for s in stations)
                worst = max(worst, drawn)
                peak_seen = max(peak_seen, drawn)
                samples += 1
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        rng = random.Random(7)
        from ocpp.v201 import call as call201
        counter = 0
        started_at = time.monotonic()
        while time.monotonic() - started_at < 25:
            station = rng.choice(stations)
            if 1 not in station.running:
                counter += 1
                if isinstance(station, Station16):
                    await station.start_transaction(1)
                else:
                    await station.start_transaction(1, f"t{counter}")
            elif isinstance(station, Station201) and rng.random() < 0.5:
                # The vehicle changes its maximum current: power moves between stations.
                await station.call(call201.NotifyEVChargingNeeds(evse_id=1, charging_needs={
                    "requested_energy_transfer": "AC_three_phase",
                    "ac_charging_parameters": {"energy_amount": 20000, "ev_min_current": 6,
                                               "ev_max_current": rng.choice([8, 16, 32]), "ev_max_voltage": 400}}))
            elif rng.random() < 0.4:
                await station.stop_transaction(1)
            await asyncio.sleep(rng.uniform(0.2, 1.2))
        done.set()
        await sampler
        return worst, samples, peak_seen

    worst, samples, peak = asyncio.run(scenario())
    assert samples > 300
    # The limit binds (the stations could draw 5 × 22 kW) and the stations used most of it ...
    assert peak > 0.8 * limit_kw
    # ... but never more.
    assert worst <= limit_kw + 1e-9, f"stations were allowed {worst:.2f} kW of a {limit_kw:g} kW limit"
    assert "Traceback" not in gw.log_text(), gw.log_text()[-3000:]
    # Every station applied what it accepted: the read-backs (GetCompositeSchedule) agree.
    assert "composite schedule allows" not in gw.log_text()


def test_a_vehicle_plugging_in_on_a_full_substation_never_takes_the_draw_past_its_limit(
        tmp_path: Path, services: list) -> None:
    """With the default settings a new transaction draws nothing before the others have come down.

    What the vehicles draw is sampled at 20 Hz from their stations' profiles, each vehicle following a
    lower limit only 0.3 s later, as a real one slowing down does.
    """
    limit_kw = 22.0
    sub = substation(tmp_path, "substation-1", limit_kw)
    start_all([sub])
    services.append(sub)
    gw = Gateway(tmp_path / "gw").start()
    services.append(gw)
    for name in ("first", "second", "third"):
        gw.register(name, sub.url, max_current_a=32)

    async def scenario() -> tuple[float, float, int]:
        ws_1 = await connect(gw.ws_url("first"), "first", "ocpp1.6")
        first = Station16("first", ws_1)
        # 2.0.1 stations: their vehicle is plugged in (running) before the gateway hears of the transaction.
        late = []
        for name in ("second", "third"):
            late.append(Station201(name, await connect(gw.ws_url(name), name, "ocpp2.0.1")))
        stations = [first, *late]
        loops = [asyncio.create_task(s.start()) for s in stations]
        for station in stations:
            await station.boot()
        await until(lambda: all(s.default_a is not None for s in stations), 10, "the fallback profiles")
        worst = peak = 0.0
        samples = 0
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal worst, peak, samples
            while not done.is_set():
                drawn = sum(s.told_a(1) * VOLTS * 3 / 1000 for s in stations)
                worst, peak, samples = max(worst, drawn), max(peak, drawn), samples + 1
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        tx = str(await first.start_transaction(1))
        # Alone, it takes the whole substation: 22 kW is 31.8 A on three phases.
        await until(lambda: first.told_a(1) == kw_to_amps(limit_kw, 3, VOLTS, 32), 15, "first at the limit")
        await asyncio.sleep(0.5)
        for count, station in enumerate(late, start=2):
            await station.start_transaction(1, f"{station.id}-1")
            share = kw_to_amps(limit_kw / count, 3, VOLTS, 32)
            await until(lambda: all(s.told_a(1) == share for s in stations[:count]), 15,
                        f"{count} vehicles at {share} A each")
            await asyncio.sleep(0.5)
        done.set()
        await sampler
        assert first.tx_a[tx] == kw_to_amps(limit_kw / 3, 3, VOLTS, 32)
        for loop in loops:
            loop.cancel()
        return worst, peak, samples

    worst, peak, samples = asyncio.run(scenario())
    assert samples > 50 and peak > 0.95 * limit_kw  # the substation was full each time a vehicle arrived
    assert worst <= limit_kw + 1e-9, f"the vehicles drew {worst:.2f} kW on a {limit_kw:g} kW substation"


def test_a_session_whose_lease_lapsed_is_created_again_while_its_transaction_runs(
        tmp_path: Path, services: list) -> None:
    sub = substation(tmp_path, "substation-1", 30.0)
    start_all([sub])
    services.append(sub)
    gw = Gateway(tmp_path / "gw", env={**FAST, "LEASE_SECONDS": "5"}).start()
    services.append(gw)
    gw.register("cp-lapse", sub.url, max_current_a=32)
    first_id = session_id_for("cp-lapse", "lapse-1")
    second_id = session_id_for("cp-lapse", "lapse-1", 1)

    def active_ids() -> list[str]:
        return [s["session_id"] for s in get_json(f"{sub.url}/sessions")["sessions"]]

    async def scenario() -> None:
        ws = await connect(gw.ws_url("cp-lapse"), "cp-lapse", "ocpp2.0.1")
        station = Station201("cp-lapse", ws)
        loop = asyncio.create_task(station.start())
        await station.boot()
        await station.start_transaction(1, "lapse-1")
        await until(lambda: station.tx_a.get("lapse-1") == 32.0, 10, "the station told 32 A")
        assert await asyncio.to_thread(active_ids) == [first_id]
        # The gateway stops answering for longer than a lease: no renewal reaches the substation.
        os.kill(gw.process.pid, signal.SIGSTOP)
        try:
            await until(lambda: session_at(sub, first_id).get("end_reason") == "lease_expired", 15, "lapsed")
        finally:
            os.kill(gw.process.pid, signal.SIGCONT)
        # The vehicle still charges: it is counted again, under the transaction's next session id.
        await until(lambda: active_ids() == [second_id], 15, "the session created again")
        again = await session_of(sub, second_id)
        assert again["vehicle_id"] == "TAG1" and again["amount"] == pytest.approx(22.08)
        assert again["allocated_kw"] == pytest.approx(22.08)
        await until(lambda: station.tx_a.get("lapse-1") == 32.0, 15, "its profile follows the new session")
        view = (await asyncio.to_thread(gw.stations))["cp-lapse"]["transactions"]
        assert [t["session_id"] for t in view] == [second_id]
        loop.cancel()
        await ws.close()

    asyncio.run(scenario())
    assert gw.log_text().count("asking for it again as session " + second_id) == 1
    # The generation is durable: a restarted gateway goes on with the same session and asks for no other.
    # The lease is held meanwhile as the gateway would hold it, so a slow restart does not lapse it too.
    held = requests.post(f"{sub.url}/leases", json={"session_ids": [second_id], "lease_seconds": 120}, timeout=5)
    assert held.status_code == 200 and held.json()["unknown"] == []
    gw.kill()
    gw.start()

    def seen_after_restart() -> bool:
        view = gw.stations()["cp-lapse"]["transactions"]
        return [(t["session_id"], t["allocated_kw"]) for t in view] == [(second_id, pytest.approx(22.08))]

    asyncio.run(until(seen_after_restart, 15, "the restarted gateway sees its session's allocation"))
    assert active_ids() == [second_id]
    assert "had ended session" not in gw.log_text().split("resumed 1 transactions")[-1]
    third = requests.get(f"{sub.url}/charge/{session_id_for('cp-lapse', 'lapse-1', 2)}", timeout=5)
    assert third.status_code == 404

    async def stop() -> None:
        ws = await connect(gw.ws_url("cp-lapse"), "cp-lapse", "ocpp2.0.1")
        station = Station201("cp-lapse", ws)
        loop = asyncio.create_task(station.start())
        station.running[1] = "lapse-1"
        await station.stop_transaction(1)
        await until(lambda: session_at(sub, second_id).get("end_reason") == "stopped", 10, "its session stopped")
        loop.cancel()
        await ws.close()

    asyncio.run(stop())
    assert active_ids() == []


def test_a_killed_gateway_loses_no_transaction_and_counts_none_twice(tmp_path: Path, services: list) -> None:
    sub = substation(tmp_path, "substation-1", 50.0)
    start_all([sub])
    services.append(sub)
    gw = Gateway(tmp_path / "gw", env=FAST).start()
    services.append(gw)
    gw.register("cp16", sub.url)
    gw.register("cp201", sub.url)
    start_stamp = "2030-01-01T00:00:00.000Z"

    async def before_kill() -> str:
        ws16 = await connect(gw.ws_url("cp16"), "cp16", "ocpp1.6")
        ws201 = await connect(gw.ws_url("cp201"), "cp201", "ocpp2.0.1")
        s16, s201 = Station16("cp16", ws16), Station201("cp201", ws201)
        loops = [asyncio.create_task(s16.start()), asyncio.create_task(s201.start())]
        tx = str(await s16.start_transaction(1, meter_start=500, timestamp=start_stamp))
        await s201.start_transaction(1, "b-1")
        await s201.start_transaction(2, "b-2")  # ends while the gateway is down, and nobody tells it
        await until(lambda: s16.tx_a.get(tx) is not None and s201.tx_a.get("b-1") is not None, 10, "profiles")
        for loop in loops:
            loop.cancel()
        return tx

    transaction_id = asyncio.run(before_kill())
    sid16, sid201 = session_id_for("cp16", transaction_id), session_id_for("cp201", "b-1")
    forgotten = session_id_for("cp201", "b-2")
    gw.kill()
    gw.start()

    async def after_restart() -> None:
        ws16 = await connect(gw.ws_url("cp16"), "cp16", "ocpp1.6")
        ws201 = await connect(gw.ws_url("cp201"), "cp201", "ocpp2.0.1")
        s16, s201 = Station16("cp16", ws16), Station201("cp201", ws201)
        loops = [asyncio.create_task(s16.start()), asyncio.create_task(s201.start())]
        # The StartTransaction whose answer was lost, sent again: the same transaction.
        again = await s16.start_transaction(1, meter_start=500, timestamp=start_stamp)
        assert str(again) == transaction_id
        s201.running[1] = "b-1"
        s201.seq_no = 3  # two events queued while offline were lost: a gap the gateway counts
        # At boot the gateway asks it about b-1 and b-2 (GetTransactionStatus): b-1 runs, b-2 does not.
        await s201.boot()
        await until(lambda: session_at(sub, forgotten).get("end_reason") == "stopped", 10, "b-2 ended")
        await s201.stop_transaction(1, offline=True)
        await s16.stop_transaction(1, meter_stop=4500)
        await until(lambda: not any(t for e in gw.stations().values() for t in e["transactions"]), 10,
                    "no transaction left at the gateway")
        for loop in loops:
            loop.cancel()

    asyncio.run(after_restart())
    ended = [s for s in get_json(f"{sub.url}/sessions?ended=1")["sessions"]
             if s["session_id"] in (sid16, sid201, forgotten)]
    assert sorted(s["session_id"] for s in ended) == sorted([sid16, sid201, forgotten])  # each once
    assert all(s["end_reason"] == "stopped" for s in ended)
    assert get_json(f"{sub.url}/sessions")["sessions"] == []
    page = requests.get(f"{gw.http}/metrics", timeout=5).text
    assert metric_sum(page, "gateway_transaction_event_gaps_total") == 2


def test_tapering_offline_stations_and_profiles_not_applied(tmp_path: Path, services: list) -> None:
    sub = substation(tmp_path, "substation-1", 30.0)
    start_all([sub])
    services.append(sub)
    gw = Gateway(tmp_path / "gw", env={
        **FAST, "TAPER_SECONDS": "0.5", "TAPER_RATIO": "0.6", "TAPER_MARGIN_KW": "1",
        "TRANSACTION_TIMEOUT_SECONDS": "3",
    }).start()
    services.append(gw)
    gw.register("taper", sub.url)
    gw.register("liar", sub.url)
    gw.register("leaver", sub.url)

    async def scenario() -> None:
        ws_t = await connect(gw.ws_url("taper"), "taper", "ocpp2.0.1")
        taper = Station201("taper", ws_t)
        loop_t = asyncio.create_task(taper.start())
        await taper.start_transaction(1, "tp-1")
        sid = session_id_for("taper", "tp-1")
        await until(lambda: taper.tx_a.get("tp-1") == 32.0, 10, "taper alone at 32 A")
        # Drawing 5 kW of its 22 kW for longer than TAPER_SECONDS: its amount comes down to 6 kW.
        for _ in range(4):
            await taper.meter(1, power_w=5000.0, energy_wh=1000.0)
            await asyncio.sleep(0.3)
        await until(lambda: session_at(sub, sid)["amount"] == pytest.approx(6.0), 10, "amount lowered to 6 kW")
        await until(lambda: taper.tx_a.get("tp-1") == kw_to_amps(6.0, 3, VOLTS, 32), 10, "profile follows")
        # Drawing near its allocation again: the whole amount comes back.
        await taper.meter(1, power_w=5900.0, energy_wh=2000.0)
        await until(lambda: session_at(sub, sid)["amount"] == pytest.approx(22.08), 10, "amount restored")

        # A station that says "Accepted" and ignores the profile is caught by the read-back.
        ws_l = await connect(gw.ws_url("liar"), "liar", "ocpp1.6")
        liar = Station16("liar", ws_l)
        liar.apply_profiles = False
        loop_l = asyncio.create_task(liar.start())
        await liar.start_transaction(1)
        await until(lambda: "station liar accepted" in gw.log_text(), 10, "the read-back catches it")
        await liar.stop_transaction(1)

        # A station that goes silent keeps its session until the transaction timeout, then it ends.
        ws_v = await connect(gw.ws_url("leaver"), "leaver", "ocpp1.6")
        leaver = Station16("leaver", ws_v)
        loop_v = asyncio.create_task(leaver.start())
        tx_v = str(await leaver.start_transaction(1))
        sid_v = session_id_for("leaver", tx_v)
        await until(lambda: leaver.tx_a.get(tx_v) is not None, 10, "leaver has its profile")
        loop_v.cancel()
        await ws_v.close()
        await asyncio.sleep(1.0)
        assert session_at(sub, sid_v).get("ended_at") is None  # still charging on its last profile
        await until(lambda: session_at(sub, sid_v).get("end_reason") == "stopped", 15, "timed out and stopped")
        for loop in (loop_t, loop_l):
            loop.cancel()
        await ws_t.close()
        await ws_l.close()

    asyncio.run(scenario())
    page = requests.get(f"{gw.http}/metrics", timeout=5).text
    assert metric_sum(page, "gateway_profiles_rejected_total", kind="not_applied") >= 1
    assert "Timeout" in gw.log_text()


def test_stations_from_a_deployment_file(tmp_path: Path, services: list) -> None:
    sub = substation(tmp_path, "substation-1", 30.0)
    start_all([sub])
    services.append(sub)
    deployment = tmp_path / "stations.json"
    deployment.write_text(json.dumps({"stations": [
        {"station_id": "file-1", "substation_url": sub.url, "phases": 1, "max_current_a": 16,
         "password": "a-file-password-1"},
    ]}))
    gw = Gateway(tmp_path / "gw", env={**FAST, "STATIONS_FILE": str(deployment)}).start()
    services.append(gw)
    assert gw.stations()["file-1"]["phases"] == 1

    async def scenario() -> float | None:
        ws = await connect(gw.ws_url("file-1"), "file-1", "ocpp1.6", password="a-file-password-1")
        station = Station16("file-1", ws, max_current_a=16)
        loop = asyncio.create_task(station.start())
        tx = str(await station.start_transaction(1))
        await until(lambda: station.tx_a.get(tx) == 16.0, 10, "16 A on one phase")
        session = await session_of(sub, session_id_for("file-1", tx))
        loop.cancel()
        await ws.close()
        return session["minimum_kw"]

    # A single-phase vehicle's minimum, 6 A × 1 × 230 V = 1.38 kW, raised to the substation's own 1.4 kW.
    assert asyncio.run(scenario()) == pytest.approx(1.4)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stations": [{"station_id": "x:y", "substation_url": sub.url, "max_current_a": 16,
                                             "password": "a-file-password-1"}]}))
    broken = Gateway(tmp_path / "gw2", env={"STATIONS_FILE": str(bad)})
    with pytest.raises(RuntimeError):
        broken.start()
    assert "stations[0]" in broken.log_text() and "':'" in broken.log_text()
