"""Node loss and network cuts, with every substation at its own address as in containers.

Each substation runs in a network namespace on a virtual LAN (tests/netns.py);
the load balancer, the charge request service and the test run on this machine
and reach the substations over the LAN's bridge, as the substations reach each
other. Cutting a substation's link makes its packets vanish: callers time out.

What a cut does, as these tests pin it down:

* The balancer marks a cut substation down at its next failed poll or forward
  and routes around it; a request sent into the cut waits out one timeout and
  is admitted elsewhere. Once the link is back, the next poll brings it back.
* A request whose answer is lost in the cut may still have been admitted by
  the cut substation. The balancer remembers the forward (its session id) and,
  once a poll reaches the substation again, stops that session: the vehicle
  keeps only the session it was told about.
* Connections the substation closed behind the cut (its keep-alive ran out,
  the FIN was lost) do not take it down again once it is back: the balancer
  sends a request whose connection broke before any answer once more.
* Peers drop a silent substation from their group after PEER_MISSED_POLLS
  polls and release the power they exchanged with it; it rejoins when it
  answers again, and the exchange starts over.
"""
from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import pytest
import requests

from tests.harness import OPERATOR, OPERATOR_TOKEN, Service, get_json, scrape, sessions_at, start_all, wait_for
from tests.netns import LanHost, VirtualLan, virtual_lan

pytestmark = pytest.mark.integration

# Load balancer timings, short so that a cut is noticed in about two seconds.
POLL_INTERVAL_SECONDS = 1.0
POLL_TIMEOUT_SECONDS = 0.5
CONNECT_TIMEOUT_SECONDS = 0.5
FORWARD_TIMEOUT_SECONDS = 1.5
BALANCER_TIMINGS = {
    "POLL_INTERVAL_SECONDS": str(POLL_INTERVAL_SECONDS),
    "POLL_TIMEOUT_SECONDS": str(POLL_TIMEOUT_SECONDS),
    "CONNECT_TIMEOUT_SECONDS": str(CONNECT_TIMEOUT_SECONDS),
    "FORWARD_TIMEOUT_SECONDS": str(FORWARD_TIMEOUT_SECONDS),
}
# Scheduling on a busy two-core machine, on top of every bound below.
SLACK_SECONDS = 1.0
# The next poll starts within one interval and fails within its timeouts.
MARKED_DOWN_WITHIN = POLL_INTERVAL_SECONDS + CONNECT_TIMEOUT_SECONDS + POLL_TIMEOUT_SECONDS + SLACK_SECONDS
# A poll under way when the link comes back may still time out; the next one finds it.
BACK_UP_WITHIN = MARKED_DOWN_WITHIN
# At most one attempt goes to a cut substation and waits out a timeout; the next one answers.
ANSWERED_WITHIN = max(CONNECT_TIMEOUT_SECONDS, FORWARD_TIMEOUT_SECONDS) + SLACK_SECONDS

# Peer balancing, fast: one-second phases, a peer polled five times a second.
MEMBERSHIP_POLL_SECONDS = 0.2
PEER_TIMEOUT_SECONDS = 0.3
PEER_MISSED_POLLS = 2
PEER_TIMINGS = {
    "PHASE_SECONDS": "1",
    "ROUND_SECONDS": "0.2",
    "DRAFT_REQUEST_TIMEOUT_SECONDS": "0.08",
    "MEMBERSHIP_POLL_SECONDS": str(MEMBERSHIP_POLL_SECONDS),
    "PEER_TIMEOUT_SECONDS": str(PEER_TIMEOUT_SECONDS),
    "PEER_MISSED_POLLS": str(PEER_MISSED_POLLS),
    "MIGRATION_STEP_KW": "4",
}
# The poll under way at the cut may still have succeeded; then PEER_MISSED_POLLS polls go unanswered.
LEAVES_GROUP_WITHIN = (PEER_MISSED_POLLS + 1) * (MEMBERSHIP_POLL_SECONDS + PEER_TIMEOUT_SECONDS) + SLACK_SECONDS

# Substations close idle connections after one second (their edge's 15 s otherwise), so a short cut outlasts them.
SHORT_KEEPALIVE = "1"

LONG_SESSION_SECONDS = 600  # outlasts every test: no session ends while a test counts them
CLIENT_TIMEOUT_SECONDS = 10

Launcher = Callable[[list[Service]], list[Service]]


