"""Simulated OCPP charging stations: N real OCPP clients over WebSocket in one asyncio loop.

Each station is the ``ocpp`` package's client side (``ocpp.v16.ChargePoint`` or
``ocpp.v201.ChargePoint``) over ``websockets.connect``, with HTTP Basic credentials, at
``ws://HOST:PORT/<station-id>``. It connects and boots at the start of the run; its vehicle
plugs in at a time drawn from a seeded schedule, is authorized, starts a transaction, sends
meter values (1.6 MeterValues, 2.0.1 TransactionEvent Updated) with Power.Active.Import and
Energy.Active.Import.Register, and leaves after its stay. The profiles it is sent and what
its vehicle draws are kept in a ``station_model.StationModel``, so what every vehicle drew
at every instant is known exactly afterwards.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import random
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import aiohttp
import websockets
from ocpp.routing import on
from ocpp.v16 import ChargePoint as ChargePoint16
from ocpp.v16 import call as call16
from ocpp.v16 import call_result as result16
from ocpp.v201 import ChargePoint as ChargePoint201
from ocpp.v201 import call as call201
from ocpp.v201 import call_result as result201

from load_tester.station_model import TX_PROFILE, Profile, StationModel

log = logging.getLogger("load_tester.stations")
PROTOCOLS = ("ocpp1.6", "ocpp2.0.1")
# Every OCPP call and WebSocket handshake of a simulated station gives up after this long.
CALL_TIMEOUT_SECONDS = 10.0
OPEN_TIMEOUT_SECONDS = 20.0
CONNECT_ATTEMPTS = 4
MIN_RESPONSE_SHARE = 0.2
# Handshakes at once: the gateway checks each password with scrypt (~50 ms), two at a time.
CONNECTS_AT_ONCE = 8
# Registrations at once through the operator API (each is a scrypt hash at the gateway).
REGISTRATIONS_AT_ONCE = 4
HTTP_TIMEOUT_SECONDS = 30.0
MAX_STATIONS = 5000
# A station keeps at most this many errors; the rest are only counted.
MAX_ERRORS_KEPT = 5


@dataclass(frozen=True)
class StationPlan:
    """One station and the one visit of its vehicle, in seconds after the start of the run."""

    station_id: str
    protocol: str
    substation_url: str
    phases: int
    max_current_a: float
    vehicle_max_a: float
    arrive_at: float
    stay_seconds: float
    id_tag: str
    password: str
    # Its vehicle follows a new limit this share of the run's response time late: vehicles differ, and an
    # increase that overtakes a decrease shows only when the one slowing down is slower than the one speeding up.
    response_share: float = 1.0

    @property
    def leave_at(self) -> float:
        return self.arrive_at + self.stay_seconds

    def registration(self) -> dict[str, Any]:
        """The station's description for the gateway's ``PUT /stations/<id>`` or its STATIONS_FILE."""
        return {"substation_url": self.substation_url, "phases": self.phases, "max_current_a": self.max_current_a,
                "connectors": 1, "password": self.password}


def plan_stations(count: int, substation_urls: list[str], seed: int, arrive_within: float,
                  stay_range: tuple[float, float], prefix: str = "sim", run_token: str | None = None,
                  password: str | None = None) -> list[StationPlan]:
    """``count`` new stations spread over the substations, half on each OCPP version, 1 in 5 on one
    phase, their vehicles' visits drawn by ``visits``."""
    if not 1 <= count <= MAX_STATIONS:
        raise ValueError(f"the number of stations must be from 1 to {MAX_STATIONS}, got {count}")
    if not substation_urls:
        raise ValueError("at least one substation URL is needed")
    rng = random.Random(seed)
    secret = password or secrets.token_urlsafe(18)[:24]
    stations = [
        {"station_id": f"{prefix}-{index:05d}", "substation_url": substation_urls[index % len(substation_urls)],
         "phases": 1 if rng.random() < 0.2 else 3, "max_current_a": 32.0, "password": secret}
        for index in range(count)
    ]
    return visits(stations, seed, arrive_within, stay_range, run_token)


