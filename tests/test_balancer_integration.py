"""The load balancer as a real gunicorn process in front of real substations, over HTTP."""
from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.harness import Service, scrape, sessions_at, start_all, wait_for
from tests.substation_support import epoch_of, max_overlapping_load

pytestmark = pytest.mark.integration

LONG_SESSION_SECONDS = 600  # outlasts every test: nothing ends while a test looks at the load
# Registering and deregistering substations is the operator's: POST/DELETE /substations need it.
REGISTRY_TOKEN = "integration-token"
OPERATOR = {"Authorization": f"Bearer {REGISTRY_TOKEN}"}

Launcher = Callable[..., list[Service]]


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launcher]:
    """``launch(app, envs)`` starts one service per env dict in parallel and waits until all are healthy."""
    started: list[Service] = []

    def launch_services(app: str, envs: list[dict[str, str]]) -> list[Service]:
        services = [
            Service(name=env.get("SUBSTATION_ID", "load-balancer"), app=app, env=env, log_dir=tmp_path)
            for env in envs
        ]
        started.extend(services)
        return start_all(services)

    yield launch_services
    for service in reversed(started):
        service.stop()


def substations(
    launch: Launcher, *capacities: float, first_index: int = 1, policy: str = "strict"
) -> list[Service]:
    """Substations of these capacities; under ``strict`` allocation unless told otherwise.

    Strict (a session gets its whole amount or nothing) makes "does it fit" a plain sum, so the
    routing tests here can state exactly what each substation must hold.
    """
    return launch(
        "substation_service:create_app()",
        [
            {"SUBSTATION_ID": f"substation-{index}", "CAPACITY_KW": str(capacity), "ALLOCATION_POLICY": policy}
            for index, capacity in enumerate(capacities, start=first_index)
        ],
    )


def balancer(launch: Launcher, behind: list[Service], **env: str) -> Service:
    (service,) = launch("load_balancer:create_app()", [{"SUBSTATIONS": ",".join(s.url for s in behind), **env}])
    return service


def charge(service: Service, vehicle_id: str, amount: float, duration: float = LONG_SESSION_SECONDS) -> requests.Response:
    body = {"vehicle_id": vehicle_id, "amount": amount, "duration_seconds": duration}
    return requests.post(f"{service.url}/charge", json=body, timeout=15)


def status_of(service: Service) -> dict[str, dict]:
    response = requests.get(f"{service.url}/status", timeout=5)
    response.raise_for_status()
    return {entry["id"]: entry for entry in response.json()["substations"]}






def assert_no_traceback(service: Service) -> None:
    assert "Traceback" not in service.log_text(), service.log_text()[-3000:]


# (a) ----------------------------------------------------------------------------


def test_a_burst_far_beyond_capacity_never_overloads_a_substation(launch: Launcher) -> None:
    grid = substations(launch, 100, 100, 100)
    lb = balancer(launch, grid)
    barrier = threading.Barrier(30)

    def five_requests(worker: int) -> list[requests.Response]:
        barrier.wait(timeout=10)
        return [charge(lb, f"ev-{worker}-{n}", 10.0) for n in range(5)]

    with ThreadPoolExecutor(30) as pool:
        responses = [r for batch in pool.map(five_requests, range(30)) for r in batch]
    burst_ended = time.time()

    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {201, 503}, statuses
    # Reservations make the view exact: every kW is used, and no request is sent where it cannot fit.
    assert statuses[201] == 30, statuses
    for rejected in (r for r in responses if r.status_code == 503):
        assert rejected.json()["error"] == "no_capacity"
        assert int(rejected.headers["Retry-After"]) >= 1
        assert rejected.json()["retry_after_seconds"] == int(rejected.headers["Retry-After"])

    admitted = [r.json() for r in responses if r.status_code == 201]
    for substation in grid:
        substation_id = substation.env["SUBSTATION_ID"]
        mine = [a for a in admitted if a["substation"] == substation_id]
        windows = [(epoch_of(a["started_at"]), epoch_of(a["ends_at"]), a["amount"]) for a in mine]
        assert max_overlapping_load(windows) <= 100.0
        assert all(ends_at > burst_ended for _, ends_at, _ in windows), "sessions still running"
        assert {s["session_id"] for s in sessions_at(substation)} == {a["session_id"] for a in mine}
        assert scrape(substation).value("charging_requests_total", outcome="rejected") == 0, (
            "the balancer never forwarded a request that the substation had to refuse"
        )
    metrics = scrape(lb)
    assert metrics.value("load_balancer_requests_total", outcome="routed") == 30
    assert metrics.value("load_balancer_requests_total", outcome="no_capacity") == 120
    assert_no_traceback(lb)


# (b) ------------------------------------------------------------------------------


