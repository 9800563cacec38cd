"""The charge API's records: group commit keeps every write's promise on SQLite; the schema migrates from the
previous release; the database itself keeps one open session per vehicle, one winner of a race, one lease
holder, one idempotency claim and one queue order, on SQLite and on a real PostgreSQL."""
from __future__ import annotations

import sqlite3
from pathlib import Path

from datetime import datetime, timezone

import psycopg
import pytest

from charge_request_service.database import SCHEMA_VERSION, schema_version
from charge_request_service.idempotency import Idempotency, KeyBusy, KeyMisused, fingerprint
from charge_request_service.queue import QueueFull, SharedQueue
from charge_request_service.sessions import SessionTracker, SharedSessionTracker
from charge_request_service.store import ChargeStore, OwnerQuotas, QuotaExceeded, StoreError, StoredAnswer
from gridcommon.validation import ChargeRequest
from tests.harness import all_at_once
from tests.postgres_support import ChargeRecords, PostgresServer


def rows(path: Path, table: str) -> int:
    """Counted through a connection of its own: what is committed, not what the store believes."""
    with sqlite3.connect(path) as db:
        return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_every_write_is_committed_when_its_writer_returns(tmp_path: Path) -> None:
    path = tmp_path / "charge.sqlite3"
    tracker = SessionTracker(store=ChargeStore(path))
    missing: list[str] = []

    def writer(number: int) -> None:
        for index in range(50):
            session_id = f"s-{number}-{index}"
            tracker.reserve(session_id, f"ev-{number}-{index}", 7.0)
            with sqlite3.connect(path) as db:
                if db.execute("SELECT state FROM sessions WHERE session_id = ?", (session_id,)).fetchone() != (
                    "pending",
                ):
                    missing.append(session_id)

    all_at_once(16, writer)

    assert missing == []
    assert rows(path, "sessions") == 16 * 50
    reopened = SessionTracker(store=ChargeStore(path))
    assert len(reopened.load()[0]) == 16 * 50  # a restart finds every pending request


def test_writers_whose_batch_failed_all_hear_of_it_and_the_next_batch_succeeds(tmp_path: Path) -> None:
    path = tmp_path / "charge.sqlite3"
    store = ChargeStore(path)
    with sqlite3.connect(path) as other:
        other.execute("DROP TABLE idempotency")  # the file changes under the service: every write to it fails
    outcomes: list[str] = []

    def writer(number: int) -> None:
        try:
            store.put_answer(f"key-{number}", StoredAnswer("print", 201, {"n": number}, {}, 1.0))
            outcomes.append("written")
        except StoreError as exc:
            assert "could not write the state file" in str(exc)
            outcomes.append("refused")

    all_at_once(8, writer)
    assert outcomes == ["refused"] * 8

    store.put_session("s-1", "ev-1", "pending", {"session_id": "s-1"}, 1.0)
    assert rows(path, "sessions") == 1


def test_writes_inside_a_batch_wait_for_its_end(tmp_path: Path) -> None:
    path = tmp_path / "charge.sqlite3"
    store = ChargeStore(path)
    with store.batch():
        store.put_session("s-1", "ev-1", "pending", {"session_id": "s-1"}, 1.0)
        store.put_session("s-1", "ev-1", "active", {"session_id": "s-1"}, 2.0)
        assert rows(path, "sessions") == 0  # queued, not yet committed
    assert rows(path, "sessions") == 1
    with pytest.raises(RuntimeError), store.batch():
        store.drop_session("s-1")
        raise RuntimeError("the caller failed after writing")
    assert rows(path, "sessions") == 0  # what was queued is committed even so


# ----- migrations ----------------------------------------------------------------------------------

# A state file written by the release before DATABASE_URL (schema version 1), as `sqlite3 .dump` prints it.
PREVIOUS_RELEASE_DUMP = Path(__file__).with_name("charge_state_v1.sql")


