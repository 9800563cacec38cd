"""The console's plain parts: what limits a session, its logins, the shared feed, its HTTP answers;
and, against the real process behind its edge, its login's CSRF token and rate limits and its alerts
panel fed by a real Prometheus."""
from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import yaml
from requests.adapters import HTTPAdapter

from charge_request_service import create_app
from charge_request_service.config import Settings
from charge_request_service.console.feed import Feed, StreamsFull
from charge_request_service.console.grid import limit_source_of, what_limits
from charge_request_service.console.logins import Logins, csrf_matches
from charge_request_service.console.routes import CONTENT_SECURITY_POLICY
from gridcommon.settings import SettingsError
from tests.harness import OPERATOR_TOKEN, Service, start_all, stop_all, wait_for
from tests.observability_support import Prometheus

# A port nothing listens on.
NOWHERE = "http://127.0.0.1:9"
SUBSTATION = {"id": "substation-1", "limit_kw": 100.0, "limit_source": "capacity"}


def session(**fields: object) -> dict[str, object]:
    return {"state": "charging", "allocated_kw": 5.0, "amount": 11.0, "minimum_kw": 1.4, **fields}


@pytest.mark.parametrize(
    ("fields", "substation", "rejected", "expected"),
    [
        ({"allocated_kw": 11.0}, SUBSTATION, False, "own_maximum"),
        ({"allocated_kw": 1.4}, SUBSTATION, False, "minimum_only"),
        ({"state": "suspended", "allocated_kw": 0.0}, SUBSTATION, False, "suspended"),
        ({}, SUBSTATION, False, "substation_limit"),
        ({}, {**SUBSTATION, "limit_source": "operator"}, False, "operator_limit"),
        ({"allocated_kw": 11.0}, SUBSTATION, True, "profile_rejected"),
    ],
)
def test_what_limits_a_session(fields: dict, substation: dict, rejected: bool, expected: str) -> None:
    code, sentence = what_limits(session(**fields), substation, rejected)
    assert code == expected and sentence


def test_the_source_of_a_limit_names_the_part_that_sets_it() -> None:
    parts = {"capacity_kw": 100.0, "generation_kw": 0.0, "storage_kw": 0.0, "peer_kw": 0.0}
    assert limit_source_of({"source": "operator", "parts": parts}, {}) == "operator"
    assert limit_source_of({"source": "substation", "parts": parts}, {}) == "capacity"
    assert limit_source_of({"source": "substation", "parts": {**parts, "generation_kw": 20.0}}, {}) == "generation"
    assert limit_source_of({"source": "substation", "parts": {**parts, "peer_kw": -5.0}}, {}) == "peers"


def test_logins_expire_when_idle_or_old_and_the_table_is_bounded() -> None:
    now = [0.0]
    logins = Logins(capacity=3, lifetime_seconds=100, idle_seconds=10, clock=lambda: now[0])
    first, login = logins.open()
    assert logins.find(first) is login and csrf_matches(login, login.csrf_token)
    assert not csrf_matches(login, "forged") and not csrf_matches(login, None)
    now[0] = 9.0
    assert logins.find(first) is login  # used: its idle clock starts again
    now[0] = 19.5
    assert logins.find(first) is None  # idle past 10 s
    kept, _ = logins.open()
    opened = now[0]
    while now[0] + 9 <= opened + 100:  # used every 9 s, never idle for long, until 99 s after it opened
        now[0] += 9
        assert logins.find(kept) is not None
    now[0] += 9  # past the 100 s lifetime
    assert logins.find(kept) is None
    ids = [logins.open()[0] for _ in range(5)]
    assert len(logins) == 3 and logins.find(ids[0]) is None and logins.find(ids[-1]) is not None


def test_one_gatherer_serves_every_stream_and_streams_are_bounded() -> None:
    taken = []

    def take() -> dict:
        taken.append(threading.current_thread().name)
        return {"n": len(taken)}

    feed = Feed(take, interval_seconds=0.05, max_streams=2)
    try:
        feed.open_stream()
        feed.open_stream()
        with pytest.raises(StreamsFull):
            feed.open_stream()
        results: list[list[int]] = [[], []]

        def follow(into: list[int]) -> None:
            number = 0
            for _ in range(5):
                number, _event = feed.next_event(number)
                into.append(number)

        readers = [threading.Thread(target=follow, args=(into,)) for into in results]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(timeout=5)
        assert all(len(into) == 5 for into in results)
        # Two streams, one snapshot per interval: the taker ran in one thread, not one per stream.
        assert set(taken) == {"console-feed"}
        started = time.monotonic()
        count = len(taken)
        time.sleep(0.5)
        assert len(taken) - count <= 0.5 / 0.05 + 2, "snapshots come no faster than the interval"
        assert time.monotonic() - started >= 0.5
        feed.close_stream()
        feed.open_stream()  # a closed stream's slot is free again
    finally:
        feed.stop()


