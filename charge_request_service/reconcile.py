"""Keeping this service's records and the substations' in agreement, at start and then periodically.

Two things can drift apart, both after a crash or a lost answer:

* a session recorded here that its substation no longer holds (the
  substation lost it, or it was stopped there): it is marked ended;
* a request forwarded whose answer never came (``pending``): a substation
  may hold a session no client was told of. Once its answer can no longer be
  on its way, it is stopped wherever it is, and every substation retires its
  id so a late copy cannot start it.

A pending request is settled within ``PENDING_GRACE`` (the request timeout
plus a margin) plus one ``RECONCILE_SECONDS``.

On a database replicas share, one replica at a time reconciles: the one that
holds the ``reconcile`` lease, renewed at every round and taken over by another
replica once it has run out (its holder died). It settles every replica's
pending requests, writes ``ended`` on sessions past their end, and forgets the
finished sessions and answers past their retention.
"""
from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from charge_request_service.balancer import BalancerClient, BalancerUnavailable
from charge_request_service.sessions import SessionTracker, SharedSessionTracker
from charge_request_service.store import ChargeStore

log = logging.getLogger("charge")

# Sessions checked with their substation per round, at most: a long list is worked through over rounds.
CHECKS_PER_ROUND = 200


LEASE = "reconcile"


class Reconciler:
    def __init__(self, tracker: SessionTracker | SharedSessionTracker, balancer: BalancerClient,
                 interval_seconds: float, pending_grace_seconds: float, store: ChargeStore | None = None,
                 holder: str = "") -> None:
        self._tracker = tracker
        # A shared database: the lease, and its length (a few rounds, so a round that runs long keeps it).
        self._shared_store = store if store is not None and store.shared else None
        self._holder = holder
        self._lease_seconds = max(3 * interval_seconds, 2.0)
        self._balancer = balancer
        self._interval = interval_seconds
        self._grace = timedelta(seconds=pending_grace_seconds)
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_check = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self.run_once()
            except Exception:  # one bad round must not end reconciliation for good
                log.exception("reconciling sessions failed; trying again in %g s", self._interval)
            self._stopped.wait(self._interval)

    def run_once(self) -> tuple[int, int]:
        """One round; ``(pending stopped, sessions found ended)``; ``(0, 0)`` while another replica holds the lease."""
        store = self._shared_store
        if store is not None:
            if not store.take_lease(LEASE, self._holder, time.time(), self._lease_seconds):
                return 0, 0
            assert isinstance(self._tracker, SharedSessionTracker)
            self._tracker.end_due()
            store.trim(time.time())
        return self._settle_pending(), self._check_active()

    def _settle_pending(self) -> int:
        now = self._tracker.now()
        settled = 0
        for pending in self._tracker.pending():
            if now - pending.created_at < self._grace:
                continue  # its answer may still come
            if not self._balancer.stop_everywhere(pending.session_id):
                return settled  # no balancer answers: next round
            self._tracker.release(pending.session_id)
            settled += 1
            log.warning("stopped session %s of vehicle %s wherever it was: its request was never answered, so "
                        "no client knows of it", pending.session_id, pending.vehicle_id)
        return settled

    def _check_active(self) -> int:
        sessions = self._tracker.active()
        if not sessions:
            return 0
        start = self._next_check % len(sessions)
        batch = (sessions[start:] + sessions[:start])[:CHECKS_PER_ROUND]
        self._next_check = start + len(batch)
        ended = 0
        for session in batch:
            try:
                reply = self._balancer.show_charge(session.substation, session.session_id)
            except BalancerUnavailable:
                return ended
            if reply.status == 404 or reply.body.get("state") == "ended":
                self._tracker.end_unheld(session.session_id)
                ended += 1
                log.info("session %s is no longer held by %s: marked ended", session.session_id, session.substation)
        return ended
