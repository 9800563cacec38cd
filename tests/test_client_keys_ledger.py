"""Client keys and their quota ledger, as plain Python: keys kept as hashes, quotas booked atomically."""
from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest

import charge_request_service.client_keys as client_keys
from charge_request_service.client_keys import (
    ClientKeys,
    KeyRequestError,
    QuotaExceeded,
    QuotaLedger,
    Quotas,
    Rejection,
    SessionState,
)
from charge_request_service.config import Settings
from charge_request_service.store import ChargeStore
from gridcommon.settings import SettingsError


def quotas(**given: float) -> Quotas:
    return Quotas.from_json(given)


def test_only_the_keys_hash_is_kept_and_it_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "charge.sqlite3"
    keys = ClientKeys(ChargeStore(path), max_keys=10)
    key, secret = keys.create("Fleet North", quotas(sessions=3))
    assert secret.startswith("sgk_") and len(secret) == 4 + 43
    assert keys.check(secret) == key
    reopened = ClientKeys(ChargeStore(path), max_keys=10)
    assert reopened.check(secret).quotas.sessions == 3
    on_disk = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert secret.encode() not in on_disk
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in on_disk


def test_a_rotated_key_stops_working_and_a_revoked_one_opens_nothing(tmp_path: Path) -> None:
    keys = ClientKeys(ChargeStore(tmp_path / "charge.sqlite3"), max_keys=10)
    key, old = keys.create("App", quotas())
    rotated, new = keys.rotate(key.key_id)
    assert rotated.key_id == key.key_id and new != old
    with pytest.raises(Rejection, match="unknown"):
        keys.check(old)
    assert keys.check(new).key_id == key.key_id
    keys.revoke(key.key_id)
    with pytest.raises(Rejection, match="revoked"):
        keys.check(new)
    with pytest.raises(KeyRequestError) as refused:
        keys.rotate(key.key_id)
    assert refused.value.error == "client_key_revoked"
    for wrong in ("", "sgk_", "sgk_" + "A" * 43, "x" * 5000, new[:-1]):
        with pytest.raises(Rejection):
            keys.check(wrong)


def test_active_keys_are_bounded_with_a_clear_refusal() -> None:
    keys = ClientKeys(None, max_keys=2)
    first, _ = keys.create("one", quotas())
    keys.create("two", quotas())
    with pytest.raises(KeyRequestError) as refused:
        keys.create("three", quotas())
    assert refused.value.status == 409 and "MAX_CLIENT_KEYS" in str(refused.value)
    keys.revoke(first.key_id)
    keys.create("three", quotas())


@pytest.mark.parametrize("given", [
    {"sessions": -1}, {"kw": float("nan")}, {"queued": 1.5}, {"requests_per_second": 0}, {"sessions": True},
    {"kw": "10"}, {"speed": 3}, {"kw": 10**9},
])
def test_bad_quotas_are_refused_by_name(given: dict) -> None:
    with pytest.raises(KeyRequestError) as refused:
        Quotas.from_json(given)
    assert refused.value.status == 400 and next(iter(given)) in str(refused.value)


