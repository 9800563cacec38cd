"""Prometheus metrics of the gateway, in a registry of its own.

Labels stay bounded: actions are OCPP's own names (anything else counts as ``other``),
results a handful of words, substations the few URLs the registry names. Gauges are
read from one snapshot of the gateway per scrape.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

KNOWN_ACTIONS = frozenset({
    "Authorize", "BootNotification", "DataTransfer", "Heartbeat", "MeterValues", "StartTransaction",
    "StatusNotification", "StopTransaction", "TransactionEvent", "NotifyEVChargingNeeds", "SetChargingProfile",
    "GetCompositeSchedule", "GetTransactionStatus", "FirmwareStatusNotification", "SecurityEventNotification",
})
# gateway_profiles_rejected's kinds: refused (or unanswered) TxProfile, fallback profile refused at boot,
# accepted but not applied (GetCompositeSchedule), decrease not delivered to an offline station.
PROFILE_REJECTION_KINDS = ("rejected", "fallback", "not_applied", "offline")
# From an allocation change at a substation to the station's acceptance: milliseconds to the
# vehicle response time plus a slow station's answer.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, float("inf"))
# How late the event loop runs a timer: every station's frames wait this long. Sub-millisecond when
# healthy; tens of milliseconds mean something holds the loop (a burst of handshakes, blocking work).
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, float("inf"))


@dataclass(frozen=True)
class GatewaySnapshot:
    stations_by_state: dict[str, int]
    measured_kw: dict[str, float]  # per substation URL
    allocated_kw: dict[str, float]
    active_transactions: int
    pending_admissions: int
    blocked_increases: dict[str, int] = field(default_factory=dict)
    # Per substation URL: running transactions whose station is not connected (what it draws is unknown).
    offline_transactions: dict[str, int] = field(default_factory=dict)


def action_label(action: object) -> str:
    return action if isinstance(action, str) and action in KNOWN_ACTIONS else "other"


class GatewayMetrics:
    def __init__(self, snapshot: Callable[[], GatewaySnapshot]) -> None:
        self.registry = CollectorRegistry()
        self.messages = Counter(
            "gateway_ocpp_messages", "OCPP messages by action, direction and result.",
            ["action", "direction", "result"], registry=self.registry,
        )
        self.refused = Counter(
            "gateway_handshakes_refused", "WebSocket handshakes refused, by reason.", ["reason"],
            registry=self.registry,
        )
        self.profile_latency = Histogram(
            "gateway_profile_latency_seconds",
            "Seconds from an allocation change seen at a substation to the station accepting its profile.",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.profiles_rejected = Counter(
            "gateway_profiles_rejected", "Charging profiles a station refused or did not answer.", ["kind"],
            registry=self.registry,
        )
        # Every kind exported from the start at 0: Prometheus's increase() cannot see a series' first
        # sample as an increase, so an alert on rejections would miss the first one otherwise.
        for kind in PROFILE_REJECTION_KINDS:
            self.profiles_rejected.labels(kind)
        self.seq_gaps = Counter(
            "gateway_transaction_event_gaps", "TransactionEvent seqNo numbers skipped (2.0.1).", registry=self.registry,
        )
        self.substation_errors = Counter(
            "gateway_substation_errors", "Calls to a substation that failed or were refused, by call.", ["call"],
            registry=self.registry,
        )
        self.loop_lag = Histogram(
            "gateway_event_loop_lag_seconds",
            "How much later than asked the event loop ran a timer, sampled every 0.1 s: what every station waits.",
            buckets=LOOP_LAG_BUCKETS, registry=self.registry,
        )
        self.registry.register(_SnapshotCollector(snapshot))


class _SnapshotCollector:
    def __init__(self, snapshot: Callable[[], GatewaySnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        stations = GaugeMetricFamily("gateway_stations", "Registered stations by state.", labels=["state"])
        for state, count in sorted(snap.stations_by_state.items()):
            stations.add_metric([state], count)
        yield stations
        measured = GaugeMetricFamily(
            "gateway_measured_power_kw", "Power the stations report drawing (MeterValues), by substation, kW.",
            labels=["substation"],
        )
        allocated = GaugeMetricFamily(
            "gateway_allocated_power_kw", "Power the substations allocate to the gateway's sessions, kW.",
            labels=["substation"],
        )
        blocked = GaugeMetricFamily(
            "gateway_blocked_decreases", "Refused or unanswered decreases that hold back a substation's increases.",
            labels=["substation"],
        )
        for url in sorted(set(snap.measured_kw) | set(snap.allocated_kw)):
            measured.add_metric([url], snap.measured_kw.get(url, 0.0))
            allocated.add_metric([url], snap.allocated_kw.get(url, 0.0))
            blocked.add_metric([url], snap.blocked_increases.get(url, 0))
        yield measured
        yield allocated
        yield blocked
        offline = GaugeMetricFamily(
            "gateway_offline_transactions",
            "Transactions running at stations that are offline: their last profile holds, their meter is unheard.",
            labels=["substation"],
        )
        for url in sorted(set(snap.measured_kw) | set(snap.offline_transactions)):
            offline.add_metric([url], snap.offline_transactions.get(url, 0))
        yield offline
        yield GaugeMetricFamily("gateway_active_transactions", "Transactions running now.",
                                value=snap.active_transactions)
        yield GaugeMetricFamily("gateway_pending_admissions",
                                "Transactions whose substation has no room yet (their station is held at 0 A).",
                                value=snap.pending_admissions)
