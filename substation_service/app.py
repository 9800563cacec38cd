"""The substation's Flask application factory."""
from __future__ import annotations

import logging
import os
import threading
import time

from flask import Flask

from gridcommon.logs import configure_logging
from gridcommon.openapi import install_openapi
from gridcommon.web import ROUTINE_PATHS, install_common
from substation_service.config import Settings
from substation_service.ledger import Clock, Ledger
from substation_service.limit_routes import limit_blueprint
from substation_service.metrics import SubstationMetrics
from substation_service.openapi_spec import SPEC
from substation_service.peering import build_peering, install_peering
from substation_service.peering.machine import Readings
from substation_service.peering.transport import MESSAGES_PATH
from substation_service.record_routes import record_blueprint
from substation_service.routes import EXTENSION_KEY, Substation, blueprint
from substation_service.store import LedgerStore, StoreError

log = logging.getLogger("substation")


def create_app(settings: Settings | None = None, start_background: bool = True, *, clock: Clock | None = None) -> Flask:
    """Build one substation app.

    ``clock`` (seconds since the epoch) lets tests move time. ``start_background``
    starts peer balancing's threads when ``PEERS`` lists peers; a substation on
    its own has none.
    """
    settings = settings or Settings.from_env(os.environ)
    configure_logging(settings.substation_id, settings.log_level, settings.log_sampling)
    app = Flask(__name__)
    install_common(app, routine_paths=ROUTINE_PATHS | {MESSAGES_PATH})
    substation = build_substation(settings, clock)
    peering = build_peering(
        settings.substation_id,
        settings.public_url,
        settings.peering,
        readings=lambda: peering_readings(substation.ledger),
        clock=clock or time.time,
        on_peer_power=substation.ledger.set_peer_kw,
    )
    app.extensions[EXTENSION_KEY] = substation
    app.register_blueprint(blueprint)
    app.register_blueprint(limit_blueprint)
    app.register_blueprint(record_blueprint)
    install_openapi(app, SPEC)
    install_peering(app, peering, substation.metrics.registry, start_background)
    return app


def peering_readings(ledger: Ledger) -> Readings:
    """FREEDM's device readings for a substation that charges vehicles.

    The load is what the vehicles ask for, capped by an operator limit (power
    past it could not be used); the rating counts as supply beside generation
    and storage. So curtailed vehicles make the substation DEMAND and room to
    spare makes it SUPPLY.
    """
    snapshot = ledger.snapshot()
    parts = snapshot.parts
    wanted = snapshot.requested_kw
    if parts.operator_limit_kw is not None:
        wanted = min(wanted, parts.operator_limit_kw)
    return Readings(
        load_kw=wanted,
        generation_kw=parts.generation_kw,
        storage_kw=parts.storage_kw,
        rating_kw=parts.capacity_kw,
    )


def build_substation(settings: Settings, clock: Clock | None) -> Substation:
    # The gauges read the ledger at scrape time; the ledger reports finished sessions to the metrics.
    metrics = SubstationMetrics(settings.substation_id, snapshot=lambda: ledger.snapshot(needs=True))
    store = open_store(settings)
    ledger = Ledger(
        settings.capacity_kw,
        settings.session_seconds,
        clock=clock,
        power=settings.peering.power,
        policy=settings.allocation_policy,
        min_charge_kw=settings.min_charge_kw,
        on_session_finished=metrics.session_finished,
        # The longest a session can last: a late copy of a request is refused for at least that long.
        retire_ids_for_seconds=settings.max_session_seconds,
        store=store,
        substation_id=settings.substation_id,
        records_retention_seconds=settings.records_retention_days * 86400.0,
        records_max_rows=settings.records_max_rows,
    )
    if store is not None:
        snapshot = ledger.snapshot()
        log.info(
            "state kept in %s: %d active session(s), %g kW allocated, state version %d",
            store.path, snapshot.active_chargers, snapshot.load_kw, snapshot.state_version,
        )
    return Substation(settings=settings, ledger=ledger, metrics=metrics,
                      long_polls=threading.BoundedSemaphore(settings.max_long_polls))


def open_store(settings: Settings) -> LedgerStore | None:
    """The durable ledger under STATE_DIR; a state that cannot be used stops the substation.

    Starting with an empty ledger instead would report 0 kW while vehicles charge, and the
    balancer would route a whole capacity to it again.
    """
    path = settings.state_file
    if path is None:
        return None
    try:
        return LedgerStore(path, settings.substation_id, full_sync=settings.state_full_sync)
    except StoreError as exc:
        # Raised on: gunicorn then reports a worker that failed to boot and exits non-zero.
        log.critical("%s cannot start: %s", settings.substation_id, exc)
        raise
