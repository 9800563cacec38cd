"""Peer-balancing metrics, read from the node when /metrics is scraped.

Every metric starts with ``peer_`` and carries ``substation="<id>"``; those
about one peer add ``peer="<peer id>"``. Counters count from the start of the
process.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from substation_service.peering.machine import LinkReset, Outcome, Rejection
from substation_service.peering.messages import MESSAGE_TYPES, NodeState
from substation_service.peering.node import NodeReport, PeeringNode

# Numbers a graph can draw and an alert can compare.
STATE_VALUES = {NodeState.DEMAND.value: -1, NodeState.NORMAL.value: 0, NodeState.SUPPLY.value: 1}


class PeeringCollector(Collector):
    def __init__(self, node: PeeringNode) -> None:
        self._node = node

    def collect(self) -> Iterator[Metric]:
        report = self._node.report()
        yield from self._node_gauges(report)
        yield from self._peer_gauges(report)
        yield from self._counters(report)

    def _node_gauges(self, report: NodeReport) -> Iterator[Metric]:
        table = report.table
        members = [peer for peer in table.peers if peer.member]
        gauges = (
            ("peer_balancing_enabled", "1 when this substation migrates power (PEER_BALANCING_ENABLED).",
             float(table.enabled)),
            ("peer_state", "Balancing state: -1 demand, 0 normal, 1 supply.", STATE_VALUES[table.state]),
            ("peer_gateway_kw", "Power sent to peers (+) or received from them (-), kW.", table.gateway_kw),
            ("peer_predicted_gateway_kw", "Gateway counting this node's unanswered offers, kW.",
             table.predicted_gateway_kw),
            (
                "peer_net_generation_kw",
                "Rating + generation + storage - what the vehicles ask for, at the last round, kW.",
                table.net_generation_kw,
            ),
            ("peer_generation_kw", "Local generation at the last round, kW.", table.generation_kw),
            ("peer_storage_kw", "Power supplied by local storage at the last round, kW.", table.storage_kw),
            ("peer_load_kw", "What the vehicles ask for (capped by an operator limit) at the last round, kW.", table.load_kw),
            ("peer_power_imbalance_kw", "Collected sum of the group's gateways plus unanswered offers, kW.",
             table.power_imbalance_kw),
            ("peer_phase", "Current balancing phase (wall time / PHASE_SECONDS).", table.phase),
            ("peer_round", "Current round inside the phase.", table.round),
            ("peer_synchronized", "1 when this phase's collected state has arrived.", float(table.synchronized)),
            ("peer_group_members", "Substations in the group, this one included.", 1 + len(members)),
            ("peer_is_leader", "1 when this substation leads the group.", float(table.leader == table.substation)),
        )
        for name, documentation, value in gauges:
            family = GaugeMetricFamily(name, documentation, labels=["substation"])
            family.add_metric([table.substation], value)
            yield family

    def _peer_gauges(self, report: NodeReport) -> Iterator[Metric]:
        table = report.table
        member = GaugeMetricFamily("peer_member", "1 while the peer is in the group.", labels=["substation", "peer"])
        flow = GaugeMetricFamily(
            "peer_flow_kw", "Power sent to the peer (+) or received from it (-), kW.", labels=["substation", "peer"]
        )
        epoch = GaugeMetricFamily(
            "peer_link_epoch", "Epoch of the link to the peer (peers adopt the newer one).",
            labels=["substation", "peer"],
        )
        for peer in table.peers:
            labels = [table.substation, peer.substation]
            member.add_metric(labels, float(peer.member))
            flow.add_metric(labels, peer.flow_kw)
            epoch.add_metric(labels, peer.link_epoch)
        yield from (member, flow, epoch)

    def _counters(self, report: NodeReport) -> Iterator[Metric]:
        substation = report.table.substation
        yield _counter("peer_messages_sent", "Messages sent, by type.", substation, "type", MESSAGE_TYPES, report.sent)
        yield _counter("peer_messages_received", "Messages accepted from group members, by type.", substation,
                       "type", MESSAGE_TYPES, report.received)
        yield _counter("peer_send_failures", "Messages a peer did not take (unreachable or refused), by type.",
                       substation, "type", MESSAGE_TYPES, report.send_failures)
        yield _counter("peer_messages_rejected", "Messages and poll answers refused or not acted on, by reason.",
                       substation, "reason", [reason.value for reason in Rejection], report.rejected)
        yield _counter("peer_migrations", "Migrations this substation offered as supplier, by outcome.", substation,
                       "outcome", [outcome.value for outcome in Outcome], report.outcomes)
        yield _counter("peer_link_resets", "Links reset (the exchange with the peer released), by reason.",
                       substation, "reason", [reason.value for reason in LinkReset], report.link_resets)
        blocked = CounterMetricFamily("peer_invariant_blocks", "Migrations held back by the invariant check.",
                                      labels=["substation"])
        blocked.add_metric([substation], report.invariant_blocks)
        yield blocked


def _counter(
    name: str, documentation: str, substation: str, label: str, values: list[str] | tuple[str, ...],
    counts: Mapping[str, int],
) -> CounterMetricFamily:
    # Every label value is exported from the start, so rate() and alerts see a series before its first event.
    family = CounterMetricFamily(name, documentation, labels=["substation", label])
    for value in values:
        family.add_metric([substation, value], counts.get(value, 0))
    return family
