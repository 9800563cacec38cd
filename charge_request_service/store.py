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
import sqlite3
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gridcommon import jsonfast
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
# Failed batches remembered until their writers have seen the failure.
FAILED_BATCHES_KEPT = 256


StoreError = StateFileError


@dataclass(frozen=True)
class StoredAnswer:
    fingerprint: str
    status: int
    body: dict[str, Any]
    headers: dict[str, str]
    created_at: float


class ChargeStore:
    """Thread-safe access to the charge API's state file, committing with group commit.

    A write is queued and then committed together with whatever other threads
    queued meanwhile: the first writer to reach the file commits everyone's
    statements in one transaction, in the order they were queued, and the
    others find theirs done. Each writer still returns only once its own
    statements are committed (or raises ``StoreError``), so "committed before
    the client is answered" holds with one transaction per batch instead of
    one per statement. Inside ``batch()`` a thread's writes are only queued,
    and committed when the block ends: a caller queues under its own lock and
    waits for the file after releasing it, so the lock is not held over a commit.
    """

    def __init__(self, path: Path, full_sync: bool = False) -> None:
        self.path = path
        self._db = open_state_file(path, SCHEMA, full_sync)
        # Guards the connection: one commit or read at a time.
        self._file_lock = threading.Lock()
        # Guards the queue and its counters; never held while waiting for the file.
        self._queue_lock = threading.Lock()
        self._queue: list[tuple[str, tuple]] = []
        self._queued = 0  # statements queued since the start, numbered from 1
        self._committed = 0  # every statement numbered up to this one was tried
        self._writes_since_trim = 0
        # (first, last, reason) of the last batches that failed; their writers raise.
        self._failed: deque[tuple[int, int, str]] = deque(maxlen=FAILED_BATCHES_KEPT)
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
        with self._file_lock:
            rows = self._db.execute("SELECT session_id, state, record FROM sessions ORDER BY updated_at").fetchall()
        return [(session_id, state, json.loads(record)) for session_id, state, record in rows]

    def answer(self, key: str) -> StoredAnswer | None:
        with self._file_lock:
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
        with self._queue_lock:
            self._queue.append((sql, params))
            self._queued += 1
            number = self._queued
        thread = self._thread
        if getattr(thread, "first", None) is None:
            thread.first = number
        thread.last = number
        if getattr(thread, "depth", 0) == 0:
            self._commit_mine()

    def _commit_mine(self) -> None:
        """Return once this thread's queued statements are committed; ``StoreError`` if they could not be."""
        thread = self._thread
        first, last = getattr(thread, "first", None), getattr(thread, "last", 0)
        thread.first = None
        if first is None:
            return
        if self._committed < last:
            with self._file_lock:
                if self._committed < last:  # nobody committed them while this thread waited
                    self._commit_queued()
        for failed_first, failed_last, reason in tuple(self._failed):  # a copy: a leader may be appending
            if failed_first <= last and first <= failed_last:
                raise StoreError(f"could not write the state file {self.path} ({reason}): is the disk full?")

    def _commit_queued(self) -> None:
        """Everything queued so far, in one transaction (under the file lock)."""
        with self._queue_lock:
            batch, self._queue = self._queue, []
            first, last = self._committed + 1, self._queued
        self._writes_since_trim += len(batch)
        try:
            with self._db:  # BEGIN ... COMMIT, or ROLLBACK on error
                self._db.execute("BEGIN IMMEDIATE")
                for sql, params in batch:
                    self._db.execute(sql, params)
                if self._writes_since_trim >= TRIM_EVERY_WRITES:
                    self._writes_since_trim = 0
                    self._trim()
        except sqlite3.Error as exc:
            self._failed.append((first, last, str(exc)))
        finally:
            self._committed = last

    def _trim(self) -> None:
        finished = "('ended', 'stopped', 'expired', 'cancelled', 'abandoned')"
        self._db.execute(
            f"DELETE FROM sessions WHERE state IN {finished} AND session_id IN (SELECT session_id FROM sessions "
            f"WHERE state IN {finished} ORDER BY updated_at DESC LIMIT -1 OFFSET ?)", (FINISHED_KEPT,)
        )
        self._db.execute(
            "DELETE FROM idempotency WHERE key IN (SELECT key FROM idempotency ORDER BY created_at DESC "
            "LIMIT -1 OFFSET ?)", (ANSWERS_KEPT,)
        )

    def close(self) -> None:
        with self._file_lock:
            self._db.close()