def visits(stations: list[dict[str, Any]], seed: int, arrive_within: float, stay_range: tuple[float, float],
           run_token: str | None = None) -> list[StationPlan]:
    """One vehicle visit per station of ``stations`` (entries of a gateway STATIONS_FILE): arrivals uniform
    over ``arrive_within`` seconds, stays uniform in ``stay_range``, vehicles of 16 or 32 A, the stations
    alternately on OCPP 1.6 and 2.0.1. The same seed gives the same visits; ``run_token`` makes the id
    tags (the substations' vehicle ids) unique to this run. Each vehicle's response time is drawn from
    ``MIN_RESPONSE_SHARE`` to all of the run's."""
    rng = random.Random(f"visits-{seed}")
    token = run_token or secrets.token_hex(3)
    return [
        StationPlan(
            station_id=entry["station_id"],
            protocol=PROTOCOLS[index % 2],
            substation_url=entry["substation_url"].rstrip("/"),
            phases=int(entry.get("phases", 3)),
            max_current_a=float(entry["max_current_a"]),
            vehicle_max_a=rng.choice((16.0, 32.0, 32.0)),
            arrive_at=round(rng.uniform(0.0, arrive_within), 3),
            stay_seconds=round(rng.uniform(*stay_range), 3),
            # OCPP 1.6's idTag is at most 20 characters; the substation takes it as the vehicle id.
            id_tag=f"v{token}-{index:05d}",
            password=entry["password"],
            response_share=round(rng.uniform(MIN_RESPONSE_SHARE, 1.0), 3),
        )
        for index, entry in enumerate(stations)
    ]


def deployment_document(plans: list[StationPlan]) -> dict[str, Any]:
    """The gateway's STATIONS_FILE for these stations."""
    return {"stations": [{"station_id": p.station_id, **p.registration()} for p in plans]}


class GatewayRefused(RuntimeError):
    """The gateway's operator API refused a station or could not be reached; the message says which."""


async def register_stations(http_url: str, admin_token: str, plans: list[StationPlan]) -> None:
    """Create (or replace) every station through the gateway's operator API; ``GatewayRefused`` naming the
    first refusal."""
    limit = asyncio.Semaphore(REGISTRATIONS_AT_ONCE)
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_SECONDS)
    headers = {"Authorization": f"Bearer {admin_token}"}
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as http:
        async def one(plan: StationPlan) -> None:
            url = f"{http_url}/stations/{plan.station_id}"
            async with limit:
                try:
                    async with http.put(url, json=plan.registration()) as answer:
                        if answer.status not in (200, 201):
                            raise GatewayRefused(f"the gateway refused station {plan.station_id} ({answer.status}): "
                                                 f"{(await answer.text())[:300]}")
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    raise GatewayRefused(f"cannot reach the gateway's operator API at {url} "
                                         f"({exc.__class__.__name__}): is --gateway-api right?") from exc
        await asyncio.gather(*(one(plan) for plan in plans))


