"""OCPP 1.6J and 2.0.1 glue: frames in, plain calls into the ``Gateway`` out, profiles back.

Kept thin on purpose: the ``ocpp`` package validates every payload against the OCA
schemas in both directions and answers unknown actions with NotImplemented; this module
adds a per-connection bound on CALLs, a reply to frames that are not OCPP at all, and the
translation between OCPP's fields and the gateway's.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from ocpp.routing import after, on
from ocpp.v16 import ChargePoint as ChargePoint16
from ocpp.v16 import call as call16
from ocpp.v16 import call_result as result16
from ocpp.v201 import ChargePoint as ChargePoint201
from ocpp.v201 import call as call201
from ocpp.v201 import call_result as result201

from charge_point_gateway.gateway import Gateway
from charge_point_gateway.metrics import action_label
from charge_point_gateway.registry import Station
from charge_point_gateway.transactions import Transaction

log = logging.getLogger("ocpp.station")
# A replacement profile starts this far in the past: one that starts in the future leaves a gap.
PROFILE_START_OFFSET = timedelta(minutes=1)
# Frames that are not OCPP at all, tolerated per connection before it is closed.
MAX_GARBAGE_FRAMES = 10
# How long a station the gateway closes gets to answer the close frame before its connection is reset.
CLOSE_GRACE_SECONDS = 2.0
TX_PROFILE_STACK_LEVEL = 1
FALLBACK_STACK_LEVEL = 0


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _past_start() -> str:
    return (datetime.now(timezone.utc) - PROFILE_START_OFFSET).isoformat(timespec="seconds").replace("+00:00", "Z")


def profile_id(session_id: str) -> int:
    """A stable positive profile id per transaction (replaces its own earlier profile)."""
    return 1000 + int(hashlib.sha256(session_id.encode()).hexdigest()[:7], 16)


# The two profiles installed at boot on connector/EVSE 0: the TxDefaultProfile (what a transaction draws
# before its own TxProfile) and the station-wide maximum (what the whole station draws, whatever it holds).
FALLBACK_PROFILE_ID = 1
STATION_MAX_PROFILE_ID = 2


class CallBudget:
    """A token bucket over a connection's CALLs: ``rate`` a second after a ``burst``.

    ``abusive`` once more than five bursts' worth were refused within ``ABUSE_WINDOW_SECONDS``:
    a station that keeps sending regardless is closed, not answered forever.
    """

    ABUSE_WINDOW_SECONDS = 10.0

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._tokens = float(burst)
        self._at = time.monotonic()
        self._refused = 0
        self._window_start = self._at

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if now - self._window_start > self.ABUSE_WINDOW_SECONDS:
            self._window_start, self._refused = now, 0
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        self._refused += 1
        return False

    @property
    def abusive(self) -> bool:
        return self._refused > 5 * self.burst


def _sampled(meter_values: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """(power W, energy register Wh) from MeterValues' sampled values, the last of each; either may be None."""
    power = energy = None
    for meter_value in meter_values or []:
        for sample in meter_value.get("sampled_value") or []:
            measurand = sample.get("measurand") or "Energy.Active.Import.Register"
            phase = sample.get("phase")
            unit = sample.get("unit") or (sample.get("unit_of_measure") or {}).get("unit")
            multiplier = 10 ** int((sample.get("unit_of_measure") or {}).get("multiplier", 0))
            try:
                value = float(sample.get("value")) * multiplier
            except (TypeError, ValueError):
                continue
            if phase:
                continue  # per-phase values: the totals are what the gateway compares
            if measurand == "Power.Active.Import":
                power = value * 1000.0 if unit == "kW" else value
            elif measurand == "Energy.Active.Import.Register":
                energy = value * 1000.0 if unit == "kWh" else value
    return power, energy