def test_requests_between_two_polls_spread_evenly(launch: Launcher) -> None:
    grid = substations(launch, 1000, 1000, 1000)
    lb = balancer(launch, grid, POLL_INTERVAL_SECONDS="30")
    barrier = threading.Barrier(30)

    def one_request(n: int) -> requests.Response:
        barrier.wait(timeout=10)
        return charge(lb, f"ev-{n}", 10.0)

    with ThreadPoolExecutor(30) as pool:
        responses = list(pool.map(one_request, range(30)))

    assert [r.status_code for r in responses] == [201] * 30
    per_substation = Counter(r.json()["substation"] for r in responses)
    assert len(per_substation) == 3
    assert max(per_substation.values()) - min(per_substation.values()) <= 1, per_substation
    assert all(r.json()["routing"] == {"policy": "fair_share", "attempts": 1} for r in responses)
    for substation in grid:
        assert len(sessions_at(substation)) == per_substation[substation.env["SUBSTATION_ID"]]
    # The answers kept the view exact although no poll ran since start-up.
    for substation_id, entry in status_of(lb).items():
        assert entry["load"] == 10.0 * per_substation[substation_id]
        assert entry["reserved_kw"] == 0.0


# (c) ------------------------------------------------------------------------------


def test_a_killed_substation_is_routed_around_and_used_again_after_restart(launch: Launcher) -> None:
    grid = substations(launch, 100, 100, 100)
    poll_interval, poll_timeout = 1.0, 0.5
    lb = balancer(
        launch,
        grid,
        POLL_INTERVAL_SECONDS=str(poll_interval),
        POLL_TIMEOUT_SECONDS=str(poll_timeout),
        CONNECT_TIMEOUT_SECONDS="0.5",
    )
    victim = grid[1]
    stop_load = threading.Event()
    responses: list[requests.Response] = []

    def keep_charging(worker: int) -> None:
        # Bounded in count and time: at most 150 requests per worker.
        for n in range(150):
            if stop_load.is_set():
                return
            responses.append(charge(lb, f"ev-{worker}-{n}", 1.0, duration=1.0))
            time.sleep(0.02)

    with ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(keep_charging, worker) for worker in range(4)]
        time.sleep(0.7)
        victim.kill()
        seconds_to_down = wait_for(
            lambda: not status_of(lb)["substation-2"]["up"], timeout=10, what="substation-2 shown down"
        )
        time.sleep(0.5)
        stop_load.set()
        for worker in workers:
            worker.result(timeout=30)

    assert seconds_to_down <= poll_interval + poll_timeout + 1.0
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {201: len(responses)}, statuses
    routed_to = Counter(r.json()["substation"] for r in responses)
    assert routed_to["substation-1"] and routed_to["substation-3"], routed_to

    stopped = requests.delete(f"{lb.url}/charge/substation-2/any-session", timeout=5)
    assert stopped.status_code == 502 and stopped.json()["error"] == "substation_unreachable"

    victim.start()  # same port, state starts again from zero
    wait_for(lambda: status_of(lb)["substation-2"]["up"], timeout=poll_interval + 3, what="substation-2 back up")
    after_restart = [charge(lb, f"ev-back-{n}", 5.0) for n in range(3)]
    assert [r.status_code for r in after_restart] == [201] * 3
    assert "substation-2" in {r.json()["substation"] for r in after_restart}
    assert len(sessions_at(victim)) >= 1
    assert status_of(lb)["substation-2"]["state_version"] >= 1, "the restarted substation's lower versions are accepted"
    assert_no_traceback(lb)


# (d) ------------------------------------------------------------------------------


