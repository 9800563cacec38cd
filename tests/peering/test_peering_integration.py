"""Three real substation processes balancing power over HTTP on loopback."""
from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests

from gridcommon.promtext import parse_metrics
from substation_service.peering.transport import MESSAGES_PATH
from tests.harness import Service, wait_until_healthy
from tests.peering.signing import OTHER_KEY, encode, signed_headers

pytestmark = pytest.mark.integration

# Short phases and rounds keep the tests fast; polls often enough that a death is noticed in half a second.
FAST = {
    "PHASE_SECONDS": "1",
    "ROUND_SECONDS": "0.2",
    "DRAFT_REQUEST_TIMEOUT_SECONDS": "0.08",
    "MEMBERSHIP_POLL_SECONDS": "0.2",
    "PEER_TIMEOUT_SECONDS": "0.5",
    "PEER_MISSED_POLLS": "2",
    "MIGRATION_STEP_KW": "4",
}
# Every transformer is rated 2 kW, less than a migration step, so an idle substation is neither in
# supply nor in demand; substation-3 also generates 30 kW, so it alone has power to spare.
CAPACITY_KW = "2"
GENERATION = {3: {"GENERATION_KW": "30"}}
# One key for the group, new for every run: nothing here may depend on a key written down anywhere.
GROUP_KEY = secrets.token_hex(32)

T = TypeVar("T")


@pytest.fixture
def start_group(tmp_path: Path) -> Iterator[Callable[..., list[Service]]]:
    started: list[Service] = []

    def start(extra_env: dict[int, dict[str, str]] = GENERATION, wait_for_group: bool = True) -> list[Service]:
        services = [
            Service(name=f"substation-{index}", app="substation_service:create_app()", env={}, log_dir=tmp_path)
            for index in (1, 2, 3)
        ]
        peers = ",".join(service.url for service in services)
        for index, service in enumerate(services, start=1):
            service.env.update(
                FAST,
                SUBSTATION_ID=f"substation-{index}",
                CAPACITY_KW=CAPACITY_KW,
                PUBLIC_URL=service.url,
                PEERS=peers,
                PEER_KEY=GROUP_KEY,
            )
            service.env.update(extra_env.get(index, {}))
        for service in services:
            started.append(service.start(wait=False))
        for service in services:
            wait_until_healthy(f"{service.url}/health", service.process)
        if wait_for_group:
            wait_for(lambda: all(len(members(service)) == 2 for service in services), "the group to form")
        return services

    yield start
    for service in started:
        service.stop()


