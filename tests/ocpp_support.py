"""Helpers of the gateway's tests: the gateway as a real process, and simulated OCPP stations.

The stations are the ``ocpp`` package's own client side over real WebSockets. Each keeps
the profiles it is sent as a real station would (a TxDefaultProfile and a station-wide
maximum profile on connector/EVSE 0, a TxProfile per transaction) and "draws" what its
composite schedule allows: the lowest limit of its profiles, never above its own maximum.
Its vehicle takes a higher limit at once but follows a lower one only ``vehicle_lag``
seconds later, as a real one slowing down does.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import requests
import websockets
from ocpp.exceptions import NotSupportedError
from ocpp.routing import on
from ocpp.v16 import ChargePoint as ChargePoint16
from ocpp.v16 import call as call16
from ocpp.v16 import call_result as result16
from ocpp.v201 import ChargePoint as ChargePoint201
from ocpp.v201 import call as call201
from ocpp.v201 import call_result as result201

from gridcommon.promtext import parse_metrics
from tests.harness import OPERATOR, OPERATOR_TOKEN, REPO_ROOT, free_port, wait_until_healthy

PASSWORD = "correct-horse-battery"  # 21 characters: within OCPP's 16 to 40
VOLTS = 230.0


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Gateway:
    """``python -m charge_point_gateway`` on free ports, its state in ``state_dir``."""

    state_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    ocpp_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "gateway.log"

    def ws_url(self, station_id: str, scheme: str = "ws") -> str:
        return f"{scheme}://127.0.0.1:{self.ocpp_port}/{station_id}"

    def start(self) -> "Gateway":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "OCPP_PORT": str(self.ocpp_port),
            "HTTP_PORT": str(self.http_port),
            "STATE_DIR": str(self.state_dir),
            "ADMIN_TOKEN": OPERATOR_TOKEN,
            "AUTHORIZE_ALL": "true",
            "PYTHONUNBUFFERED": "1",
            **self.env,
        }
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "charge_point_gateway"], cwd=REPO_ROOT, env=env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        wait_until_healthy(f"{self.http}/health", self.process)
        return self

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def register(self, station_id: str, substation_url: str, phases: int = 3, max_current_a: float = 32,
                 connectors: int = 1, password: str = PASSWORD) -> None:
        response = requests.put(
            f"{self.http}/stations/{station_id}",
            json={"substation_url": substation_url, "phases": phases, "max_current_a": max_current_a,
                  "connectors": connectors, "password": password},
            headers=OPERATOR, timeout=10,
        )
        assert response.status_code in (200, 201), response.text

    def stations(self) -> dict[str, dict[str, Any]]:
        response = requests.get(f"{self.http}/stations", timeout=5)
        response.raise_for_status()
        return {entry["station_id"]: entry for entry in response.json()["stations"]}


def basic(station_id: str, password: str = PASSWORD) -> dict[str, str]:
    token = base64.b64encode(f"{station_id}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def connect(url: str, station_id: str, subprotocol: str, password: str = PASSWORD,
                  ssl_context: ssl.SSLContext | None = None, **kwargs: Any) -> Any:
    return await websockets.connect(
        url, subprotocols=[subprotocol], additional_headers=basic(station_id, password), ssl=ssl_context,
        open_timeout=10, **kwargs,
    )


class _Profiles:
    """The profiles a station keeps and the current they allow."""

    station_max_a: float
    reject_profiles: bool

    def _init_profiles(self, max_current_a: float, reject_profiles: bool, vehicle_lag: float) -> None:
        self.station_max_a = max_current_a
        self.reject_profiles = reject_profiles
        self.vehicle_lag = vehicle_lag
        self.apply_profiles = True  # False: says "Accepted" and ignores them, as some real chargers do
        self.fallback_call_error = False  # True: answers a TxDefaultProfile with a CALLERROR (NotSupported)
        self._slowing: dict[str, tuple[float, float]] = {}  # transaction -> (until, the higher limit before)
        self.default_a: float | None = None  # TxDefaultProfile
        self.station_cap_a: float | None = None  # ChargePointMaxProfile / ChargingStationMaxProfile
        self.tx_a: dict[str, float] = {}  # TxProfile by transaction id
        self.running: dict[int, str] = {}  # connector -> transaction id
        self.profiles_received: list[tuple[float, str, float]] = []  # (time, purpose, limit)

    def told_a(self, connector: int, lag: bool = True) -> float:
        """What the vehicle on ``connector`` may draw now (0 when nothing runs there); ``lag=False``: what the
        station's composite schedule says, before the vehicle has followed a decrease."""
        transaction = self.running.get(connector)
        if transaction is None:
            return 0.0
        limits = [self.station_max_a]
        if self.station_cap_a is not None:
            limits.append(self.station_cap_a)  # the whole station's cap: one transaction at a time here
        if transaction in self.tx_a:
            limit = self.tx_a[transaction]
            until, before = self._slowing.get(transaction, (0.0, 0.0))
            limits.append(max(limit, before) if lag and time.monotonic() < until else limit)
        elif self.default_a is not None:
            limits.append(self.default_a)
        return min(limits)

    def _take(self, purpose: str, limit: float, number_phases: int | None, transaction_id: Any) -> str:
        assert number_phases in (1, 3), f"numberPhases must be explicit, got {number_phases!r}"
        assert round(limit, 1) == limit, f"limit {limit} has more than one decimal"
        self.profiles_received.append((time.monotonic(), purpose, limit))
        if self.fallback_call_error and purpose == "TxDefaultProfile":
            raise NotSupportedError("TxDefaultProfile is not supported here")
        if self.reject_profiles and purpose == "TxProfile":
            return "Rejected"
        if not self.apply_profiles:
            return "Accepted"
        if purpose == "TxDefaultProfile":
            self.default_a = limit
        elif purpose in ("ChargePointMaxProfile", "ChargingStationMaxProfile"):
            self.station_cap_a = limit
        elif purpose == "TxProfile":
            key = str(transaction_id)
            before = self.tx_a.get(key)
            if before is not None and limit < before:
                self._slowing[key] = (time.monotonic() + self.vehicle_lag, before)
            self.tx_a[key] = limit
        return "Accepted"


