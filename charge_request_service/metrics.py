"""Prometheus metrics of the charge request service, in a registry of its own per app."""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# From a quick answer to REQUEST_TIMEOUT_SECONDS (10 s by default) running out. 2 s is
# ChargeRequestLatencyHigh's p95 limit: a boundary there keeps requests just over 1 s from
# being interpolated up to 2.5 s and past the limit.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 2.5, 5, 10, float("inf"))


# From a moment to QUEUE_TIMEOUT_SECONDS (300 s by default) and beyond.
QUEUE_WAIT_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, float("inf"))
QUEUE_OUTCOMES = ("started", "expired", "cancelled")


class ChargeMetrics:
    def __init__(
        self,
        active_sessions: Callable[[], int],
        queue_length: Callable[[], int] = lambda: 0,
        oldest_wait_seconds: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            "charge_requests",
            "POST /charge requests answered, by HTTP status code.",
            ["status"],
            registry=self.registry,
        )
        self._duration = Histogram(
            "requests_duration_seconds",
            "Time to answer POST /charge, forwarding to the balancer included, seconds.",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self._failed = Counter(
            "failed_requests",
            "Requests that failed because the load balancer was unreachable, too slow or answered nonsense.",
            registry=self.registry,
        )
        # Read from the tracker at scrape time, so expired sessions never linger in the gauge.
        Gauge(
            "active_sessions", "Charging sessions started here that are still running.", registry=self.registry
        ).set_function(active_sessions)
        Gauge(
            "charge_queue_length", "Charge requests waiting for power (\"wait\": true).", registry=self.registry
        ).set_function(queue_length)
        Gauge(
            "charge_queue_oldest_wait_seconds",
            "How long the request at the head of the queue has waited; 0 when nobody waits, seconds.",
            registry=self.registry,
        ).set_function(oldest_wait_seconds)
        queue_wait = Histogram(
            "charge_queue_wait_seconds",
            "How long requests waited in the queue, by how they left it, seconds.",
            ["outcome"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=self.registry,
        )
        # Created up front, so every outcome shows on /metrics (as 0) before it first happens.
        self._queue_wait = {outcome: queue_wait.labels(outcome=outcome) for outcome in QUEUE_OUTCOMES}

    def charge_answered(self, status: int, seconds: float) -> None:
        self._requests.labels(status=str(status)).inc()
        self._duration.observe(seconds)

    def left_queue(self, outcome: str, waited_seconds: float) -> None:
        self._queue_wait[outcome].observe(waited_seconds)

    def balancer_failed(self) -> None:
        self._failed.inc()

    def requests_by_status(self) -> dict[str, int]:
        return {
            sample.labels["status"]: int(sample.value)
            for metric in self._requests.collect()
            for sample in metric.samples
            if sample.name == "charge_requests_total"
        }

    def failed_requests(self) -> int:
        return int(self.registry.get_sample_value("failed_requests_total") or 0)
