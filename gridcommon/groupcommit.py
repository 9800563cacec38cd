"""Group commit for a state file: many threads' changes, one SQLite transaction.

A change is submitted as its statements and gets a number; whoever then waits
for it and finds it uncommitted takes the file and commits every change
submitted so far, in order, in one transaction, while the other waiters find
theirs done. Each waiter still returns only once its change is committed, or
raises ``StateFileError`` if the transaction that held it failed, so "committed
before the client is answered" holds at a fraction of the commits. Callers
submit under their own lock (the order of changes is theirs) and wait without
it, so no lock of theirs is held over a write to disk.
"""
from __future__ import annotations

import sqlite3
import threading
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gridcommon.sqlitestate import StateFileError

Statement = tuple[str, Iterable[Any]]
# Failed transactions remembered until their waiters have seen the failure.
FAILED_GROUPS_KEPT = 256


class GroupCommit:
    """The write side of one SQLite connection, shared by threads."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db = db
        self._path = path
        # One transaction (or read) at a time on the connection.
        self.file_lock = threading.Lock()
        # Guards the queue and its counters; never held while the file is written.
        self._queue_lock = threading.Lock()
        self._queue: list[list[Statement]] = []
        self._submitted = 0  # changes submitted since the start, numbered from 1
        self._tried = 0  # every change numbered up to this one has been in a transaction
        self._failed: deque[tuple[int, int, str]] = deque(maxlen=FAILED_GROUPS_KEPT)

    @property
    def submitted(self) -> int:
        """The number of the last change submitted."""
        return self._submitted

    def submit(self, statements: list[Statement]) -> int:
        """Queue one change's statements for the next transaction; its number."""
        with self._queue_lock:
            self._queue.append(statements)
            self._submitted += 1
            return self._submitted

    def wait(self, first: int, last: int | None = None) -> None:
        """Return once the changes numbered ``first`` to ``last`` are committed; ``StateFileError`` if not."""
        last = first if last is None else last
        if self._tried < last:
            with self.file_lock:
                if self._tried < last:  # nobody committed them while this thread waited for the file
                    self._commit_queued()
        for failed_first, failed_last, reason in tuple(self._failed):  # a copy: a committer may be appending
            if failed_first <= last and first <= failed_last:
                raise StateFileError(f"could not write the state file {self._path} ({reason}): is the disk full?")

    def _commit_queued(self) -> None:
        with self._queue_lock:
            group, self._queue = self._queue, []
            first, last = self._tried + 1, self._submitted
        try:
            with self._db:  # BEGIN ... COMMIT, or ROLLBACK on error
                self._db.execute("BEGIN IMMEDIATE")
                for statements in group:
                    for sql, params in statements:
                        self._db.execute(sql, tuple(params))
        except sqlite3.Error as exc:
            self._failed.append((first, last, str(exc)))
        finally:
            self._tried = last