# Plumbing ---------------------------------------------------------------------


@pytest.fixture
def lan() -> Iterator[VirtualLan]:
    with virtual_lan() as network:
        yield network


@pytest.fixture
def launch(lan: VirtualLan) -> Iterator[Launcher]:
    """Start services in parallel and wait until all are healthy; all are stopped before the LAN goes."""
    started: list[Service] = []

    def launch_services(services: list[Service]) -> list[Service]:
        started.extend(services)  # stopping one that never started does nothing
        return start_all(services)

    yield launch_services
    for service in reversed(started):
        # A test that failed while a service was frozen must not leave it unable to stop.
        service.resume()
        service.stop()


def substation_at(host: LanHost, index: int, log_dir: Path, **env: str) -> Service:
    service = Service(
        name=f"substation-{index}",
        app="substation_service:create_app()",
        env={"SUBSTATION_ID": f"substation-{index}", **env},
        log_dir=log_dir,
        host=host.address,
        netns=host.namespace,
    )
    service.env["PUBLIC_URL"] = service.url
    return service


@contextmanager
def frozen(service: Service) -> Iterator[None]:
    """Suspend the service's processes (SIGSTOP): its kernel still accepts connections and takes in
    requests, but nothing answers them."""
    service.suspend()
    try:
        yield
    finally:
        service.resume()








def post_charge(service: Service, vehicle_id: str, amount: float) -> requests.Response:
    body = {"vehicle_id": vehicle_id, "amount": amount, "duration_seconds": LONG_SESSION_SECONDS}
    return requests.post(f"{service.url}/charge", json=body, timeout=CLIENT_TIMEOUT_SECONDS)


# The network helper itself ----------------------------------------------------

# Run inside a namespace: connect attempts for the given seconds, one outcome per line.
CONNECT_PROBE = """
import errno, socket, sys, time
address, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    try:
        socket.create_connection((address, port), timeout=0.5).close()
        print("connected")
    except TimeoutError:
        print("timeout")
    except OSError as exc:
        print(errno.errorcode.get(exc.errno, repr(exc)))
"""
NOTHING_LISTENS = 9  # discard: a reachable host refuses at once


def connect_outcomes(address: str, seconds: float, inside: LanHost | None = None) -> subprocess.Popen:
    command = [sys.executable, "-c", CONNECT_PROBE, address, str(NOTHING_LISTENS), str(seconds)]
    return subprocess.Popen(inside.command(command) if inside else command, stdout=subprocess.PIPE, text=True)


def assert_outcomes(probe: subprocess.Popen, expected: str) -> None:
    output, _ = probe.communicate(timeout=30)
    seen = Counter(output.split())
    assert set(seen) == {expected}, seen


def test_a_cut_host_swallows_packets_so_callers_time_out(lan: VirtualLan) -> None:
    cut, other = lan.add_host(), lan.add_host()
    assert_outcomes(connect_outcomes(cut.address, 0.2), "ECONNREFUSED")
    assert_outcomes(connect_outcomes(cut.address, 0.2, inside=other), "ECONNREFUSED")

    cut.cut()
    # As after a long silence: ARP must find the cut host again, and gives up after three probes a second
    # apart. Unpinned, callers would then be told "No route to host" at once instead of timing out.
    lan.forget_learnt_neighbours()
    from_here, from_peer = connect_outcomes(cut.address, 4), connect_outcomes(cut.address, 4, inside=other)
    assert_outcomes(connect_outcomes(other.address, 0.2, inside=cut), "ENETUNREACH")  # its own link is down
    assert_outcomes(from_here, "timeout")
    assert_outcomes(from_peer, "timeout")

    cut.restore()
    assert_outcomes(connect_outcomes(cut.address, 0.2), "ECONNREFUSED")
    assert_outcomes(connect_outcomes(cut.address, 0.2, inside=other), "ECONNREFUSED")
    assert_outcomes(connect_outcomes(other.address, 0.2, inside=cut), "ECONNREFUSED")


# The balancer and its clients -------------------------------------------------


