"""An independently written OCPP station against the real gateway, on both OCPP versions.

tests/ocpp_node_station/station.js runs on ocpp-rpc (Node) in strict mode: every CALL and
CALLRESULT in either direction is checked against the OCA JSON schemas, so a message of
the gateway's that the standard does not allow fails the station. It boots, authorizes,
starts a transaction, sends meter values, takes a profile update (the operator lowers the
substation's limit while it charges) and stops; the substation's records must show the
session, ended.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import threading
from typing import Any

import pytest
import requests

from tests.harness import OPERATOR, OPERATOR_TOKEN, REPO_ROOT, Service, get_json, start_all, stop_all
from tests.ocpp_support import PASSWORD, Gateway

pytestmark = pytest.mark.integration

STATION_DIR = REPO_ROOT / "tests" / "ocpp_node_station"
VOLTS = 230.0
MAX_CURRENT_A = 16
LOWERED_LIMIT_KW = 5.0  # 7.2 A on three phases, rounded down to OCPP's one decimal
STATION_TIMEOUT_SECONDS = 90


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    if not (STATION_DIR / "node_modules" / "ocpp-rpc").exists():
        pytest.fail(f"{STATION_DIR}/node_modules is missing: `make ocpp-node-station` installs it "
                    f"(npm ci --prefix {STATION_DIR.relative_to(REPO_ROOT)}).")
    folder = tmp_path_factory.mktemp("node-station")
    subs = {
        protocol: Service(name=f"substation-{index}", app="substation_service:create_app()", log_dir=folder, env={
            "SUBSTATION_ID": f"substation-{index}", "CAPACITY_KW": "50", "ADMIN_TOKEN": OPERATOR_TOKEN,
            "STATE_DIR": str(folder / f"state-{index}"),
        })
        for index, protocol in enumerate(("ocpp1.6", "ocpp2.0.1"), start=1)
    }
    start_all(list(subs.values()))
    gw = Gateway(folder / "gw", env={"WATCH_WAIT_SECONDS": "5", "MIN_PROFILE_INTERVAL_SECONDS": "0.5",
                                    "VEHICLE_RESPONSE_SECONDS": "0.2", "FALLBACK_CURRENT_A": "0"}).start()
    try:
        yield gw, subs
    finally:
        gw.stop()
        stop_all(list(subs.values()))


def run_station(gw: Gateway, sub: Service, station_id: str, protocol: str, id_tag: str) -> list[dict[str, Any]]:
    """Run station.js to the end; its JSON lines. The substation's limit is lowered once the station
    is told all it can take, so a profile update reaches it while it charges."""
    node = shutil.which("node") or "node"
    process = subprocess.Popen(
        [node, str(STATION_DIR / "station.js"), "--endpoint", f"ws://127.0.0.1:{gw.ocpp_port}", "--id", station_id,
         "--password", PASSWORD, "--protocol", protocol, "--id-tag", id_tag, "--charge-seconds", "8",
         "--meter-interval", "1", "--max-current", str(MAX_CURRENT_A), "--phases", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=STATION_DIR,
    )
    watchdog = threading.Timer(STATION_TIMEOUT_SECONDS, process.kill)
    watchdog.start()
    lines: list[dict[str, Any]] = []
    lowered = False
    try:
        assert process.stdout is not None
        for raw in process.stdout:
            line = json.loads(raw)
            lines.append(line)
            if (not lowered and line["event"] == "profile" and line["purpose"] == "TxProfile"
                    and line["limit"] == MAX_CURRENT_A):
                answer = requests.put(f"{sub.url}/limit", json={"limit_kw": LOWERED_LIMIT_KW}, headers=OPERATOR,
                                      timeout=10)
                assert answer.status_code == 200, answer.text
                lowered = True
        process.wait(timeout=10)
    finally:
        watchdog.cancel()
        requests.delete(f"{sub.url}/limit", headers=OPERATOR, timeout=10)
    assert process.stderr is not None
    assert process.returncode == 0, f"station.js failed ({process.returncode}): {lines[-3:]} {process.stderr.read()}"
    return lines


@pytest.mark.parametrize("protocol", ["ocpp1.6", "ocpp2.0.1"])
def test_an_independent_station_charges_through_the_gateway(stack, protocol: str) -> None:
    gw, subs = stack
    sub = subs[protocol]
    station_id = f"node-{protocol.replace('.', '')}"
    id_tag = f"NODE{protocol.replace('ocpp', '').replace('.', '')}"
    gw.register(station_id, sub.url, phases=3, max_current_a=MAX_CURRENT_A)
    lines = run_station(gw, sub, station_id, protocol, id_tag)
    events = [line["event"] for line in lines]
    steps = [event for event in events if event != "profile"]
    assert steps == ["connected", "boot", "authorize", "started", *["meter"] * 8, "stopped", "done"], events
    first = {event: next(line for line in lines if line["event"] == event) for event in set(events)}
    assert first["connected"]["protocol"] == protocol
    assert first["boot"]["status"] == "Accepted" and first["boot"]["interval"] > 0
    assert first["authorize"]["status"] == "Accepted"
    assert first["started"]["status"] == "Accepted"
    profiles = [line for line in lines if line["event"] == "profile"]
    assert all(p["unit"] == "A" and p["numberPhases"] == 3 for p in profiles), profiles
    # At boot the fallback (FALLBACK_CURRENT_A: no charging before a transaction's own profile), and no
    # station-wide cap above the station's maximum; then the transaction's own: alone, all the station can
    # take (the gateway may hold it at 0 A until the substation's next snapshot shows the new session);
    # after the operator's cut, what 5 kW allows.
    purposes = [p["purpose"] for p in profiles]
    assert "TxDefaultProfile" in purposes and purposes.index("TxDefaultProfile") < purposes.index("TxProfile")
    assert [p["limit"] for p in profiles if p["purpose"] == "TxDefaultProfile"] == [0]
    assert all(p["limit"] <= MAX_CURRENT_A for p in profiles if p["purpose"].endswith("MaxProfile"))
    tx = [p["limit"] for p in profiles if p["purpose"] == "TxProfile"]
    assert MAX_CURRENT_A in tx and tx[-1] == 7.2 and tx.index(7.2) > tx.index(MAX_CURRENT_A), tx
    assert LOWERED_LIMIT_KW * 1000 / (3 * VOLTS) - 0.1 < tx[-1] <= LOWERED_LIMIT_KW * 1000 / (3 * VOLTS)
    assert all(p["transactionId"] is not None for p in profiles if p["purpose"] == "TxProfile")
    meters = [line for line in lines if line["event"] == "meter"]
    assert meters[-1]["limit_a"] == tx[-1] and meters[-1]["power_w"] == round(tx[-1] * VOLTS * 3)
    # The substation's own record: the vehicle's session existed, drew energy, and ended when it stopped.
    sessions = [s for s in get_json(f"{sub.url}/sessions?ended=1")["sessions"] if s["vehicle_id"] == id_tag]
    assert len(sessions) == 1, sessions
    assert sessions[0]["end_reason"] == "stopped" and sessions[0]["energy_kwh"] > 0
    assert gw.stations()[station_id]["transactions"] == []
    assert "Traceback" not in gw.log_text(), gw.log_text()[-3000:]
