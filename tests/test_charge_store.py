"""The charge API's state file under concurrent writers: group commit keeps every write's promise."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from charge_request_service.sessions import SessionTracker
from charge_request_service.store import ChargeStore, StoreError, StoredAnswer
from tests.harness import all_at_once


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
