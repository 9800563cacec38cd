"""The central system's core: transactions become substation sessions, allocations become profiles.

The protocol glue (``protocol``) calls in here with plain values and hands over a
``StationLink`` per connected station; nothing here knows OCPP frames or WebSockets.
Per substation three tasks run while the gateway lives: a watcher long-polling its
sessions, a dispatcher turning allocations into profiles through the ``ProfilePlanner``,
and a lease renewer.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from collections.abc import Coroutine
from typing import Any, Protocol

from charge_point_gateway.config import Settings
from charge_point_gateway.metrics import GatewayMetrics, GatewaySnapshot
from charge_point_gateway.planner import ProfilePlanner, Send
from charge_point_gateway.registry import Station
from charge_point_gateway.store import GatewayStore
from charge_point_gateway.substation_client import SubstationClient, SubstationUnavailable
from charge_point_gateway.transactions import (
    ActiveTransactions,
    Transaction,
    amps_to_kw,
    energy_need,
    kw_to_amps,
    session_id_for,
    taper_decision,
    vehicle_id_for,
)

log = logging.getLogger("gateway")
# Pause after a substation failed to answer, before asking it again.
RETRY_SECONDS = 2.0
# A station's last-seen time is written this often at most: one SQLite write per message would not scale.
SEEN_WRITE_SECONDS = 30.0


class StationLink(Protocol):
    """What the protocol glue offers for one connected station."""

    protocol: str

    async def set_tx_profile(self, transaction: Transaction, amps: float, phases: int) -> bool:
        """Send the transaction's TxProfile; True when the station accepted it."""

    async def install_fallback(self, default_a: float, station_max_a: float, phases: int) -> list[str]:
        """Install the TxDefaultProfile (``default_a``: what a transaction without its own TxProfile may draw)
        and the station-wide maximum profile (``station_max_a``); returns the ones the station refused.
        A CALLERROR or an unanswered call raises."""

    async def transaction_ongoing(self, transaction_id: str) -> bool | None:
        """Whether the station still runs the transaction (None: it cannot tell)."""

    async def disconnect(self, code: int, reason: str) -> None:
        """Close the station's connection (its profiles hold)."""


@dataclass
class SubstationState:
    url: str
    planner: ProfilePlanner
    version: int = -1
    min_charge_kw: float = 0.0  # the substation's own MIN_CHARGE_KW: no session's minimum may be below it
    changed_at: float = 0.0  # monotonic time the last allocation change was seen
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # state_version of the answer that admitted a session: an older snapshot does not show it yet.
    admitted_at: dict[str, int] = field(default_factory=dict)
    tasks: list[asyncio.Task] = field(default_factory=list)


