"""The peer-balancing endpoints and metrics of one substation app (Flask test client, no threads).

Every message here is signed as a peer of the group would sign it (tests/peering/signing.py),
except those that test what an unsigned or wrongly signed one gets.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gridcommon.promtext import parse_metrics
from substation_service import create_app
from substation_service.config import Settings
from substation_service.peering.auth import SIGNATURE_HEADER, PeerKey
from substation_service.peering.config import PeeringSettings
from substation_service.peering.membership import Membership
from substation_service.peering.power import LocalPower
from substation_service.peering.routes import EXTENSION_KEY
from substation_service.peering.schedule import PhaseSchedule
from substation_service.peering.service import PeeringService
from substation_service.peering.transport import (
    MESSAGES_PATH,
    PEER_FAMILIES,
    PEER_POLL_PATH,
    POLL_REFUSED_HEADER,
    PeerReport,
    PeerUnreachable,
    peer_report,
    signed_peer_report,
)
from tests.peering.signing import GROUP_KEY, OTHER_KEY, encode, signed_headers

ME = "substation-1"
PEER = "substation-2"
THIRD = "substation-3"
# Only a key of the membership here: the peer's /metrics is read through its test client.
PEER_URL = "http://127.0.0.1:5012"
# The apps' default timing; phases are checked against the wall clock's.
SCHEDULE = PhaseSchedule(phase_seconds=4.0, round_seconds=0.4)
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

    def make(
        substation_id: str,
        power: LocalPower,
        capacity_kw: float = 100.0,
        peer_key: str = GROUP_KEY,
        peers: tuple[str, ...] = (),
        start_background: bool = False,
    ) -> tuple[FlaskClient, PeeringService]:
        peering = PeeringSettings(power=power, peer_key=peer_key, peers=peers)
        settings = Settings(substation_id=substation_id, capacity_kw=capacity_kw, peering=peering)
        app = create_app(settings, start_background=start_background)
        services.append(app.extensions[EXTENSION_KEY])
        return app.test_client(), services[-1]

    yield make
    for service in services:
        service.stop()


@pytest.fixture
def app_client(make_app: AppFactory) -> tuple[FlaskClient, PeeringService]:
    return make_app(ME, LocalPower(generation_kw=30.0, storage_kw=5.0))


def post(
    client: FlaskClient,
    document: Any,
    signer: str | None = None,
    key: str = GROUP_KEY,
    now: float | None = None,
    body: bytes | None = None,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
):
    """POST a message as a peer would: its exact body bytes signed by ``signer`` (its sender by default)."""
    body = encode(document) if body is None else body
    signer = signer or (document.get("sender") if isinstance(document, dict) else None) or PEER
    signed = signed_headers(body, signer, key=key, now=now) if headers is None else headers
    return client.post(MESSAGES_PATH, data=body, headers=signed, content_type=content_type)


def rejected(client: FlaskClient, reason: str, own: str = ME) -> float | None:
    scrape = parse_metrics(client.get("/metrics").text)
    return scrape.value("peer_messages_rejected_total", substation=own, reason=reason)


def link_epoch(client: FlaskClient, own: str = ME, peer: str = PEER) -> float | None:
    scrape = parse_metrics(client.get("/metrics").text)
    return scrape.value("peer_link_epoch", substation=own, peer=peer)


def link_resets(client: FlaskClient, reason: str, own: str = ME) -> float | None:
    return parse_metrics(client.get("/metrics").text).value("peer_link_resets_total", substation=own, reason=reason)


def header(client: FlaskClient, sender: str = PEER, own: str = ME, round_: int = 0) -> dict[str, Any]:
    """A message header as ``sender`` writes it now: this phase, and the link's epoch read from /metrics
    (0 from a sender this substation has no link to)."""
    epoch = link_epoch(client, own=own, peer=sender)
    return {"sender": sender, "phase": SCHEDULE.phase_at(time.time()), "round": round_,
            "epoch": 0.0 if epoch is None else epoch}


def peer_kw(client: FlaskClient) -> float:
    """Power this substation counts from (+) or for (-) its peers: what its limit adds."""
    return client.get("/limit").json["parts"]["peer_kw"]


def capacity(client: FlaskClient) -> float:
    return client.get("/status").json["capacity"]


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
    assert body["peer_key_set"] is True and body["off_reason"] is None
    assert body["state"] == "normal" and body["leader"] == ME
    assert body["peers"] == [] and body["gateway_kw"] == 0.0
    assert body["migration_step_kw"] == 2.0
    assert body["migrations"] == {"accepted": 0, "too_late": 0, "rolled_back": 0, "dropped": 0}
    assert body["load_table"][1] == f"(NORMAL) {ME}"


def test_without_a_peer_key_peer_balancing_stays_off_and_says_how_to_turn_it_on(make_app: AppFactory, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="peering")
    client, service = make_app(ME, LocalPower(), peer_key="", peers=(PEER_URL,), start_background=True)
    service.start()  # a second start says nothing more

    body = client.get("/peer-balancing").json
    assert body["configured"] is True and body["running"] is False and body["peer_key_set"] is False
    assert "PEER_KEY is not set" in body["off_reason"] and "secrets.token_hex" in body["off_reason"]
    assert caplog.text.count("PEER_KEY is not set") == 1
    refused = post(client, {**header(client), "type": "StateChange", "state": "demand"})
    assert refused.status_code == 403 and refused.json["error"] == "peering_off"
    assert "PEER_KEY" in refused.json["message"]
    assert rejected(client, "peering_off") == 1
    # Its /metrics answers a peer's signed poll unsigned: nobody takes it for a member.
    poll = signed_headers(b"", PEER, method="GET", path="/metrics")
    assert SIGNATURE_HEADER not in client.get("/metrics", headers=poll).headers


def test_bad_messages_are_rejected_with_a_json_error_and_counted(app_client) -> None:
    client, _ = app_client
    not_json = post(client, None, body=b"hello", content_type="text/plain")
    assert not_json.status_code == 415 and not_json.json["error"] == "unsupported_media_type"
    not_object = post(client, [1])
    assert not_object.status_code == 400
    unknown_type = post(client, {**header(client), "type": "Gossip"})
    assert unknown_type.status_code == 400
    assert unknown_type.json["error"] == "invalid_message" and unknown_type.json["field"] == "type"
    assert rejected(client, "malformed") == 3

    stranger = post(client, {**header(client), "type": "DraftRequest"})
    assert stranger.status_code == 403 and stranger.json["error"] == "unknown_sender"
    assert "substation-2" in stranger.json["message"] and "PEERS" in stranger.json["message"]
    assert rejected(client, "unknown_sender") == 1


def test_member_messages_are_accepted_or_ignored(app_client) -> None:
    client, service = app_client
    service.node.peer_seen("substation-2", link_epoch=None)
    # A peer learns the link's epoch from this substation's /metrics, as the membership poll does.
    message_header = header(client)

    request = post(client, {**message_header, "type": "DraftRequest"})
    assert request.status_code == 202 and request.json == {"status": "accepted"}
    late_age = post(client, {**message_header, "type": "DraftAge", "age": 4})
    assert late_age.status_code == 202 and late_age.json == {"status": "ignored", "reason": "no_open_request"}
    body = client.get("/peer-balancing").json
    assert body["messages"]["received"] == {"DraftRequest": 1, "DraftAge": 1}
    # Answered the supplier's request with its age (0: this substation needs nothing).
    assert body["messages"]["sent"] == {"DraftAge": 1}
    assert body["peers"][0]["substation"] == "substation-2" and body["peers"][0]["state"] == "supply"

    service.node.peer_lost("substation-2")
    service.node.peer_seen("substation-2", link_epoch=None)
    assert link_epoch(client) > message_header["epoch"]
    stale = post(client, {**message_header, "type": "DraftRequest", "round": 1})
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
    for reason in ("bad_signature", "stale_timestamp", "sender_mismatch", "not_leader", "unsolicited_select",
                   "amount_out_of_bounds", "implausible_phase", "implausible_epoch", "duplicate"):
        assert scrape.value("peer_messages_rejected_total", substation=ME, reason=reason) == 0, reason


def test_an_accept_for_an_offer_this_substation_does_not_have_resets_the_link(app_client, caplog) -> None:
    client, service = app_client
    service.node.peer_seen(PEER, link_epoch=None)
    message_header = header(client)
    caplog.set_level(logging.WARNING, logger="peering")

    accept = {**message_header, "type": "DraftAccept", "migration": f"{ME}:7", "amount": 2}
    response = post(client, accept)

    # substation-2 took a step this substation does not send: both must release the link, not ignore it.
    assert response.status_code == 202 and response.json == {"status": "accepted"}
    assert link_resets(client, "late_accept") == 1
    assert link_epoch(client) > message_header["epoch"]
    assert client.get("/peer-balancing").json["gateway_kw"] == 0.0
    assert f"{PEER} accepted migration {ME}:7" in caplog.text and "link is reset" in caplog.text
    stale = post(client, {**message_header, "type": "DraftRequest"})
    assert stale.status_code == 409


# ----- the membership poll, signed both ways ---------------------------------------------------------


def poll_through(peer_client: FlaskClient, key: str = GROUP_KEY, own: str = ME):
    """A scrape function for ``Membership``: a signed poll of the peer app's /metrics, its answer checked."""
    poller_key = PeerKey.from_text(key)

    def scrape(urls) -> dict[str, PeerReport | PeerUnreachable]:
        results: dict[str, PeerReport | PeerUnreachable] = {}
        for url in urls:
            headers = signed_headers(b"", own, key=key, method="GET", path=PEER_POLL_PATH)
            answer = peer_client.get(PEER_POLL_PATH, headers=headers)
            try:
                results[url] = signed_peer_report(f"{url}/metrics", answer.status_code, answer.headers, answer.data,
                                                  headers[SIGNATURE_HEADER], poller_key, own)
            except PeerUnreachable as exc:
                results[url] = exc
        return results

    return scrape