class _Connection:
    """What both versions share: the budget, the garbage count, the connection's metrics."""

    protocol = ""
    gateway: Gateway
    station: Station
    budget: CallBudget
    garbage = 0
    composite_supported = True
    _closing: asyncio.Task | None = None

    def _setup(self, gateway: Gateway, station: Station) -> None:
        self.gateway = gateway
        self.station = station
        settings = gateway.settings
        self.budget = CallBudget(settings.calls_per_second, settings.call_burst)
        self._max_unread_bytes = settings.max_unread_bytes

    async def route_message(self, raw_msg: str | bytes) -> None:  # type: ignore[override]
        # One frame per turn of the event loop: websockets hands over every frame already received without
        # waiting, so a station sending hundreds at once would otherwise hold every other station's for as long.
        await asyncio.sleep(0)
        if self._closing is not None:
            return  # closed for abuse or garbage: what it still sends is dropped unread
        try:
            frame = json.loads(raw_msg)
        except (ValueError, UnicodeDecodeError):
            frame = None
        if not isinstance(frame, list) or len(frame) < 3 or frame[0] not in (2, 3, 4):
            await self._garbage(frame)
            return
        if frame[0] == 2:
            action = frame[2] if len(frame) > 2 else None
            if not self.budget.take():
                self.gateway.metrics.messages.labels(action_label(action), "in", "rate_limited").inc()
                if self.budget.abusive:
                    log.warning("station %s keeps flooding CALLs past %g/s: closing its connection",
                                self.station.station_id, self.budget.rate)
                    self._close_soon(1008, "too many requests")
                    return
                await self._send(json.dumps([4, str(frame[1]), "GenericError",
                                             f"too many requests: at most {self.budget.rate:g} a second", {}]))
                return
            self.gateway.heard_from(self.station.station_id)
            self.gateway.metrics.messages.labels(action_label(action), "in", "call").inc()
        await super().route_message(raw_msg)  # type: ignore[misc]

    async def _garbage(self, frame: object) -> None:
        self.garbage += 1
        self.gateway.metrics.messages.labels("other", "in", "malformed").inc()
        unique_id = str(frame[1]) if isinstance(frame, list) and len(frame) > 1 else "-1"
        code = "ProtocolError" if self.protocol == "ocpp1.6" else "RpcFrameworkError"
        if self.garbage == 1:  # once per connection: a hostile station must not fill the log at its own pace
            log.info("station %s sent a frame that is not an OCPP message (it is closed after %d of them)",
                     self.station.station_id, MAX_GARBAGE_FRAMES)
        if self.garbage > MAX_GARBAGE_FRAMES:
            self._close_soon(1002, "too many malformed frames")
            return
        await self._send(json.dumps([4, unique_id, code, "not an OCPP-J message: [type, id, ...] expected", {}]))

    async def disconnect(self, code: int, reason: str) -> None:
        try:
            await asyncio.wait_for(self._connection.close(code, reason), CLOSE_GRACE_SECONDS)
        except asyncio.TimeoutError:
            self._connection.transport.abort()

    def _close_soon(self, code: int, reason: str) -> None:
        """Close from inside the receive loop: in a task of its own, so the loop goes on reading the frames
        already queued and the station's close frame behind them (awaited here, it would wait for itself)."""
        if self._closing is None:
            self._closing = asyncio.create_task(self.disconnect(code, reason))

    async def _send(self, message: str) -> None:
        """Every frame to the station: never waits on one that does not read (its connection is reset)."""
        transport = self._connection.transport
        if transport.get_write_buffer_size() + len(message) > self._max_unread_bytes:
            if not transport.is_closing():
                log.warning("station %s has not read %d bytes sent to it: resetting its connection",
                            self.station.station_id, transport.get_write_buffer_size())
                self.gateway.metrics.messages.labels("other", "out", "unread").inc()
                transport.abort()
            return
        await super()._send(message)  # type: ignore[misc]

    async def _call(self, payload: Any) -> Any:
        action = payload.__class__.__name__
        try:
            result = await self.call(payload, suppress=False)  # type: ignore[attr-defined]
        except Exception:
            self.gateway.metrics.messages.labels(action_label(action), "out", "error").inc()
            raise
        self.gateway.metrics.messages.labels(action_label(action), "out", "result").inc()
        return result


