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
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from substation_service.ledger import LimitSource, Session, SessionState, Snapshot

# Sessions last from seconds (tests, demos) to an hour (MAX_SESSION_SECONDS).
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, float("inf"))


# (name, help, the snapshot's value) of every gauge read from the ledger.
SNAPSHOT_GAUGES: tuple[tuple[str, str, Callable[[Snapshot], float]], ...] = (
    ("current_load", "Power the charging sessions draw: the sum of their allocations, kW.", lambda s: s.load_kw),
    ("requested_load_kw", "Power the active sessions ask for (the sum of their amounts), kW.", lambda s: s.requested_kw),
    ("curtailed_kw", "Power asked for but not allocated (requested_load_kw - current_load), kW.", lambda s: s.curtailed_kw),
    ("minimum_load_kw", "Sum of the minimums of the active sessions: what a new session must fit beside, kW.",
     lambda s: s.minimum_load_kw),
    (
        "fair_share_kw",
        "The most a charging session may draw now (the max-min fair level); the limit when nobody is curtailed, kW.",
        lambda s: s.limit_kw if s.fair_share_kw is None else s.fair_share_kw,
    ),
    ("curtailed_sessions", "Charging sessions that get less than they ask for.", lambda s: s.curtailed),
    (
        "min_charge_kw",
        "The least a new session gets (MIN_CHARGE_KW); 0 under strict allocation, where it is the whole amount.",
        lambda s: s.min_charge_kw or 0.0,
    ),
    ("total_capacity", "Transformer capacity (CAPACITY_KW), kW.", lambda s: s.total_capacity_kw),
    (
        "admission_capacity",
        "The substation's limit now: min(operator limit, transformer + generation + storage + peers), kW.",
        lambda s: s.limit_kw,
    ),
    ("substation_limit_kw", "The substation's limit now (same as admission_capacity), kW.", lambda s: s.limit_kw),
    ("available_capacity", "Limit not allocated to anyone, kW.", lambda s: s.available_kw),
    ("active_chargers", "Active sessions, charging or suspended.", lambda s: s.active_chargers),
    ("load_percentage", "current_load / limit * 100.", lambda s: s.load_percentage),
    ("leased_sessions", "Active sessions held by a lease (OCPP transactions), charging or suspended.",
     lambda s: s.leased),
    (
        "substation_state_version",
        "Grows with every admission, stop and expiry of a session and every change of the allocations.",
        lambda s: s.state_version,
    ),
)


class _SnapshotGauges:
    """prometheus-client collector: every gauge from a single snapshot per scrape."""

    def __init__(self, substation_id: str, snapshot: Callable[[], Snapshot]) -> None:
        self._substation_id = substation_id
        self._snapshot = snapshot

    def describe(self) -> Iterator[Metric]:
        # Lets the registry learn the names without reading a ledger that may not exist yet.
        for name, documentation, _ in SNAPSHOT_GAUGES:
            yield GaugeMetricFamily(name, documentation, labels=["substation"])
        yield GaugeMetricFamily("charging_sessions", "", labels=["substation", "state"])
        yield GaugeMetricFamily("substation_limit_source", "", labels=["substation", "source"])
        yield CounterMetricFamily("energy_delivered_kwh", "", labels=["substation"])
        yield CounterMetricFamily("leases_expired", "", labels=["substation"])
        yield CounterMetricFamily("substation_energy_requested_kwh", "", labels=["substation"])
        yield CounterMetricFamily("substation_energy_delivered_kwh", "", labels=["substation"])
        yield CounterMetricFamily("substation_needs", "", labels=["substation", "result"])
        yield GaugeMetricFamily("substation_expected_shortfall_kwh", "", labels=["substation"])

    def collect(self) -> Iterator[Metric]:
        snapshot = self._snapshot()
        labels = [self._substation_id]
        for name, documentation, read in SNAPSHOT_GAUGES:
            family = GaugeMetricFamily(name, documentation, labels=["substation"])
            family.add_metric(labels, float(read(snapshot)))
            yield family
        sessions = GaugeMetricFamily(
            "charging_sessions", "Active sessions by state (charging or suspended).", labels=["substation", "state"]
        )
        sessions.add_metric([*labels, SessionState.CHARGING.value], snapshot.charging)
        sessions.add_metric([*labels, SessionState.SUSPENDED.value], snapshot.suspended)
        yield sessions
        source = GaugeMetricFamily(
            "substation_limit_source",
            "1 for what sets the limit now: the substation's own supply, or an operator's limit.",
            labels=["substation", "source"],
        )
        for candidate in LimitSource:
            source.add_metric([*labels, candidate.value], 1.0 if snapshot.limit_source is candidate else 0.0)
        yield source
        energy = CounterMetricFamily(
            "energy_delivered_kwh", "Energy delivered to vehicles since this substation started, kWh.",
            labels=["substation"],
        )
        energy.add_metric(labels, snapshot.energy_kwh)
        yield energy
        expired = CounterMetricFamily(
            "leases_expired",
            "Leased sessions that ended because their lease lapsed unrenewed, since this process started: "
            "their holder (the OCPP gateway) stopped renewing.",
            labels=["substation"],
        )
        expired.add_metric(labels, snapshot.leases_expired)
        yield expired
        yield from self._needs(snapshot)

    def _needs(self, snapshot: Snapshot) -> Iterator[Metric]:
        """Energy needs (energy_kwh by departure): asked versus delivered, and demands met (ACN-Sim's way)."""
        needs = snapshot.needs
        if needs is None:
            return
        labels = [self._substation_id]
        requested = CounterMetricFamily(
            "substation_energy_requested_kwh",
            "Energy needed by the sessions with a need that finished, kWh (what they asked for).",
            labels=["substation"],
        )
        requested.add_metric(labels, needs.requested_kwh)
        yield requested
        delivered = CounterMetricFamily(
            "substation_energy_delivered_kwh",
            "Energy delivered to the sessions with a need that finished, kWh: divided by "
            "substation_energy_requested_kwh_total, the share of requested energy delivered.",
            labels=["substation"],
        )
        delivered.add_metric(labels, needs.delivered_kwh)
        yield delivered
        results = CounterMetricFamily(
            "substation_needs",
            "Finished sessions with a need, by whether it was met (less than 0.1 kWh missing) or missed.",
            labels=["substation", "result"],
        )
        results.add_metric([*labels, "met"], needs.met)
        results.add_metric([*labels, "missed"], needs.missed)
        yield results
        shortfall = GaugeMetricFamily(
            "substation_expected_shortfall_kwh",
            "Energy the running sessions with a need are expected to miss by their departures under the current "
            "plan, kWh (the sum of their expected_shortfall_kwh).",
            labels=["substation"],
        )
        shortfall.add_metric(labels, needs.expected_shortfall_kwh)
        yield shortfall


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
