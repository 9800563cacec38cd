"""The charge request service's Flask application factory."""
from __future__ import annotations

import logging
import os

from flask import Flask

from charge_request_service.balancer import BalancerClient
from charge_request_service.config import Settings
from charge_request_service.console import install_console
from charge_request_service.limits import install_rate_limits
from charge_request_service.openapi_spec import SPEC
from charge_request_service.metrics import ChargeMetrics
from charge_request_service.queue import WaitingQueue
from charge_request_service.routes import EXTENSION_KEY, SERVICE_NAME, ChargeService, blueprint
from charge_request_service.sessions import Clock, SessionTracker, utc_now
from charge_request_service.idempotency import Idempotency
from charge_request_service.reconcile import Reconciler
from charge_request_service.store import ChargeStore, StoreError
from charge_request_service.waiting import Dispatcher
from gridcommon.httpclient import HttpClient
from gridcommon.logs import configure_logging
from gridcommon.openapi import install_openapi
from gridcommon.web import install_common

log = logging.getLogger("charge")


def create_app(settings: Settings | None = None, start_background: bool = True, *, clock: Clock = utc_now) -> Flask:
    """Build the public charge API.

    ``clock`` (an aware UTC ``datetime``) lets tests move time. Expired sessions are
    dropped whenever the tracker is read; the one background thread starts queued
    requests when the grid has room (``start_background=False`` leaves it off, and a
    test calls ``dispatcher.work_once()`` itself).
    """
    settings = settings or Settings.from_env(os.environ)
    configure_logging(SERVICE_NAME, settings.log_level, settings.log_sampling)
    app = Flask(__name__)
    install_common(app)
    service = build_service(settings, clock)
    app.extensions[EXTENSION_KEY] = service
    app.register_blueprint(blueprint)
    install_console(app, settings, service.queue.__len__)
    install_openapi(app, SPEC)
    install_rate_limits(app, settings)
    if start_background:
        service.dispatcher.start()
        service.reconciler.start()
    return app


def build_service(settings: Settings, clock: Clock) -> ChargeService:
    store = open_store(settings)
    tracker = SessionTracker(clock, store)
    http = HttpClient(
        f"{SERVICE_NAME}/1", timeout=(settings.connect_timeout_seconds, settings.request_timeout_seconds)
    )
    balancer = BalancerClient(
        settings.load_balancer_urls,
        http,
        health_timeout=(settings.connect_timeout_seconds, settings.health_timeout_seconds),
    )
    queue = WaitingQueue(settings.max_queued, settings.queue_timeout_seconds, clock)
    pending, queued = tracker.load()
    queue.restore(queued)
    if store is not None:
        log.info("records kept in %s: %d active, %d queued, %d pending session(s)",
                 store.path, tracker.active_count(), len(queue), len(pending))
    metrics = ChargeMetrics(tracker.active_count, queue.__len__, queue.oldest_wait_seconds)
    dispatcher = Dispatcher(queue, balancer, tracker, metrics, settings.queue_retry_seconds)
    reconciler = Reconciler(
        tracker, balancer, settings.reconcile_seconds,
        # After this long no answer to a forward can still be on its way.
        pending_grace_seconds=settings.connect_timeout_seconds + settings.request_timeout_seconds + 1,
    )
    return ChargeService(
        settings=settings, tracker=tracker, balancer=balancer, metrics=metrics, queue=queue, dispatcher=dispatcher,
        idempotency=Idempotency(store), reconciler=reconciler,
    )


def open_store(settings: Settings) -> ChargeStore | None:
    """The durable records under STATE_DIR; records that cannot be used stop the service."""
    path = settings.state_file
    if path is None:
        return None
    try:
        return ChargeStore(path, full_sync=settings.state_full_sync)
    except StoreError as exc:
        log.critical("%s cannot start: %s", SERVICE_NAME, exc)
        raise
