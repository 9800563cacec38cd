"""The gateway's plain modules: passwords, the station registry, transactions and their durable store."""
from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path

import pytest

from charge_point_gateway.passwords import hash_password, password_problem, verify_password
from charge_point_gateway.registry import StationSpecError, parse_deployment, parse_station, station_id_problem
from charge_point_gateway.store import GatewayStore
from charge_point_gateway.transactions import (
    ActiveTransactions,
    Transaction,
    amps_to_kw,
    kw_to_amps,
    session_id_for,
    taper_decision,
    vehicle_id_for,
)
from gridcommon.validation import SESSION_ID_PATTERN, VEHICLE_ID_PATTERN

GOOD = {"substation_url": "http://127.0.0.1:5011", "phases": 3, "max_current_a": 32, "password": "x" * 16}


def test_passwords_are_salted_hashes_checked_exactly() -> None:
    first, second = hash_password("a-password-of-20-ch"), hash_password("a-password-of-20-ch")
    assert first != second and "a-password" not in first  # a salt of its own, no plain text
    assert verify_password("a-password-of-20-ch", first)
    assert not verify_password("a-password-of-20-cH", first)
    assert not verify_password("a-password-of-20-ch", "scrypt$garbage")
    assert password_problem("x" * 15) and password_problem("x" * 41) and password_problem(12345)
    assert password_problem("x" * 16) is None and password_problem("x" * 40) is None


@pytest.mark.parametrize("bad", ["x" * 49, "a:b", "", "with space", "ünï"])
def test_station_ids_outside_ocpp_identity_rules_are_refused(bad: str) -> None:
    assert station_id_problem(bad)


def test_a_station_description_names_the_field_that_is_wrong() -> None:
    station = parse_station("cp-1", GOOD)
    assert station.public() == {"station_id": "cp-1", "substation_url": "http://127.0.0.1:5011", "connectors": 1,
                                "phases": 3, "max_current_a": 32.0}
    for field, value in [("phases", 2), ("phases", True), ("max_current_a", 501), ("connectors", 33),
                         ("substation_url", "http://user@host"), ("password", "short"), ("surprise", 1)]:
        with pytest.raises(StationSpecError) as error:
            parse_station("cp-1", {**GOOD, field: value})
        assert error.value.field == field
    with pytest.raises(StationSpecError) as error:
        parse_deployment({"stations": [{"station_id": "ok", **GOOD}, {"station_id": "bad:id", **GOOD}]})
    assert "stations[1]" in str(error.value)
    assert [s.station_id for s in parse_deployment({"stations": [{"station_id": "ok", **GOOD}]})] == ["ok"]


def test_session_ids_are_deterministic_and_valid_at_the_substation() -> None:
    one = session_id_for("cp-1", "42")
    assert one == session_id_for("cp-1", "42") and SESSION_ID_PATTERN.fullmatch(one)
    assert one != session_id_for("cp-1", "43") and one != session_id_for("cp-2", "42")
    # No concatenation ambiguity: ("a-1", "2") and ("a", "1-2") differ.
    assert session_id_for("a-1", "2") != session_id_for("a", "1-2")
    assert vehicle_id_for("cp.1", 2, "TAG 1") == "cp_1-2" and vehicle_id_for("cp", 1, "TAG1") == "TAG1"
    assert VEHICLE_ID_PATTERN.fullmatch(vehicle_id_for("x" * 48, 32, None))
    # A re-created session's id: deterministic per generation, valid, and never an earlier generation's.
    generations = [session_id_for("cp-1", "42", n) for n in range(4)]
    assert generations[0] == one and len(set(generations)) == 4
    assert generations == [session_id_for("cp-1", "42", n) for n in range(4)]
    assert all(SESSION_ID_PATTERN.fullmatch(g) for g in generations)


def test_current_and_power_conversions_round_down_to_one_decimal() -> None:
    assert amps_to_kw(6, 3, 230) == pytest.approx(4.14)
    assert amps_to_kw(6, 1, 230) == pytest.approx(1.38)
    assert kw_to_amps(4.14, 3, 230, 32) == 6.0
    assert kw_to_amps(10.0, 3, 230, 32) == 14.4  # 14.49 A: rounded down, never drawing more than 10 kW
    assert amps_to_kw(kw_to_amps(10.0, 3, 230, 32), 3, 230) <= 10.0
    assert kw_to_amps(100.0, 3, 230, 32) == 32.0 and kw_to_amps(0.0, 3, 230, 32) == 0.0


def _transaction(**kwargs) -> Transaction:
    base = dict(session_id="s", station_id="cp", transaction_id="1", connector=1, id_tag="T", substation_url="u",
                phases=3, amount_kw=22.08, minimum_kw=4.14, started_at=0.0)
    return Transaction(**{**base, **kwargs})


def test_seq_no_gaps_are_counted_once() -> None:
    transaction = _transaction()
    assert [transaction.seq_no_gap(n) for n in (0, 1, 4, 3, 5, 9)] == [0, 0, 2, 0, 0, 3]
    assert transaction.seq_gaps == 5


