"""Starting queued requests as soon as the grid has room: the dispatcher's background thread.

One thread works the queue in order. It offers the request at the head to
the balancer; a 201 starts it and the next one is offered at once, a 503
leaves it at the head and the dispatcher tries again after
``QUEUE_RETRY_SECONDS``: nobody behind it overtakes it, which is what
"first come, first served across the grid" means. A head that fits under no
substation's limit (the balancer answers 409: the limits fell since it was
queued) could never start, so it leaves the queue at once as ``cancelled``
and the ones behind it move up. Requests that waited past
``QUEUE_TIMEOUT_SECONDS`` leave the queue as ``expired``.
"""
from __future__ import annotations

import logging
import threading

from charge_request_service.balancer import BalancerClient, BalancerUnavailable, NoAnswer
from charge_request_service.metrics import ChargeMetrics
from charge_request_service.queue import QueuedRequest, WaitingQueue
from charge_request_service.sessions import ChargeSession, InvalidAdmission, SessionTracker

log = logging.getLogger("charge")


class Dispatcher:
    def __init__(
        self,
        queue: WaitingQueue,
        balancer: BalancerClient,
        tracker: SessionTracker,
        metrics: ChargeMetrics,
        retry_seconds: float,
    ) -> None:
        self._queue = queue
        self._balancer = balancer
        self._tracker = tracker
        self._metrics = metrics
        self._retry_seconds = retry_seconds
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="queue-dispatcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self._retry_seconds + 15)

    def request_queued(self) -> None:
        """A request joined an empty queue: try it now instead of at the next retry."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                started = self.work_once()
            except Exception:  # a bug in one attempt must not leave the queue stuck for good
                log.exception("starting a queued request failed; trying again in %g s", self._retry_seconds)
                started = False
            if not started:
                self._wake.wait(self._retry_seconds)
                self._wake.clear()

    def work_once(self) -> bool:
        """Expire what waited too long, then offer the head once; True when it started."""
        for entry in self._queue.expire(self._tracker):  # recorded as expired as they leave the queue
            self._metrics.left_queue("expired", self._waited(entry))
            log.info("queued request %s of vehicle %s expired after waiting its time",
                     entry.session_id, entry.request.vehicle_id)
        head = self._queue.head()
        return head is not None and self._offer(head)

    def _offer(self, entry: QueuedRequest) -> bool:
        try:
            reply = self._balancer.start_charge(entry.request)
        except NoAnswer as exc:
            # It may have been admitted behind the lost answer: offered again under its id, a second
            # balancer could start a second session. Stopped everywhere, it leaves the queue instead.
            log.warning("%s while offering queued request %s; stopping it wherever it is", exc, entry.session_id)
            if not self._balancer.stop_everywhere(entry.session_id):
                return False  # nobody answers: it stays at the head and is offered again later
            if self._queue.finish(entry.session_id, "expired", self._tracker) is None:
                return True  # its client cancelled it meanwhile: the cancellation is what is recorded
            self._metrics.left_queue("expired", self._waited(entry))
            return True
        except BalancerUnavailable as exc:
            log.warning("could not offer queued request %s to the load balancer: %s", entry.session_id, exc)
            return False
        if reply.status == 503:
            return False
        if reply.status != 201:
            # Validated before it was queued, so a refusal now is the balancer's view of it: tell the client.
            # A 409 says it fits under no substation's limit (they fell since it was queued): left at the
            # head it would hold up every request behind it that could start.
            if self._queue.finish(entry.session_id, "cancelled", self._tracker) is None:
                return True  # its client cancelled it meanwhile
            self._metrics.left_queue("cancelled", self._waited(entry))
            log.warning("queued request %s was refused (HTTP %s): %s", entry.session_id, reply.status,
                        reply.body.get("message"))
            return True
        try:
            session = ChargeSession.from_admission(reply.body).waited(entry.queued_at)
            if entry.token_digest is not None:
                session = session.with_token(entry.token_digest)
            session = session.owned_by(entry.owner)
        except InvalidAdmission as exc:
            log.error("the balancer admitted queued request %s but its answer is unusable: %s",
                      entry.session_id, exc)
            return False
        if not self._queue.start(session, self._tracker):
            # Cancelled while it was being offered: stop the session it just got.
            self._stop_cancelled(session)
            return True
        self._metrics.left_queue("started", session.queue_wait_seconds or 0.0)
        log.info("queued request %s started at %s after %.1f s: vehicle %s, %g kW",
                 session.session_id, session.substation, session.queue_wait_seconds or 0.0,
                 session.vehicle_id, session.amount_kw)
        return True

    def _stop_cancelled(self, session: ChargeSession) -> None:
        try:
            self._balancer.stop_charge(session.substation, session.session_id)
        except BalancerUnavailable as exc:
            log.error("session %s was cancelled while it started and could not be stopped at %s: %s",
                      session.session_id, session.substation, exc)

    def _waited(self, entry: QueuedRequest) -> float:
        return max(0.0, (self._tracker.now() - entry.queued_at).total_seconds())