def test_metrics_answers_are_signed_only_for_a_signed_poll(app_client) -> None:
    client, _ = app_client
    assert SIGNATURE_HEADER not in client.get("/metrics").headers  # Prometheus's scrape: left alone
    poll = signed_headers(b"", PEER, method="GET", path="/metrics")
    answer = client.get("/metrics", headers=poll)
    report = signed_peer_report("test", answer.status_code, answer.headers, answer.data, poll[SIGNATURE_HEADER],
                                PeerKey.from_text(GROUP_KEY), PEER)
    assert report.substation == ME

    wrong = client.get("/metrics", headers=signed_headers(b"", PEER, key=OTHER_KEY, method="GET", path="/metrics"))
    assert SIGNATURE_HEADER not in wrong.headers and wrong.headers[POLL_REFUSED_HEADER] == "bad_signature"
    old = client.get("/metrics", headers=signed_headers(b"", PEER, now=time.time() - 60, method="GET",
                                                          path="/metrics"))
    assert SIGNATURE_HEADER not in old.headers and old.headers[POLL_REFUSED_HEADER] == "stale_timestamp"
    assert rejected(client, "bad_signature") == 1 and rejected(client, "stale_timestamp") == 1


def test_a_poll_gets_only_the_families_it_asks_for_and_its_query_is_signed(app_client) -> None:
    client, _ = app_client
    poll = signed_headers(b"", PEER, method="GET", path=PEER_POLL_PATH)
    answer = client.get(PEER_POLL_PATH, headers=poll)

    assert SIGNATURE_HEADER in answer.headers
    assert set(parse_metrics(answer.get_data(as_text=True)).samples) <= PEER_FAMILIES
    assert "current_load" in parse_metrics(answer.get_data(as_text=True)).samples
    assert len(answer.data) < len(client.get("/metrics").data) / 5
    # Somebody on the way swaps the query for one that drops the link's figures: the signature no longer holds.
    stripped = client.get("/metrics?name[]=current_load", headers=poll)
    assert SIGNATURE_HEADER not in stripped.headers and stripped.headers[POLL_REFUSED_HEADER] == "bad_signature"