def test_a_state_file_of_the_previous_release_keeps_every_session_and_answer(tmp_path: Path) -> None:
    path = tmp_path / "charge.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(PREVIOUS_RELEASE_DUMP.read_text())
    with sqlite3.connect(path) as db:
        before = {row[0]: row[1:] for row in db.execute("SELECT session_id, vehicle_id, state, record FROM sessions")}
        answers = db.execute("SELECT key, fingerprint, status, answer FROM idempotency ORDER BY key").fetchall()
    assert len(before) == 8 and len(answers) == 2

    store = ChargeStore(path)
    assert schema_version(store._database) == SCHEMA_VERSION
    with sqlite3.connect(path) as db:  # every row, unchanged, and the end of each active session as a column
        after = {row[0]: row[1:] for row in db.execute("SELECT session_id, vehicle_id, state, record FROM sessions")}
        due = dict(db.execute("SELECT session_id, due_at FROM sessions WHERE state = 'active'").fetchall())
        assert db.execute("SELECT key, fingerprint, status, answer FROM idempotency ORDER BY key").fetchall() == answers
    assert after == before
    assert due == {f"active-{index}": datetime(2099, 1, 1, tzinfo=timezone.utc).timestamp() for index in range(3)}

    tracker = SessionTracker(store=store)
    pending, queued = tracker.load()
    assert [p.session_id for p in pending] == ["pending-0"]
    assert sorted(record["request"]["session_id"] for record in queued) == ["queued-0", "queued-1"]
    assert {s.session_id for s in tracker.active()} == {"active-0", "active-1", "active-2"}
    stopped = tracker.finished("stopped-0")
    assert (stopped.state, stopped.final["energy_kwh"], stopped.token_digest) == ("stopped", 0.5, "digest-stopped-0")
    assert tracker.finished("cancelled-0").state == "cancelled"
    assert store.answer("key-201").body == {"session_id": "active-0"}
    assert store.answer("key-422").status == 422
    # The vehicle of an active session from the old file is held by the new constraint too.
    holder = store.claim_vehicle("another", "ev-active-0", {"session_id": "another"}, 1.0)
    assert holder is not None and holder.session_id == "active-0"
    store.close()
    assert schema_version(ChargeStore(path)._database) == SCHEMA_VERSION  # opened again: nothing left to migrate


def test_a_database_of_a_newer_release_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "charge.sqlite3"
    ChargeStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE schema_version SET version = version + 1")
    with pytest.raises(StoreError, match="newer than this release knows"):
        ChargeStore(path)


# ----- guarantees the database keeps, on SQLite and PostgreSQL -------------------------------------


def open_rows(target: Path | str, vehicle_id: str) -> list[str]:
    """The open sessions of a vehicle, read through a connection of the test's own."""
    sql = "SELECT session_id FROM sessions WHERE vehicle_id = '%s' AND state IN ('pending', 'queued', 'active')"
    if isinstance(target, Path):
        with sqlite3.connect(target) as db:
            return [row[0] for row in db.execute(sql % vehicle_id)]
    with psycopg.connect(target) as db:
        return [row[0] for row in db.execute(sql % vehicle_id)]


def test_one_open_session_per_vehicle_is_a_database_constraint(tmp_path: Path, charge_records: ChargeRecords) -> None:
    target = charge_records.store_target(tmp_path)
    stores = [ChargeStore(target) for _ in range(2)]  # two replicas' connections
    won: list[str] = []

    def claim(number: int) -> None:
        session_id = f"s-{number}"
        if stores[number % 2].claim_vehicle(session_id, "ev-1", {"session_id": session_id}, 1.0) is None:
            won.append(session_id)

    all_at_once(16, claim)
    assert len(won) == 1
    assert open_rows(target, "ev-1") == won
    # Once it is finished, the vehicle may have a new one.
    assert stores[1].change_session(won[0], ("pending",), "ended", {"session_id": won[0]}, 2.0)
    assert stores[0].claim_vehicle("s-next", "ev-1", {"session_id": "s-next"}, 3.0) is None
    assert open_rows(target, "ev-1") == ["s-next"]


def test_a_change_two_replicas_race_on_is_made_once(tmp_path: Path, charge_records: ChargeRecords) -> None:
    target = charge_records.store_target(tmp_path)
    stores = [ChargeStore(target) for _ in range(2)]
    stores[0].put_session("s-1", "ev-1", "active", {"session_id": "s-1"}, 1.0, due_at=100.0)
    outcomes: list[bool] = []
    all_at_once(8, lambda number: outcomes.append(
        stores[number % 2].change_session("s-1", ("active",), "stopped", {"by": number}, 2.0)))
    assert sorted(outcomes) == [False] * 7 + [True]
    assert stores[1].session("s-1").state == "stopped"


