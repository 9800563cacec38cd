"""The peer-balancing endpoints and metrics of one substation app (Flask test client, no threads)."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient

from gridcommon.promtext import parse_metrics
from substation_service import create_app
from substation_service.config import Settings
from substation_service.peering.config import PeeringSettings
from substation_service.peering.power import LocalPower
from substation_service.peering.routes import EXTENSION_KEY
from substation_service.peering.service import PeeringService

ME = "substation-1"
HEADER = {"sender": "substation-2", "phase": 1, "round": 0, "epoch": 0.0}
PEER_METRICS = {
    "peer_balancing_enabled",
    "peer_state",
    "peer_gateway_kw",
    "peer_predicted_gateway_kw",
    "peer_net_generation_kw",
    "peer_generation_kw",
    "peer_storage_kw",
    "peer_load_kw",
    "peer_power_imbalance_kw",
    "peer_phase",
    "peer_round",
    "peer_synchronized",
    "peer_group_members",
    "peer_is_leader",
    "peer_messages_sent_total",
    "peer_messages_received_total",
    "peer_send_failures_total",
    "peer_messages_rejected_total",
    "peer_migrations_total",
    "peer_invariant_blocks_total",
}


@pytest.fixture
def app_client() -> Iterator[tuple[FlaskClient, PeeringService]]:
    power = LocalPower(generation_kw=30.0, storage_kw=5.0)
    settings = Settings(substation_id=ME, capacity_kw=100.0, peering=PeeringSettings(power=power))
    app = create_app(settings, start_background=False)
    service = app.extensions[EXTENSION_KEY]
    yield app.test_client(), service
    service.stop()


def rejected(client: FlaskClient, reason: str) -> float | None:
    return parse_metrics(client.get("/metrics").text).value("peer_messages_rejected_total", substation=ME, reason=reason)


def test_generation_and_storage_relieve_the_transformer(app_client) -> None:
    client, _ = app_client
    assert client.get("/status").json["capacity"] == 135.0
    assert client.post("/charge", json={"vehicle_id": "ev-1", "amount": 130}).status_code == 201
    assert client.post("/charge", json={"vehicle_id": "ev-2", "amount": 10}).status_code == 409


def test_load_table_of_a_substation_without_peers(app_client) -> None:
    client, _ = app_client
    body = client.get("/peer-balancing").json
    assert body["substation"] == ME and body["configured"] is False and body["running"] is False
    assert body["state"] == "normal" and body["leader"] == ME
    assert body["peers"] == [] and body["gateway_kw"] == 0.0
    assert body["migration_step_kw"] == 2.0
    assert body["migrations"] == {"accepted": 0, "too_late": 0, "rolled_back": 0, "dropped": 0}
    assert body["load_table"][1] == f"(NORMAL) {ME}"


def test_bad_messages_are_rejected_with_a_json_error_and_counted(app_client) -> None:
    client, _ = app_client
    not_json = client.post("/peer-balancing/messages", data="hello", content_type="text/plain")
    assert not_json.status_code == 415 and not_json.json["error"] == "unsupported_media_type"
    not_object = client.post("/peer-balancing/messages", json=[1])
    assert not_object.status_code == 400
    unknown_type = client.post("/peer-balancing/messages", json={**HEADER, "type": "Gossip"})
    assert unknown_type.status_code == 400
    assert unknown_type.json["error"] == "invalid_message" and unknown_type.json["field"] == "type"
    assert rejected(client, "malformed") == 3

    stranger = client.post("/peer-balancing/messages", json={**HEADER, "type": "DraftRequest"})
    assert stranger.status_code == 403 and stranger.json["error"] == "unknown_sender"
    assert "substation-2" in stranger.json["message"] and "PEERS" in stranger.json["message"]
    assert rejected(client, "unknown_sender") == 1


def link_epoch(client: FlaskClient) -> float | None:
    scrape = parse_metrics(client.get("/metrics").text)
    return scrape.value("peer_link_epoch", substation=ME, peer="substation-2")


def test_member_messages_are_accepted_or_ignored(app_client) -> None:
    client, service = app_client
    service.node.peer_seen("substation-2", link_epoch=None)
    # A peer learns the link's epoch from this substation's /metrics, as the membership poll does.
    header = {**HEADER, "epoch": link_epoch(client)}

    request = client.post("/peer-balancing/messages", json={**header, "type": "DraftRequest"})
    assert request.status_code == 202 and request.json == {"status": "accepted"}
    late_age = client.post("/peer-balancing/messages", json={**header, "type": "DraftAge", "age": 4})
    assert late_age.status_code == 202 and late_age.json == {"status": "ignored", "reason": "no_open_request"}
    body = client.get("/peer-balancing").json
    assert body["messages"]["received"] == {"DraftRequest": 1, "DraftAge": 1}
    # Answered the supplier's request with its age (0: this substation needs nothing).
    assert body["messages"]["sent"] == {"DraftAge": 1}
    assert body["peers"][0]["substation"] == "substation-2" and body["peers"][0]["state"] == "supply"

    service.node.peer_lost("substation-2")
    service.node.peer_seen("substation-2", link_epoch=None)
    assert link_epoch(client) > header["epoch"]
    stale = client.post("/peer-balancing/messages", json={**header, "type": "DraftRequest"})
    assert stale.status_code == 409 and stale.json["error"] == "stale_link"


def test_metrics_carry_every_peer_metric_with_the_substation_label(app_client) -> None:
    client, service = app_client
    service.node.begin_round(phase=1, round_=0)  # a round reads the devices
    scrape = parse_metrics(client.get("/metrics").text)
    assert PEER_METRICS <= set(scrape.samples)
    for name in PEER_METRICS:
        assert all(labels["substation"] == ME for labels, _ in scrape.samples[name])
    assert scrape.value("peer_generation_kw", substation=ME) == 30.0
    assert scrape.value("peer_storage_kw", substation=ME) == 5.0
    assert scrape.value("peer_messages_sent_total", substation=ME, type="DraftSelect") == 0