def test_a_forged_metrics_answer_at_a_peer_url_resets_no_link(make_app: AppFactory, caplog) -> None:
    client, service = make_app(ME, LocalPower())
    peer_client, _ = make_app(PEER, LocalPower())
    poll = Membership(service.node, [PEER_URL], poll_through(peer_client), missed_polls=3)
    poll.poll_once()  # the peer is a member now, on the link's first epoch
    epoch = link_epoch(client)
    caplog.set_level(logging.WARNING, logger="peering")

    # Something else answers at the peer's URL: a well-formed page with a link epoch that would reset the link.
    forged_page = (
        f'current_load{{substation="{PEER}"}} 0.0\n'
        f'peer_link_epoch{{substation="{PEER}",peer="{ME}"}} {time.time():.3f}\n'
        f'peer_flow_kw{{substation="{PEER}",peer="{ME}"}} 8.0\n'
    )

    def forged(urls) -> dict[str, PeerReport | PeerUnreachable]:
        results: dict[str, PeerReport | PeerUnreachable] = {}
        for url in urls:
            headers = signed_headers(b"", ME, method="GET", path="/metrics")
            try:
                results[url] = signed_peer_report(f"{url}/metrics", 200, {}, forged_page.encode(),
                                                  headers[SIGNATURE_HEADER], PeerKey.from_text(GROUP_KEY), ME)
            except PeerUnreachable as exc:
                results[url] = exc
        return results

    # Taken at its word, the page would move the link to a newer epoch and release its exchange.
    assert peer_report("forged", forged_page, ME).link_epoch > epoch
    forger = Membership(service.node, [PEER_URL], forged, missed_polls=3)
    forger.poll_once()
    forger.poll_once()

    assert link_epoch(client) == epoch and link_resets(client, "flows_disagree") == 0
    assert rejected(client, "bad_signature") == 2
    assert [p["member"] for p in client.get("/peer-balancing").json["peers"]] == [True]
    assert caplog.text.count(f"the answer at {PEER_URL} is not signed") == 1  # said once, not every poll
    # An answer signed with another key is no better.
    impostor = Membership(service.node, [PEER_URL], poll_through(peer_client, key=OTHER_KEY), missed_polls=3)
    impostor.poll_once()
    assert rejected(client, "bad_signature") == 3 and link_epoch(client) == epoch