def test_finished_sessions_stay_for_their_retention_and_bound(tmp_path: Path, charge_records: ChargeRecords) -> None:
    day = 86_400.0
    store = ChargeStore(charge_records.store_target(tmp_path), finished_retention_seconds=90 * day, finished_kept=3)
    now = 1_000 * day
    for index, age_days in enumerate([100, 80, 60, 40, 20, 10]):
        store.put_session(f"done-{index}", f"ev-{index}", "ended", {"n": index}, now - age_days * day)
    store.put_session("running", "ev-running", "active", {"n": 9}, now - 200 * day, due_at=now + 60)
    store.trim(now)
    kept = {s for s in ("done-0", "done-1", "done-2", "done-3", "done-4", "done-5", "running") if store.session(s)}
    # Past 90 days: done-0; past the bound of 3 (the oldest first): done-1 and done-2. Open sessions stay.
    assert kept == {"done-3", "done-4", "done-5", "running"}


def test_a_lease_has_one_holder_until_it_runs_out(tmp_path: Path, charge_records: ChargeRecords) -> None:
    target = charge_records.store_target(tmp_path)
    first, second = ChargeStore(target), ChargeStore(target)
    held: list[str] = []
    all_at_once(8, lambda number: held.append(f"replica-{number}") if (first if number % 2 else second).take_lease(
        "reconcile", f"replica-{number}", 100.0, 5.0) else None)
    assert len(held) == 1
    holder = held[0]
    assert first.take_lease("reconcile", holder, 104.0, 5.0)  # renewed by its holder
    assert not second.take_lease("reconcile", "someone-else", 108.0, 5.0)  # still running (until 109)
    assert second.take_lease("reconcile", "someone-else", 109.5, 5.0)  # run out: taken over


# ----- PostgreSQL: replicas ------------------------------------------------------------------------


def test_a_key_is_claimed_by_one_replica_and_its_answer_replayed_by_the_other(postgres: PostgresServer) -> None:
    url = postgres.new_database()
    replicas = [Idempotency(ChargeStore(url), claim_seconds=30) for _ in range(2)]
    body = fingerprint({"vehicle_id": "ev-1", "amount": 11})
    outcomes: list[str] = []

    def begin(number: int) -> None:
        try:
            outcomes.append("new" if replicas[number % 2].begin("k-1", body) is None else "replayed")
        except KeyBusy:
            outcomes.append("busy")

    all_at_once(8, begin)
    assert sorted(outcomes) == ["busy"] * 7 + ["new"]
    replicas[0].finish("k-1", body, 201, {"session_id": "s-1"}, {})
    assert replicas[1].begin("k-1", body).body == {"session_id": "s-1"}
    with pytest.raises(KeyMisused):
        replicas[1].begin("k-1", fingerprint({"vehicle_id": "ev-1", "amount": 12}))


def test_a_claim_whose_replica_died_is_taken_over_once_stale(postgres: PostgresServer) -> None:
    store = ChargeStore(postgres.new_database())
    assert store.claim_answer("k-1", "print", 100.0, 70.0) == ("claimed", None)
    assert store.claim_answer("k-1", "print", 120.0, 90.0) == ("busy", None)  # 20 s old: still being answered
    assert store.claim_answer("k-1", "print", 140.0, 110.0) == ("claimed", None)  # 40 s old: its replica is gone


def test_the_shared_queue_keeps_one_order_and_one_bound(postgres: PostgresServer) -> None:
    url = postgres.new_database()
    clock = lambda: datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)  # noqa: E731
    stores = [ChargeStore(url) for _ in range(2)]
    queues = [SharedQueue(store, 5, 300, clock, f"replica-{index}", 10) for index, store in enumerate(stores)]
    for number in range(12):
        stores[number % 2].claim_vehicle(f"s-{number}", f"ev-{number}", {"session_id": f"s-{number}"}, 1.0)
    placed: list[tuple[int, str]] = []
    full: list[str] = []

    def add(number: int) -> None:
        try:
            entry, _ = queues[number % 2].add(ChargeRequest(f"ev-{number}", 11.0, 60.0, f"s-{number}"))
            placed.append((entry.sequence, entry.session_id))
        except QueueFull:
            full.append(f"s-{number}")

    all_at_once(12, add)
    assert len(placed) == 5 and len(full) == 7
    order = [session_id for _, session_id in sorted(placed)]
    # Both replicas see one order: positions 1..5 in sequence order, the head the same for whoever holds the lease.
    assert [queues[index % 2].get(session_id)[1] for index, session_id in enumerate(order)] == [1, 2, 3, 4, 5]
    assert queues[0].head().session_id == order[0]
    assert queues[1].head() is None  # the other replica does not dispatch while the lease runs
    trackers = [SharedSessionTracker(clock, store) for store in stores]
    # Taken out once, in the one update that writes how it left: a reader finds it queued or cancelled.
    assert queues[1].finish(order[0], "cancelled", trackers[1]) is not None
    assert queues[0].finish(order[0], "cancelled", trackers[0]) is None
    assert queues[0].get(order[0]) is None and trackers[0].finished(order[0]).state == "cancelled"
    assert queues[1].get(order[1])[1] == 1


