"""Simulated OCPP stations (load_tester.stations) against the real gateway and real substations.

What the vehicles physically draw (each a step function known exactly: its station's
composite limit, followed one response time late) is summed per substation and sampled
at 20 Hz against the limit in force then, from the substation's own limit history. The
only excess allowed is right after an operator's limit DROP, for as long as the design
needs (the profiles' push latency + the vehicles' response time); power moving between
stations as vehicles arrive and leave must never show as an excess.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from load_tester.api import GridClient
from load_tester.station_audit import StationTrace, SubstationHistory, audit, percentile
from load_tester.station_model import Profile, StationModel
from load_tester.station_run import StationsScenario, console_text, run_scenario
from load_tester.stations import plan_stations
from tests.harness import OPERATOR_TOKEN, Service, get_json, start_all, stop_all
from tests.ocpp_support import Gateway

RESPONSE_SECONDS = 1.0


def _model(response: float = RESPONSE_SECONDS) -> StationModel:
    return StationModel(station_max_a=32, vehicle_max_a=32, phases=3, response_seconds=response)


def _tx(limit: float, at: float, transaction: str = "t1", profile_id: int = 7) -> Profile:
    return Profile(profile_id, "TxProfile", 1, 1, transaction, ((0.0, limit),), at - 60)


def test_a_vehicle_follows_its_composite_limit_one_response_time_late() -> None:
    model = _model()
    model.set_profile(Profile(1, "TxDefaultProfile", 0, 0, None, ((0.0, 10.0),), 0.0), 100.0)
    model.start("t1", 100.0)
    assert model.draw_w(100.5) == 0.0  # not yet: the vehicle takes its response time
    assert model.draw_w(101.0) == 10 * 230 * 3  # the default profile, 6.9 kW
    model.set_profile(_tx(20.0, 105.0), 105.0)
    assert model.draw_w(105.9) == 10 * 230 * 3 and model.draw_w(106.0) == 20 * 230 * 3
    model.set_profile(_tx(5.0, 110.0), 110.0)  # below 6 A: nothing
    assert model.draw_w(111.0) == 0.0
    model.set_profile(_tx(16.0, 112.0), 112.0)
    model.stop(114.0)  # it stops drawing at once when it leaves
    assert model.draw_w(113.5) == 16 * 230 * 3 and model.draw_w(114.0) == 0.0
    # Energy is the integral of that step function: 5 s at 6.9 kW, 5 s at 13.8 kW, 2 s at 0, 1 s at 11.04 kW.
    assert model.energy_wh(200.0) == pytest.approx((5 * 6900 + 5 * 13800 + 1 * 11040) / 3600)


def test_the_audit_tells_an_excess_by_message_order_from_a_drop_window() -> None:
    """Two vehicles at one substation: a cut in time is allowed, an increase before a decrease is not."""
    a, b = _model(), _model()
    for model, name in ((a, "t1"), (b, "t2")):
        model.start(name, 0.0)
        model.set_profile(_tx(16.0, 0.0, name), 0.0)  # 2 × 11.04 kW from t=1
    # t=10: the limit drops from 30 to 16 kW; both are cut to 11 A (7.59 kW) at 10.2: allowed until 11.2.
    a.set_profile(_tx(11.0, 10.2, "t1"), 10.2)
    b.set_profile(_tx(11.0, 10.2, "t2"), 10.2)
    # t=20: power moves from a to b, but b's increase arrives before a's decrease: b draws 15 A from 21.0
    # while a draws 11 A until 21.3: 10.35 + 7.59 = 17.94 kW, over 16 kW for 0.3 s.
    b.set_profile(_tx(15.0, 20.0, "t2"), 20.0)
    a.set_profile(_tx(6.0, 20.3, "t1"), 20.3)
    allocations = {"v1": ((0.0, 15.0), (10.0, 7.9), (20.0, 4.14)), "v2": ((0.0, 15.0), (10.0, 7.9), (20.0, 11.8))}
    history = SubstationHistory("http://sub", ((0.0, 30.0), (10.0, 16.0)), allocations)
    traces = [StationTrace("a", "http://sub", "v1", a), StationTrace("b", "http://sub", "v2", b)]
    result = audit(traces, {"http://sub": history}, 0.0, 30.0, 20.0, RESPONSE_SECONDS)
    (sub,) = result.substations
    # 10.00 .. 11.15 over 16 kW (22.08 kW until 11.2): 24 samples, all inside the drop's window.
    assert sub.excess_after_drop == 24
    # 21.00 .. 21.25: 6 samples of message order.
    assert sub.excess_by_order == 6
    (drop,) = result.drops
    assert drop.push_seconds == pytest.approx(0.2) and drop.affected == 2
    assert drop.recovery_seconds == pytest.approx(1.2)
    assert sorted(result.push_seconds) == pytest.approx([0.2, 0.2, 0.3])


def test_after_a_drop_the_draw_is_back_under_for_good_not_at_its_first_dip() -> None:
    """An increase sent just before a drop takes effect just after it (the vehicle is late both ways)."""
    model = _model()
    model.start("t1", 0.0)
    model.set_profile(_tx(6.0, 0.0), 0.0)
    model.set_profile(_tx(16.0, 9.5), 9.5)  # 11.04 kW from 10.5
    model.set_profile(_tx(14.0, 10.1), 10.1)  # the cut: 9.66 kW from 11.1
    history = SubstationHistory("http://sub", ((0.0, 30.0), (10.0, 10.0)),
                                {"v1": ((0.0, 4.14), (9.5, 11.04), (10.0, 9.66))})
    result = audit([StationTrace("a", "http://sub", "v1", model)], {"http://sub": history}, 0.0, 20.0, 20.0,
                   RESPONSE_SECONDS)
    (drop,) = result.drops
    assert drop.push_seconds == pytest.approx(0.1) and drop.recovery_seconds == pytest.approx(1.1)
    (sub,) = result.substations
    assert sub.excess_after_drop == 12 and sub.excess_by_order == 0  # 10.50 .. 11.05


def substation(log_dir: Path, name: str, capacity_kw: float) -> Service:
    return Service(name=name, app="substation_service:create_app()", log_dir=log_dir, env={
        "SUBSTATION_ID": name, "CAPACITY_KW": str(capacity_kw), "ADMIN_TOKEN": OPERATOR_TOKEN,
        "STATE_DIR": str(log_dir / f"state-{name}"),
    })


@pytest.fixture
def services():
    started: list[Any] = []
    yield started
    for item in reversed(started):
        item.stop() if isinstance(item, Gateway) else stop_all([item])


@pytest.mark.integration
def test_forty_stations_never_overdraw_by_message_order(tmp_path: Path, services: list) -> None:
    # Even halved, a substation has room for all its 20 vehicles at their minimum (6 A): none is refused.
    subs = [substation(tmp_path, "substation-1", 180.0), substation(tmp_path, "substation-2", 180.0)]
    start_all(subs)
    services.extend(subs)
    gw = Gateway(tmp_path / "gw", env={
        "LEASE_SECONDS": "15", "WATCH_WAIT_SECONDS": "5", "SUBSTATION_TIMEOUT_SECONDS": "3",
        "MIN_PROFILE_INTERVAL_SECONDS": "0.5",
        # The gateway waits longer for a vehicle to slow down than the simulated ones take.
        "VEHICLE_RESPONSE_SECONDS": str(RESPONSE_SECONDS + 0.5),
        # A new transaction draws nothing until its own profile: a fallback above 0 would let it draw before
        # the substation has made room for it.
        "FALLBACK_CURRENT_A": "0",
    }).start()
    services.append(gw)
    plans = plan_stations(40, [s.url for s in subs], seed=11, arrive_within=20.0, stay_range=(12.0, 26.0))
    scenario = StationsScenario(
        plans=tuple(plans), gateway_ws=f"ws://127.0.0.1:{gw.ocpp_port}", gateway_http=gw.http,
        duration_seconds=60.0, response_seconds=RESPONSE_SECONDS, meter_interval_seconds=2.0,
        derate_url=subs[0].url, derate_at=16.0, derate_for=10.0, derate_factor=0.5,
    )
    client = GridClient("http://127.0.0.1:9", "http://127.0.0.1:9", admin_token=OPERATOR_TOKEN)
    try:
        run = asyncio.run(run_scenario(scenario, client, OPERATOR_TOKEN))
    finally:
        client.close()
    print(console_text(run))
    outcomes = run.outcomes
    assert {o.plan.protocol for o in outcomes} == {"ocpp1.6", "ocpp2.0.1"}
    assert all(o.started and o.stopped and not o.errors for o in outcomes), [
        (o.plan.station_id, o.errors) for o in outcomes if o.errors or not o.stopped]
    result = run.audit
    # The limit binds: without the gateway the vehicles would draw far more than it.
    assert max(s.peak_percentage or 0 for s in result.substations) > 80
    assert result.excess_by_order == 0, console_text(run)
    # The operator's halving, and the lift after it (not a drop): one drop, at the derated substation.
    (drop,) = result.drops
    assert drop.substation == subs[0].url and drop.to_kw == pytest.approx(90.0) and drop.affected > 0
    assert drop.push_seconds is not None and drop.recovery_seconds is not None
    print(f"limit drop: push latency {drop.push_seconds:.3f} s + response {RESPONSE_SECONDS:g} s; "
          f"draw back under the new limit after {drop.recovery_seconds:.3f} s")
    assert drop.recovery_seconds <= drop.push_seconds + RESPONSE_SECONDS + 1e-6
    assert drop.push_seconds < 2.0
    push_p99 = percentile(result.push_seconds, 0.99)
    assert push_p99 is not None and push_p99 < 2.0
    # The substations' own records: every vehicle had a session there, and it ended when it left.
    for sub in subs:
        ended = {s["vehicle_id"]: s for s in get_json(f"{sub.url}/sessions?ended=1")["sessions"]}
        for plan in plans:
            if plan.substation_url == sub.url:
                assert ended[plan.id_tag]["end_reason"] == "stopped", ended.get(plan.id_tag)
    assert "Traceback" not in gw.log_text(), gw.log_text()[-3000:]


@pytest.mark.integration
def test_the_load_tester_runs_the_stations_scenario(tmp_path: Path, services: list) -> None:
    sub = substation(tmp_path, "substation-1", 30.0)
    start_all([sub])
    services.append(sub)
    gw = Gateway(tmp_path / "gw", env={"FALLBACK_CURRENT_A": "0", "VEHICLE_RESPONSE_SECONDS": "1.5"}).start()
    services.append(gw)
    from load_tester.cli import main

    code = main(["--scenario", "stations", "--stations", "6", "--gateway", f"ws://127.0.0.1:{gw.ocpp_port}",
                 "--gateway-api", gw.http, "--substations", sub.url, "--duration", "12", "--session-duration", "8",
                 "--seed", "3", "--meter-interval", "1", "--derate-at", "5", "--derate-for", "3",
                 "--output", str(tmp_path / "out")], environ={"ADMIN_TOKEN": OPERATOR_TOKEN})
    results = json.loads((tmp_path / "out" / "stations-results.json").read_text())
    assert code == 0, results["problems"]
    assert results["stations"] == results["transactions_started"] == results["transactions_ended"] == 6
    assert results["by_protocol"] == {"ocpp1.6": 3, "ocpp2.0.1": 3}
    assert results["energy_kwh"] > 0 and results["meter_values_sent"] > 0
    assert results["audit"]["excess_instants_by_message_order"] == 0
    assert results["derate"]["from_kw"] == 30.0 and results["derate"]["to_kw"] == 15.0
    assert [d["to_kw"] for d in results["audit"]["limit_drops"]] == [15.0]
    # Every station's vehicle is a session the substation ended when it left.
    ended = [s for s in get_json(f"{sub.url}/sessions?ended=1")["sessions"] if s.get("end_reason") == "stopped"]
    assert len(ended) == 6
