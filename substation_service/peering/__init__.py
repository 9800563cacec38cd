"""Peer-to-peer power balancing among substations, after FREEDM's Load Balancing module.

``machine.py`` is the protocol as a plain state machine; ``service.py`` runs
it between substation processes over HTTP, every message and poll signed
with the group's ``PEER_KEY`` (``auth.py``). ``build_peering`` makes the
service for one substation, ``install_peering`` adds its endpoints, metrics
and, when asked, its background threads to the substation's app.
"""
from __future__ import annotations

from collections.abc import Callable

from flask import Flask
from prometheus_client import CollectorRegistry

from substation_service.peering.config import PeeringSettings
from substation_service.peering.machine import BalancingMachine, Readings
from substation_service.peering.metrics import PeeringCollector
from substation_service.peering.node import PeeringNode
from substation_service.peering.routes import EXTENSION_KEY, blueprint
from substation_service.peering.service import PeeringService

__all__ = ["PeeringService", "PeeringSettings", "build_peering", "install_peering"]


def build_peering(
    substation_id: str,
    public_url: str,
    settings: PeeringSettings,
    readings: Callable[[], Readings],
    clock: Callable[[], float],
    on_peer_power: Callable[[float], None],
) -> PeeringService:
    """The peer balancing of one substation.

    ``readings`` reads its devices (see ``PeeringNode.readings``); ``on_peer_power`` is told
    every change of the power exchanged with peers, at once.
    """
    machine = BalancingMachine(substation_id, settings.balancing, epoch_origin=clock(), schedule=settings.schedule)
    node = PeeringNode(machine, readings, clock, on_peer_power)
    return PeeringService(node, settings, public_url, clock)


def install_peering(app: Flask, service: PeeringService, registry: CollectorRegistry, start_background: bool) -> None:
    app.extensions[EXTENSION_KEY] = service
    app.register_blueprint(blueprint)
    registry.register(PeeringCollector(service.node))
    if start_background:
        service.start()