def test_the_queue_length_read_with_a_claim_is_only_for_the_request_that_made_it(postgres: PostgresServer) -> None:
    """The claim's round trip also counts the queue, for the request that goes on to ask; a refused claim
    leaves nothing behind for whatever this thread answers next (a /metrics scrape, another request)."""
    store = ChargeStore(postgres.new_database())
    store.claim_vehicle("s-queued", "ev-queued", {"session_id": "s-queued"}, 1.0)
    store.enqueue("s-queued", {"session_id": "s-queued"}, 1.0, 301.0, 10)
    assert store.claim_vehicle("s-1", "ev-1", {"session_id": "s-1"}, 2.0) is None
    assert store.noted_queue_length() == 1
    assert store.noted_queue_length() is None  # read once
    assert store.claim_vehicle("s-2", "ev-1", {"session_id": "s-2"}, 3.0).session_id == "s-1"
    assert store.noted_queue_length() is None


def test_a_keys_quotas_are_counted_over_every_replica_sharing_the_database(postgres: PostgresServer) -> None:
    """Two replicas' stores race 32 claims under one key: the sessions and kW the winners asked for stay
    within the key's quotas, as the claimants themselves counted them."""
    url = postgres.new_database()
    stores = [ChargeStore(url) for _ in range(2)]
    quotas = OwnerQuotas("key-a", sessions=5, kw=24.0, queued=2)
    won: list[float] = []
    refused: list[str] = []

    def claim(number: int) -> None:
        kw = 3.0 + number % 4
        record = {"session_id": f"s-{number}", "vehicle_id": f"ev-{number}", "amount_kw": kw, "owner": "key-a"}
        try:
            assert stores[number % 2].claim_vehicle(f"s-{number}", f"ev-{number}", record, 1.0, quotas) is None
            won.append(kw)
        except QuotaExceeded as exc:
            refused.append(exc.quota)

    all_at_once(32, claim)
    assert len(won) <= 5 and sum(won) <= 24.0, won
    assert len(won) + len(refused) == 32 and set(refused) <= {"sessions", "kw"}
    assert len(won) >= 4  # it did fill up: at most 6 kW each, so at least four fit in 24 kW
    # Another key is not held back by this one's bookings.
    other = {"session_id": "s-other", "vehicle_id": "ev-other", "amount_kw": 20.0, "owner": "key-b"}
    assert stores[0].claim_vehicle("s-other", "ev-other", other, 1.0, OwnerQuotas("key-b", 1, 20.0, 0)) is None
    assert stores[1].owner_holdings(1.0)["key-b"] == (1, 20.0, 0)


