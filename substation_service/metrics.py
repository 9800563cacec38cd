"""Prometheus metrics of one substation, in a registry of its own per app.

Every metric carries the label ``substation="<id>"`` so the panels of all
substations can share one query. The gauges come from one ledger snapshot
taken when /metrics is scraped: exact at scrape time, and consistent within a
page even when scrapes overlap (the balancer relies on ``current_load`` and
``substation_state_version`` describing the same moment).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from substation_service.ledger import Session, Snapshot

# Sessions last from seconds (tests, demos) to an hour (MAX_SESSION_SECONDS).
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, float("inf"))


# (name, help, the snapshot's value) of every gauge read from the ledger.
SNAPSHOT_GAUGES: tuple[tuple[str, str, Callable[[Snapshot], float]], ...] = (
    ("current_load", "Power drawn by active charging sessions, kW.", lambda s: s.load_kw),
    ("total_capacity", "Transformer capacity (CAPACITY_KW), kW.", lambda s: s.total_capacity_kw),
    (
        "admission_capacity",
        "Capacity new sessions are admitted against: transformer plus extra power, kW.",
        lambda s: s.admission_capacity_kw,
    ),
    ("available_capacity", "Admission capacity not yet in use, kW.", lambda s: s.available_kw),
    ("active_chargers", "Charging sessions in progress.", lambda s: s.active_chargers),
    ("load_percentage", "current_load / admission_capacity * 100.", lambda s: s.load_percentage),
    (
        "substation_state_version",
        "Grows with every admission, stop and expiry of a session.",
        lambda s: s.state_version,
    ),
)


class _SnapshotGauges:
    """prometheus-client collector: every gauge from a single snapshot per scrape."""

    def __init__(self, substation_id: str, snapshot: Callable[[], Snapshot]) -> None:
        self._substation_id = substation_id
        self._snapshot = snapshot

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Lets the registry learn the names without reading a ledger that may not exist yet.
        for name, documentation, _ in SNAPSHOT_GAUGES:
            yield GaugeMetricFamily(name, documentation, labels=["substation"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snapshot = self._snapshot()
        for name, documentation, read in SNAPSHOT_GAUGES:
            family = GaugeMetricFamily(name, documentation, labels=["substation"])
            family.add_metric([self._substation_id], float(read(snapshot)))
            yield family


class SubstationMetrics:
    def __init__(self, substation_id: str, snapshot: Callable[[], Snapshot]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"substation": substation_id}
        self.registry.register(_SnapshotGauges(substation_id, snapshot))
        requests = Counter(
            "charging_requests",
            "Charge requests decided by this substation, by outcome.",
            [*labels, "outcome"],
            registry=self.registry,
        )
        self.admitted = requests.labels(outcome="admitted", **labels)
        self.rejected = requests.labels(outcome="rejected", **labels)
        self._charging_duration = Histogram(
            "charging_duration_seconds",
            "How long finished sessions charged, whether they ran out or were stopped, seconds.",
            list(labels),
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        ).labels(**labels)

    def session_finished(self, _session: Session, charged_seconds: float) -> None:
        self._charging_duration.observe(charged_seconds)