@dataclass(frozen=True)
class Grid:
    hosts: list[LanHost]
    substations: list[Service]
    balancer: Service
    charge: Service

    def substation(self, substation_id: str) -> Service:
        return next(s for s in self.substations if s.env["SUBSTATION_ID"] == substation_id)

    def entry(self, substation_id: str) -> dict[str, Any]:
        """The balancer's view of one substation (GET /status)."""
        entries = get_json(f"{self.balancer.url}/status")["substations"]
        return next(entry for entry in entries if entry["id"] == substation_id)

    def is_up(self, substation_id: str) -> bool:
        return self.entry(substation_id)["up"]


@pytest.fixture
def grid(lan: VirtualLan, launch: Launcher, tmp_path: Path) -> Grid:
    """Three 300 kW substations, each on its own host; balancer and charge API here."""
    hosts = [lan.add_host() for _ in range(3)]
    substations = launch(
        [
            substation_at(host, index, tmp_path, CAPACITY_KW="300", EDGE_KEEPALIVE_TIMEOUT_SECONDS=SHORT_KEEPALIVE)
            for index, host in enumerate(hosts, start=1)
        ]
    )
    (balancer,) = launch(
        [
            Service(
                name="load-balancer",
                app="load_balancer:create_app()",
                env={"SUBSTATIONS": ",".join(s.url for s in substations), "ADMIN_TOKEN": OPERATOR_TOKEN,
                     **BALANCER_TIMINGS},
                log_dir=tmp_path,
            )
        ]
    )
    (charge,) = launch(
        [
            Service(
                name="charge-request-service",
                app="charge_request_service:create_app()",
                env={"LOAD_BALANCER_URL": balancer.url, "REQUEST_TIMEOUT_SECONDS": str(CLIENT_TIMEOUT_SECONDS),
                     "ADMIN_TOKEN": OPERATOR_TOKEN},
                log_dir=tmp_path,
            )
        ]
    )
    built = Grid(hosts, substations, balancer, charge)
    ids = [s.env["SUBSTATION_ID"] for s in substations]
    wait_for(lambda: all(built.is_up(i) for i in ids), BACK_UP_WITHIN, "the balancer to find every substation up")
    return built


@dataclass(frozen=True)
class Reply:
    """One charge request a client sent through the public API, and what came back."""

    vehicle_id: str
    amount: float
    sent_at: float  # time.monotonic()
    seconds: float
    status: int  # 0 when no answer came at all
    body: dict[str, Any]

    @property
    def substation(self) -> str | None:
        return self.body.get("substation") if self.status == 201 else None

    @property
    def attempts(self) -> int | None:
        return self.body.get("routing", {}).get("attempts") if self.status == 201 else None


def charge_through(charge: Service, vehicle_id: str, amount: float) -> Reply:
    sent_at = time.monotonic()
    try:
        response = post_charge(charge, vehicle_id, amount)
        status, body = response.status_code, response.json()
    except (requests.RequestException, ValueError) as exc:
        status, body = 0, {"error": str(exc)}
    return Reply(vehicle_id, amount, sent_at, time.monotonic() - sent_at, status, body)


class Traffic:
    """A client charging vehicles (1 kW each) one after another, in the background.

    Bounded in count and time whatever the test does; leaving the ``with`` block stops it.
    """

    def __init__(self, charge: Service, max_requests: int = 400, max_seconds: float = 30.0) -> None:
        self._charge = charge
        self._max_requests = max_requests
        self._max_seconds = max_seconds
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._replies: list[Reply] = []
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=CLIENT_TIMEOUT_SECONDS + 1)

    def replies(self) -> list[Reply]:
        with self._lock:
            return list(self._replies)

    def sent_after(self, moment: float) -> list[Reply]:
        return [reply for reply in self.replies() if reply.sent_at > moment]

    def _run(self) -> None:
        deadline = time.monotonic() + self._max_seconds
        for number in range(self._max_requests):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            reply = charge_through(self._charge, f"ev-{number}", 1.0)
            with self._lock:
                self._replies.append(reply)
            self._stop.wait(0.03)


def orphan_sessions(grid: Grid, replies: list[Reply]) -> list[dict[str, Any]]:
    """Sessions on the substations that no client got a 201 for, after checking every 201 is a real session."""
    answered: dict[str, set[str]] = defaultdict(set)
    for reply in replies:
        if reply.status == 201:
            answered[reply.substation].add(reply.body["session_id"])
    orphans = []
    for substation in grid.substations:
        substation_id = substation.env["SUBSTATION_ID"]
        sessions = sessions_at(substation)
        held = {session["session_id"] for session in sessions}
        assert answered[substation_id] <= held, f"{substation_id} lost sessions a client was told about"
        orphans += [session for session in sessions if session["session_id"] not in answered[substation_id]]
    return orphans