def _iso(epoch: float | None = None) -> str:
    moment = datetime.fromtimestamp(time.time() if epoch is None else epoch, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _epoch(text: str | None, default: float) -> float:
    if not text:
        return default
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return default


def _profile(model: StationModel, connector: int, body: dict[str, Any], schedule: dict[str, Any],
             profile_id: int, now: float) -> Profile:
    unit = schedule.get("charging_rate_unit", "A")
    periods = []
    for period in schedule.get("charging_schedule_period") or []:
        limit = float(period["limit"])
        if unit == "W":
            limit /= model.volts * (period.get("number_phases") or model.phases)
        periods.append((float(period.get("start_period", 0)), limit))
    transaction = body.get("transaction_id")
    return Profile(
        profile_id=int(profile_id),
        purpose=body["charging_profile_purpose"],
        stack_level=int(body.get("stack_level", 0)),
        connector=connector,
        transaction_id=None if transaction is None else str(transaction),
        periods=tuple(periods),
        starts_at=_epoch(schedule.get("start_schedule"), now),
    )


def _composite(model: StationModel) -> dict[str, Any]:
    return {"charging_rate_unit": "A", "charging_schedule_period": [
        {"start_period": 0, "limit": round(model.composite_a(time.time()), 1), "number_phases": model.phases}]}


class _Simulated:
    model: StationModel

    def _accept(self, connector: int, body: dict[str, Any], schedule: dict[str, Any], profile_id: int) -> str:
        now = time.time()
        if body.get("charging_profile_purpose") == TX_PROFILE and self.model.started_at is None:
            return "Rejected"  # OCPP: a TxProfile without a transaction is refused
        self.model.set_profile(_profile(self.model, connector, body, schedule, profile_id, now), now)
        return "Accepted"


class Station16(_Simulated, ChargePoint16):
    @on("SetChargingProfile")
    def on_set_charging_profile(self, connector_id: int, cs_charging_profiles: dict,
                                **_: Any) -> result16.SetChargingProfile:
        body = cs_charging_profiles
        status = self._accept(connector_id, body, body["charging_schedule"], body["charging_profile_id"])
        return result16.SetChargingProfile(status=status)

    @on("ClearChargingProfile")
    def on_clear(self, id: int | None = None, charging_profile_purpose: str | None = None,  # noqa: A002 - OCPP's name
                 **_: Any) -> result16.ClearChargingProfile:
        cleared = self.model.clear_profiles(time.time(), id, charging_profile_purpose)
        return result16.ClearChargingProfile(status="Accepted" if cleared else "Unknown")

    @on("GetCompositeSchedule")
    def on_composite(self, connector_id: int, duration: int, **_: Any) -> result16.GetCompositeSchedule:
        return result16.GetCompositeSchedule(status="Accepted", connector_id=connector_id, schedule_start=_iso(),
                                             charging_schedule={**_composite(self.model), "duration": duration})


class Station201(_Simulated, ChargePoint201):
    @on("SetChargingProfile")
    def on_set_charging_profile(self, evse_id: int, charging_profile: dict,
                                **_: Any) -> result201.SetChargingProfile:
        body = charging_profile
        status = self._accept(evse_id, body, body["charging_schedule"][0], body["id"])
        return result201.SetChargingProfile(status=status)

    @on("ClearChargingProfile")
    def on_clear(self, charging_profile_id: int | None = None, charging_profile_criteria: dict | None = None,
                 **_: Any) -> result201.ClearChargingProfile:
        purpose = (charging_profile_criteria or {}).get("charging_profile_purpose")
        cleared = self.model.clear_profiles(time.time(), charging_profile_id, purpose)
        return result201.ClearChargingProfile(status="Accepted" if cleared else "Unknown")

    @on("GetCompositeSchedule")
    def on_composite(self, duration: int, evse_id: int, **_: Any) -> result201.GetCompositeSchedule:
        return result201.GetCompositeSchedule(status="Accepted", schedule={
            "evse_id": evse_id, "duration": duration, "schedule_start": _iso(), **_composite(self.model)})

    @on("GetTransactionStatus")
    def on_transaction_status(self, transaction_id: str | None = None,
                              **_: Any) -> result201.GetTransactionStatus:
        model = self.model
        ongoing = model.started_at is not None and model.stopped_at is None and transaction_id == model.transaction_id
        return result201.GetTransactionStatus(messages_in_queue=False, ongoing_indicator=ongoing)


@dataclass
class StationOutcome:
    """What happened to one station in the run."""

    plan: StationPlan
    model: StationModel
    connected: bool = False
    booted: bool = False
    started: bool = False
    stopped: bool = False
    transaction_id: str | None = None
    meter_values: int = 0
    errors: list[str] = field(default_factory=list)
    error_count: int = 0

    def error(self, text: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(text)


@dataclass(frozen=True)
class RunOptions:
    ws_url: str  # ws://HOST:PORT, the station id is appended
    response_seconds: float = 1.0  # of the slowest vehicle
    meter_interval_seconds: float = 5.0
    volts: float = 230.0


def _basic(plan: StationPlan) -> dict[str, str]:
    token = base64.b64encode(f"{plan.station_id}:{plan.password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def _sleep_until(epoch: float, stop: asyncio.Event) -> bool:
    """Sleep until ``epoch``; False when ``stop`` came first."""
    delay = epoch - time.time()
    if delay <= 0:
        return not stop.is_set()
    try:
        await asyncio.wait_for(stop.wait(), delay)
    except asyncio.TimeoutError:
        return True
    return False


class SimulatedStation:
    """One station's life in the run: connect, boot, its vehicle's visit, then idle until the end."""

    def __init__(self, plan: StationPlan, options: RunOptions, run_start: float, connects: asyncio.Semaphore) -> None:
        self.plan, self.options, self.run_start = plan, options, run_start
        self.outcome = StationOutcome(plan, StationModel(
            station_max_a=plan.max_current_a, vehicle_max_a=plan.vehicle_max_a, phases=plan.phases,
            response_seconds=options.response_seconds * plan.response_share, volts=options.volts))
        self._connects = connects
        self._seq_no = 0
        self.cp: Any = None

    async def run(self, stop: asyncio.Event) -> StationOutcome:
        outcome, plan = self.outcome, self.plan
        connection = await self._connect()
        if connection is None:
            return outcome
        outcome.connected = True
        cls = Station16 if plan.protocol == "ocpp1.6" else Station201
        self.cp = cls(plan.station_id, connection, response_timeout=CALL_TIMEOUT_SECONDS)
        self.cp.model = outcome.model
        receiver = asyncio.create_task(self.cp.start())
        try:
            await self._visit(stop)
            await stop.wait()
        except websockets.ConnectionClosed as exc:
            outcome.error(f"connection closed: {exc}")
        except Exception as exc:  # noqa: BLE001 - a refused or unanswered call ends this station's run, not the others'
            outcome.error(f"{exc.__class__.__name__}: {exc}")
        finally:
            if outcome.model.started_at is not None and outcome.model.stopped_at is None:
                outcome.model.stop(time.time())  # the run ends: the vehicle stops drawing
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
            await connection.close()
        return outcome

    async def _connect(self) -> Any:
        """The station's WebSocket, tried again after a growing pause as a real station does when the
        handshake fails on the way (not when it is refused: a 4xx answer will not change)."""
        plan = self.plan
        failure: Exception | None = None
        for attempt in range(CONNECT_ATTEMPTS):
            try:
                async with self._connects:
                    return await websockets.connect(
                        f"{self.options.ws_url}/{plan.station_id}",
                        subprotocols=[plan.protocol],  # type: ignore[list-item]
                        additional_headers=_basic(plan), open_timeout=OPEN_TIMEOUT_SECONDS,
                        # The gateway pings every station; a thousand clients pinging too would only add load.
                        ping_interval=None, close_timeout=2,
                    )
            except websockets.InvalidStatus as exc:
                if exc.response.status_code < 500:
                    self.outcome.error(f"the gateway refused the connection: {exc}")
                    return None
                failure = exc
            except (OSError, asyncio.TimeoutError, websockets.InvalidHandshake) as exc:
                failure = exc
            if attempt + 1 < CONNECT_ATTEMPTS:
                await asyncio.sleep(2.0 ** attempt)
        self.outcome.error(f"cannot connect after {CONNECT_ATTEMPTS} attempts: {failure}")
        return None

    async def _call(self, payload: Any) -> Any:
        return await self.cp.call(payload, suppress=False)

    async def _visit(self, stop: asyncio.Event) -> None:
        plan, outcome, model = self.plan, self.outcome, self.outcome.model
        v16 = plan.protocol == "ocpp1.6"
        if v16:
            boot = await self._call(call16.BootNotification(charge_point_model="loadtest", charge_point_vendor="sim"))
        else:
            boot = await self._call(call201.BootNotification(
                charging_station={"model": "loadtest", "vendor_name": "sim"}, reason="PowerUp"))
        outcome.booted = boot.status == "Accepted"
        if not outcome.booted:
            raise RuntimeError(f"BootNotification answered {boot.status}")
        await self._status("Available")
        if not await _sleep_until(self.run_start + plan.arrive_at, stop):
            return
        if v16:
            answer = await self._call(call16.Authorize(id_tag=plan.id_tag))
            status = answer.id_tag_info["status"]
        else:
            answer = await self._call(call201.Authorize(id_token={"id_token": plan.id_tag, "type": "ISO14443"}))
            status = answer.id_token_info["status"]
        if status != "Accepted":
            raise RuntimeError(f"id tag {plan.id_tag} was not authorized ({status}): start the gateway with "
                               "AUTHORIZE_ALL=true or list the tags in ID_TAGS")
        await self._status("Charging")
        if v16:
            model.start(None, time.time())
            started = await self._call(call16.StartTransaction(connector_id=1, id_tag=plan.id_tag, meter_start=0,
                                                               timestamp=_iso()))
            if started.id_tag_info["status"] != "Accepted":
                raise RuntimeError(f"StartTransaction answered {started.id_tag_info['status']}")
            outcome.transaction_id = str(started.transaction_id)
            model.transaction_known(outcome.transaction_id, time.time())
        else:
            outcome.transaction_id = f"{plan.station_id}-{plan.id_tag}"
            model.start(outcome.transaction_id, time.time())
            await self._event("Started", "Authorized", id_token=plan.id_tag, meter=self._meter201(time.time()))
        outcome.started = True
        leave_at = self.run_start + plan.leave_at
        while True:
            next_at = min(time.time() + self.options.meter_interval_seconds, leave_at)
            if not await _sleep_until(next_at, stop) or time.time() >= leave_at:
                break
            await self._meter()
        left = time.time()
        model.stop(left)  # the vehicle stops drawing before the station reports it
        energy = model.energy_wh(left)
        if v16:
            await self._call(call16.StopTransaction(
                meter_stop=int(energy), timestamp=_iso(left), transaction_id=int(outcome.transaction_id),
                reason="EVDisconnected"))
        else:
            await self._event("Ended", "EVDeparted", stopped_reason="EVDisconnected", meter=self._meter201(left))
        outcome.stopped = True
        await self._status("Available")

    async def _status(self, status: str) -> None:
        if self.plan.protocol == "ocpp1.6":
            await self._call(call16.StatusNotification(connector_id=1, error_code="NoError", status=status))
        else:
            state = "Occupied" if status == "Charging" else "Available"
            await self._call(call201.StatusNotification(timestamp=_iso(), connector_status=state, evse_id=1,
                                                        connector_id=1))

    def _meter201(self, now: float) -> list[dict[str, Any]]:
        model = self.outcome.model
        return [{"timestamp": _iso(now), "sampled_value": [
            {"value": round(model.draw_w(now), 1), "measurand": "Power.Active.Import",
             "unit_of_measure": {"unit": "W"}},
            {"value": round(model.energy_wh(now), 1), "measurand": "Energy.Active.Import.Register",
             "unit_of_measure": {"unit": "Wh"}},
        ]}]

    async def _meter(self) -> None:
        now, model = time.time(), self.outcome.model
        if self.plan.protocol == "ocpp1.6":
            await self._call(call16.MeterValues(
                connector_id=1, transaction_id=int(self.outcome.transaction_id or 0),
                meter_value=[{"timestamp": _iso(now), "sampled_value": [
                    {"value": f"{model.draw_w(now):.1f}", "measurand": "Power.Active.Import", "unit": "W"},
                    {"value": f"{model.energy_wh(now):.1f}", "measurand": "Energy.Active.Import.Register",
                     "unit": "Wh"},
                ]}]))
        else:
            await self._event("Updated", "MeterValuePeriodic", meter=self._meter201(now))
        self.outcome.meter_values += 1

    async def _event(self, event_type: str, trigger: str, id_token: str | None = None,
                     stopped_reason: str | None = None, meter: list | None = None) -> Any:
        info: dict[str, Any] = {"transaction_id": self.outcome.transaction_id,
                                "charging_state": "Idle" if event_type == "Ended" else "Charging"}
        if stopped_reason:
            info["stopped_reason"] = stopped_reason
        answer = await self._call(call201.TransactionEvent(
            event_type=event_type, timestamp=_iso(), trigger_reason=trigger, seq_no=self._seq_no,
            transaction_info=info, evse={"id": 1, "connector_id": 1}, meter_value=meter,
            id_token={"id_token": id_token, "type": "ISO14443"} if id_token else None,
        ))
        self._seq_no += 1
        return answer


async def run_stations(plans: list[StationPlan], options: RunOptions, run_start: float,
                       stop: asyncio.Event) -> list[StationOutcome]:
    """Run every station until ``stop`` is set; each one's outcome, in the order of ``plans``."""
    connects = asyncio.Semaphore(CONNECTS_AT_ONCE)
    stations = [SimulatedStation(plan, options, run_start, connects) for plan in plans]
    return list(await asyncio.gather(*(station.run(stop) for station in stations)))