class Station16(_Connection, ChargePoint16):
    protocol = "ocpp1.6"

    def __init__(self, gateway: Gateway, station: Station, connection: Any) -> None:
        ChargePoint16.__init__(self, station.station_id, connection,
                               response_timeout=gateway.settings.response_timeout_seconds)
        self._setup(gateway, station)

    @on("BootNotification")
    def on_boot(self, **_: Any) -> result16.BootNotification:
        return result16.BootNotification(current_time=now_iso(), interval=self.gateway.settings.heartbeat_seconds,
                                         status="Accepted")

    @after("BootNotification")
    async def after_boot(self, **_: Any) -> None:
        await self.gateway.booted(self.station)

    @on("Heartbeat")
    def on_heartbeat(self) -> result16.Heartbeat:
        return result16.Heartbeat(current_time=now_iso())

    @on("StatusNotification")
    def on_status(self, **_: Any) -> result16.StatusNotification:
        return result16.StatusNotification()

    @on("Authorize")
    def on_authorize(self, id_tag: str) -> result16.Authorize:
        status = "Accepted" if self.gateway.authorize(id_tag) else "Invalid"
        return result16.Authorize(id_tag_info={"status": status})

    @on("StartTransaction")
    async def on_start(self, connector_id: int, id_tag: str, meter_start: int, timestamp: str,
                       **_: Any) -> result16.StartTransaction:
        if not self.gateway.authorize(id_tag):
            return result16.StartTransaction(transaction_id=0, id_tag_info={"status": "Invalid"})
        # A StartTransaction sent again (its answer was lost) is the same transaction: same id, one session.
        start_key = f"{self.station.station_id}|{connector_id}|{id_tag}|{meter_start}|{timestamp}"
        known = self.gateway.replay_of(start_key)
        if known is not None:
            return result16.StartTransaction(transaction_id=int(known.transaction_id),
                                             id_tag_info={"status": "Accepted"})
        transaction = await self.gateway.begin(
            self.station, self.gateway.new_transaction_id(), connector_id, id_tag,
            meter_start_wh=float(meter_start), start_key=start_key, announced=False,
        )
        return result16.StartTransaction(transaction_id=int(transaction.transaction_id),
                                         id_tag_info={"status": "Accepted"})

    @after("StartTransaction")
    def after_start(self, connector_id: int, id_tag: str, meter_start: int, timestamp: str, **_: Any) -> None:
        start_key = f"{self.station.station_id}|{connector_id}|{id_tag}|{meter_start}|{timestamp}"
        transaction = self.gateway.replay_of(start_key)
        if transaction is not None:
            self.gateway.announced(transaction.session_id)

    @on("StopTransaction")
    def on_stop(self, meter_stop: int, transaction_id: int, reason: str | None = None,
                **_: Any) -> result16.StopTransaction:
        transaction = self.gateway.find(self.station.station_id, str(transaction_id))
        if transaction is not None and transaction.active:
            self.gateway.end(transaction, reason or "Local", meter_stop_wh=float(meter_stop))
        return result16.StopTransaction(id_tag_info={"status": "Accepted"})

    @on("MeterValues")
    def on_meter_values(self, connector_id: int, meter_value: list, transaction_id: int | None = None,
                        **_: Any) -> result16.MeterValues:
        transaction = None
        if transaction_id is not None:
            transaction = self.gateway.find(self.station.station_id, str(transaction_id))
        if transaction is None:
            transaction = self.gateway.on_connector(self.station.station_id, connector_id)
        if transaction is not None and transaction.active:
            self.gateway.metered(transaction, *_sampled(meter_value))
        return result16.MeterValues()

    async def set_tx_profile(self, transaction: Transaction, amps: float, phases: int) -> bool:
        answer = await self._call(call16.SetChargingProfile(
            connector_id=transaction.connector,
            cs_charging_profiles={
                "charging_profile_id": profile_id(transaction.session_id),
                "transaction_id": int(transaction.transaction_id),
                "stack_level": TX_PROFILE_STACK_LEVEL,
                "charging_profile_purpose": "TxProfile",
                "charging_profile_kind": "Absolute",
                "charging_schedule": _schedule16(amps, phases),
            },
        ))
        accepted = answer.status == "Accepted"
        if accepted:
            self.gateway.spawn(self._read_back(transaction.connector, amps, transaction.session_id))
        return accepted

    async def install_fallback(self, default_a: float, station_max_a: float, phases: int) -> list[str]:
        refused = []
        for profile_id_, purpose, amps in ((FALLBACK_PROFILE_ID, "TxDefaultProfile", default_a),
                                           (STATION_MAX_PROFILE_ID, "ChargePointMaxProfile", station_max_a)):
            answer = await self._call(call16.SetChargingProfile(
                connector_id=0,
                cs_charging_profiles={
                    "charging_profile_id": profile_id_,
                    "stack_level": FALLBACK_STACK_LEVEL,
                    "charging_profile_purpose": purpose,
                    "charging_profile_kind": "Absolute",
                    "charging_schedule": _schedule16(amps, phases),
                },
            ))
            if answer.status != "Accepted":
                refused.append(f"its {purpose} ({amps:g} A)")
        return refused

    async def transaction_ongoing(self, transaction_id: str) -> bool | None:
        return None  # 1.6 has no such question: the station replays its queued StopTransaction instead

    async def _read_back(self, connector: int, amps: float, session_id: str) -> None:
        if not self.composite_supported:
            return
        try:
            answer = await self._call(call16.GetCompositeSchedule(connector_id=connector, duration=60,
                                                                  charging_rate_unit="A"))
        except Exception as exc:  # noqa: BLE001 - a station without the feature, or gone: stop asking it
            self.composite_supported = False
            log.info("station %s does not read back its composite schedule (%s): trusting its acceptances",
                     self.station.station_id, exc.__class__.__name__)
            return
        self.gateway.read_back(self.station, session_id, amps, _first_limit(answer.charging_schedule))