def assert_views_agree(grid: Grid, replies: list[Reply]) -> None:
    """The balancer counts what each substation holds, and the charge API knows exactly the 201s."""

    def balancer_matches_substations() -> bool:
        return all(
            grid.entry(s.env["SUBSTATION_ID"])["load"] == sum(session["amount"] for session in sessions_at(s))
            for s in grid.substations
        )

    wait_for(balancer_matches_substations, BACK_UP_WITHIN, "the balancer's loads to match the substations' sessions")
    # Nothing is in flight any more: a reservation left behind would count a request twice.
    entries = get_json(f"{grid.balancer.url}/status")["substations"]
    assert [(e["reserved_kw"], e["in_flight"]) for e in entries] == [(0.0, 0)] * len(entries), entries
    known = {session["session_id"] for session in get_json(f"{grid.charge.url}/sessions", headers=OPERATOR)["sessions"]}
    assert known == {reply.body["session_id"] for reply in replies if reply.status == 201}


# Balancer failover ------------------------------------------------------------


def test_a_cut_substation_is_routed_around_and_used_again_once_restored(grid: Grid) -> None:
    cut_host = grid.hosts[2]
    with Traffic(grid.charge) as traffic:
        wait_for(
            lambda: sum(r.substation == "substation-3" for r in traffic.replies()) >= 3,
            10,
            "requests to reach substation-3 before the cut",
        )
        cut_at = time.monotonic()
        cut_host.cut()
        wait_for(lambda: not grid.is_up("substation-3"), MARKED_DOWN_WITHIN, "the balancer to mark substation-3 down")
        marked_down_at = time.monotonic()
        wait_for(lambda: len(traffic.sent_after(marked_down_at)) >= 20, 10, "20 requests while substation-3 is cut")
        while_cut_error = grid.entry("substation-3")["last_error"]

        restored_at = time.monotonic()
        cut_host.restore()
        wait_for(lambda: grid.is_up("substation-3"), BACK_UP_WITHIN, "the balancer to find substation-3 back")
        wait_for(
            lambda: any(r.substation == "substation-3" for r in traffic.sent_after(restored_at)),
            5,
            "a request to be routed to substation-3 again",
        )
    replies = traffic.replies()

    assert Counter(r.status for r in replies) == {201: len(replies)}, [r.body for r in replies if r.status != 201]
    slowest = max(replies, key=lambda r: r.seconds)
    assert slowest.seconds <= ANSWERED_WITHIN, slowest
    # A request sent into the cut before the balancer noticed it waited out one timeout, then went elsewhere.
    for reply in (r for r in replies if r.attempts != 1):
        assert reply.attempts == 2 and reply.substation != "substation-3", reply
        assert reply.sent_at + reply.seconds > cut_at, reply
    # Once marked down, it was not tried at all until the link came back.
    while_down = [r for r in replies if marked_down_at < r.sent_at < restored_at]
    assert {r.substation for r in while_down} == {"substation-1", "substation-2"}
    assert {r.attempts for r in while_down} == {1}

    # The balancer saw timeouts, not refusals: the packets vanished as in a real split.
    assert "no answer within the timeout" in while_cut_error, while_cut_error
    cut_url = grid.substation("substation-3").url
    marked_down = [line for line in grid.balancer.log_text().splitlines() if f"{cut_url} marked down" in line]
    assert len(marked_down) == 1 and "no answer within the timeout" in marked_down[0], marked_down

    # A request that reached substation-3 just as the link went down may have been admitted there with its
    # answer lost (see the next test): the balancer frees such a session once substation-3 answers again.
    wait_for(lambda: not orphan_sessions(grid, replies), BACK_UP_WITHIN, "sessions behind lost answers to be freed")
    assert_views_agree(grid, replies)


