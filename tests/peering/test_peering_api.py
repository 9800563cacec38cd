"""The peer-balancing endpoints and metrics of one substation app (Flask test client, no threads)."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest
from flask.testing import FlaskClient

from gridcommon.promtext import parse_metrics
from substation_service import create_app
from substation_service.config import Settings
from substation_service.peering.config import PeeringSettings
from substation_service.peering.membership import Membership
from substation_service.peering.power import LocalPower
from substation_service.peering.routes import EXTENSION_KEY
from substation_service.peering.service import PeeringService
from substation_service.peering.transport import peer_report

ME = "substation-1"
PEER = "substation-2"
# Only a key of the membership here: the peer's /metrics is read through its test client.
PEER_URL = "http://127.0.0.1:5012"
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
    "peer_link_resets_total",
    "peer_invariant_blocks_total",
}

AppFactory = Callable[..., tuple[FlaskClient, PeeringService]]


@pytest.fixture
def make_app() -> Iterator[AppFactory]:
    services: list[PeeringService] = []

    def make(substation_id: str, power: LocalPower, capacity_kw: float = 100.0) -> tuple[FlaskClient, PeeringService]:
        settings = Settings(substation_id=substation_id, capacity_kw=capacity_kw, peering=PeeringSettings(power=power))
        app = create_app(settings, start_background=False)
        services.append(app.extensions[EXTENSION_KEY])
        return app.test_client(), services[-1]

    yield make
    for service in services:
        service.stop()


@pytest.fixture
def app_client(make_app: AppFactory) -> tuple[FlaskClient, PeeringService]:
    return make_app(ME, LocalPower(generation_kw=30.0, storage_kw=5.0))


def rejected(client: FlaskClient, reason: str) -> float | None:
    return parse_metrics(client.get("/metrics").text).value("peer_messages_rejected_total", substation=ME, reason=reason)


def test_generation_and_storage_relieve_the_transformer(app_client) -> None:
    client, _ = app_client
    assert client.get("/status").json["capacity"] == 135.0
    assert client.post("/charge", json={"vehicle_id": "ev-1", "amount": 130}).status_code == 201
    # The second vehicle shares the 135 kW with the first instead of being turned away.
    assert client.post("/charge", json={"vehicle_id": "ev-2", "amount": 10}).status_code == 201
    status = client.get("/status").json
    assert (status["load"], status["requested_load"], status["curtailed_sessions"]) == (135.0, 140.0, 1)


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


def link_epoch(client: FlaskClient, own: str = ME, peer: str = PEER) -> float | None:
    scrape = parse_metrics(client.get("/metrics").text)
    return scrape.value("peer_link_epoch", substation=own, peer=peer)


def link_resets(client: FlaskClient, reason: str, own: str = ME) -> float | None:
    return parse_metrics(client.get("/metrics").text).value("peer_link_resets_total", substation=own, reason=reason)


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


def test_an_accept_for_an_offer_this_substation_does_not_have_resets_the_link(app_client, caplog) -> None:
    client, service = app_client
    service.node.peer_seen(PEER, link_epoch=None)
    header = {**HEADER, "epoch": link_epoch(client)}
    caplog.set_level(logging.WARNING, logger="peering")

    accept = {**header, "type": "DraftAccept", "migration": f"{ME}:7", "amount": 2}
    response = client.post("/peer-balancing/messages", json=accept)

    # substation-2 took a step this substation does not send: both must release the link, not ignore it.
    assert response.status_code == 202 and response.json == {"status": "accepted"}
    assert link_resets(client, "late_accept") == 1
    assert link_epoch(client) > header["epoch"]
    assert client.get("/peer-balancing").json["gateway_kw"] == 0.0
    assert f"{PEER} accepted migration {ME}:7" in caplog.text and "link is reset" in caplog.text
    stale = client.post("/peer-balancing/messages", json={**header, "type": "DraftRequest"})
    assert stale.status_code == 409


def test_a_poll_that_finds_the_two_sides_disagreeing_resets_the_link(make_app: AppFactory, caplog) -> None:
    client, service = make_app(ME, LocalPower(), capacity_kw=4.0)
    peer_client, peer = make_app(PEER, LocalPower(generation_kw=30.0))
    poll = Membership(
        service.node,
        [PEER_URL],
        lambda urls: {url: peer_report(url, peer_client.get("/metrics").text, ME) for url in urls},
        missed_polls=2,
    )
    poll.poll_once()  # this substation meets the peer ...
    peer.node.peer_seen(ME, link_epoch(client))  # ... the peer's own poll meets this one ...
    poll.poll_once()  # ... and both now speak for the same link
    epoch = link_epoch(client)
    assert epoch == link_epoch(peer_client, own=PEER, peer=ME)

    assert client.post("/charge", json={"vehicle_id": "ev-1", "amount": 10}).status_code == 201
    select = {**HEADER, "epoch": epoch, "type": "DraftSelect", "migration": f"{PEER}:1", "amount": 2}
    assert client.post("/peer-balancing/messages", json=select).status_code == 202
    # The Draft Accept cannot reach substation-2 (this app's own membership has no URL for it): it is lost.
    report = client.get("/peer-balancing").json
    assert report["messages"]["send_failures"] == {"DraftAccept": 1}
    assert report["gateway_kw"] == -2.0 and client.get("/status").json["capacity"] == 6.0
    caplog.set_level(logging.WARNING, logger="peering")

    poll.poll_once()  # the peer counts 0 kW: maybe the answer is still on its way
    assert client.get("/peer-balancing").json["gateway_kw"] == -2.0
    poll.poll_once()  # still so: lost

    assert link_resets(client, "flows_disagree") == 1
    assert link_epoch(client) > epoch
    assert client.get("/peer-balancing").json["gateway_kw"] == 0.0
    assert client.get("/status").json["capacity"] == 4.0  # no longer counting on power nobody sends
    assert f"{ME} counts -2.00 kW exchanged with {PEER}, which counts +0.00 kW" in caplog.text
