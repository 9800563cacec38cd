"""The charge API's records on disk: SQLite (stdlib ``sqlite3``) in WAL mode. Plain Python, no Flask.

Kept: every session this service started or queued, in its state —
``pending`` (forwarded, no answer yet: the write-ahead record that lets a
restart find a session a substation may hold but no client was told of),
``queued``, ``active``, and how the finished ones ended — and the answers
given to requests with an ``Idempotency-Key``. Each change is committed
before the client is answered.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gridcommon import jsonfast
from gridcommon.groupcommit import GroupCommit
from gridcommon.sqlitestate import StateFileError, open_state_file

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    vehicle_id TEXT NOT NULL,
    state TEXT NOT NULL,
    record TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_state ON sessions (state, updated_at);
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    status INTEGER NOT NULL,
    answer TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS idempotency_by_age ON idempotency (created_at);
"""

# Finished sessions and idempotency answers kept, at most.
FINISHED_KEPT = 10_000
ANSWERS_KEPT = 100_000
# How often the file forgets what is past those bounds.
TRIM_EVERY_WRITES = 1_000


StoreError = StateFileError


@dataclass(frozen=True)
class StoredAnswer:
    fingerprint: str
    status: int
    body: dict[str, Any]
    headers: dict[str, str]
    created_at: float


class ChargeStore:
    """Thread-safe access to the charge API's state file, committing in groups (``gridcommon.groupcommit``).

    A write returns once it is committed, together with whatever other threads
    wrote meanwhile. Inside ``batch()`` a thread's writes are only queued, and
    committed when the block ends: a caller writes under its own lock and waits
    for the file after releasing it, so the lock is not held over a commit.
    """

    def __init__(self, path: Path, full_sync: bool = False) -> None:
        self.path = path
        self._db = open_state_file(path, SCHEMA, full_sync)
        self._group = GroupCommit(self._db, path)
        # The first and last write this thread queued and has not waited for yet, and how deep in batch() it is.
        self._thread = threading.local()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Queue this thread's writes inside the block; commit them (group commit) when it ends."""
        thread = self._thread
        depth = getattr(thread, "depth", 0)
        thread.depth = depth + 1
        try:
            yield
        finally:
            thread.depth = depth
            if depth == 0:
                self._commit_mine()

    def put_session(self, session_id: str, vehicle_id: str, state: str, record: dict[str, Any], now: float) -> None:
        self._write(
            "INSERT OR REPLACE INTO sessions (session_id, vehicle_id, state, record, updated_at) VALUES (?, ?, ?, ?, ?)",
            (session_id, vehicle_id, state, jsonfast.dumps_text(record), now),
        )

    def drop_session(self, session_id: str) -> None:
        self._write("DELETE FROM sessions WHERE session_id = ?", (session_id,))

    def sessions(self) -> list[tuple[str, str, dict[str, Any]]]:
        """``(session_id, state, record)`` of every kept session, oldest change first."""
        with self._group.file_lock:
            rows = self._db.execute("SELECT session_id, state, record FROM sessions ORDER BY updated_at").fetchall()
        return [(session_id, state, json.loads(record)) for session_id, state, record in rows]

    def answer(self, key: str) -> StoredAnswer | None:
        with self._group.file_lock:
            row = self._db.execute(
                "SELECT fingerprint, status, answer, created_at FROM idempotency WHERE key = ?", (key,)
            ).fetchone()
        if row is None:
            return None
        answer = json.loads(row[2])
        return StoredAnswer(row[0], row[1], answer["body"], answer["headers"], row[3])

    def put_answer(self, key: str, answer: StoredAnswer) -> None:
        self._write(
            "INSERT OR REPLACE INTO idempotency (key, fingerprint, status, answer, created_at) VALUES (?, ?, ?, ?, ?)",
            (key, answer.fingerprint, answer.status, jsonfast.dumps_text({"body": answer.body, "headers": answer.headers}),
             answer.created_at),
        )

    def _write(self, sql: str, params: tuple) -> None:
        number = self._group.submit([(sql, params)])
        if number % TRIM_EVERY_WRITES == 0:  # one writer in so many also forgets what is past the bounds
            self._group.submit(self._trim_statements())
        thread = self._thread
        if getattr(thread, "first", None) is None:
            thread.first = number
        thread.last = number
        if getattr(thread, "depth", 0) == 0:
            self._commit_mine()

    def _commit_mine(self) -> None:
        """Return once this thread's queued writes are committed; ``StoreError`` if they could not be."""
        thread = self._thread
        first = getattr(thread, "first", None)
        thread.first = None
        if first is not None:
            self._group.wait(first, thread.last)

    @staticmethod
    def _trim_statements() -> list[tuple[str, tuple]]:
        finished = "('ended', 'stopped', 'expired', 'cancelled', 'abandoned')"
        return [
            (f"DELETE FROM sessions WHERE state IN {finished} AND session_id IN (SELECT session_id FROM sessions "
             f"WHERE state IN {finished} ORDER BY updated_at DESC LIMIT -1 OFFSET ?)", (FINISHED_KEPT,)),
            ("DELETE FROM idempotency WHERE key IN (SELECT key FROM idempotency ORDER BY created_at DESC "
             "LIMIT -1 OFFSET ?)", (ANSWERS_KEPT,)),
        ]

    def close(self) -> None:
        with self._group.file_lock:
            self._db.close()