def test_a_request_caught_by_the_cut_is_hedged_elsewhere_before_its_forward_times_out(grid: Grid) -> None:
    # least_loaded breaks ties by id: on an empty grid the first request goes to substation-1.
    cut_host, cut_substation = grid.hosts[0], grid.substation("substation-1")
    with ThreadPoolExecutor(1) as pool:
        with frozen(cut_substation):
            in_flight = pool.submit(charge_through, grid.charge, "ev-caught", 2.0)
            wait_for(lambda: grid.entry("substation-1")["in_flight"] == 1, 3, "the request to be forwarded")
            time.sleep(0.3)  # its bytes reach substation-1's socket, where nothing reads them yet
            cut_host.cut()
        # Thawed behind the cut: substation-1 admits the request now, and its answer cannot get out.
        caught = in_flight.result(timeout=CLIENT_TIMEOUT_SECONDS)

    assert caught.status == 201, caught
    # Unanswered after the hedge delay, the forward was sent to the next substation too, which admitted
    # it: the client did not wait out the forward timeout.
    assert caught.substation != "substation-1" and caught.attempts == 2, caught
    assert caught.seconds < FORWARD_TIMEOUT_SECONDS, caught
    assert scrape(grid.balancer).value("load_balancer_hedges_total", outcome="sent") == 1
    # The first forward still timed out behind the cut, counted as a failure of substation-1, now down.
    wait_for(lambda: scrape(grid.balancer).value("forward_failures_total", substation="substation-1") == 1,
             ANSWERED_WITHIN, "the first forward to time out")
    cut_entry = grid.entry("substation-1")
    assert not cut_entry["up"] and "no answer within the timeout" in cut_entry["last_error"], cut_entry

    during_cut = [charge_through(grid.charge, f"ev-{n}", 1.0) for n in range(5)]
    assert all(r.status == 201 and r.attempts == 1 and r.substation != "substation-1" for r in during_cut), during_cut

    cut_host.restore()
    wait_for(lambda: grid.is_up("substation-1"), BACK_UP_WITHIN, "the balancer to find substation-1 back")
    # Lightest of the three (at most 2 kW, against 4 and 3 kW elsewhere): least_loaded picks substation-1 again.
    after = charge_through(grid.charge, "ev-after", 1.0)
    assert after.status == 201 and after.substation == "substation-1", after

    # Substation-1 admitted the caught request behind the cut, but its answer was lost. Once a poll reaches
    # it again, the balancer stops that session: the vehicle keeps only the one it was told about.
    replies = [caught, *during_cut, after]
    wait_for(
        lambda: scrape(grid.balancer).value("lost_sessions_freed_total", substation="substation-1") == 1,
        BACK_UP_WITHIN,
        "the balancer to free the session whose answer was lost",
    )
    assert orphan_sessions(grid, replies) == []
    assert_views_agree(grid, replies)
    assert grid.entry("substation-1")["load"] == 1.0


def established_connections(host: LanHost, service: Service) -> list[str]:
    done = subprocess.run(
        host.command(["ss", "-Htn", "state", "established", f"( sport = :{service.port} )"]),
        capture_output=True, text=True, timeout=10, check=True,
    )
    return done.stdout.splitlines()


def test_connections_closed_behind_a_cut_do_not_take_the_restored_substation_down(grid: Grid) -> None:
    cut_host, cut_substation = grid.hosts[2], grid.substation("substation-3")
    # One request each, then 5 kW more on substation-1 and -2: the balancer keeps a connection to
    # substation-3 open, and substation-3 is where the next request goes.
    opening = [charge_through(grid.charge, f"ev-{n}", amount) for n, amount in enumerate((1.0, 1.0, 1.0, 5.0, 5.0))]
    assert [r.substation for r in opening] == [f"substation-{n}" for n in (1, 2, 3, 1, 2)], opening

    cut_host.cut()
    wait_for(lambda: not grid.is_up("substation-3"), MARKED_DOWN_WITHIN, "the balancer to mark substation-3 down")
    # Its keep-alive runs out: substation-3 closes the idle connections, and the FINs vanish in the cut.
    wait_for(lambda: not established_connections(cut_host, cut_substation), 5, "substation-3 to close its connections")
    cut_host.restore()
    # Polled at once (registering a known URL again), so the next request follows the restore before
    # substation-3's kernel sends its lost FIN again.
    registered = requests.post(f"{grid.balancer.url}/substations", json={"url": cut_substation.url},
                               headers=OPERATOR, timeout=3)
    assert registered.status_code == 200 and registered.json()["up"], registered.text

    after = charge_through(grid.charge, "ev-after", 1.0)
    assert (after.status, after.substation, after.attempts) == (201, "substation-3", 1), after
    assert grid.is_up("substation-3")
    # No forward to it failed: the series appears with the first failure.
    assert scrape(grid.balancer).value("forward_failures_total", substation="substation-3") is None
    assert_views_agree(grid, [*opening, after])