def test_a_poll_that_finds_the_two_sides_disagreeing_resets_the_link(make_app: AppFactory, caplog) -> None:
    client, service = make_app(ME, LocalPower(), capacity_kw=4.0)
    peer_client, peer = make_app(PEER, LocalPower(generation_kw=30.0))
    poll = Membership(service.node, [PEER_URL], poll_through(peer_client), missed_polls=2)
    poll.poll_once()  # this substation meets the peer ...
    peer.node.peer_seen(ME, link_epoch(client))  # ... the peer's own poll meets this one ...
    poll.poll_once()  # ... and both now speak for the same link
    epoch = link_epoch(client)
    assert epoch == link_epoch(peer_client, own=PEER, peer=ME)

    assert client.post("/charge", json={"vehicle_id": "ev-1", "amount": 10}).status_code == 201
    message_header = header(client)
    assert post(client, {**message_header, "type": "DraftRequest"}).status_code == 202  # it answers its need
    select = {**message_header, "type": "DraftSelect", "migration": f"{PEER}:1", "amount": 2}
    assert post(client, select).json == {"status": "accepted"}
    # The Draft Accept cannot reach substation-2 (this app's own membership has no URL for it): it is lost.
    report = client.get("/peer-balancing").json
    assert report["messages"]["send_failures"] == {"DraftAge": 1, "DraftAccept": 1}
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


# ----- forged and replayed messages: refused, counted, and no power moves ----------------------------

# A substation in demand: 4 kW of transformer, a vehicle asking 10. substation-1 (the leader, lowest id)
# supplies; substation-3 is a third member. Every test below first shows a message that would move power,
# then that the forgery does not.
DEMAND = "substation-2"
SUPPLIER = "substation-1"


@pytest.fixture
def in_demand(make_app: AppFactory) -> FlaskClient:
    client, service = make_app(DEMAND, LocalPower(), capacity_kw=4.0)
    service.node.peer_seen(SUPPLIER, link_epoch=None)
    service.node.peer_seen(THIRD, link_epoch=None)
    assert client.post("/charge", json={"vehicle_id": "ev-1", "amount": 10}).status_code == 201
    return client


def solicited(client: FlaskClient, round_: int = 0) -> dict[str, Any]:
    """substation-1 asks for Draft Ages and the substation answers its need: a select may follow."""
    message_header = header(client, sender=SUPPLIER, own=DEMAND, round_=round_)
    assert post(client, {**message_header, "type": "DraftRequest"}).json == {"status": "accepted"}
    return message_header