def _schedule16(amps: float, phases: int) -> dict[str, Any]:
    return {
        "charging_rate_unit": "A",
        "start_schedule": _past_start(),
        "charging_schedule_period": [{"start_period": 0, "limit": round(amps, 1), "number_phases": phases}],
    }


def _first_limit(schedule: Any) -> float | None:
    if isinstance(schedule, list):
        schedule = schedule[0] if schedule else None
    if not isinstance(schedule, dict):
        return None
    periods = schedule.get("charging_schedule_period") or []
    try:
        return float(periods[0]["limit"]) if periods else None
    except (KeyError, TypeError, ValueError):
        return None


class Station201(_Connection, ChargePoint201):
    protocol = "ocpp2.0.1"

    def __init__(self, gateway: Gateway, station: Station, connection: Any) -> None:
        ChargePoint201.__init__(self, station.station_id, connection,
                                response_timeout=gateway.settings.response_timeout_seconds)
        self._setup(gateway, station)

    @on("BootNotification")
    def on_boot(self, **_: Any) -> result201.BootNotification:
        return result201.BootNotification(current_time=now_iso(), interval=self.gateway.settings.heartbeat_seconds,
                                          status="Accepted")

    @after("BootNotification")
    async def after_boot(self, **_: Any) -> None:
        await self.gateway.booted(self.station)

    @on("Heartbeat")
    def on_heartbeat(self, **_: Any) -> result201.Heartbeat:
        return result201.Heartbeat(current_time=now_iso())

    @on("StatusNotification")
    def on_status(self, **_: Any) -> result201.StatusNotification:
        return result201.StatusNotification()

    @on("Authorize")
    def on_authorize(self, id_token: dict, **_: Any) -> result201.Authorize:
        return result201.Authorize(id_token_info={"status": self._token_status(id_token)})

    def _token_status(self, id_token: dict | None) -> str:
        if not id_token:
            return "Unknown"
        return "Accepted" if self.gateway.authorize(id_token.get("id_token", "")) else "Invalid"

    @on("TransactionEvent")
    async def on_transaction_event(self, event_type: str, seq_no: int, transaction_info: dict,
                                   meter_value: list | None = None, evse: dict | None = None,
                                   id_token: dict | None = None, offline: bool | None = None,
                                   **_: Any) -> result201.TransactionEvent:
        transaction_id = transaction_info["transaction_id"]
        transaction = self.gateway.find(self.station.station_id, transaction_id)
        token_status = self._token_status(id_token) if id_token else None
        if transaction is None and event_type != "Ended" and token_status != "Invalid":
            # Started, or an Updated whose Started was lost: either way the transaction runs now.
            evse_id = (evse or {}).get("id", 1)
            transaction = await self.gateway.begin(
                self.station, transaction_id, evse_id, (id_token or {}).get("id_token"),
            )
        if transaction is not None:
            gap = transaction.seq_no_gap(seq_no)
            if gap:
                self.gateway.metrics.seq_gaps.inc(gap)
                log.warning("station %s transaction %s: %d TransactionEvent(s) missing before seqNo %d%s",
                            self.station.station_id, transaction_id, gap, seq_no,
                            " (sent offline)" if offline else "")
            if meter_value and transaction.active:
                self.gateway.metered(transaction, *_sampled(meter_value))
            if event_type == "Ended" and transaction.active:
                self.gateway.end(transaction, transaction_info.get("stopped_reason") or "Local")
            else:
                self.gateway.save(transaction)
        if token_status is not None:
            return result201.TransactionEvent(id_token_info={"status": token_status})
        return result201.TransactionEvent()

    @on("NotifyEVChargingNeeds")
    def on_charging_needs(self, charging_needs: dict, evse_id: int, **_: Any) -> result201.NotifyEVChargingNeeds:
        transaction = self.gateway.on_connector(self.station.station_id, evse_id)
        if transaction is None:
            return result201.NotifyEVChargingNeeds(status="Rejected")
        ac = charging_needs.get("ac_charging_parameters") or {}
        dc = charging_needs.get("dc_charging_parameters") or {}
        self.gateway.charging_needs(
            transaction,
            max_current_a=ac.get("ev_max_current"),
            min_current_a=ac.get("ev_min_current"),
            # A DC vehicle states its need too; its currents are the station's business, not a phase's.
            energy_wh=ac.get("energy_amount", dc.get("energy_amount")),
            departure_time=charging_needs.get("departure_time"),
        )
        return result201.NotifyEVChargingNeeds(status="Accepted")

    @on("MeterValues")
    def on_meter_values(self, evse_id: int, meter_value: list, **_: Any) -> result201.MeterValues:
        transaction = self.gateway.on_connector(self.station.station_id, evse_id)
        if transaction is not None:
            self.gateway.metered(transaction, *_sampled(meter_value))
        return result201.MeterValues()

    async def set_tx_profile(self, transaction: Transaction, amps: float, phases: int) -> bool:
        answer = await self._call(call201.SetChargingProfile(
            evse_id=transaction.connector,
            charging_profile={
                "id": profile_id(transaction.session_id),
                "stack_level": TX_PROFILE_STACK_LEVEL,
                "charging_profile_purpose": "TxProfile",
                "charging_profile_kind": "Absolute",
                "transaction_id": transaction.transaction_id,
                "charging_schedule": [_schedule201(amps, phases)],
            },
        ))
        accepted = answer.status == "Accepted"
        if accepted:
            self.gateway.spawn(self._read_back(transaction.connector, amps, transaction.session_id))
        return accepted

    async def install_fallback(self, default_a: float, station_max_a: float, phases: int) -> list[str]:
        refused = []
        for profile_id_, purpose, amps in ((FALLBACK_PROFILE_ID, "TxDefaultProfile", default_a),
                                           (STATION_MAX_PROFILE_ID, "ChargingStationMaxProfile", station_max_a)):
            answer = await self._call(call201.SetChargingProfile(
                evse_id=0,
                charging_profile={
                    "id": profile_id_,
                    "stack_level": FALLBACK_STACK_LEVEL,
                    "charging_profile_purpose": purpose,
                    "charging_profile_kind": "Absolute",
                    "charging_schedule": [_schedule201(amps, phases)],
                },
            ))
            if answer.status != "Accepted":
                refused.append(f"its {purpose} ({amps:g} A)")
        return refused

    async def transaction_ongoing(self, transaction_id: str) -> bool | None:
        try:
            answer = await self._call(call201.GetTransactionStatus(transaction_id=transaction_id))
        except Exception as exc:  # noqa: BLE001 - a station that cannot tell: keep the transaction
            log.info("station %s could not tell whether transaction %s still runs: %s", self.station.station_id,
                     transaction_id, exc)
            return None
        if answer.messages_in_queue:
            return None  # its queued TransactionEvents will tell
        return answer.ongoing_indicator

    async def _read_back(self, evse_id: int, amps: float, session_id: str) -> None:
        if not self.composite_supported:
            return
        try:
            answer = await self._call(call201.GetCompositeSchedule(duration=60, evse_id=evse_id,
                                                                   charging_rate_unit="A"))
        except Exception as exc:  # noqa: BLE001 - a station without the feature, or gone: stop asking it
            self.composite_supported = False
            log.info("station %s does not read back its composite schedule (%s): trusting its acceptances",
                     self.station.station_id, exc.__class__.__name__)
            return
        schedule = (answer.schedule or {}) if answer.status == "Accepted" else {}
        self.gateway.read_back(self.station, session_id, amps, _first_limit(schedule))


def _schedule201(amps: float, phases: int) -> dict[str, Any]:
    return {
        "id": 1,
        "start_schedule": _past_start(),
        "charging_rate_unit": "A",
        "charging_schedule_period": [{"start_period": 0, "limit": round(amps, 1), "number_phases": phases}],
    }