# Peer group partition ---------------------------------------------------------


def peer_table(service: Service) -> dict[str, Any]:
    return get_json(f"{service.url}/peer-balancing")


def members(table: dict[str, Any]) -> list[str]:
    return [peer["substation"] for peer in table["peers"] if peer["member"]]


def gateways(services: list[Service]) -> list[float]:
    return [peer_table(service)["gateway_kw"] for service in services]


FETCH_JSON = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())"


def fetch_inside(host: LanHost, url: str) -> dict[str, Any]:
    """GET ``url`` from inside ``host``: the only way to ask a cut host anything."""
    done = subprocess.run(
        host.command([sys.executable, "-c", FETCH_JSON, url]), capture_output=True, text=True, timeout=10, check=True
    )
    return json.loads(done.stdout)


def test_a_cut_supplier_leaves_the_group_its_power_is_released_and_it_rejoins(
    lan: VirtualLan, launch: Launcher, tmp_path: Path
) -> None:
    hosts = [lan.add_host() for _ in range(3)]
    # 2 kW transformers, less than a 4 kW step: only substation-3, with 30 kW of generation, has power to spare.
    services = [
        substation_at(host, index, tmp_path, CAPACITY_KW="2", **PEER_TIMINGS)
        for index, host in enumerate(hosts, start=1)
    ]
    group_key = secrets.token_hex(32)  # the group signs its peer traffic with one key
    for service in services:
        service.env["PEERS"] = ",".join(peer.url for peer in services)
        service.env["PEER_KEY"] = group_key
    services[2].env["GENERATION_KW"] = "30"
    demand, bystander, supplier = launch(services)
    supplier_host = hosts[2]
    wait_for(lambda: all(len(members(peer_table(s))) == 2 for s in services), 15, "the group to form")

    assert post_charge(demand, "ev-demand", 22).status_code == 201  # curtailed by 20 kW: in demand
    wait_for(lambda: gateways(services) == [-20.0, 0.0, 20.0], 15, "substation-3 to supply substation-1")
    assert get_json(f"{demand.url}/status")["capacity"] == 22.0

    supplier_host.cut()
    wait_for(
        lambda: members(peer_table(demand)) == ["substation-2"] and members(peer_table(bystander)) == ["substation-1"],
        LEAVES_GROUP_WITHIN,
        "substation-3 to leave the group",
    )
    metrics = scrape(demand)
    assert metrics.value("peer_member", substation="substation-1", peer="substation-3") == 0
    assert metrics.value("peer_group_members", substation="substation-1") == 2
    # The power exchanged with the lost supplier is released: the limit falls back to the transformer.
    table = peer_table(demand)
    assert table["gateway_kw"] == 0.0
    assert [(p["member"], p["flow_kw"]) for p in table["peers"] if p["substation"] == "substation-3"] == [(False, 0.0)]
    status = get_json(f"{demand.url}/status")
    assert (status["capacity"], status["load"]) == (2.0, 2.0)  # its vehicle is curtailed again, at once

    # The two that remain keep running phases, led by substation-1.
    phase = peer_table(bystander)["phase"]
    wait_for(
        lambda: all(t["phase"] >= phase + 2 and t["synchronized"] for t in map(peer_table, (demand, bystander))),
        5,
        "phases to go on without substation-3",
    )
    assert peer_table(bystander)["leader"] == "substation-1"

    # Behind the cut, the supplier lost both peers and stopped sending into the void.
    wait_for(lambda: members(fetch_inside(supplier_host, f"{supplier.url}/peer-balancing")) == [], 5,
             "substation-3 to find itself alone")
    assert fetch_inside(supplier_host, f"{supplier.url}/peer-balancing")["gateway_kw"] == 0.0
    assert fetch_inside(supplier_host, f"{supplier.url}/status")["capacity"] == 32.0

    supplier_host.restore()
    wait_for(lambda: all(len(members(peer_table(s))) == 2 for s in services), 5, "substation-3 to rejoin")
    wait_for(lambda: gateways(services) == [-20.0, 0.0, 20.0], 15, "substation-3 to supply substation-1 again")
    status = get_json(f"{demand.url}/status")
    assert (status["capacity"], status["load"]) == (22.0, 22.0)