def select(message_header: dict[str, Any], amount: float = 2.0, migration: str = f"{SUPPLIER}:1") -> dict[str, Any]:
    return {**message_header, "type": "DraftSelect", "migration": migration, "amount": amount}


def assert_refused(client: FlaskClient, response, status: int, reason: str) -> None:
    assert response.status_code == status, response.json
    assert response.json["error"] == reason and response.json["message"]
    assert rejected(client, reason, own=DEMAND) == 1
    # No power moved: the limit counts nothing from peers, the vehicle is still curtailed to 4 kW.
    assert peer_kw(client) == 0.0 and capacity(client) == 4.0


def test_a_genuine_select_moves_one_step(in_demand: FlaskClient) -> None:
    client = in_demand
    response = post(client, select(solicited(client)))
    assert response.status_code == 202 and response.json == {"status": "accepted"}
    assert peer_kw(client) == 2.0 and capacity(client) == 6.0


def test_an_unsigned_message_is_refused(in_demand: FlaskClient) -> None:
    client = in_demand
    response = post(client, select(solicited(client)), headers={})
    assert_refused(client, response, 401, "bad_signature")
    assert "not signed" in response.json["message"]


def test_a_message_signed_with_another_key_is_refused(in_demand: FlaskClient) -> None:
    client = in_demand
    response = post(client, select(solicited(client)), key=OTHER_KEY)
    assert_refused(client, response, 401, "bad_signature")
    assert "PEER_KEY" in response.json["message"]


def test_a_message_changed_after_signing_is_refused(in_demand: FlaskClient) -> None:
    client = in_demand
    genuine = select(solicited(client))
    headers = signed_headers(encode(genuine), SUPPLIER)
    response = post(client, select(genuine, amount=30.0), headers=headers)
    assert_refused(client, response, 401, "bad_signature")


def test_a_replayed_message_with_an_old_timestamp_is_refused(in_demand: FlaskClient) -> None:
    client = in_demand
    response = post(client, select(solicited(client)), now=time.time() - 60)
    assert_refused(client, response, 401, "stale_timestamp")
    assert "replay" in response.json["message"]


def test_a_member_cannot_send_as_another(in_demand: FlaskClient) -> None:
    client = in_demand
    # substation-3 holds the key, but the select says it comes from substation-1.
    response = post(client, select(solicited(client)), signer=THIRD)
    assert_refused(client, response, 401, "sender_mismatch")
    assert response.json["sender"] == SUPPLIER


def test_a_select_without_a_draft_age_is_refused(in_demand: FlaskClient) -> None:
    client = in_demand
    response = post(client, select(header(client, sender=SUPPLIER, own=DEMAND)))
    assert_refused(client, response, 409, "unsolicited_select")


def test_an_oversized_select_is_refused(in_demand: FlaskClient) -> None:
    client = in_demand
    # The review's forgery: 30 kW offered in one select.
    response = post(client, select(solicited(client), amount=30.0))
    assert_refused(client, response, 422, "amount_out_of_bounds")
    assert "at most 2 kW" in response.json["message"]


def test_a_collected_state_from_a_member_that_is_not_the_leader_is_refused(in_demand: FlaskClient) -> None:
    client = in_demand
    collected = {**header(client, sender=THIRD, own=DEMAND), "type": "CollectedState", "gateway_total_kw": 0.0}
    response = post(client, collected)
    assert_refused(client, response, 409, "not_leader")
    assert client.get("/peer-balancing").json["synchronized"] is False


def test_a_collected_state_for_phase_10_to_the_12_is_refused(in_demand: FlaskClient) -> None:
    client = in_demand
    forged = {**header(client, sender=SUPPLIER, own=DEMAND), "phase": 10**12, "type": "CollectedState",
              "gateway_total_kw": 0.0}
    assert_refused(client, post(client, forged), 422, "implausible_phase")
    # The group is not stuck: the leader's collected state for this phase is still taken.
    genuine = {**header(client, sender=SUPPLIER, own=DEMAND), "type": "CollectedState", "gateway_total_kw": 0.0}
    assert post(client, genuine).json == {"status": "accepted"}