def test_substations_can_be_registered_and_deregistered_at_run_time(launch: Launcher) -> None:
    small, extra, impostor = launch(
        "substation_service:create_app()",
        [
            {"SUBSTATION_ID": "substation-1", "CAPACITY_KW": "10", "ALLOCATION_POLICY": "strict"},
            {"SUBSTATION_ID": "substation-extra", "CAPACITY_KW": "50", "ALLOCATION_POLICY": "strict"},
            {"SUBSTATION_ID": "substation-1", "CAPACITY_KW": "50", "ALLOCATION_POLICY": "strict"},
        ],
    )
    # started last, so stopped first: no idle connections delay the others
    lb = balancer(launch, [small], ADMIN_TOKEN=REGISTRY_TOKEN)
    wait_for(lambda: status_of(lb).get("substation-1", {}).get("up", False), timeout=5, what="first poll")
    too_large = charge(lb, "ev-big", 30.0)
    assert too_large.status_code == 409, "30 kW does not fit the 10 kW substation's limit, the only one"
    assert too_large.json()["error"] == "exceeds_every_limit"

    anonymous = requests.post(f"{lb.url}/substations", json={"url": extra.url}, timeout=5)
    assert anonymous.status_code == 401 and anonymous.json()["error"] == "unauthorized"
    registered = requests.post(f"{lb.url}/substations", json={"url": extra.url}, headers=OPERATOR, timeout=5)
    assert registered.status_code == 201, registered.text
    entry = registered.json()
    assert (entry["id"], entry["url"], entry["up"], entry["capacity"]) == ("substation-extra", extra.url, True, 50.0)
    again = requests.post(f"{lb.url}/substations", json={"url": extra.url + "/"}, headers=OPERATOR, timeout=5)
    assert again.status_code == 200 and again.json()["id"] == "substation-extra"
    clash = requests.post(f"{lb.url}/substations", json={"url": impostor.url}, headers=OPERATOR, timeout=5)
    assert clash.status_code == 409 and clash.json()["error"] == "substation_conflict"
    assert {e["id"] for e in requests.get(f"{lb.url}/substations", timeout=5).json()["substations"]} == {
        "substation-1",
        "substation-extra",
    }

    admitted = charge(lb, "ev-big", 30.0)
    assert admitted.status_code == 201 and admitted.json()["substation"] == "substation-extra"
    metrics = scrape(lb)
    assert metrics.value("routing_decisions_total", substation="substation-extra") == 1
    assert metrics.value("substation_up", substation="substation-extra") == 1
    assert metrics.value("substation_load_kw", substation="substation-extra") == 30.0

    session_id = admitted.json()["session_id"]
    stopped = requests.delete(f"{lb.url}/charge/substation-extra/{session_id}", timeout=5)
    assert stopped.status_code == 200 and stopped.json()["session_id"] == session_id
    assert status_of(lb)["substation-extra"]["load"] == 0.0, "the stop's answer updates the view at once"
    gone = requests.delete(f"{lb.url}/charge/substation-extra/{session_id}", timeout=5)
    assert gone.status_code == 404 and gone.json()["error"]

    assert requests.delete(f"{lb.url}/substations/substation-extra", timeout=5).status_code == 401
    removed = requests.delete(f"{lb.url}/substations/substation-extra", headers=OPERATOR, timeout=5)
    assert removed.status_code == 200 and removed.json()["id"] == "substation-extra"
    assert set(status_of(lb)) == {"substation-1"}
    metrics = scrape(lb)
    assert metrics.value("substation_up", substation="substation-extra") is None
    assert metrics.value("routing_decisions_total", substation="substation-extra") is None
    assert charge(lb, "ev-big-2", 30.0).status_code == 409, "only the 10 kW substation is left"
    assert requests.delete(f"{lb.url}/substations/substation-extra", headers=OPERATOR, timeout=5).status_code == 404


# (e) ------------------------------------------------------------------------------


def test_bad_input_gets_json_errors_and_the_balancer_stays_healthy(launch: Launcher) -> None:
    (only,) = substations(launch, 100)
    lb = balancer(launch, [only], ADMIN_TOKEN=REGISTRY_TOKEN)
    json_headers = {"Content-Type": "application/json"}
    cases = [
        ("POST", "/charge", {"data": b"\xff\xfe\x00garbage", "headers": json_headers}, 400),
        ("POST", "/charge", {"data": b'{"vehicle_id": "ev-1", "amount": 1e999}', "headers": json_headers}, 400),
        ("POST", "/charge", {"data": b'{"vehicle_id": "ev-1", "amount": NaN}', "headers": json_headers}, 400),
        ("POST", "/charge", {"data": b"x" * 40_000, "headers": json_headers}, 413),
        ("POST", "/charge", {"data": b"amount=5", "headers": {"Content-Type": "text/plain"}}, 415),
        ("POST", "/charge", {"json": {"vehicle_id": "ev-1", "amount": "10"}}, 400),
        # answers, but 404 on /metrics
        ("POST", "/substations", {"json": {"url": f"{only.url}/status"}, "headers": OPERATOR}, 502),
        ("POST", "/substations", {"json": {"url": "javascript:alert(1)"}, "headers": OPERATOR}, 400),
        ("POST", "/substations", {"json": {"url": only.url}}, 401),
        ("DELETE", "/charge", {}, 405),
        ("DELETE", "/charge/nobody/abc", {}, 404),
        ("PUT", "/admin/policy", {"json": {"policy": "random"}, "headers": {"Authorization": "Bearer \u00e9"}}, 401),
        ("GET", "/admin/policy", {"headers": {"Authorization": "Bearer"}}, 401),
        ("GET", "/%ff%fe", {}, 404),
    ]
    for method, path, kwargs, status in cases:
        response = requests.request(method, f"{lb.url}{path}", timeout=5, **kwargs)
        assert response.status_code == status, (method, path, response.text)
        body = response.json()
        assert isinstance(body["error"], str) and isinstance(body["message"], str), body
    assert requests.get(f"{lb.url}/health", timeout=5).json()["status"] == "ok"
    assert charge(lb, "ev-after", 10.0).status_code == 201
    assert_no_traceback(lb)


