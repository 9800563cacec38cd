"""The substation's Flask application factory."""
from __future__ import annotations

import os
import time
from collections.abc import Callable

from flask import Flask

from gridcommon.logs import configure_logging
from gridcommon.web import ROUTINE_PATHS, install_common
from substation_service.config import Settings
from substation_service.ledger import Clock, Ledger
from substation_service.metrics import SubstationMetrics
from substation_service.peering import build_peering, install_peering
from substation_service.peering.transport import MESSAGES_PATH
from substation_service.routes import EXTENSION_KEY, Substation, blueprint


def create_app(
    settings: Settings | None = None,
    start_background: bool = True,
    *,
    clock: Clock | None = None,
    extra_capacity: Callable[[], float] | None = None,
) -> Flask:
    """Build one substation app.

    ``clock`` (seconds since the epoch) lets tests move time; ``extra_capacity``
    returns the kW that generation, storage and peers add to ``CAPACITY_KW``
    (by default the peer-balancing node's: generation + storage - gateway).
    ``start_background`` starts peer balancing's threads when ``PEERS`` lists
    peers; a substation on its own has none.
    """
    settings = settings or Settings.from_env(os.environ)
    configure_logging(settings.substation_id, settings.log_level)
    app = Flask(__name__)
    install_common(app, routine_paths=ROUTINE_PATHS | {MESSAGES_PATH})
    # The ledger asks the peering node for extra capacity and the node reads the ledger's load:
    # each reaches the other through a function that is first called once both exist.
    peering = build_peering(
        settings.substation_id,
        settings.public_url,
        settings.peering,
        load_kw=lambda: substation.ledger.snapshot().load_kw,
        clock=clock or time.time,
    )
    substation = build_substation(settings, clock, extra_capacity or peering.node.extra_capacity_kw)
    app.extensions[EXTENSION_KEY] = substation
    app.register_blueprint(blueprint)
    install_peering(app, peering, substation.metrics.registry, start_background)
    return app


def build_substation(settings: Settings, clock: Clock | None, extra_capacity: Callable[[], float]) -> Substation:
    # The gauges read the ledger at scrape time; the ledger reports finished sessions to the metrics.
    metrics = SubstationMetrics(settings.substation_id, snapshot=lambda: ledger.snapshot())
    ledger = Ledger(
        settings.capacity_kw,
        settings.session_seconds,
        clock=clock,
        extra_capacity=extra_capacity,
        on_session_finished=metrics.session_finished,
        # The longest a session can last: a late copy of a request is refused for at least that long.
        retire_ids_for_seconds=settings.max_session_seconds,
    )
    return Substation(settings=settings, ledger=ledger, metrics=metrics)
