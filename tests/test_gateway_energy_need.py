"""A 2.0.1 vehicle's NotifyEVChargingNeeds becomes its session's energy need at the substation.

Against a real substation (gunicorn) and a simulated station over a real WebSocket (the
``ocpp`` package's client side): ``energyAmount`` in Wh is the session's ``energy_kwh`` and
``departureTime`` its ``departure``; the substation then answers whether the need is feasible.
A need out of bounds is left out, and the vehicle's own limits still apply.
"""
from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from ocpp.v201 import call as call201

from charge_point_gateway.transactions import Transaction, energy_need, session_id_for
from gridcommon.timefmt import format_time, parse_time
from tests.harness import start_all
from tests.ocpp_support import Gateway, Station201, connect
from tests.test_gateway_e2e import FAST, session_at, services, substation, until  # noqa: F401 - fixture

VOLTS = 230.0


def transaction(energy_wh: Any, departure: Any) -> Transaction:
    return Transaction("s", "cp", "tx-1", 1, None, "http://sub", 3, 11.0, 1.4, 0.0,
                       ev_energy_wh=energy_wh, departure_time=departure)


def in_hours(hours: float) -> str:
    return format_time(datetime.now(timezone.utc) + timedelta(hours=hours))


def test_a_need_is_the_energy_in_kwh_by_the_departure_in_utc() -> None:
    departure = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(hours=3)
    local = departure.astimezone(timezone(timedelta(hours=2))).isoformat()
    need = energy_need(transaction(20_000, local))
    assert need == {"energy_kwh": 20.0, "departure": format_time(departure)}


@pytest.mark.parametrize("energy_wh, departure", [
    (20_000, None),                      # no departure: a leased session cannot be planned by it
    (None, "in_hours"),                  # no energy: a departure alone would end the session there
    (20_000, "2020-01-01T00:00:00Z"),    # already past
    (20_000, "2030-01-01T08:00:00Z"),    # years ahead
    (-5, "in_hours"),                    # negative
    (900_000, "in_hours"),               # 900 kWh: beyond any vehicle
    ("lots", "in_hours"),                # not a number
])
def test_a_need_out_of_bounds_is_left_out(energy_wh: Any, departure: Any) -> None:
    assert energy_need(transaction(energy_wh, in_hours(2) if departure == "in_hours" else departure)) is None


def test_charging_needs_set_the_energy_and_departure_of_the_running_session(tmp_path: Path, services: list) -> None:
    sub = substation(tmp_path, "substation-1", 30.0)
    start_all([sub])
    services.append(sub)
    gw = Gateway(tmp_path / "gw", env=FAST).start()
    services.append(gw)
    gw.register("cp-n", sub.url, phases=3, max_current_a=32)
    departure = in_hours(2)

    async def scenario() -> dict[str, Any]:
        ws = await connect(gw.ws_url("cp-n"), "cp-n", "ocpp2.0.1")
        station = Station201("cp-n", ws)
        loop = asyncio.create_task(station.start())
        await station.boot()
        await station.start_transaction(1, "tx-n-1")
        sid = session_id_for("cp-n", "tx-n-1")
        await until(lambda: station.tx_a.get("tx-n-1") == 32.0, 10, "the station told 32 A")
        before = session_at(sub, sid)
        assert "feasible" not in before, "no need was stated yet"
        # 20 kWh by two hours from now, at most 16 A: 16 × 3 × 230 V = 11.04 kW, 22 kWh in two hours.
        answer = await station.call(call201.NotifyEVChargingNeeds(evse_id=1, charging_needs={
            "requested_energy_transfer": "AC_three_phase", "departure_time": departure,
            "ac_charging_parameters": {"energy_amount": 20_000, "ev_min_current": 6, "ev_max_current": 16,
                                       "ev_max_voltage": 400}}))
        assert answer.status == "Accepted"
        await until(lambda: session_at(sub, sid).get("energy_kwh") == 20.0
                    and session_at(sub, sid)["amount"] == pytest.approx(16 * 3 * VOLTS / 1000), 10,
                    "the session's need and the vehicle's 16 A set")
        session = session_at(sub, sid)
        await station.stop_transaction(1)
        loop.cancel()
        await ws.close()
        return session

    session = asyncio.run(scenario())
    assert parse_time(session["departure"]) == parse_time(departure)
    assert session["amount"] == pytest.approx(16 * 3 * VOLTS / 1000)
    # Alone under a 30 kW limit at 11.04 kW, 20 kWh by two hours from now is expected to be met.
    assert session["feasible"] is True, json.dumps(session)
    assert session["expected_energy_kwh"] >= 20.0 - 0.1
    assert session["still_needed_kwh"] <= 20.0
