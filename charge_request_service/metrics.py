"""Prometheus metrics of the charge request service, in a registry of its own per app."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# From a quick answer to REQUEST_TIMEOUT_SECONDS (10 s by default) running out. 2 s is
# ChargeRequestLatencyHigh's p95 limit: a boundary there keeps requests just over 1 s from
# being interpolated up to 2.5 s and past the limit.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 2.5, 5, 10, float("inf"))


# From a moment to QUEUE_TIMEOUT_SECONDS (300 s by default) and beyond.
QUEUE_WAIT_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, float("inf"))
QUEUE_OUTCOMES = ("started", "expired", "cancelled")
# Why a request's client key opened nothing (charge_request_service.key_access).
KEY_REJECTIONS = ("missing", "unknown", "revoked")


@dataclass(frozen=True)
class KeyFigures:
    """One active client key's figures at scrape time (charge_request_service.client_keys)."""

    key_id: str
    name: str
    sessions: int
    kw: float
    queued: int
    refusals: Mapping[str, int]
    quotas: Mapping[str, float]


class ClientKeyCollector(Collector):
    """Per-key series, read at scrape time: one label value per active key, and at most MAX_CLIENT_KEYS of
    those, so the series stay as bounded as the keys."""

    def __init__(self, figures: Callable[[], list[KeyFigures]], reasons: tuple[str, ...]) -> None:
        self._figures = figures
        self._reasons = reasons

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("client_key_info", "Each active client key, by id, with its name.",
                                 labels=["key", "name"])
        sessions = GaugeMetricFamily("client_key_sessions",
                                     "Sessions a client key holds: waiting, starting or charging.", labels=["key"])
        kw = GaugeMetricFamily("client_key_allocated_kw", "kW asked for by the sessions a client key holds, kW.",
                               labels=["key"])
        queued = GaugeMetricFamily("client_key_queued", "Requests of a client key waiting in the queue.",
                                   labels=["key"])
        # Each figure's quota beside it, so a dashboard or an alert can tell how near a key is to its quota.
        sessions_limit = GaugeMetricFamily("client_key_sessions_limit", "A client key's sessions quota.",
                                           labels=["key"])
        kw_limit = GaugeMetricFamily("client_key_allocated_kw_limit", "A client key's kW quota, kW.", labels=["key"])
        queued_limit = GaugeMetricFamily("client_key_queued_limit", "A client key's queued quota.", labels=["key"])
        refusals = CounterMetricFamily("client_key_refusals",
                                       "Charge requests of a client key refused, by the quota or limit they met.",
                                       labels=["key", "reason"])
        for key in self._figures():
            info.add_metric([key.key_id, key.name], 1)
            sessions.add_metric([key.key_id], key.sessions)
            kw.add_metric([key.key_id], key.kw)
            queued.add_metric([key.key_id], key.queued)
            sessions_limit.add_metric([key.key_id], key.quotas["sessions"])
            kw_limit.add_metric([key.key_id], key.quotas["kw"])
            queued_limit.add_metric([key.key_id], key.quotas["queued"])
            for reason in self._reasons:
                refusals.add_metric([key.key_id, reason], key.refusals.get(reason, 0))
        yield from (info, sessions, kw, queued, sessions_limit, kw_limit, queued_limit, refusals)

    def describe(self) -> Iterator[Metric]:
        return iter(())


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
        rejections = Counter(
            "client_key_rejections",
            "Requests whose client key opened nothing: missing (PUBLIC_API_AUTH=keys), unknown or revoked.",
            ["reason"],
            registry=self.registry,
        )
        self._rejections = {reason: rejections.labels(reason=reason) for reason in KEY_REJECTIONS}

    def count_client_keys(self, figures: Callable[[], list[KeyFigures]], reasons: tuple[str, ...]) -> None:
        """Publish every active key's figures, read at scrape time."""
        self.registry.register(ClientKeyCollector(figures, reasons))

    def key_rejected(self, reason: str) -> None:
        self._rejections[reason].inc()

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