class Gateway:
    def __init__(self, settings: Settings, store: GatewayStore, client: SubstationClient) -> None:
        self.settings = settings
        self.store = store
        self.client = client
        self.metrics = GatewayMetrics(self.snapshot)
        self.links: dict[str, StationLink] = {}
        self.stations: dict[str, Station] = {station.station_id: station for station, *_ in store.stations()}
        # Indexed by substation, station and connector: an allocation change, a reconnect or MeterValues
        # touch their own transactions without a scan of all of them.
        self.transactions = ActiveTransactions(store.active_transactions())
        for transaction in self.transactions:
            transaction.announced = True  # its station had its answer, or will replay and get the same id
        self.substations: dict[str, SubstationState] = {}
        self._background: set[asyncio.Task] = set()
        self._admitting: set[str] = set()
        self._seen_written: dict[str, float] = {}

    # Life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        for url in {station.substation_url for station in self.stations.values()}:
            self.substation(url)
        for transaction in self.transactions:
            station = self.stations.get(transaction.station_id)
            state = self.substation(transaction.substation_url)
            # What it holds: its last accepted TxProfile, else the fallback (TxDefaultProfile), and at its
            # maximum if it refuses profiles.
            if station is not None and transaction.profile_rejected:
                held = station.max_current_a
            elif transaction.limit_a is not None:
                held = transaction.limit_a
            else:
                held = self.settings.fallback_current_a
            state.planner.track(transaction.session_id, held)
            self.spawn(self._admit(transaction))
        self.spawn(self._expire_offline())
        if self.transactions:
            log.info("resumed %d transactions from the state file", len(self.transactions))

    async def close(self) -> None:
        tasks = [*self._background, *(t for s in self.substations.values() for t in s.tasks)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def substation(self, url: str) -> SubstationState:
        state = self.substations.get(url)
        if state is None:
            settings = self.settings
            state = SubstationState(
                url,
                ProfilePlanner(settings.deadband_a, settings.min_profile_interval_seconds,
                               settings.vehicle_response_seconds),
            )
            self.substations[url] = state
            state.tasks = [
                asyncio.create_task(self._watch(state), name=f"watch {url}"),
                asyncio.create_task(self._dispatch(state), name=f"dispatch {url}"),
                asyncio.create_task(self._renew_leases(state), name=f"leases {url}"),
            ]
        return state

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Run ``coroutine`` in the background, kept referenced until it ends."""
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # Stations -------------------------------------------------------------------------------

    def authorize(self, id_tag: str) -> bool:
        return self.settings.authorize_all or id_tag in self.settings.id_tags

    def connected(self, station: Station, link: StationLink) -> None:
        self.links[station.station_id] = link
        self.store.seen(station.station_id, time.time(), "connected", link.protocol)
        self.substation(station.substation_url)
        for transaction in self.transactions.of_station(station.station_id):
            normal = self._normal_minimum(transaction, station)
            if not transaction.profile_rejected and transaction.minimum_kw > normal + 1e-6:
                # Counted at what it held while offline: now it can be told again, so its own minimum returns.
                self.spawn(self._change(transaction, minimum_kw=normal))

    def _normal_minimum(self, transaction: Transaction, station: Station) -> float:
        amps = self.settings.min_current_a
        if transaction.ev_min_current_a is not None:
            amps = max(amps, transaction.ev_min_current_a)
        return min(amps_to_kw(amps, station.phases, self.settings.volts), self._full_amount(transaction, station))

    def disconnected(self, station_id: str, link: StationLink) -> None:
        if self.links.get(station_id) is link:
            del self.links[station_id]
            self.store.seen(station_id, time.time(), "offline")

    def heard_from(self, station_id: str) -> None:
        """A message from the station: its last-seen time, written at most every ``SEEN_WRITE_SECONDS``."""
        now = time.time()
        if now - self._seen_written.get(station_id, 0.0) >= SEEN_WRITE_SECONDS:
            self._seen_written[station_id] = now
            self.store.seen(station_id, now, "connected")

    def station_max_a(self, station: Station) -> float:
        """The station-wide cap installed at boot: ``STATION_MAX_CURRENT_A``, never above its registered maximum
        (0: its registered maximum)."""
        configured = self.settings.station_max_current_a
        return station.max_current_a if configured <= 0 else min(configured, station.max_current_a)

    async def booted(self, station: Station) -> None:
        """After BootNotification: the fallback profiles, then the station's transactions re-checked."""
        link = self.links.get(station.station_id)
        if link is None:
            return
        default_a, station_max_a = self.settings.fallback_current_a, self.station_max_a(station)
        try:
            refused = await link.install_fallback(default_a, station_max_a, station.phases)
        except Exception as exc:  # noqa: BLE001 - a CALLERROR, a timeout or a closed link: the same refusal
            refused = [f"the fallback profiles (it answered {exc.__class__.__name__}: {exc})"]
        if refused:
            self.metrics.profiles_rejected.labels("fallback").inc()
            log.warning("station %s refused %s: a new transaction may draw more than %g A before its own "
                        "profile, and if it loses the gateway it may draw more than %g A; check that it supports "
                        "smart charging", station.station_id, " and ".join(refused), default_a, station_max_a)
        await self.reconcile(station)

    async def reconcile(self, station: Station) -> None:
        """Ask a returning station (2.0.1) whether the transactions we hold for it still run."""
        link = self.links.get(station.station_id)
        if link is None:
            return
        for transaction in self.transactions.of_station(station.station_id):
            ongoing = await link.transaction_ongoing(transaction.transaction_id)
            if ongoing is False:
                log.info("station %s no longer runs transaction %s: ending its session %s",
                         station.station_id, transaction.transaction_id, transaction.substation_session_id)
                self.end(transaction, "NotOngoing")
        self.substation(station.substation_url).wake.set()

    # Transactions ---------------------------------------------------------------------------

    def put_station(self, station: Station) -> bool:
        """Create or replace a station (operator API, deployment file); True when it is new."""
        created = self.store.put_station(station)
        self.stations[station.station_id] = station
        return created

    def delete_station(self, station_id: str) -> bool:
        self.stations.pop(station_id, None)
        link = self.links.get(station_id)
        if link is not None:
            self.spawn(link.disconnect(1008, "this station is no longer registered"))
        return self.store.delete_station(station_id)

    def on_connector(self, station_id: str, connector: int) -> Transaction | None:
        """The active transaction on a station's connector (1.6) or EVSE (2.0.1), if any."""
        return self.transactions.on_connector(station_id, connector)

    def save(self, transaction: Transaction) -> None:
        self.store.save(transaction)

    def announced(self, session_id: str) -> None:
        """The station has the transaction id: profiles for it may go now."""
        transaction = self.transactions.get(session_id)
        if transaction is not None and not transaction.announced:
            transaction.announced = True
            self.store.save(transaction)
            self.substation(transaction.substation_url).wake.set()

    def read_back(self, station: Station, session_id: str, told_a: float, composite_a: float | None) -> None:
        """What GetCompositeSchedule says the station applies, against what it was told."""
        if composite_a is None or composite_a <= told_a + 0.1:
            return
        self.metrics.profiles_rejected.labels("not_applied").inc()
        log.warning("station %s accepted %.1f A for session %s but its composite schedule allows %.1f A: "
                    "another profile of higher precedence overrides ours; check its stored profiles",
                    station.station_id, told_a, session_id, composite_a)

    def find(self, station_id: str, transaction_id: str) -> Transaction | None:
        session_id = session_id_for(station_id, transaction_id)
        return self.transactions.get(session_id) or self.store.transaction(session_id)

    def replay_of(self, start_key: str) -> Transaction | None:
        return self.store.by_start_key(start_key)

    def new_transaction_id(self) -> str:
        return str(self.store.next_transaction_id())

    async def begin(
        self, station: Station, transaction_id: str, connector: int, id_tag: str | None,
        meter_start_wh: float | None = None, start_key: str | None = None, announced: bool = True,
    ) -> Transaction:
        """A transaction started: kept durably, then admitted at the substation (idempotent)."""
        session_id = session_id_for(station.station_id, transaction_id)
        known = self.transactions.get(session_id) or self.store.transaction(session_id)
        if known is not None:
            return known
        settings = self.settings
        amount = amps_to_kw(station.max_current_a, station.phases, settings.volts)
        transaction = Transaction(
            session_id=session_id,
            station_id=station.station_id,
            transaction_id=transaction_id,
            connector=connector,
            id_tag=id_tag,
            substation_url=station.substation_url,
            phases=station.phases,
            amount_kw=amount,
            minimum_kw=min(amount, amps_to_kw(settings.min_current_a, station.phases, settings.volts)),
            started_at=time.time(),
            meter_start_wh=meter_start_wh,
            announced=announced,
        )
        self.store.save(transaction, start_key)
        self.transactions.add(transaction)
        state = self.substation(station.substation_url)
        state.planner.track(session_id, settings.fallback_current_a)
        log.info("transaction %s of station %s (connector %d) started: session %s at %s",
                 transaction_id, station.station_id, connector, session_id, station.substation_url)
        await self._admit(transaction)
        return transaction

    async def _admit(self, transaction: Transaction) -> None:
        """Ask the substation for the session (again: the same id makes it a replay)."""
        if transaction.admitted or not transaction.active or transaction.session_id in self._admitting:
            return
        self._admitting.add(transaction.session_id)
        try:
            await self._ask_for_session(transaction)
        finally:
            self._admitting.discard(transaction.session_id)

    async def _ask_for_session(self, transaction: Transaction, relearned: bool = False,
                               renamed: bool = False) -> None:
        try:
            answer = await self.client.start(
                transaction.substation_url, transaction.substation_session_id,
                vehicle_id_for(transaction.station_id, transaction.connector, transaction.id_tag),
                transaction.amount_kw, self._minimum_at(transaction, transaction.minimum_kw),
                self.settings.lease_seconds, need=energy_need(transaction),
            )
        except SubstationUnavailable as exc:
            self.metrics.substation_errors.labels("start").inc()
            log.warning("session %s not admitted yet, retrying when %s answers: %s",
                        transaction.substation_session_id, transaction.substation_url, exc)
            self.substation(transaction.substation_url).wake.set()
            return
        if answer.status == 201:
            transaction.admitted = True
            # Its allocation is taken from the watcher's next snapshot only: one consistent view of all
            # sessions, never this answer's figure beside older figures of the others.
            version = answer.body.get("state_version")
            if isinstance(version, int):
                self.substation(transaction.substation_url).admitted_at[transaction.session_id] = version
            self.store.save(transaction)
        elif answer.status == 400 and answer.body.get("field") == "minimum_kw" and not relearned:
            # Its MIN_CHARGE_KW was not known yet (or changed): ask it, then ask for the session again.
            await self._learn_minimum(self.substation(transaction.substation_url))
            await self._ask_for_session(transaction, relearned=True, renamed=renamed)
            return
        elif answer.status == 409 and answer.body.get("error") == "session_id_retired" and not renamed:
            # The substation ended the session while the transaction runs on (its lease lapsed while the gateway
            # was down, or an operator stopped it): its id is spent, and a vehicle drawing under its last profile
            # is counted nowhere. A new generation names a new session, kept durably before it is asked for.
            retired = transaction.substation_session_id
            transaction.generation += 1
            self.store.save(transaction)
            log.warning("%s had ended session %s while transaction %s of station %s still runs: asking for it "
                        "again as session %s", transaction.substation_url, retired, transaction.transaction_id,
                        transaction.station_id, transaction.substation_session_id)
            await self._ask_for_session(transaction, relearned=relearned, renamed=True)
            return
        elif answer.status == 409 and answer.body.get("error") == "capacity_exceeded":
            log.info("no room at %s for session %s: its station is held at 0 A until there is",
                     transaction.substation_url, transaction.substation_session_id)
        else:
            self.metrics.substation_errors.labels("start").inc()
            log.warning("%s refused session %s (%s): %s", transaction.substation_url,
                        transaction.substation_session_id, answer.status, answer.body.get("message", answer.body))
        self.substation(transaction.substation_url).wake.set()

    def end(self, transaction: Transaction, reason: str | None, meter_stop_wh: float | None = None) -> None:
        """The transaction ended at its station: durably ended here, then its session stopped."""
        if not transaction.active:
            return
        transaction.ended_at = time.time()
        transaction.stop_reason = reason
        if meter_stop_wh is not None:
            transaction.energy_wh = meter_stop_wh - (transaction.meter_start_wh or 0.0)
        self.store.save(transaction)
        self.transactions.remove(transaction.session_id)
        state = self.substation(transaction.substation_url)
        state.planner.forget(transaction.session_id)
        log.info("transaction %s of station %s ended (%s): stopping session %s", transaction.transaction_id,
                 transaction.station_id, reason or "no reason given", transaction.substation_session_id)
        state.admitted_at.pop(transaction.session_id, None)
        self.spawn(self._stop_session(transaction))
        state.wake.set()

    async def _stop_session(self, transaction: Transaction) -> None:
        for attempt in range(5):
            try:
                answer = await self.client.stop(transaction.substation_url, transaction.substation_session_id)
                if answer.status in (200, 404):
                    return
                log.warning("stopping session %s: %s answered %d", transaction.substation_session_id,
                            transaction.substation_url, answer.status)
            except SubstationUnavailable as exc:
                log.warning("stopping session %s failed (attempt %d): %s", transaction.substation_session_id,
                            attempt + 1, exc)
            self.metrics.substation_errors.labels("stop").inc()
            await asyncio.sleep(RETRY_SECONDS * (attempt + 1))
        log.error("session %s could not be stopped at %s: its lease ends it within %g s",
                  transaction.substation_session_id, transaction.substation_url, self.settings.lease_seconds)

    def metered(self, transaction: Transaction, power_w: float | None, energy_wh: float | None) -> None:
        """MeterValues of a transaction: its measured power and energy, and the taper check."""
        if power_w is not None:
            transaction.power_w = power_w
        if energy_wh is not None:
            transaction.energy_wh = energy_wh - (transaction.meter_start_wh or 0.0)
        station = self.stations.get(transaction.station_id)
        if station is None or transaction.profile_rejected:
            return
        full = self._full_amount(transaction, station)
        decision = taper_decision(transaction, full, time.monotonic(), self.settings.taper_ratio,
                                  self.settings.taper_seconds, self.settings.taper_margin_kw)
        if decision.amount_kw is not None and abs(decision.amount_kw - transaction.amount_kw) > 1e-6:
            transaction.tapered = decision.tapered
            self.spawn(self._change(transaction, amount_kw=decision.amount_kw))

    def charging_needs(self, transaction: Transaction, max_current_a: float | None, min_current_a: float | None,
                       energy_wh: float | None, departure_time: str | None) -> None:
        """2.0.1 NotifyEVChargingNeeds: the vehicle's own limits become the session's amount and minimum."""
        transaction.ev_max_current_a = max_current_a
        transaction.ev_min_current_a = min_current_a
        transaction.ev_energy_wh = energy_wh
        transaction.departure_time = departure_time
        station = self.stations.get(transaction.station_id)
        if station is None:
            return
        self.store.save(transaction)
        if transaction.admitted and energy_need(transaction):
            # Apart from the amount: a substation that refuses the need must not keep the vehicle's limits out.
            self.spawn(self._set_need(transaction))
        if transaction.profile_rejected:
            return  # counted at the station's maximum whatever the vehicle says
        self.spawn(self._change(transaction, amount_kw=self._full_amount(transaction, station),
                                minimum_kw=self._normal_minimum(transaction, station)))

    async def _set_need(self, transaction: Transaction) -> None:
        """The vehicle's energy need and departure become its session's (PATCH /charge/<id>)."""
        need = energy_need(transaction)
        try:
            answer = await self.client.change(transaction.substation_url, transaction.substation_session_id,
                                              need=need)
        except SubstationUnavailable as exc:
            self.metrics.substation_errors.labels("change").inc()
            log.warning("setting the energy need of session %s failed: %s", transaction.substation_session_id, exc)
            return
        if answer.status != 200:
            self.metrics.substation_errors.labels("change").inc()
            log.warning("%s refused the energy need %s of session %s (%d): %s", transaction.substation_url, need,
                        transaction.substation_session_id, answer.status, answer.body.get("message", answer.body))

    def _minimum_at(self, transaction: Transaction, minimum_kw: float) -> float | None:
        """``minimum_kw`` as the substation takes it: at least its own MIN_CHARGE_KW (6 A on one phase is
        1.38 kW, a substation's 1.4 kW is more), at most the amount; None when the amount is below its minimum
        (the substation then gives the session what it asks)."""
        floor = self.substation(transaction.substation_url).min_charge_kw
        if transaction.amount_kw < floor:
            return None
        return min(max(minimum_kw, floor), transaction.amount_kw)

    def _full_amount(self, transaction: Transaction, station: Station) -> float:
        amps = station.max_current_a
        if transaction.ev_max_current_a is not None:
            amps = min(amps, transaction.ev_max_current_a)
        return amps_to_kw(amps, station.phases, self.settings.volts)

    async def _change(self, transaction: Transaction, amount_kw: float | None = None,
                      minimum_kw: float | None = None) -> bool:
        if not transaction.admitted:
            if amount_kw is not None:
                transaction.amount_kw = amount_kw
            if minimum_kw is not None:
                transaction.minimum_kw = minimum_kw
            self.store.save(transaction)
            return True
        if minimum_kw is not None:
            floor = self.substation(transaction.substation_url).min_charge_kw
            minimum_kw = max(minimum_kw, floor)
            if amount_kw is not None and minimum_kw > amount_kw:
                minimum_kw = None
        try:
            answer = await self.client.change(transaction.substation_url, transaction.substation_session_id,
                                              amount_kw=amount_kw, minimum_kw=minimum_kw)
        except SubstationUnavailable as exc:
            self.metrics.substation_errors.labels("change").inc()
            log.warning("changing session %s failed: %s", transaction.substation_session_id, exc)
            return False
        if answer.status != 200:
            self.metrics.substation_errors.labels("change").inc()
            log.warning("%s refused to change session %s to amount %s / minimum %s kW (%d): %s",
                        transaction.substation_url, transaction.substation_session_id, amount_kw, minimum_kw,
                        answer.status,
                        answer.body.get("message", answer.body))
            return False
        if amount_kw is not None:
            transaction.amount_kw = amount_kw
        if minimum_kw is not None:
            transaction.minimum_kw = minimum_kw
        self.store.save(transaction)
        return True

    # Per substation -------------------------------------------------------------------------

    async def _watch(self, state: SubstationState) -> None:
        """Long-poll the substation's sessions; every new state_version re-plans the profiles."""
        wait = self.settings.watch_wait_seconds
        await self._learn_minimum(state)
        while True:
            try:
                answer = await self.client.watch(state.url, state.version, wait)
            except SubstationUnavailable as exc:
                self.metrics.substation_errors.labels("watch").inc()
                log.warning("watching %s: %s; trying again in %g s", state.url, exc, RETRY_SECONDS)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            version = answer.body.get("state_version")
            if answer.status != 200 or not isinstance(version, int) or isinstance(version, bool):
                self.metrics.substation_errors.labels("watch").inc()
                log.warning("watching %s: answer %d without a state_version (%s); is it a substation with "
                            "leased sessions? trying again in %g s", state.url, answer.status,
                            answer.body.get("message", "no message"), RETRY_SECONDS)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            if version != state.version:
                state.changed_at = time.monotonic()
                state.version = version
            self._take_allocations(state, version, answer.body.get("sessions") or [])
            state.wake.set()

    async def _learn_minimum(self, state: SubstationState) -> None:
        """The substation's MIN_CHARGE_KW (``GET /status``), asked once; until it answers, 0."""
        try:
            answer = await self.client.status(state.url)
        except SubstationUnavailable as exc:
            log.warning("cannot read %s/status (%s): session minimums are sent as computed", state.url, exc)
            return
        value = answer.body.get("min_charge_kw")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            state.min_charge_kw = float(value)

    def _take_allocations(self, state: SubstationState, version: int, sessions: list) -> None:
        allocated = {
            s["session_id"]: float(s.get("allocated_kw") or 0.0)
            for s in sessions if isinstance(s, dict) and isinstance(s.get("session_id"), str)
        }
        for transaction in self.transactions.of_substation(state.url):
            if transaction.substation_session_id in allocated:
                transaction.allocated_kw = allocated[transaction.substation_session_id]
                state.admitted_at.pop(transaction.session_id, None)
                if not transaction.admitted:
                    transaction.admitted = True
                    self.store.save(transaction)
            elif version <= state.admitted_at.get(transaction.session_id, -1):
                transaction.allocated_kw = None  # admitted after this snapshot was taken: the next one shows it
            elif transaction.admitted:
                # The substation no longer has it (its lease lapsed, or an operator stopped it): ask again.
                log.warning("session %s is gone from %s: asking for it again", transaction.substation_session_id,
                            state.url)
                transaction.admitted = False
                transaction.allocated_kw = None
                self.spawn(self._admit(transaction))
            else:
                self.spawn(self._admit(transaction))

    def _targets(self, state: SubstationState) -> dict[str, float]:
        targets: dict[str, float] = {}
        for transaction in self.transactions.of_substation(state.url):
            if not transaction.announced:
                continue
            station = self.stations.get(transaction.station_id)
            if station is None:
                continue
            if not transaction.admitted or transaction.allocated_kw is None:
                targets[transaction.session_id] = 0.0
            elif transaction.profile_rejected:
                continue  # counted at its maximum (ProfilePlanner.assume); nothing more is sent to it
            else:
                targets[transaction.session_id] = kw_to_amps(
                    transaction.allocated_kw, station.phases, self.settings.volts, station.max_current_a
                )
        return targets

    async def _dispatch(self, state: SubstationState) -> None:
        while True:
            wake_at = state.planner.wake_at
            timeout = None if wake_at is None else max(0.0, wake_at - time.monotonic())
            try:
                await asyncio.wait_for(state.wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass
            state.wake.clear()
            for send in state.planner.plan(self._targets(state), time.monotonic()):
                self.spawn(self._send_profile(state, send))

    async def _send_profile(self, state: SubstationState, send: Send) -> None:
        transaction = self.transactions.get(send.key)
        if transaction is None:
            return
        link = self.links.get(transaction.station_id)
        accepted = False
        if link is not None:
            try:
                accepted = await link.set_tx_profile(transaction, send.amps, transaction.phases)
            except Exception as exc:  # noqa: BLE001 - a lost connection or a timeout: the station holds its old limit
                log.warning("profile %.1f A for session %s not delivered to %s: %s", send.amps, send.key,
                            transaction.station_id, exc)
        now = time.monotonic()
        if accepted:
            state.planner.accepted(send, now)
            transaction.limit_a = send.amps
            self.store.save(transaction)
            self.metrics.profile_latency.observe(now - state.changed_at if state.changed_at else 0.0)
            state.wake.set()
            return
        state.planner.failed(send, now)
        station = self.stations.get(transaction.station_id)
        if station is None:
            return
        if link is not None:
            # Refused (or unanswered on a live connection): whatever it draws now is out of our hands, and
            # "accepted" is not "applied" anyway. Count it at its maximum so the others make room.
            self.metrics.profiles_rejected.labels("rejected").inc()
            if transaction.profile_rejected:
                return
            transaction.profile_rejected = True
            log.warning("station %s refused a %.1f A profile for session %s: counting it at its maximum "
                        "%.1f A so the others make room", transaction.station_id, send.amps, send.key,
                        station.max_current_a)
            held_a = station.max_current_a
            state.planner.assume(send.key, held_a)
        elif send.decrease:
            # Offline: its last profile holds until it returns. The substation counts what it holds.
            self.metrics.profiles_rejected.labels("offline").inc()
            held_a = state.planner.held(send.key) or station.max_current_a
            log.warning("station %s is offline and keeps %.1f A for session %s: counting that at the substation",
                        transaction.station_id, held_a, send.key)
        else:
            return
        held_kw = amps_to_kw(held_a, station.phases, self.settings.volts)
        # The amount first: a minimum may never pass it.
        if await self._change(transaction, amount_kw=max(held_kw, transaction.amount_kw)):
            await self._change(transaction, minimum_kw=held_kw)

    async def _renew_leases(self, state: SubstationState) -> None:
        period = self.settings.lease_seconds / 3
        while True:
            await asyncio.sleep(period)
            held = {t.substation_session_id: t for t in self.transactions.of_substation(state.url) if t.admitted}
            ids = list(held)
            for chunk in (ids[i:i + 5000] for i in range(0, len(ids), 5000)):
                try:
                    answer = await self.client.renew(state.url, chunk, self.settings.lease_seconds)
                except SubstationUnavailable as exc:
                    self.metrics.substation_errors.labels("leases").inc()
                    log.warning("renewing %d leases at %s failed: %s", len(chunk), state.url, exc)
                    continue
                unknown = answer.body.get("unknown") or []
                for session_id in unknown:
                    transaction = held.get(session_id)
                    if transaction is not None and transaction.active:
                        log.warning("lease of session %s at %s had lapsed: asking for it again", session_id,
                                    state.url)
                        transaction.admitted = False
                        self.spawn(self._admit(transaction))

    async def _expire_offline(self) -> None:
        """A station silent longer than the transaction timeout: its transactions end here."""
        while True:
            await asyncio.sleep(min(60.0, self.settings.transaction_timeout_seconds / 4))
            cutoff = time.time() - self.settings.transaction_timeout_seconds
            seen = {station.station_id: (last_seen, state) for station, last_seen, state, _ in self.store.stations()}
            for transaction in self.transactions:
                last_seen, _ = seen.get(transaction.station_id, (None, "unknown"))
                if transaction.station_id in self.links:
                    continue
                if (last_seen or transaction.started_at) < cutoff:
                    self.end(transaction, "Timeout")

    # Views ----------------------------------------------------------------------------------

    def snapshot(self) -> GatewaySnapshot:
        states = {"connected": 0, "charging": 0, "offline": 0}
        charging_stations = {t.station_id for t in self.transactions.values()}
        for station, _, _, _ in self.store.stations():
            if station.station_id in self.links:
                states["charging" if station.station_id in charging_stations else "connected"] += 1
            else:
                states["offline"] += 1
        measured: dict[str, float] = {url: 0.0 for url in self.substations}
        allocated: dict[str, float] = {url: 0.0 for url in self.substations}
        for transaction in self.transactions.values():
            measured[transaction.substation_url] = measured.get(transaction.substation_url, 0.0) + (
                (transaction.power_w or 0.0) / 1000.0)
            allocated[transaction.substation_url] = allocated.get(transaction.substation_url, 0.0) + (
                transaction.allocated_kw or 0.0)
        return GatewaySnapshot(
            stations_by_state=states,
            measured_kw=measured,
            allocated_kw=allocated,
            active_transactions=len(self.transactions),
            pending_admissions=sum(1 for t in self.transactions.values() if not t.admitted),
            blocked_increases={url: len(s.planner.blocked()) for url, s in self.substations.items()},
            offline_transactions={url: sum(1 for t in self.transactions.of_substation(url)
                                           if t.station_id not in self.links)
                                  for url in self.substations},
        )

    def stations_view(self) -> list[dict]:
        by_station: dict[str, list[Transaction]] = {}
        for transaction in self.transactions.values():
            by_station.setdefault(transaction.station_id, []).append(transaction)
        view = []
        for station, last_seen, last_state, protocol in self.store.stations():
            planner = self.substations.get(station.substation_url)
            view.append({
                **station.public(),
                "connected": station.station_id in self.links,
                "protocol": protocol,
                "last_seen": last_seen,
                "last_state": last_state,
                "transactions": [
                    {
                        "transaction_id": t.transaction_id,
                        "session_id": t.substation_session_id,
                        "connector": t.connector,
                        "admitted": t.admitted,
                        "amount_kw": t.amount_kw,
                        "minimum_kw": t.minimum_kw,
                        "allocated_kw": t.allocated_kw,
                        "limit_a": None if planner is None else planner.planner.held(t.session_id),
                        "measured_kw": None if t.power_w is None else round(t.power_w / 1000.0, 3),
                        "energy_wh": t.energy_wh,
                        "seq_gaps": t.seq_gaps,
                        "tapered": t.tapered,
                        "profile_rejected": t.profile_rejected,
                        "ev_max_current_a": t.ev_max_current_a,
                        "ev_energy_wh": t.ev_energy_wh,
                        "departure_time": t.departure_time,
                    }
                    for t in by_station.get(station.station_id, [])
                ],
            })
        return view