def test_a_tapering_vehicle_gets_its_amount_lowered_then_restored() -> None:
    transaction = _transaction(allocated_kw=22.0, power_w=5000.0)
    decide = lambda now: taper_decision(transaction, 22.08, now, ratio=0.6, hold_seconds=60, margin_kw=1.0)  # noqa: E731
    assert decide(0).amount_kw is None  # below, but not for long yet
    lowered = decide(61)
    assert lowered.tapered and lowered.amount_kw == 6.0  # 5 kW drawn + 1 kW margin
    transaction.amount_kw, transaction.tapered, transaction.allocated_kw = 6.0, True, 6.0
    transaction.power_w = 5900.0  # drawing near its (lowered) allocation: it wants more again
    restored = decide(70)
    assert restored.amount_kw == 22.08 and not restored.tapered
    # Never below its own minimum.
    transaction.amount_kw, transaction.tapered, transaction.allocated_kw, transaction.power_w = 22.08, False, 22.0, 100.0
    transaction.below_since = None
    decide(100)
    assert decide(200).amount_kw == 4.14


def test_the_store_keeps_stations_and_transactions_through_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "gateway.sqlite3"
    store = GatewayStore(path)
    station = parse_station("cp-1", GOOD)
    assert store.put_station(station) is True and store.put_station(station) is False
    ids = [store.next_transaction_id() for _ in range(3)]
    assert ids == [1, 2, 3]
    transaction = _transaction(session_id=session_id_for("cp-1", "1"))
    store.save(transaction, start_key="cp-1|1|T|0|t")
    ended = _transaction(session_id="ended", transaction_id="2", ended_at=5.0)
    store.save(ended)
    store.close()
    again = GatewayStore(path)
    assert again.station("cp-1") == station
    assert [t.session_id for t in again.active_transactions()] == [transaction.session_id]
    assert again.by_start_key("cp-1|1|T|0|t") == transaction
    assert again.next_transaction_id() == 4  # never hands out an id twice
    assert again.delete_station("cp-1") and again.station("cp-1") is None
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    again.close()


def test_the_substation_session_id_follows_the_generation_and_survives_a_reopen(tmp_path: Path) -> None:
    transaction = _transaction(session_id=session_id_for("cp", "1"))
    assert transaction.substation_session_id == transaction.session_id
    transaction.generation = 2
    assert transaction.substation_session_id == session_id_for("cp", "1", 2) != transaction.session_id
    store = GatewayStore(tmp_path / "gateway.sqlite3")
    store.save(transaction)
    assert store.transaction(transaction.session_id).substation_session_id == session_id_for("cp", "1", 2)
    # A record written before generations existed loads as generation 0.
    record = json.loads(store._db.execute("SELECT record FROM transactions").fetchone()[0])
    del record["generation"]
    store._db.execute("UPDATE transactions SET record=?", (json.dumps(record),))
    assert store.transaction(transaction.session_id).generation == 0
    store.close()


def test_active_transactions_stay_indexed_by_substation_station_and_connector() -> None:
    rng = random.Random(5)
    index = ActiveTransactions()
    reference: dict[str, Transaction] = {}
    last_on: dict[tuple[str, int], Transaction] = {}  # the connector index holds the latest one there, while it runs
    urls, stations = ["http://a", "http://b", "http://c"], [f"cp-{n}" for n in range(6)]
    for number in range(2000):
        if reference and rng.random() < 0.45:
            key = rng.choice(sorted(reference))
            assert index.remove(key) is reference.pop(key)
        else:
            station = rng.choice(stations)
            transaction = _transaction(session_id=f"s{number}", station_id=station, transaction_id=str(number),
                                       connector=rng.randint(1, 2), substation_url=rng.choice(urls))
            # A connector runs one transaction: a new one there replaces the old in the connector index only.
            index.add(transaction)
            reference[transaction.session_id] = transaction
            last_on[(station, transaction.connector)] = transaction
        assert len(index) == len(reference)
        for url in urls:
            assert {t.session_id for t in index.of_substation(url)} == {
                k for k, t in reference.items() if t.substation_url == url}
        for station in stations:
            assert {t.session_id for t in index.of_station(station)} == {
                k for k, t in reference.items() if t.station_id == station}
            for connector in (1, 2):
                latest = last_on.get((station, connector))
                expected = latest if latest is not None and latest.session_id in reference else None
                assert index.on_connector(station, connector) is expected
    assert index.remove("no-such-key") is None
    # Adding a transaction again (a restore) does not leave a stale copy in another index.
    moved = _transaction(session_id="again", substation_url="http://a")
    index.add(moved)
    index.add(_transaction(session_id="again", substation_url="http://b"))
    assert "again" not in {t.session_id for t in index.of_substation("http://a")}
    assert "again" in {t.session_id for t in index.of_substation("http://b")}