def test_an_epoch_of_1e17_is_refused(in_demand: FlaskClient) -> None:
    client = in_demand
    epoch = link_epoch(client, own=DEMAND, peer=SUPPLIER)
    forged = {**header(client, sender=SUPPLIER, own=DEMAND), "epoch": 1e17, "type": "DraftRequest"}
    assert_refused(client, post(client, forged), 422, "implausible_epoch")
    assert link_epoch(client, own=DEMAND, peer=SUPPLIER) == epoch


def test_a_duplicated_select_takes_power_once(in_demand: FlaskClient) -> None:
    client = in_demand
    genuine = select(solicited(client))
    assert post(client, genuine).json == {"status": "accepted"}
    again = post(client, genuine)  # the very message, once more (a replay within the clock tolerance)
    assert again.status_code == 202 and again.json == {"status": "duplicate", "reason": "duplicate"}
    assert rejected(client, "duplicate", own=DEMAND) == 1
    assert peer_kw(client) == 2.0 and capacity(client) == 6.0  # one step, not two
    assert client.get("/peer-balancing").json["messages"]["sent"] == {"DraftAge": 1, "DraftAccept": 1}


def test_a_duplicated_accept_adds_flow_once(make_app: AppFactory) -> None:
    client, service = make_app(ME, LocalPower(generation_kw=30.0), capacity_kw=4.0)
    node = service.node
    node.peer_seen(PEER, link_epoch=None)
    phase = SCHEDULE.phase_at(time.time())
    assert post(client, {**header(client), "type": "StateChange", "state": "demand"}).status_code == 202
    node.collect_state(phase, {})  # this substation leads: its own collected state
    node.begin_round(phase, 1)  # asks substation-2 for its Draft Age
    assert post(client, {**header(client, round_=1), "type": "DraftAge", "age": 6.0}).status_code == 202
    [offer] = node.close_draft()
    accept = {**header(client, round_=1), "type": "DraftAccept", "migration": offer.message.migration, "amount": 2}
    assert post(client, accept).json == {"status": "accepted"}
    assert peer_kw(client) == -2.0 and capacity(client) == 32.0

    again = post(client, accept)

    assert again.status_code == 202 and again.json["status"] == "duplicate"
    assert rejected(client, "duplicate") == 1
    # The second accept changed nothing: no link reset releasing the step, no second step.
    assert link_resets(client, "late_accept") == 0
    assert client.get("/peer-balancing").json["gateway_kw"] == 2.0
    assert peer_kw(client) == -2.0 and capacity(client) == 32.0


HEADER_FIELDS = {
    "phase": st.one_of(st.integers(-5, 10**13), st.floats(allow_nan=True), st.none()),
    "round": st.one_of(st.integers(-1, 10**6), st.text(max_size=3)),
    "epoch": st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.just(1e17), st.integers(-1, 10**12)),
    "amount": st.one_of(st.floats(allow_nan=False), st.integers(-3, 10**6)),
    "migration": st.text(max_size=8),
    "sender": st.sampled_from([SUPPLIER, THIRD, DEMAND, "x y"]),
    # No Draft Request: this substation answers none, so any select it took would be a forgery taken.
    "type": st.sampled_from(["StateChange", "DraftAge", "DraftSelect", "DraftAccept", "TooLate", "CollectedState",
                             "Gossip"]),
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    changes=st.fixed_dictionaries({}, optional=HEADER_FIELDS),
    signer=st.sampled_from([SUPPLIER, THIRD, "substation-9"]),
    key=st.sampled_from([GROUP_KEY, OTHER_KEY]),
    skew=st.sampled_from([0.0, -60.0]),
)
def test_no_message_whatever_its_content_or_signature_gets_a_server_error_or_moves_power_unasked(
    in_demand: FlaskClient, changes: dict, signer: str, key: str, skew: float
) -> None:
    client = in_demand
    document = {**header(client, sender=SUPPLIER, own=DEMAND), "type": "DraftSelect", "migration": "m:1",
                "amount": 2.0, **changes}
    response = post(client, document, signer=signer, key=key, now=time.time() + skew)
    assert response.status_code in {202, 400, 401, 403, 409, 422}, response.json
    assert response.is_json and (response.json.get("error") or response.json.get("status"))
    # Nothing asked substation-1 for power (no Draft Request was answered): no select can be taken.
    assert peer_kw(client) == 0.0