class Station16(_Profiles, ChargePoint16):
    def __init__(self, station_id: str, connection: Any, max_current_a: float = 32, reject_profiles: bool = False,
                 vehicle_lag: float = 0.3):
        super().__init__(station_id, connection, response_timeout=10)
        self._init_profiles(max_current_a, reject_profiles, vehicle_lag)

    @on("SetChargingProfile")
    def on_set_charging_profile(self, connector_id: int, cs_charging_profiles: dict) -> result16.SetChargingProfile:
        schedule = cs_charging_profiles["charging_schedule"]
        period = schedule["charging_schedule_period"][0]
        assert schedule["charging_rate_unit"] == "A"
        assert schedule["start_schedule"] < now_iso(), "a replacement profile must start in the past"
        status = self._take(cs_charging_profiles["charging_profile_purpose"], float(period["limit"]),
                            period.get("number_phases"), cs_charging_profiles.get("transaction_id"))
        return result16.SetChargingProfile(status=status)

    @on("GetCompositeSchedule")
    def on_composite(self, connector_id: int, duration: int, **_: Any) -> result16.GetCompositeSchedule:
        return result16.GetCompositeSchedule(
            status="Accepted", connector_id=connector_id, schedule_start=now_iso(),
            charging_schedule={"charging_rate_unit": "A", "charging_schedule_period": [
                {"start_period": 0, "limit": self.told_a(connector_id, lag=False)}]},
        )

    async def boot(self) -> Any:
        return await self.call(call16.BootNotification(charge_point_model="Sim", charge_point_vendor="Tests"))

    async def start_transaction(self, connector: int, id_tag: str = "TAG1", meter_start: int = 0,
                                timestamp: str | None = None) -> int:
        answer = await self.call(call16.StartTransaction(connector_id=connector, id_tag=id_tag,
                                                         meter_start=meter_start, timestamp=timestamp or now_iso()))
        assert answer.id_tag_info["status"] == "Accepted", answer
        self.running[connector] = str(answer.transaction_id)
        return answer.transaction_id

    async def stop_transaction(self, connector: int, meter_stop: int = 1000) -> None:
        transaction = self.running.pop(connector)
        await self.call(call16.StopTransaction(meter_stop=meter_stop, timestamp=now_iso(),
                                               transaction_id=int(transaction), reason="EVDisconnected"))
        self.tx_a.pop(transaction, None)

    async def meter(self, connector: int, power_w: float, energy_wh: float) -> None:
        await self.call(call16.MeterValues(connector_id=connector, transaction_id=int(self.running[connector]),
                                           meter_value=[{"timestamp": now_iso(), "sampled_value": [
                                               {"value": f"{power_w:.1f}", "measurand": "Power.Active.Import",
                                                "unit": "W"},
                                               {"value": f"{energy_wh:.1f}",
                                                "measurand": "Energy.Active.Import.Register", "unit": "Wh"},
                                           ]}]))