def wait_for(check: Callable[[], T], what: str, timeout: float = 15.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def table(service: Service) -> dict[str, Any]:
    response = requests.get(f"{service.url}/peer-balancing", timeout=2)
    assert response.status_code == 200
    return response.json()


def members(service: Service) -> list[str]:
    return [peer["substation"] for peer in table(service)["peers"] if peer["member"]]


def gateways(services: list[Service]) -> list[float]:
    return [table(service)["gateway_kw"] for service in services]


def charge(service: Service, amount: float) -> requests.Response:
    body = {"vehicle_id": f"ev-{amount:g}", "amount": amount, "duration_seconds": 600}
    return requests.post(f"{service.url}/charge", json=body, timeout=2)


def metric(service: Service, name: str, **labels: str) -> float | None:
    scrape = parse_metrics(requests.get(f"{service.url}/metrics", timeout=2).text)
    return scrape.value(name, **labels)


def post_as(signer: str, service: Service, document: dict[str, Any], key: str = GROUP_KEY) -> requests.Response:
    """A message POSTed to ``service`` as ``signer`` signs it with ``key``."""
    body = encode(document)
    headers = {"Content-Type": "application/json", **signed_headers(body, signer, key=key)}
    return requests.post(f"{service.url}{MESSAGES_PATH}", data=body, headers=headers, timeout=2)


def link_epoch(service: Service, peer: str) -> float | None:
    return metric(service, "peer_link_epoch", substation=service.name, peer=peer)


def agreed_epoch(one: Service, other: Service) -> float | None:
    """The epoch both ends of the link speak for, once they agree on it."""
    mine, theirs = link_epoch(one, other.name), link_epoch(other, one.name)
    return mine if mine is not None and mine == theirs else None


def test_three_substations_converge_from_an_unbalanced_start(start_group) -> None:
    s1, s2, s3 = start_group()
    # A vehicle asking 22 kW of a 2 kW transformer: curtailed by 20 kW, substation-1 is in demand.
    assert charge(s1, 22).status_code == 201

    wait_for(lambda: gateways([s1, s2, s3]) == [-20.0, 0.0, 20.0], "substation-3 to send 20 kW to substation-1")
    # FREEDM's end state, once every node has run a round with its new gateway: no supply and demand at once.
    wait_for(lambda: [table(service)["state"] for service in (s1, s2, s3)] == ["normal", "normal", "supply"],
             "the states to settle")
    # Power received from a peer raises substation-1's limit; what substation-3 sends is gone from its own.
    status = requests.get(f"{s1.url}/status", timeout=2).json()
    assert (status["capacity"], status["load"]) == (22.0, 22.0)  # the vehicle gets all it asks for now
    assert requests.get(f"{s3.url}/status", timeout=2).json()["capacity"] == 2.0 + 30.0 - 20.0
    assert metric(s3, "peer_migrations_total", substation="substation-3", outcome="accepted") == 5
    assert metric(s1, "peer_messages_received_total", substation="substation-1", type="DraftSelect") >= 5
    assert metric(s3, "peer_state", substation="substation-3") in {0, 1}
    load_table = table(s1)["load_table"]
    assert any(line.startswith("(SUPPLY) substation-3 flow -") for line in load_table), load_table
    for service in (s1, s2, s3):
        assert table(service)["leader"] == "substation-1"


def test_a_killed_peer_leaves_the_group_and_the_others_carry_on(start_group) -> None:
    s1, s2, s3 = start_group()
    s1.kill()  # the leader

    for survivor in (s2, s3):
        wait_for(lambda: members(survivor) == ["substation-3" if survivor is s2 else "substation-2"],
                 f"{survivor.name} to drop substation-1")
        wait_for(lambda: table(survivor)["leader"] == "substation-2", "substation-2 to lead")
    assert "substation-1" in s2.log_text() and "leaves the peer-balancing group" in s2.log_text()
    phase = table(s2)["phase"]
    wait_for(lambda: table(s3)["phase"] >= phase + 2 and table(s3)["synchronized"], "phases to go on")

    assert charge(s2, 14).status_code == 201  # curtailed by 12 kW
    wait_for(lambda: gateways([s2, s3]) == [-12.0, 12.0], "substation-3 to supply substation-2")

    s1.start()  # it answers again: it rejoins and, lowest id, leads again
    wait_for(lambda: all(len(members(service)) == 2 for service in (s1, s2, s3)), "substation-1 to rejoin")
    wait_for(lambda: table(s3)["leader"] == "substation-1", "substation-1 to lead again")
    assert gateways([s1, s2, s3]) == [0.0, -12.0, 12.0]


def test_power_from_a_killed_supplier_is_released(start_group) -> None:
    s1, s2, s3 = start_group()
    assert charge(s1, 22).status_code == 201
    wait_for(lambda: gateways([s1, s3]) == [-20.0, 20.0], "substation-3 to supply substation-1")

    s3.kill()

    # substation-1 no longer counts on power from a substation that is gone: its vehicle is curtailed again.
    wait_for(lambda: table(s1)["gateway_kw"] == 0.0, "substation-1 to release the power of substation-3")
    status = requests.get(f"{s1.url}/status", timeout=2).json()
    assert (status["capacity"], status["load"]) == (2.0, 2.0)
    wait_for(lambda: table(s1)["state"] == "demand", "substation-1's next round to find it in demand")
    assert table(s2)["gateway_kw"] == 0.0


def test_a_step_that_no_supplier_sends_is_released_on_both_sides(start_group) -> None:
    s1, s2, s3 = start_group(extra_env={})  # no generation anywhere: nobody supplies
    assert charge(s1, 22).status_code == 201
    wait_for(lambda: table(s1)["state"] == "demand", "substation-1 to be in demand")
    # The newer process's start time wins a link's epoch at the polls after the group forms.
    epoch = wait_for(lambda: agreed_epoch(s1, s2), "substation-1 and substation-2 to agree on their link's epoch")
    # A Draft Select substation-2 no longer knows of, as when its Draft Accept came after the offer was dropped.
    # Played here with the group's key, answering a Draft Request as the real one would have.
    message_header = {"sender": "substation-2", "phase": table(s1)["phase"], "round": 0, "epoch": epoch}
    assert post_as("substation-2", s1, {**message_header, "type": "DraftRequest"}).status_code == 202
    select = {**message_header, "type": "DraftSelect", "migration": "substation-2:1000", "amount": 4}
    response = post_as("substation-2", s1, select)
    assert response.status_code == 202 and response.json() == {"status": "accepted"}

    wait_for(lambda: metric(s2, "peer_link_resets_total", substation="substation-2", reason="late_accept") == 1,
             "substation-2 to reset the link to substation-1")
    wait_for(lambda: gateways([s1, s2, s3]) == [0.0, 0.0, 0.0], "substation-1 to release the step")
    new_epoch = link_epoch(s2, "substation-1")
    assert new_epoch > epoch
    wait_for(lambda: link_epoch(s1, "substation-2") == new_epoch, "substation-1 to follow the new epoch")
    assert requests.get(f"{s1.url}/status", timeout=2).json()["capacity"] == 2.0
    assert "no longer offers" in s2.log_text()


def test_a_substation_with_another_key_cannot_influence_the_group(start_group) -> None:
    # substation-3, the only one with power to spare, has a key of its own: the others do not take it in.
    s1, s2, s3 = start_group(extra_env={3: {"GENERATION_KW": "30", "PEER_KEY": OTHER_KEY}}, wait_for_group=False)
    wait_for(lambda: members(s1) == ["substation-2"] and members(s2) == ["substation-1"], "substation-1 and -2 to pair")
    assert charge(s1, 22).status_code == 201  # curtailed by 20 kW: in demand, and substation-3 could help
    wait_for(lambda: table(s1)["state"] == "demand", "substation-1 to be in demand")

    # Each side refuses the other's polls and poll answers, and says so.
    for service in (s1, s2, s3):
        wait_for(lambda: (metric(service, "peer_messages_rejected_total", substation=service.name,
                                 reason="bad_signature") or 0) >= 2, f"{service.name} to count bad signatures")
    assert "is not signed by a substation of this group" in s1.log_text()
    assert members(s3) == []
    # What substation-3 would send, were it to try: refused at the door, counted, and nothing moves.
    phase = table(s1)["phase"]
    before = metric(s1, "peer_messages_rejected_total", substation="substation-1", reason="bad_signature")
    for document in (
        {"type": "StateChange", "state": "supply"},
        {"type": "DraftSelect", "migration": "substation-3:1", "amount": 30},
        {"type": "CollectedState", "gateway_total_kw": 0.0, "phase": 10**12},
    ):
        message = {"sender": "substation-3", "phase": phase, "round": 0, "epoch": 0.0, **document}
        response = post_as("substation-3", s1, message, key=OTHER_KEY)
        assert response.status_code == 401 and response.json()["error"] == "bad_signature", response.text
    assert metric(s1, "peer_messages_rejected_total", substation="substation-1", reason="bad_signature") >= before + 3

    # Phases go on in the pair; no power ever crosses to or from substation-3.
    wait_for(lambda: table(s1)["phase"] >= phase + 2 and table(s1)["synchronized"], "phases to go on")
    assert gateways([s1, s2, s3]) == [0.0, 0.0, 0.0]
    status = requests.get(f"{s1.url}/status", timeout=2).json()
    assert (status["capacity"], status["load"]) == (2.0, 2.0)
    limit = requests.get(f"{s1.url}/limit", timeout=2).json()
    assert limit["parts"]["peer_kw"] == 0.0
    assert metric(s3, "peer_messages_sent_total", substation="substation-3", type="DraftSelect") == 0