def test_thirty_two_threads_racing_on_one_key_never_pass_its_quotas() -> None:
    held: set[str] = set()
    ledger = QuotaLedger(lambda session_id: ("active", 60.0) if session_id in held else None)
    key, _ = ClientKeys(None, max_keys=1).create("racer", quotas(sessions=5, kw=20))
    admitted: list[tuple[str, float]] = []
    refused: list[str] = []
    start = threading.Barrier(32)

    def ask(number: int) -> None:
        start.wait()
        session_id, kw = f"s-{number}", 3.0 + number % 4
        try:
            ledger.book(key, session_id, kw)
        except QuotaExceeded as exc:
            refused.append(exc.quota)
            return
        admitted.append((session_id, kw))
        held.add(session_id)
        ledger.settle(key.key_id, session_id, session_id)

    threads = [threading.Thread(target=ask, args=(number,)) for number in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(f"admitted {len(admitted)} sessions, {sum(kw for _, kw in admitted):g} kW; refused {len(refused)}")
    assert len(admitted) <= 5 and sum(kw for _, kw in admitted) <= 20
    assert admitted and len(admitted) + len(refused) == 32
    usage = ledger.usage([key.key_id])[key.key_id]
    assert usage.refusals["sessions"] + usage.refusals["kw"] == len(refused)


def test_a_booking_lasts_as_long_as_its_session() -> None:
    states: dict[str, SessionState] = {}
    ledger = QuotaLedger(states.get)
    key, _ = ClientKeys(None, max_keys=1).create("fleet", quotas(sessions=2, kw=50, queued=1))
    ledger.book(key, "a", 10)
    ledger.book(key, "b", 10)
    # Still being answered: counted although the service does not hold it yet.
    with pytest.raises(QuotaExceeded) as over:
        ledger.book(key, "c", 10)
    assert over.value.quota == "sessions"
    ledger.settle(key.key_id, "a", "a")
    ledger.settle(key.key_id, "b", "b-renamed")  # a retry renamed it
    states["a"] = ("active", 42.2)
    states["b-renamed"] = ("queued", None)
    with pytest.raises(QuotaExceeded) as over:
        ledger.book(key, "c", 10)
    assert over.value.retry_after == 43  # when its first session ends
    assert ledger.usage([key.key_id])[key.key_id].queued == 1
    del states["a"]  # it ended
    ledger.book(key, "c", 10)
    with pytest.raises(QuotaExceeded) as over:
        ledger.queue(key, "c", retry_after=1)
    assert over.value.quota == "queued"
    ledger.settle(key.key_id, "c", "c")  # refused: the service holds no session "c", so it is released
    usage = ledger.usage([key.key_id])[key.key_id]
    assert (usage.sessions, usage.kw, usage.queued) == (1, 10.0, 1)


class SharedStore:
    """A database several replicas write: what another replica wrote shows up here."""

    shared = True

    def __init__(self) -> None:
        self.rows: dict[str, object] = {}
        self.reads = 0

    def put_client_key(self, key) -> None:
        self.rows[key.key_id] = key

    def client_keys(self) -> list:
        self.reads += 1
        return list(self.rows.values())


def test_a_replica_sees_keys_another_one_created_or_revoked_and_guesses_cost_few_reads(monkeypatch) -> None:
    monkeypatch.setattr(client_keys, "RELOAD_SECONDS", 0.2)
    store = SharedStore()
    here, there = ClientKeys(store, max_keys=10), ClientKeys(store, max_keys=10)
    key, secret = there.create("elsewhere", quotas())
    reads = store.reads
    for _ in range(1000):  # a flood of guesses, meanwhile
        with pytest.raises(Rejection):
            here.check("sgk_" + "B" * 43)
    assert store.reads - reads <= 1
    time.sleep(0.25)
    assert here.check(secret).key_id == key.key_id
    there.revoke(key.key_id)
    time.sleep(0.25)
    with pytest.raises(Rejection, match="revoked"):
        here.check(secret)


@pytest.mark.parametrize(("env", "mode"), [
    ({}, "keys"), ({"HOST": "0.0.0.0"}, "keys"), ({"HOST": "10.0.0.5"}, "keys"), ({"HOST": "127.0.0.1"}, "open"),
    ({"HOST": "::1"}, "open"), ({"HOST": "localhost"}, "open"),
    ({"HOST": "127.0.0.1", "PUBLIC_API_AUTH": "keys"}, "keys"),
    ({"HOST": "0.0.0.0", "PUBLIC_API_AUTH": "open"}, "open"),
])
def test_keys_are_needed_by_default_wherever_anyone_but_this_machine_can_reach_the_api(env: dict, mode: str) -> None:
    assert Settings.from_env(env).public_api_auth == mode


def test_an_unknown_mode_is_refused_by_name() -> None:
    with pytest.raises(SettingsError, match="PUBLIC_API_AUTH"):
        Settings.from_env({"PUBLIC_API_AUTH": "maybe"})
