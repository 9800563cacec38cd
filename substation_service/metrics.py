"""Prometheus metrics of one substation, in a registry of its own per app.

Every metric carries the label ``substation="<id>"`` so the panels of all
substations can share one query. The gauges are set from a ledger snapshot
when /metrics is scraped, so they are exact at scrape time rather than as of
the last request.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from substation_service.ledger import Session, Snapshot

# Sessions last from seconds (tests, demos) to an hour (MAX_SESSION_SECONDS).
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, float("inf"))


class SubstationMetrics:
    def __init__(self, substation_id: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"substation": substation_id}

        def gauge(name: str, documentation: str) -> Gauge:
            return Gauge(name, documentation, list(labels), registry=self.registry).labels(**labels)

        self.current_load = gauge("current_load", "Power drawn by active charging sessions, kW.")
        self.total_capacity = gauge("total_capacity", "Transformer capacity (CAPACITY_KW), kW.")
        self.admission_capacity = gauge(
            "admission_capacity", "Capacity new sessions are admitted against: transformer plus extra power, kW."
        )
        self.available_capacity = gauge("available_capacity", "Admission capacity not yet in use, kW.")
        self.active_chargers = gauge("active_chargers", "Charging sessions in progress.")
        self.load_percentage = gauge("load_percentage", "current_load / admission_capacity * 100.")
        self.state_version = gauge(
            "substation_state_version", "Grows with every admission, stop and expiry of a session."
        )
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

    def refresh(self, snapshot: Snapshot) -> None:
        self.current_load.set(snapshot.load_kw)
        self.total_capacity.set(snapshot.total_capacity_kw)
        self.admission_capacity.set(snapshot.admission_capacity_kw)
        self.available_capacity.set(snapshot.available_kw)
        self.active_chargers.set(snapshot.active_chargers)
        self.load_percentage.set(snapshot.load_percentage)
        self.state_version.set(snapshot.state_version)