def test_a_keys_queued_quota_and_ended_sessions_are_counted_in_the_database(postgres: PostgresServer) -> None:
    url = postgres.new_database()
    stores = [ChargeStore(url) for _ in range(2)]
    quotas = OwnerQuotas("key-a", sessions=10, kw=100.0, queued=2)
    for number in range(3):
        record = {"session_id": f"q-{number}", "vehicle_id": f"ev-q{number}", "amount_kw": 5.0, "owner": "key-a"}
        stores[number % 2].claim_vehicle(f"q-{number}", f"ev-q{number}", record, 1.0, quotas)
    queued_record = lambda number: {"session_id": f"q-{number}", "request": {"amount": 5.0}, "owner": "key-a"}  # noqa: E731
    assert stores[0].enqueue("q-0", queued_record(0), 1.0, 301.0, 100, quotas) is not None
    assert stores[1].enqueue("q-1", queued_record(1), 1.0, 301.0, 100, quotas) is not None
    with pytest.raises(QuotaExceeded) as refused:
        stores[0].enqueue("q-2", queued_record(2), 1.0, 301.0, 100, quotas)
    assert (refused.value.quota, refused.value.limit, refused.value.used) == ("queued", 2, 2)
    assert stores[1].owner_holdings(1.0)["key-a"] == (3, 15.0, 2)

    # A session past its end counts no more, even before anyone marks it ended; the soonest end is the hint.
    small = OwnerQuotas("key-c", sessions=1, kw=50.0, queued=0)
    first = {"session_id": "c-1", "vehicle_id": "ev-c1", "amount_kw": 5.0, "owner": "key-c"}
    stores[0].claim_vehicle("c-1", "ev-c1", first, 1.0, small)
    stores[0].change_session("c-1", ("pending",), "active", first, 1.0, due_at=100.0)
    second = {"session_id": "c-2", "vehicle_id": "ev-c2", "amount_kw": 5.0, "owner": "key-c"}
    with pytest.raises(QuotaExceeded) as over:
        stores[1].claim_vehicle("c-2", "ev-c2", second, 40.0, small)
    assert (over.value.quota, over.value.retry_after) == ("sessions", 60)
    assert stores[1].claim_vehicle("c-2", "ev-c2", second, 100.0, small) is None


def test_the_key_of_each_open_session_becomes_a_column_when_the_schema_moves_to_version_3(tmp_path: Path) -> None:
    path = tmp_path / "charge.sqlite3"
    store = ChargeStore(path)
    store.put_session("p-1", "ev-1", "pending", {"session_id": "p-1", "amount_kw": 7.0, "owner": "key-a"}, 1.0)
    store.put_session("q-1", "ev-2", "queued", {"session_id": "q-1", "request": {"amount": 11.0}, "owner": "key-a"}, 1.0)
    store.put_session("a-1", "ev-3", "active", {"session_id": "a-1", "amount_kw": 3.0, "owner": None}, 1.0, 9e9)
    store.close()
    with sqlite3.connect(path) as db:  # as version 2 kept them: no key columns
        db.executescript("DROP INDEX open_sessions_by_owner; ALTER TABLE sessions DROP COLUMN owner; "
                         "ALTER TABLE sessions DROP COLUMN booked_kw; UPDATE schema_version SET version = 2;")
    assert schema_version(ChargeStore(path)._database) == SCHEMA_VERSION
    with sqlite3.connect(path) as db:
        columns = dict((row[0], row[1:]) for row in db.execute("SELECT session_id, owner, booked_kw FROM sessions"))
    assert columns == {"p-1": ("key-a", 7.0), "q-1": ("key-a", 11.0), "a-1": (None, None)}


def test_claims_of_many_keys_racing_on_two_replicas_never_deadlock_and_each_keeps_its_quota(
        postgres: PostgresServer) -> None:
    """Each replica's group of claims takes the locks of all its keys: in one order everywhere, so two groups
    never wait for each other (a deadlock would fail a whole group with a 503)."""
    url = postgres.new_database()
    stores = [ChargeStore(url) for _ in range(2)]
    keys = [f"key-{letter}" for letter in "abcdef"]
    failed: list[str] = []

    for round_number in range(3):
        won: dict[str, int] = {key: 0 for key in keys}

        def claim(number: int) -> None:
            # The two replicas meet the keys in opposite orders.
            key = keys[(number // 2) % 6] if number % 2 else keys[-1 - (number // 2) % 6]
            session_id = f"m-{round_number}-{number}"
            record = {"session_id": session_id, "vehicle_id": f"ev-{session_id}", "amount_kw": 2.0, "owner": key}
            try:
                stores[number % 2].claim_vehicle(session_id, f"ev-{session_id}", record, 1.0,
                                                 OwnerQuotas(key, sessions=4, kw=100.0, queued=0))
                won[key] += 1
            except QuotaExceeded:
                pass
            except StoreError as exc:
                failed.append(str(exc))

        all_at_once(64, claim)
        assert failed == []
        assert set(won.values()) == {4}, won  # each key got its four sessions, and no more
        for session_id, _, _ in stores[0].sessions():
            stores[0].delete_session(session_id, "pending")
