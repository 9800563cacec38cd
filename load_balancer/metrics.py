"""The balancer's Prometheus metrics, in a registry of its own per app.

| Metric                                   | Type      | Labels     | Meaning                                             |
| ---------------------------------------- | --------- | ---------- | --------------------------------------------------- |
| load_balancer_requests_total             | counter   | outcome    | Charge requests: routed, no_capacity (grid full), unreachable, too_slow, no_time (deadline too short), too_large (fits under no limit), invalid, error |
| routing_decisions_total                  | counter   | substation | Charge requests admitted at each substation          |
| forward_failures_total                   | counter   | substation | Forwards that failed (connection, timeout, 5xx)      |
| lost_sessions_freed_total                | counter   | substation | Sessions admitted whose answer was lost, then freed  |
| substation_load_kw                       | gauge     | substation | Load in the balancer's view                          |
| substation_capacity_kw                   | gauge     | substation | Admission capacity in the balancer's view            |
| substation_load_percentage               | gauge     | substation | Load / admission capacity * 100                      |
| substation_up                            | gauge     | substation | 1 while routable, 0 while down                       |
| substation_last_poll_age_seconds         | gauge     | substation | Time since the last successful poll                  |
| healthy_substations                      | gauge     |            | Substations up                                       |
| load_balancer_poll_interval_seconds      | gauge     |            | POLL_INTERVAL_SECONDS                                |
| polling_duration_seconds                 | histogram |            | Duration of one poll of every substation             |
| load_balancer_hedges_total               | counter   | outcome    | Hedged forwards: sent, over_budget, first_won, hedge_won, and what became of the unused forward: stopped, refused, lost |
| substation_ejected                       | gauge     | substation | 1 while ejected as an outlier (timeouts, 5xx)        |
| load_balancer_forward_timeout_seconds    | gauge     |            | Read timeout of the next forward (adaptive)          |
| load_balancer_hedge_delay_seconds        | gauge     |            | Time a forward waits before it is hedged             |

The per-substation gauges are computed from the view at scrape time, so they are
exact when read and a deregistered substation's series disappear with it.
"""
from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from load_balancer.tail import ForwardTiming
from load_balancer.view import SubstationSnapshot

OUTCOMES = ("routed", "no_capacity", "unreachable", "too_slow", "no_time", "too_large", "invalid", "error")
HEDGE_OUTCOMES = ("sent", "over_budget", "first_won", "hedge_won", "stopped", "refused", "lost")
POLL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _ScrapeTimeCollector:
    """prometheus-client's collector interface around a function that yields metric families."""

    def __init__(self, collect: Callable[[], Iterator[Metric]]) -> None:
        self.collect = collect