def test_settings_refuse_a_gateway_url_that_is_not_one() -> None:
    with pytest.raises(SettingsError, match="GATEWAY_URL"):
        Settings.from_env({"GATEWAY_URL": "ftp://nowhere"})
    assert Settings.from_env({"PROMETHEUS_URL": "http://127.0.0.1:9090/"}).prometheus_url == "http://127.0.0.1:9090"
    unset = Settings.from_env({})
    assert unset.gateway_url == "" and unset.prometheus_url == ""
    assert Settings.from_env({"GATEWAY_URL": " "}).gateway_url == ""
    for name in ("GATEWAY_URL", "PROMETHEUS_URL"):
        with pytest.raises(SettingsError, match=f"{name} takes one base URL"):
            Settings.from_env({name: "http://127.0.0.1:9001,http://127.0.0.1:9002"})


def test_answers_carry_a_strict_csp_and_bad_input_is_a_clear_4xx() -> None:
    # No balancer answers there: the console's picture of the grid is empty.
    app = create_app(Settings(admin_token="operator", load_balancer_url=NOWHERE), start_background=False)
    client = app.test_client()
    form = client.get("/console/")
    assert form.status_code == 200 and b'name="token"' in form.data
    assert form.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY and "default-src 'self'" in CONTENT_SECURITY_POLICY
    login = client.post("/console/login", data={"token": "operator", "csrf_token": form_token(form.data.decode())})
    assert login.status_code == 303
    page = client.get("/console/")
    csrf = page.data.split(b'name="csrf-token" content="')[1].split(b'"')[0].decode()
    headers = {"X-CSRF-Token": csrf}
    bad_limit = client.post("/console/actions/limit", json={"substation": "x", "limit_kw": "lots"}, headers=headers)
    assert bad_limit.status_code == 400 and bad_limit.json["field"] == "limit_kw"
    unknown = client.post("/console/actions/limit", json={"substation": "x", "limit_kw": 5}, headers=headers)
    assert unknown.status_code == 404 and unknown.json["error"] == "substation_not_found"
    bad_id = client.post("/console/actions/stop", json={"substation": "x", "session_id": "<b>"}, headers=headers)
    assert bad_id.status_code == 400 and bad_id.json["field"] == "session_id"
    not_json = client.post("/console/actions/policy", data="policy=strict", headers=headers,
                           content_type="application/x-www-form-urlencoded")
    assert not_json.status_code == 415


def test_without_an_operator_token_the_console_is_off() -> None:
    client = create_app(Settings(admin_token="", load_balancer_url=NOWHERE), start_background=False).test_client()
    assert client.get("/console/").status_code == 403
    assert client.post("/console/login", data={"token": ""}).status_code == 403
    assert client.get("/console/snapshot").status_code == 401


# The real process ------------------------------------------------------------------

ALERT = "ConsoleTestAlwaysFiring"


def form_token(html: str) -> str:
    """The login form's hidden CSRF token, read as a browser would get it."""
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "the login form has no csrf_token field"
    return match.group(1)


class FromAddress(HTTPAdapter):
    """Connections from one loopback address, so the edge sees a client of that address."""

    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args: object, **kwargs: object) -> None:
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


def browser_from(address: str) -> requests.Session:
    client = requests.Session()
    client.mount("http://", FromAddress(address))
    return client


def try_login(base: str, address: str, token: str, **headers: str) -> requests.Response:
    """Open the form from ``address`` and post it, as a browser there would."""
    client = browser_from(address)
    form = client.get(f"{base}/console/", timeout=10)
    assert form.status_code == 200, form.text
    return client.post(f"{base}/console/login", data={"token": token, "csrf_token": form_token(form.text)},
                       headers=headers, allow_redirects=False, timeout=10)


