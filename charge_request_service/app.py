"""The charge request service's Flask application factory."""
from __future__ import annotations

import logging
from dataclasses import asdict
import os
import socket

from flask import Flask

from charge_request_service.balancer import BalancerClient
from charge_request_service.config import Settings
from charge_request_service.console import install_console
from charge_request_service.client_keys import (
    REFUSAL_REASONS,
    ClientKeys,
    QuotaLedger,
    SessionState,
    SharedQuotaLedger,
)
from charge_request_service.database import OPEN_STATES, booked_kw
from charge_request_service.key_access import ClientAccess, install_client_access
from charge_request_service.key_routes import keys_blueprint
from charge_request_service.limits import RateLimits
from charge_request_service.openapi_spec import SPEC
from charge_request_service.metrics import ChargeMetrics
from charge_request_service.queue import SharedQueue, WaitingQueue
from charge_request_service.routes import EXTENSION_KEY, SERVICE_NAME, ChargeService, blueprint
from charge_request_service.sessions import Clock, SessionTracker, SharedSessionTracker, utc_now
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
    access = build_client_access(settings, service)
    install_console(app, settings, service.queue.__len__,
                    client_keys=lambda: [asdict(figures) for figures in access.figures()])
    install_openapi(app, SPEC)
    install_client_access(app, access)
    app.register_blueprint(keys_blueprint)
    if start_background:
        service.dispatcher.start()
        service.reconciler.start()
    return app


def build_service(settings: Settings, clock: Clock) -> ChargeService:
    store = open_store(settings)
    # After this long no answer to a forward can still be on its way.
    grace_seconds = settings.connect_timeout_seconds + settings.request_timeout_seconds + 1
    # This replica, as the holder of a lease on a shared database (dispatching the queue, reconciling): its host
    # and port, which no other live replica shares and a restarted one keeps, so it takes its leases back at once.
    holder = f"{socket.gethostname()}:{os.environ.get('PORT', '')}"
    shared = store is not None and store.shared
    tracker = SharedSessionTracker(clock, store) if shared else SessionTracker(clock, store)
    http = HttpClient(
        f"{SERVICE_NAME}/1", timeout=(settings.connect_timeout_seconds, settings.request_timeout_seconds)
    )
    balancer = BalancerClient(
        settings.load_balancer_urls,
        http,
        health_timeout=(settings.connect_timeout_seconds, settings.health_timeout_seconds),
    )
    if shared:
        # The dispatch lease outlives a round's longest offer, so it is not taken over while one is on its way.
        queue = SharedQueue(store, settings.max_queued, settings.queue_timeout_seconds, clock, holder,
                            lease_seconds=grace_seconds + settings.queue_retry_seconds + 1)
    else:
        queue = WaitingQueue(settings.max_queued, settings.queue_timeout_seconds, clock)
    pending, queued = tracker.load()
    queue.restore(queued)
    if store is not None:
        log.info("records kept in %s: %d active, %d queued, %d pending session(s)",
                 store.path, tracker.active_count(), len(queue), len(pending))
    metrics = ChargeMetrics(tracker.active_count, queue.__len__, queue.oldest_wait_seconds)
    dispatcher = Dispatcher(queue, balancer, tracker, metrics, settings.queue_retry_seconds)
    reconciler = Reconciler(tracker, balancer, settings.reconcile_seconds, pending_grace_seconds=grace_seconds,
                            store=store, holder=holder)
    return ChargeService(
        settings=settings, tracker=tracker, balancer=balancer, metrics=metrics, queue=queue, dispatcher=dispatcher,
        idempotency=Idempotency(store, claim_seconds=grace_seconds), reconciler=reconciler,
    )


def build_client_access(settings: Settings, service: ChargeService) -> ClientAccess:
    """The client keys (kept with the service's records), their quotas booked again from the sessions kept."""
    store = service.idempotency.store
    keys = ClientKeys(store, settings.max_client_keys)
    tracker, queue = service.tracker, service.queue

    def state_of(session_id: str) -> SessionState:
        # The tracker first and again last: the dispatcher takes a request out of the queue just before the
        # tracker records the session it became.
        if (session := tracker.get(session_id)) is not None:
            return "active", session.remaining_seconds(tracker.now())
        if queue.get(session_id) is not None:
            return "queued", None
        if any(pending.session_id == session_id for pending in tracker.pending()):
            return "pending", None
        if (session := tracker.get(session_id)) is not None:
            return "active", session.remaining_seconds(tracker.now())
        return None

    ledger: QuotaLedger | SharedQuotaLedger
    if store is not None and store.shared:
        ledger = SharedQuotaLedger(store)  # every replica's sessions, counted in the database
    else:
        ledger = QuotaLedger(state_of)
        for session_id, state, record in store.sessions() if store is not None else []:
            if record.get("owner") is not None and state in OPEN_STATES:
                ledger.restore(record["owner"], session_id, booked_kw(state, record), queued=state == "queued")

    access = ClientAccess(settings.public_api_auth, keys, ledger, RateLimits(settings), service.metrics,
                          settings.admin_token)
    service.metrics.count_client_keys(access.figures, REFUSAL_REASONS)
    if settings.public_api_auth == "open":
        log.warning("PUBLIC_API_AUTH=open: anyone who reaches this port may ask for power for any vehicle, without "
                    "a client key. For a demo on this machine only; set PUBLIC_API_AUTH=keys anywhere else.")
    elif not settings.admin_token:
        log.warning("PUBLIC_API_AUTH=keys and no ADMIN_TOKEN: only the %d client key(s) kept can charge, and no "
                    "new one can be created. Set ADMIN_TOKEN to manage keys (POST /client-keys).",
                    len(keys.active()))
    return access


def open_store(settings: Settings) -> ChargeStore | None:
    """The durable records in DATABASE_URL's database, else under STATE_DIR; records that cannot be used stop
    the service."""
    where = settings.database_url or settings.state_file
    if not where:
        return None
    try:
        return ChargeStore(where, full_sync=settings.state_full_sync,
                           finished_retention_seconds=settings.finished_retention_days * 86_400,
                           finished_kept=settings.finished_kept)
    except StoreError as exc:
        log.critical("%s cannot start: %s", SERVICE_NAME, exc)
        raise