class BalancerMetrics:
    def __init__(
        self,
        snapshots: Callable[[], list[SubstationSnapshot]],
        clock: Callable[[], float],
        poll_interval_seconds: float,
    ) -> None:
        self._snapshots = snapshots
        self._clock = clock
        self._poll_interval = poll_interval_seconds
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "load_balancer_requests",
            "Charge requests by outcome: routed; not placed because the grid is full (no_capacity), no substation "
            "could be reached (unreachable), they answered too slowly (too_slow) or the caller's deadline left no "
            "time (no_time); refused as larger than every limit (too_large) or invalid; error.",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in OUTCOMES:
            self.requests.labels(outcome)  # every outcome from zero, so rate() works at once
        self.routing_decisions = Counter(
            "routing_decisions",
            "Charge requests admitted at each substation.",
            ["substation"],
            registry=self.registry,
        )
        self.forward_failures = Counter(
            "forward_failures",
            "Forwards to a substation that failed: connection error, timeout or 5xx.",
            ["substation"],
            registry=self.registry,
        )
        self.lost_sessions_freed = Counter(
            "lost_sessions_freed",
            "Sessions a substation admitted although their answer was lost, freed after a later poll.",
            ["substation"],
            registry=self.registry,
        )
        self.polling_duration = Histogram(
            "polling_duration_seconds",
            "Seconds one poll of every substation took.",
            buckets=POLL_BUCKETS,
            registry=self.registry,
        )
        self.hedges = Counter(
            "load_balancer_hedges",
            "Hedged forwards: sent, or over_budget (not sent); which answer was used (first_won, hedge_won); and "
            "what became of the unused forward: stopped (it admitted too), refused, lost (no answer).",
            ["outcome"],
            registry=self.registry,
        )
        # Made once: counting is then one increment, no label lookup.
        self._hedge_counters = {outcome: self.hedges.labels(outcome) for outcome in HEDGE_OUTCOMES}
        self._forward_timing: ForwardTiming | None = None
        self.registry.register(_ScrapeTimeCollector(self._view_gauges))

    def watch_forward_timing(self, timing: ForwardTiming) -> None:
        """Report the router's adaptive forward timeout and hedge delay."""
        self._forward_timing = timing

    def count_hedge(self, outcome: str) -> None:
        self._hedge_counters[outcome].inc()

    def count_request(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()

    def count_admission(self, substation_id: str) -> None:
        self.routing_decisions.labels(substation_id).inc()

    def count_forward_failure(self, substation_id: str) -> None:
        self.forward_failures.labels(substation_id).inc()

    def count_lost_session_freed(self, substation_id: str) -> None:
        self.lost_sessions_freed.labels(substation_id).inc()

    def forget_substation(self, substation_id: str) -> None:
        """Drop a deregistered substation's series."""
        self.routing_decisions.remove(substation_id)
        self.forward_failures.remove(substation_id)
        self.lost_sessions_freed.remove(substation_id)

    def _view_gauges(self) -> Iterator[Metric]:
        now = self._clock()
        # An id is learnt at the first successful poll; until then there is no label to report under.
        known = [s for s in self._snapshots() if s.substation_id is not None and s.last_poll_at is not None]
        per_substation = {
            "substation_load_kw": ("Load of each substation in the balancer's view, kW.", lambda s: s.load_kw),
            "substation_capacity_kw": (
                "Admission capacity of each substation in the balancer's view, kW.",
                lambda s: s.capacity_kw,
            ),
            "substation_load_percentage": (
                "Load / admission capacity * 100 in the balancer's view.",
                lambda s: s.load_percentage,
            ),
            "substation_up": ("1 while the substation is routable, 0 while it is down.", lambda s: float(s.up)),
            "substation_last_poll_age_seconds": (
                "Seconds since the last successful poll of the substation.",
                lambda s: now - s.last_poll_at,
            ),
            "substation_ejected": (
                "1 while the substation is ejected as an outlier (a forward timed out or answered 5xx), else 0.",
                lambda s: float(s.ejected_until is not None and s.ejected_until > now),
            ),
        }
        for name, (documentation, read) in per_substation.items():
            family = GaugeMetricFamily(name, documentation, labels=["substation"])
            for substation in known:
                family.add_metric([substation.substation_id], read(substation))
            yield family
        yield GaugeMetricFamily(
            "healthy_substations", "Substations that are up and routable.", value=sum(s.up for s in known)
        )
        if self._forward_timing is not None:
            yield GaugeMetricFamily(
                "load_balancer_forward_timeout_seconds",
                "Read timeout of the next forward: 4x the recent forwards' p99, within its bounds.",
                value=self._forward_timing.timeout_seconds,
            )
            hedge_delay = self._forward_timing.hedge_delay_seconds
            if hedge_delay is not None:
                yield GaugeMetricFamily(
                    "load_balancer_hedge_delay_seconds",
                    "Seconds a forward goes unanswered before the next candidate is asked too.",
                    value=hedge_delay,
                )
        yield GaugeMetricFamily(
            "load_balancer_poll_interval_seconds",
            "Seconds between two polls of every substation (POLL_INTERVAL_SECONDS).",
            value=self._poll_interval,
        )