class Station201(_Profiles, ChargePoint201):
    def __init__(self, station_id: str, connection: Any, max_current_a: float = 32, reject_profiles: bool = False,
                 vehicle_lag: float = 0.3):
        super().__init__(station_id, connection, response_timeout=10)
        self._init_profiles(max_current_a, reject_profiles, vehicle_lag)
        self.seq_no = 0
        self.ended: set[str] = set()

    @on("SetChargingProfile")
    def on_set_charging_profile(self, evse_id: int, charging_profile: dict,
                                **_: Any) -> result201.SetChargingProfile:
        schedule = charging_profile["charging_schedule"][0]
        period = schedule["charging_schedule_period"][0]
        assert schedule["charging_rate_unit"] == "A" and period["start_period"] == 0
        assert schedule["start_schedule"] < now_iso(), "a replacement profile must start in the past"
        status = self._take(charging_profile["charging_profile_purpose"], float(period["limit"]),
                            period.get("number_phases"), charging_profile.get("transaction_id"))
        return result201.SetChargingProfile(status=status)

    @on("GetCompositeSchedule")
    def on_composite(self, duration: int, evse_id: int, **_: Any) -> result201.GetCompositeSchedule:
        return result201.GetCompositeSchedule(status="Accepted", schedule={
            "evse_id": evse_id, "duration": duration, "schedule_start": now_iso(), "charging_rate_unit": "A",
            "charging_schedule_period": [{"start_period": 0, "limit": self.told_a(evse_id, lag=False)}]})

    @on("GetTransactionStatus")
    def on_transaction_status(self, transaction_id: str | None = None, **_: Any) -> result201.GetTransactionStatus:
        return result201.GetTransactionStatus(messages_in_queue=False,
                                              ongoing_indicator=transaction_id in self.running.values())

    async def boot(self) -> Any:
        return await self.call(call201.BootNotification(
            charging_station={"model": "Sim", "vendor_name": "Tests"}, reason="PowerUp"))

    async def _event(self, event_type: str, transaction_id: str, evse: int, trigger: str,
                     meter_value: list | None = None, stopped_reason: str | None = None,
                     id_token: str | None = None, offline: bool | None = None) -> Any:
        self.seq_no += 1
        info: dict[str, Any] = {"transaction_id": transaction_id}
        if stopped_reason:
            info["stopped_reason"] = stopped_reason
        return await self.call(call201.TransactionEvent(
            event_type=event_type, timestamp=now_iso(), trigger_reason=trigger, seq_no=self.seq_no,
            transaction_info=info, evse={"id": evse, "connector_id": 1}, meter_value=meter_value,
            id_token={"id_token": id_token, "type": "ISO14443"} if id_token else None, offline=offline,
        ))

    async def start_transaction(self, evse: int, transaction_id: str, id_token: str = "TAG1") -> None:
        self.running[evse] = transaction_id
        await self._event("Started", transaction_id, evse, "Authorized", id_token=id_token)

    async def stop_transaction(self, evse: int, offline: bool | None = None) -> None:
        transaction = self.running.pop(evse)
        self.tx_a.pop(transaction, None)
        await self._event("Ended", transaction, evse, "EVDeparted", stopped_reason="EVDisconnected", offline=offline)

    async def meter(self, evse: int, power_w: float, energy_wh: float) -> None:
        await self._event("Updated", self.running[evse], evse, "MeterValuePeriodic", meter_value=[{
            "timestamp": now_iso(), "sampled_value": [
                {"value": power_w, "measurand": "Power.Active.Import", "unit_of_measure": {"unit": "W"}},
                {"value": energy_wh, "measurand": "Energy.Active.Import.Register",
                 "unit_of_measure": {"unit": "Wh"}},
            ]}])


async def run_station(station: Any) -> asyncio.Task:
    """Start the station's receive loop in the background."""
    return asyncio.create_task(station.start())


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, made with openssl."""
    cert, key = folder / "gateway.crt", folder / "gateway.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` on a /metrics page."""
    return sum(value for sample_labels, value in parse_metrics(text).samples.get(name, [])
               if all(sample_labels.get(k) == v for k, v in labels.items()))


def dumps(frame: Any) -> str:
    return json.dumps(frame)