# A lost answer ----------------------------------------------------------------------


def test_a_session_admitted_behind_a_lost_answer_is_freed_once_the_substation_answers_again(
    launch: Launcher,
) -> None:
    grid = substations(launch, 100, 100)
    lb = balancer(launch, grid, POLL_INTERVAL_SECONDS="1", FORWARD_TIMEOUT_SECONDS="1", POLL_TIMEOUT_SECONDS="0.5")
    wait_for(lambda: len(status_of(lb)) == 2, 5, "the balancer to poll both substations")
    slow = grid[0]  # least_loaded breaks ties by id: an empty grid sends the first request to substation-1

    slow.suspend()
    try:
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(charge, lb, "ev-lost", 7.0)
            # The forward is in substation-1's socket; it admits once thawed, after the balancer gave up.
            wait_for(lambda: not status_of(lb)["substation-1"]["up"], 5, "the balancer to give up on substation-1")
            response = answer.result(timeout=15)
    finally:
        slow.resume()

    assert response.status_code == 201, response.text
    assert response.json()["substation"] == "substation-2" and response.json()["routing"]["attempts"] == 2
    # Thawed, substation-1 admitted the forward nobody waits for any more; the next poll finds it again.
    wait_for(
        lambda: scrape(lb).value("lost_sessions_freed_total", substation="substation-1") == 1,
        10,
        "the balancer to free the session whose answer was lost",
    )
    assert sessions_at(slow) == []
    assert [s["session_id"] for s in sessions_at(grid[1])] == [response.json()["session_id"]]
    assert status_of(lb)["substation-1"]["load"] == 0
    assert "answer was lost" in lb.log_text()


# A deadline on routing ----------------------------------------------------------------


# A forward to a frozen substation takes 3 s; the 4 s deadline leaves a second one 0.5 s, and no third.
ROUTE_DEADLINE_SECONDS = 4.0
DEADLINE_TIMINGS = {
    "ROUTE_DEADLINE_SECONDS": str(ROUTE_DEADLINE_SECONDS),
    "FORWARD_TIMEOUT_SECONDS": "3",
    "CONNECT_TIMEOUT_SECONDS": "0.5",
    "POLL_INTERVAL_SECONDS": "1",
    "POLL_TIMEOUT_SECONDS": "0.5",
    # Failed polls leave frozen substations up in the view, so the request goes to each in turn.
    "FAILURE_THRESHOLD": "100",
}
# Scheduling on a busy two-core machine.
SLACK_SECONDS = 1.0


def test_routing_ends_by_its_deadline_and_leaves_no_session_behind(launch: Launcher) -> None:
    grid = substations(launch, 100, 100, 100)
    lb = balancer(launch, grid, **DEADLINE_TIMINGS)
    wait_for(lambda: len(status_of(lb)) == 3, 5, "the balancer to poll every substation")
    frozen = grid[:2]  # least_loaded tries an empty grid in id order: substation-1, -2, then -3
    ids = [substation.env["SUBSTATION_ID"] for substation in grid]

    for substation in frozen:
        substation.suspend()
    try:
        started = time.monotonic()
        response = charge(lb, "ev-late", 7.0)
        took = time.monotonic() - started
    finally:
        for substation in frozen:
            substation.resume()

    # Without the deadline, each frozen substation would take a full forward timeout (6 s in all), and the
    # third would admit the request after the caller's own time limit.
    assert took <= ROUTE_DEADLINE_SECONDS + SLACK_SECONDS, f"answered after {took:.2f} s"
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "substations_too_slow"
    assert "could not be placed in time" in response.json()["message"]
    assert int(response.headers["Retry-After"]) >= 1

    def counted(metric: str, substation_id: str) -> float:
        return scrape(lb).value(metric, substation=substation_id) or 0

    # Thawed, a frozen substation admits the forward nobody waits for; its next poll frees that session.
    assert counted("forward_failures_total", "substation-1") == 1
    wait_for(
        lambda: all(
            counted("lost_sessions_freed_total", s) == counted("forward_failures_total", s) for s in ids
        ),
        10,
        "the balancer to free every session admitted behind a timed-out forward",
    )
    assert [sessions_at(substation) for substation in grid] == [[], [], []]
    assert scrape(grid[2]).value("charging_requests_total", outcome="admitted") == 0, (
        "nothing was sent to the third substation once the deadline was near"
    )
    assert_no_traceback(lb)
