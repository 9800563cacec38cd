"""The gateway's OCPP endpoint as a real process over real WebSockets: handshakes, messages, hostile frames.

No substation is needed here: the stations are registered against a URL nobody answers,
so these tests see the OCPP side alone (the watcher's failed polls only log).
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import ssl
import time
from pathlib import Path

import pytest
import requests
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.harness import OPERATOR, free_port, wait_for
from tests.ocpp_support import PASSWORD, Gateway, Station16, Station201, basic, connect, make_certificate, metric_sum

pytestmark = pytest.mark.integration

NOWHERE = f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory):
    gw = Gateway(tmp_path_factory.mktemp("gateway"), env={
        "CALLS_PER_SECOND": "5", "CALL_BURST": "10", "MAX_MESSAGE_BYTES": "4096", "ID_TAGS": "TAG1",
        "AUTHORIZE_ALL": "false",
    }).start()
    for station_id in ("cp16", "cp201", "flood", "hostile", "twice", "other"):
        gw.register(station_id, NOWHERE)
    yield gw
    gw.stop()


def test_boot_heartbeat_authorize_and_fallback_profile_on_1_6(gateway: Gateway) -> None:
    async def scenario() -> None:
        async with await connect(gateway.ws_url("cp16"), "cp16", "ocpp1.6") as ws:
            assert ws.subprotocol == "ocpp1.6"
            station = Station16("cp16", ws)
            loop = asyncio.create_task(station.start())
            boot = await station.boot()
            assert boot.status == "Accepted" and boot.interval > 0
            # What every station gets at boot, phases explicit: a TxDefaultProfile of 0 A (a new transaction
            # waits for its own profile) and a cap on the whole station at its registered maximum.
            await asyncio.wait_for(_until(lambda: station.station_cap_a is not None), 10)
            assert station.default_a == 0.0 and station.station_cap_a == 32.0
            assert [purpose for _, purpose, _ in station.profiles_received] == [
                "TxDefaultProfile", "ChargePointMaxProfile"]
            from ocpp.v16 import call as call16
            assert (await station.call(call16.Heartbeat())).current_time
            assert (await station.call(call16.Authorize(id_tag="TAG1"))).id_tag_info["status"] == "Accepted"
            assert (await station.call(call16.Authorize(id_tag="STRANGER"))).id_tag_info["status"] == "Invalid"
            status = await station.call(call16.StatusNotification(connector_id=1, error_code="NoError",
                                                                  status="Available"))
            assert status is not None
            loop.cancel()

    asyncio.run(scenario())
    view = gateway.stations()["cp16"]
    assert view["protocol"] == "ocpp1.6" and "password" not in json.dumps(view)


def test_boot_heartbeat_authorize_and_fallback_profile_on_2_0_1(gateway: Gateway) -> None:
    async def scenario() -> None:
        async with await connect(gateway.ws_url("cp201"), "cp201", "ocpp2.0.1") as ws:
            station = Station201("cp201", ws)
            loop = asyncio.create_task(station.start())
            assert (await station.boot()).status == "Accepted"
            await asyncio.wait_for(_until(lambda: station.station_cap_a is not None), 10)
            assert station.default_a == 0.0 and station.station_cap_a == 32.0
            assert [purpose for _, purpose, _ in station.profiles_received] == [
                "TxDefaultProfile", "ChargingStationMaxProfile"]
            from ocpp.v201 import call as call201
            assert (await station.call(call201.Heartbeat())).current_time
            token = await station.call(call201.Authorize(id_token={"id_token": "TAG1", "type": "ISO14443"}))
            assert token.id_token_info["status"] == "Accepted"
            token = await station.call(call201.Authorize(id_token={"id_token": "NOPE", "type": "ISO14443"}))
            assert token.id_token_info["status"] == "Invalid"
            loop.cancel()

    asyncio.run(scenario())
    assert gateway.stations()["cp201"]["protocol"] == "ocpp2.0.1"


def test_a_fallback_answered_with_a_call_error_is_counted_and_reconciliation_still_runs(gateway: Gateway) -> None:
    def fallback_refusals() -> float:
        page = requests.get(f"{gateway.http}/metrics", timeout=5).text
        return metric_sum(page, "gateway_profiles_rejected_total", kind="fallback")

    before = fallback_refusals()

    async def scenario() -> None:
        async with await connect(gateway.ws_url("other"), "other", "ocpp2.0.1") as ws:
            station = Station201("other", ws)
            station.fallback_call_error = True
            loop = asyncio.create_task(station.start())
            await station.start_transaction(1, "gone-1", id_token="TAG1")
            assert [t["transaction_id"] for t in gateway.stations()["other"]["transactions"]] == ["gone-1"]
            # The station restarts and has lost the transaction; at boot it answers the TxDefaultProfile with
            # a CALLERROR. The gateway still asks it about the transaction (GetTransactionStatus) and ends it.
            station.running.clear()
            assert (await station.boot()).status == "Accepted"
            await asyncio.wait_for(_until(lambda: not gateway.stations()["other"]["transactions"]), 10)
            assert [purpose for _, purpose, _ in station.profiles_received] == ["TxDefaultProfile"]
            loop.cancel()

    asyncio.run(scenario())
    assert fallback_refusals() == before + 1
    page = requests.get(f"{gateway.http}/metrics", timeout=5).text
    assert metric_sum(page, "gateway_ocpp_messages_total", action="SetChargingProfile", result="error") >= 1
    assert "station other refused the fallback profiles (it answered NotSupportedError" in gateway.log_text()
    assert "no longer runs transaction gone-1" in gateway.log_text()


def test_the_fallback_settings_reach_the_station_capped_at_its_maximum(tmp_path: Path) -> None:
    gw = Gateway(tmp_path / "fallback", env={"FALLBACK_CURRENT_A": "6", "STATION_MAX_CURRENT_A": "16"}).start()
    try:
        gw.register("big", NOWHERE, max_current_a=32)
        gw.register("small", NOWHERE, max_current_a=10)

        async def boot(name: str) -> tuple[float | None, float | None]:
            async with await connect(gw.ws_url(name), name, "ocpp1.6") as ws:
                station = Station16(name, ws)
                loop = asyncio.create_task(station.start())
                await station.boot()
                await asyncio.wait_for(_until(lambda: station.station_cap_a is not None), 10)
                loop.cancel()
                return station.default_a, station.station_cap_a

        assert asyncio.run(boot("big")) == (6.0, 16.0)
        assert asyncio.run(boot("small")) == (6.0, 10.0)  # never above what it is registered for
    finally:
        gw.stop()


def test_unknown_id_tags_start_no_transaction(gateway: Gateway) -> None:
    async def scenario() -> tuple[str, str]:
        from ocpp.v16 import call as call16
        from ocpp.v201 import call as call201
        async with await connect(gateway.ws_url("cp16"), "cp16", "ocpp1.6") as ws16, \
                await connect(gateway.ws_url("cp201"), "cp201", "ocpp2.0.1") as ws201:
            s16, s201 = Station16("cp16", ws16), Station201("cp201", ws201)
            loops = [asyncio.create_task(s16.start()), asyncio.create_task(s201.start())]
            start = await s16.call(call16.StartTransaction(connector_id=1, id_tag="STRANGER", meter_start=0,
                                                           timestamp="2030-01-01T00:00:00Z"))
            event = await s201.call(call201.TransactionEvent(
                event_type="Started", timestamp="2030-01-01T00:00:00Z", trigger_reason="Authorized", seq_no=0,
                transaction_info={"transaction_id": "nope-1"}, evse={"id": 1},
                id_token={"id_token": "STRANGER", "type": "ISO14443"}))
            for loop in loops:
                loop.cancel()
            return start.id_tag_info["status"], event.id_token_info["status"]

    assert asyncio.run(scenario()) == ("Invalid", "Invalid")
    stations = gateway.stations()
    assert stations["cp16"]["transactions"] == [] and stations["cp201"]["transactions"] == []


def _status_of_handshake(url: str, headers: dict[str, str], subprotocols: list[str] | None) -> int:
    async def attempt() -> int:
        try:
            ws = await websockets.connect(url, subprotocols=subprotocols, additional_headers=headers, open_timeout=10)
        except InvalidStatus as refused:
            return refused.response.status_code
        await ws.close()
        return 101

    return asyncio.run(attempt())


@pytest.mark.parametrize(
    ("path", "user", "password", "subprotocols", "status"),
    [
        ("cp16", "cp16", PASSWORD, ["ocpp1.6"], 101),
        ("unknown-station", "unknown-station", PASSWORD, ["ocpp1.6"], 404),
        ("cp16", "cp16", "wrong-password-of-20", ["ocpp1.6"], 401),
        ("cp16", None, None, ["ocpp1.6"], 401),
        ("cp16", "cp201", PASSWORD, ["ocpp1.6"], 403),  # another station's credentials
        ("x" * 49, "x" * 49, PASSWORD, ["ocpp1.6"], 404),
        ("cp%3A16", "cp16", PASSWORD, ["ocpp1.6"], 404),
        ("cp:16", "cp16", PASSWORD, ["ocpp1.6"], 404),
        ("cp16", "cp16", PASSWORD, None, 400),
        ("cp16", "cp16", PASSWORD, ["ocpp1.5"], 400),
    ],
    ids=["accepted", "unknown", "wrong-password", "no-credentials", "other-station", "id-too-long",
         "id-with-escaped-colon", "id-with-colon", "no-subprotocol", "wrong-subprotocol"],
)
def test_handshake_refusals(gateway: Gateway, path: str, user: str | None, password: str | None,
                            subprotocols: list[str] | None, status: int) -> None:
    headers = basic(user, password) if user else {}
    assert _status_of_handshake(f"ws://127.0.0.1:{gateway.ocpp_port}/{path}", headers, subprotocols) == status


def test_refused_handshakes_are_counted(gateway: Gateway) -> None:
    _status_of_handshake(gateway.ws_url("cp16"), basic("cp16", "wrong-password-of-20"), ["ocpp1.6"])
    page = requests.get(f"{gateway.http}/metrics", timeout=5).text
    assert metric_sum(page, "gateway_handshakes_refused_total", reason="wrong_password") >= 1


async def _raw(ws: websockets.ClientConnection, frame: str) -> list:
    await ws.send(frame)
    while True:
        answer = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if answer[0] in (3, 4):  # skip the gateway's own CALLs (the fallback profile)
            return answer
        await ws.send(json.dumps([3, answer[1], {"status": "Accepted"}]))


def test_hostile_frames_get_the_right_call_errors(gateway: Gateway) -> None:
    async def scenario() -> None:
        async with await connect(gateway.ws_url("hostile"), "hostile", "ocpp2.0.1") as ws:
            answer = await _raw(ws, "{this is not json")
            assert answer[0] == 4 and answer[1] == "-1" and answer[2] == "RpcFrameworkError"
            answer = await _raw(ws, json.dumps({"not": "a list"}))
            assert answer[0] == 4 and answer[2] == "RpcFrameworkError"
            # An action OCPP 2.0.1 does not have, and one it has that the gateway does not handle.
            answer = await _raw(ws, json.dumps([2, "u1", "NoSuchAction", {}]))
            assert answer[:3] == [4, "u1", "NotSupported"]
            answer = await _raw(ws, json.dumps([2, "u1b", "FirmwareStatusNotification", {"status": "Idle"}]))
            assert answer[:3] == [4, "u1b", "NotImplemented"]
            # Schema-invalid: a required field missing, a wrong type.
            answer = await _raw(ws, json.dumps([2, "u2", "BootNotification", {"reason": "PowerUp"}]))
            assert answer[:3] == [4, "u2", "ProtocolError"] or answer[:3] == [4, "u2", "FormationViolation"]
            answer = await _raw(ws, json.dumps([2, "u3", "Heartbeat", {"customData": 5}]))
            assert answer[0] == 4 and answer[1] == "u3" and answer[2] in {"TypeConstraintViolation",
                                                                          "FormatViolation"}
            answer = await _raw(ws, json.dumps([2, "u4", "Heartbeat", {}]))
            assert answer[:2] == [3, "u4"] and "currentTime" in answer[2]
            # An oversized frame closes the connection with 1009.
            await ws.send(json.dumps([2, "u5", "Heartbeat", {"pad": "x" * 8000}]))
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009

    asyncio.run(scenario())


def test_malformed_frames_on_1_6_are_protocol_errors(gateway: Gateway) -> None:
    async def scenario() -> None:
        async with await connect(gateway.ws_url("cp16"), "cp16", "ocpp1.6") as ws:
            answer = await _raw(ws, "[2, ")
            assert answer[:3] == [4, "-1", "ProtocolError"]
            answer = await _raw(ws, json.dumps([2, "u1", "StartTransaction", {"connectorId": "one"}]))
            assert answer[0] == 4 and answer[1] == "u1"
            # A station that keeps sending garbage is closed (1002) rather than answered forever.
            with pytest.raises(ConnectionClosed) as closed:
                for _ in range(20):
                    await _raw(ws, "garbage")
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1002

    asyncio.run(scenario())


def test_a_call_flood_is_refused_then_closed(gateway: Gateway) -> None:
    async def scenario() -> tuple[int, int, int | None]:
        async with await connect(gateway.ws_url("flood"), "flood", "ocpp1.6") as ws:
            ok = refused = 0
            code = None
            for number in range(200):
                try:
                    await ws.send(json.dumps([2, f"f{number}", "Heartbeat", {}]))
                except ConnectionClosed as closed:
                    code = closed.rcvd.code if closed.rcvd else None
                    break
            try:
                while True:
                    answer = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    if answer[0] == 3 and answer[1].startswith("f"):
                        ok += 1
                    elif answer[0] == 4 and answer[2] == "GenericError":
                        refused += 1
                    elif answer[0] == 2:
                        await ws.send(json.dumps([3, answer[1], {"status": "Accepted"}]))
            except ConnectionClosed as closed:
                code = closed.rcvd.code if closed.rcvd else code
            return ok, refused, code

    ok, refused, code = asyncio.run(scenario())
    # The burst (10) passes, then a few more at 5/s; the rest are refused, then the connection closes.
    assert 10 <= ok < 40 and refused >= 10
    assert code == 1008
    page = requests.get(f"{gateway.http}/metrics", timeout=5).text
    assert metric_sum(page, "gateway_ocpp_messages_total", action="Heartbeat", result="rate_limited") >= refused


def test_a_station_connecting_again_replaces_its_earlier_connection(gateway: Gateway) -> None:
    async def scenario() -> int | None:
        first = await connect(gateway.ws_url("twice"), "twice", "ocpp1.6")
        second = await connect(gateway.ws_url("twice"), "twice", "ocpp1.6")
        try:
            await asyncio.wait_for(first.wait_closed(), 10)
            assert second.state.name == "OPEN"
            return first.close_code
        finally:
            await second.close()

    assert asyncio.run(scenario()) == 1000


def test_operator_api_needs_the_token_and_never_returns_the_password(gateway: Gateway) -> None:
    url = f"{gateway.http}/stations/new-one"
    body = {"substation_url": NOWHERE, "phases": 3, "max_current_a": 16, "password": PASSWORD}
    assert requests.put(url, json=body, timeout=5).status_code == 401
    wrong = requests.put(url, json=body, headers={"Authorization": "Bearer nope"}, timeout=5)
    assert wrong.status_code == 401 and wrong.json()["error"] == "unauthorized"
    created = requests.put(url, json=body, headers=OPERATOR, timeout=5)
    assert created.status_code == 201 and "password" not in created.text
    assert requests.put(url, json=body, headers=OPERATOR, timeout=5).status_code == 200
    for field, value in [("password", "short"), ("phases", 2), ("max_current_a", 5), ("substation_url", "ftp://x"),
                         ("connectors", 0)]:
        bad = requests.put(url, json={**body, field: value}, headers=OPERATOR, timeout=5)
        assert bad.status_code == 400 and bad.json()["field"] == field, bad.text
    bad = requests.put(f"{gateway.http}/stations/{'y' * 49}", json=body, headers=OPERATOR, timeout=5)
    assert bad.status_code == 400 and bad.json()["field"] == "station_id"
    garbage = requests.put(url, data=b"\xff{", headers=OPERATOR, timeout=5)
    assert garbage.status_code == 400 and garbage.json()["error"] == "invalid_json"
    shown = requests.get(url, timeout=5).json()
    assert shown["max_current_a"] == 16 and "password" not in json.dumps(shown)
    assert requests.delete(url, headers=OPERATOR, timeout=5).status_code == 200
    assert requests.get(url, timeout=5).status_code == 404
    assert requests.delete(url, headers=OPERATOR, timeout=5).status_code == 404
    assert requests.get(f"{gateway.http}/no/such/path", timeout=5).json()["error"] == "not_found"


@pytest.mark.parametrize("cap", ["MAX_CONNECTIONS_PER_ADDRESS", "MAX_CONNECTIONS"])
def test_connection_caps_refuse_with_503(tmp_path: Path, cap: str) -> None:
    gw = Gateway(tmp_path / "caps", env={cap: "2", "OPEN_TIMEOUT_SECONDS": "1"}).start()
    try:
        for name in ("a1", "a2", "a3"):
            gw.register(name, NOWHERE)

        async def scenario() -> int:
            held = [await connect(gw.ws_url(name), name, "ocpp1.6") for name in ("a1", "a2")]
            try:
                await connect(gw.ws_url("a3"), "a3", "ocpp1.6")
            except InvalidStatus as refused:
                return refused.response.status_code
            finally:
                for ws in held:
                    await ws.close()
            return 101

        assert asyncio.run(scenario()) == 503
        # A client that opens a socket and never sends its handshake is dropped after OPEN_TIMEOUT_SECONDS.
        with socket.create_connection(("127.0.0.1", gw.ocpp_port), timeout=10) as idle:
            started = time.monotonic()
            assert idle.recv(1024) == b""  # closed by the gateway
            assert time.monotonic() - started < 5
    finally:
        gw.stop()


def test_connections_waiting_for_their_handshake_are_bounded_per_address_and_in_all(tmp_path: Path) -> None:
    gw = Gateway(tmp_path / "waiting", env={"MAX_HANDSHAKING": "6", "MAX_HANDSHAKING_PER_ADDRESS": "4",
                                           "OPEN_TIMEOUT_SECONDS": "30"}).start()
    idle: list[socket.socket] = []

    def open_from(source: str) -> socket.socket:
        sock = socket.socket()
        sock.bind((source, 0))
        sock.settimeout(5)
        sock.connect(("127.0.0.1", gw.ocpp_port))
        return sock

    def answer_to(sock: socket.socket) -> bytes:
        """What the gateway says at once, before any request is sent; b"" if it says nothing within 0.5 s."""
        sock.settimeout(0.5)
        try:
            return sock.recv(4096)
        except TimeoutError:
            return b""

    async def station_status() -> int:
        try:
            async with await connect(gw.ws_url("waiter"), "waiter", "ocpp1.6"):
                return 101
        except InvalidStatus as refused:
            return refused.response.status_code

    try:
        gw.register("waiter", NOWHERE)
        idle += [open_from("127.0.0.2") for _ in range(4)]
        assert all(answer_to(sock) == b"" for sock in idle)  # waiting for their handshake, as any client may
        with open_from("127.0.0.2") as fifth:
            refused = answer_to(fifth)
        assert refused.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 5" in refused, refused
        assert b"127.0.0.2 has 4 connections waiting for their handshake" in refused
        idle += [open_from("127.0.0.3") for _ in range(2)]
        with open_from("127.0.0.4") as seventh:
            refused = answer_to(seventh)
        assert refused.startswith(b"HTTP/1.1 503 ") and b"gateway has 6 connections waiting" in refused, refused
        assert asyncio.run(station_status()) == 503  # every place is taken, a station's too

        for sock in idle[:2]:  # two idle clients go: their places are free again
            sock.close()
        wait_for(lambda: asyncio.run(station_status()) == 101, 5, "a station to connect once places were free")
        # A station's handshake done, its place is given back: another client may wait in it.
        with open_from("127.0.0.4") as another:
            assert answer_to(another) == b""
        page = requests.get(f"{gw.http}/metrics", timeout=5).text
        assert metric_sum(page, "gateway_handshakes_refused_total", reason="address_handshaking_capacity") == 1
        assert metric_sum(page, "gateway_handshakes_refused_total", reason="handshaking_capacity") >= 2
        assert "Traceback" not in gw.log_text()
    finally:
        for sock in idle:
            sock.close()
        gw.stop()


def test_tls_with_a_self_signed_certificate(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    gw = Gateway(tmp_path / "tls", env={"TLS_CERT_FILE": str(cert), "TLS_KEY_FILE": str(key)}).start()
    try:
        gw.register("secure", NOWHERE)
        context = ssl.create_default_context(cafile=str(cert))

        async def scenario() -> str:
            async with await connect(gw.ws_url("secure", "wss"), "secure", "ocpp2.0.1", ssl_context=context) as ws:
                station = Station201("secure", ws)
                loop = asyncio.create_task(station.start())
                status = (await station.boot()).status
                loop.cancel()
                return status

        assert asyncio.run(scenario()) == "Accepted"
        # Plain ws:// to a TLS port is no OCPP connection at all.
        with pytest.raises(Exception):
            asyncio.run(connect(gw.ws_url("secure"), "secure", "ocpp2.0.1"))
    finally:
        gw.stop()


async def _until(condition, interval: float = 0.02) -> None:  # noqa: ANN001 - any predicate
    while not condition():
        await asyncio.sleep(interval)


def test_a_half_open_connection_is_dropped_by_the_keepalive(tmp_path: Path) -> None:
    gw = Gateway(tmp_path / "ping", env={"PING_INTERVAL_SECONDS": "0.5", "PING_TIMEOUT_SECONDS": "0.5"}).start()
    try:
        gw.register("silent", NOWHERE)
        with socket.create_connection(("127.0.0.1", gw.ocpp_port), timeout=10) as raw:
            # A real handshake, then silence: no pong ever, as from a station whose network vanished.
            key = base64.b64encode(os.urandom(16)).decode()
            headers = "".join(f"{name}: {value}\r\n" for name, value in {
                "Host": f"127.0.0.1:{gw.ocpp_port}", "Upgrade": "websocket", "Connection": "Upgrade",
                "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13", "Sec-WebSocket-Protocol": "ocpp1.6",
                **basic("silent"),
            }.items())
            raw.sendall(f"GET /silent HTTP/1.1\r\n{headers}\r\n".encode())
            assert raw.recv(4096).startswith(b"HTTP/1.1 101")
            wait_for(lambda: gw.stations()["silent"]["connected"], 5, "the gateway holds the connection")
            started = time.monotonic()
            wait_for(lambda: not gw.stations()["silent"]["connected"], 10, "the keep-alive drops it")
            assert time.monotonic() - started < 5
    finally:
        gw.stop()