@pytest.fixture
def charge_api(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    started: list[Service] = []

    def start(**env: str) -> Service:
        service = Service(name=f"charge-{len(started)}", app="charge_request_service:create_app()", log_dir=tmp_path,
                          env={"LOAD_BALANCER_URL": NOWHERE, "ADMIN_TOKEN": OPERATOR_TOKEN, **env})
        started.append(service)
        start_all([service])
        return service

    yield start
    stop_all(started)


@pytest.mark.integration
def test_the_login_form_carries_a_csrf_token_the_login_requires(charge_api: Callable[..., Service]) -> None:
    base = charge_api().url
    client = requests.Session()
    form = client.get(f"{base}/console/", timeout=10)
    token = form_token(form.text)
    assert "HttpOnly" in form.headers["Set-Cookie"] and "SameSite=Strict" in form.headers["Set-Cookie"]
    # A post from another site: the right operator token, but no form of this console behind it.
    for cookies, data in [
        ({}, {"token": OPERATOR_TOKEN}),
        ({}, {"token": OPERATOR_TOKEN, "csrf_token": token}),  # the field without its cookie
        (dict(client.cookies), {"token": OPERATOR_TOKEN}),  # the cookie without its field
        (dict(client.cookies), {"token": OPERATOR_TOKEN, "csrf_token": "f" * 64}),
        # Another form's field with this form's cookie.
        (dict(client.cookies), {"token": OPERATOR_TOKEN,
                                "csrf_token": form_token(requests.get(f"{base}/console/", timeout=10).text)}),
    ]:
        forged = requests.post(f"{base}/console/login", data=data, cookies=cookies, allow_redirects=False,
                               timeout=10)
        assert forged.status_code == 403, forged.text
        assert "console_login=" not in forged.headers.get("Set-Cookie", "")
        assert "stale or was not sent from this console" in forged.text
    as_json = requests.post(f"{base}/console/login", data={"token": OPERATOR_TOKEN},
                            headers={"Accept": "application/json"}, allow_redirects=False, timeout=10)
    assert as_json.status_code == 403 and as_json.json()["error"] == "csrf_token_mismatch"
    logged_in = client.post(f"{base}/console/login", data={"token": OPERATOR_TOKEN, "csrf_token": token},
                            allow_redirects=False, timeout=10)
    assert logged_in.status_code == 303 and "console_login" in client.cookies
    assert client.get(f"{base}/console/snapshot", timeout=10).status_code == 200


@pytest.mark.integration
def test_failed_logins_are_limited_per_client_address(charge_api: Callable[..., Service]) -> None:
    base = charge_api().url
    for _ in range(5):
        assert try_login(base, "127.0.0.2", "a-guess").status_code == 401
    # The sixth try is refused before its token is even compared: the right one too.
    refused = try_login(base, "127.0.0.2", OPERATOR_TOKEN)
    assert refused.status_code == 429 and "console_login=" not in refused.headers.get("Set-Cookie", "")
    retry_after = int(refused.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    assert "Too many failed console logins from this address" in refused.text
    assert re.search(r"Wait \d+ s", refused.text) and 'name="token"' in refused.text  # the form, to try later
    as_json = try_login(base, "127.0.0.2", OPERATOR_TOKEN, Accept="application/json")
    assert as_json.status_code == 429 and as_json.json()["error"] == "too_many_failed_logins"
    assert 1 <= as_json.json()["retry_after_seconds"] <= 60 and as_json.headers["Retry-After"]
    # Another address is not held back by this one's failures; right tokens do not count.
    for _ in range(6):
        assert try_login(base, "127.0.0.3", OPERATOR_TOKEN).status_code == 303


@pytest.mark.integration
def test_failed_logins_are_limited_in_all(charge_api: Callable[..., Service]) -> None:
    base = charge_api().url
    # Thirty failures, five from each of six addresses: none of them reaches its own limit.
    for host in range(1, 7):
        for _ in range(5):
            assert try_login(base, f"127.0.1.{host}", "a-guess").status_code == 401
    refused = try_login(base, "127.0.2.1", OPERATOR_TOKEN)
    assert refused.status_code == 429, refused.text
    assert "from all addresses together" in refused.text and int(refused.headers["Retry-After"]) >= 1


@pytest.mark.integration
def test_the_alerts_panel_shows_a_firing_alert_of_a_real_prometheus(
        tmp_path: Path, charge_api: Callable[..., Service]) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "console-test", "rules": [{
        "alert": ALERT, "expr": "vector(1) > 0", "for": "0s",
        "labels": {"severity": "warning"}, "annotations": {"summary": "Fires from the start."},
    }]}]}))
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    prometheus = Prometheus(workdir)
    try:
        prometheus.start({"global": {"evaluation_interval": "1s"}, "rule_files": [str(rules)]})
        base = charge_api(PROMETHEUS_URL=prometheus.url).url
        client = requests.Session()
        form = client.get(f"{base}/console/", timeout=10)
        assert client.post(f"{base}/console/login", data={"token": OPERATOR_TOKEN, "csrf_token": form_token(
            form.text)}, allow_redirects=False, timeout=10).status_code == 303

        def firing() -> list[dict]:
            panel = client.get(f"{base}/console/snapshot", timeout=10).json()["alerts"]
            assert panel["configured"] and panel["error"] is None, panel
            return [alert for alert in panel["alerts"] if alert["name"] == ALERT and alert["state"] == "firing"]

        # Prometheus evaluates every second; the console asks it every ALERTS_EVERY_SECONDS.
        wait_for(firing, timeout=30, what=f"{ALERT} firing in the console's snapshot")
        (alert,) = firing()
        assert alert["severity"] == "warning" and alert["summary"] == "Fires from the start."
        # Checked against Prometheus's own answer, not only the console's.
        assert ALERT in {a["labels"]["alertname"] for a in prometheus.api("alerts")["alerts"]}
    finally:
        prometheus.stop()
