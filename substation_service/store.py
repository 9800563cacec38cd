"""The substation's ledger on disk: SQLite (stdlib ``sqlite3``) in WAL mode. Plain Python, no Flask.

Every change the ledger makes (an admission, an end, a stop, a suspension, a
change of limit) is committed before the ledger answers, so a process killed at
any moment comes back with every session it ever admitted. Changes are
committed in groups (group commit): the ledger seals each change's statements
under its lock and waits for the file after releasing it; the first waiter
commits every change sealed so far in one transaction, in order, and the
others find theirs done. ``synchronous=NORMAL`` in WAL mode survives a
crashed or killed process; ``STATE_SYNC=full`` also survives a power cut,
at the cost of an fsync per change.

What is kept: the active sessions (with their suspensions), the fair-share
level's history since the oldest of them started (their allocation
histories are derived from it), the last ended sessions with their final
records, the retired ids, the limit's history and the counters
(``state_version``, energy). A store belongs to one substation: opening it
under another ``SUBSTATION_ID`` is refused.

Schema 2 added leased sessions (no fixed end: ``ends_at`` may be null), each
session's own minimum and the changes of its amount. Schema 3 added energy
needs (``need``: the need, and under the deadline policy the session's own
power history). A file of an older schema is migrated when it is opened, in
one transaction.

Finished sessions are records, not a cache: they stay in the file for a
retention (``SESSION_RECORDS_RETENTION_DAYS``) and up to a number of rows
(``SESSION_RECORDS_MAX_ROWS``), the oldest forgotten first; the operator pages
through them by end time (:meth:`LedgerStore.records`).
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gridcommon import jsonfast
from gridcommon.groupcommit import GroupCommit, Statement
from gridcommon.sqlitestate import StateFileError, open_state_file

SCHEMA_VERSION = 3

SESSIONS_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    session_id TEXT PRIMARY KEY,
    vehicle_id TEXT NOT NULL,
    amount_kw REAL NOT NULL,
    started_at REAL NOT NULL,
    ends_at REAL,
    admitted INTEGER NOT NULL,
    start_position INTEGER NOT NULL,
    state_changes TEXT NOT NULL,
    ended_at REAL,
    report TEXT,
    lease_seconds REAL,
    minimum_kw REAL,
    amounts TEXT,
    need TEXT
);
"""

SCHEMA = SESSIONS_TABLE.format(name="sessions") + """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS sessions_by_end ON sessions (ended_at);
CREATE TABLE IF NOT EXISTS levels (position INTEGER PRIMARY KEY, at REAL NOT NULL, level_mw INTEGER);
CREATE TABLE IF NOT EXISTS limits (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL,
                                   limit_kw REAL NOT NULL, source TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS retired (session_id TEXT PRIMARY KEY, forget_at REAL NOT NULL);
"""


StoreError = StateFileError


@dataclass(frozen=True)
class StoredSession:
    session_id: str
    vehicle_id: str
    amount_kw: float
    started_at: float
    ends_at: float
    admitted: int
    start_position: int
    state_changes: list[tuple[float, bool]]
    lease_seconds: float | None = None
    minimum_kw: float | None = None
    # (time, kW, own minimum kW or None) at admission and every change of either.
    amounts: list[tuple[float, float, float | None]] = field(default_factory=list)
    # The ledger's record of its energy need (JSON), None for a session without one.
    need: str | None = None


@dataclass(frozen=True)
class StoredState:
    """Everything a ledger needs to carry on where it stopped."""

    meta: dict[str, Any]
    active: list[StoredSession]
    levels: list[tuple[int, float, int | None]]
    ended: list[dict[str, Any]]
    retired: list[tuple[str, float]]
    limits: list[tuple[float, float, str]]

    @property
    def empty(self) -> bool:
        return not self.meta


class LedgerStore:
    """One substation's SQLite file.

    The writing methods queue statements for the change being made and ``seal()`` hands them
    to the next commit: the ledger calls those under its own lock. ``commit_through()`` is
    called without it, from any thread.
    """

    def __init__(self, path: Path, substation_id: str, full_sync: bool = False) -> None:
        self.path = path
        self._substation_id = substation_id
        self._db = open_state_file(path, SCHEMA, full_sync)
        self._check_owner()
        self._migrate()
        # The change being made: its statements, and the counters' row as it ends.
        self._pending: list[Statement] = []
        self._meta: str | None = None
        self._pruned_before: int | None = None
        self._group = GroupCommit(self._db, path)

    def _check_owner(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'state'").fetchone()
        if row is None:
            return
        meta = json.loads(row[0])
        if meta.get("substation_id") != self._substation_id:
            raise StoreError(
                f"the state file {self.path} belongs to {meta.get('substation_id')!r}, not {self._substation_id!r}: "
                "give each substation its own STATE_DIR"
            )
        if meta.get("schema_version") not in MIGRATIONS and meta.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(
                f"the state file {self.path} has schema {meta.get('schema_version')}, this substation reads "
                f"{SCHEMA_VERSION}"
            )

    def _migrate(self) -> None:
        """Bring a file of an older schema to this one, in one transaction (all of it or none)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'state'").fetchone()
        if row is None:
            return
        meta = json.loads(row[0])
        while meta["schema_version"] != SCHEMA_VERSION:
            step = MIGRATIONS[meta["schema_version"]]
            self._db.execute("BEGIN IMMEDIATE")
            try:
                new_version = step(self._db)
                meta["schema_version"] = new_version
                self._db.execute("UPDATE meta SET value = ? WHERE key = 'state'", (json.dumps(meta),))
                self._db.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                self._db.execute("ROLLBACK")
                raise StoreError(
                    f"the state file {self.path} could not be migrated to schema {SCHEMA_VERSION} ({exc}); "
                    "it is left as it was: free disk space or check the folder's permissions, then start again"
                ) from None

    # ----- reading ---------------------------------------------------------------------------

    def load(self, ended_kept: int) -> StoredState:
        """What the file holds; of the finished sessions only the newest ``ended_kept`` (the others stay
        in the file, read when asked for)."""
        db = self._db
        row = db.execute("SELECT value FROM meta WHERE key = 'state'").fetchone()
        meta = json.loads(row[0]) if row else {}
        active = [
            StoredSession(row[0], row[1], row[2], row[3], row[4], row[5], row[6],
                          [(at, bool(charging)) for at, charging in json.loads(row[7])],
                          lease_seconds=row[8], minimum_kw=row[9],
                          amounts=([(at, kw, minimum) for at, kw, minimum in json.loads(row[10])] if row[10]
                                   else [(row[3], row[2], None)]),
                          need=row[11])
            for row in db.execute(
                "SELECT session_id, vehicle_id, amount_kw, started_at, ends_at, admitted, start_position, "
                "state_changes, lease_seconds, minimum_kw, amounts, need FROM sessions WHERE ended_at IS NULL "
                "ORDER BY admitted"
            )
        ]
        levels = list(db.execute("SELECT position, at, level_mw FROM levels ORDER BY position"))
        ended = [json.loads(row[0]) for row in db.execute(
            "SELECT report FROM (SELECT report, ended_at, admitted FROM sessions WHERE ended_at IS NOT NULL "
            "ORDER BY ended_at DESC, admitted DESC LIMIT ?) ORDER BY ended_at, admitted", (ended_kept,)
        )]
        retired = list(db.execute("SELECT session_id, forget_at FROM retired ORDER BY forget_at"))
        limits = list(db.execute("SELECT at, limit_kw, source FROM limits ORDER BY id"))
        return StoredState(meta, active, levels, ended, retired, limits)

    def ended_report(self, session_id: str) -> bytes | None:
        """An ended session's final record as stored (compact JSON), or None when the file has none."""
        with self._group.file_lock:
            row = self._db.execute(
                "SELECT report FROM sessions WHERE session_id = ? AND ended_at IS NOT NULL", (session_id,)
            ).fetchone()
        return None if row is None else row[0].encode()

    def ended_reports(self, session_ids: list[str]) -> dict[str, bytes]:
        """These ended sessions' final records, by session id (those the file has)."""
        found: dict[str, bytes] = {}
        with self._group.file_lock:
            for start in range(0, len(session_ids), 500):  # SQLite's limit on parameters is far above
                chunk = session_ids[start:start + 500]
                rows = self._db.execute(
                    f"SELECT session_id, report FROM sessions WHERE ended_at IS NOT NULL AND session_id IN "
                    f"({','.join('?' * len(chunk))})", chunk).fetchall()
                found.update((session_id, report.encode()) for session_id, report in rows)
        return found

    def records(self, since: float | None, after: tuple[float, str] | None, limit: int) -> list[bytes]:
        """A page of finished records by (end time, id): ended at or after ``since``, past ``after``."""
        query = "SELECT report FROM sessions WHERE ended_at IS NOT NULL"
        parameters: list[Any] = []
        if since is not None:
            query += " AND ended_at >= ?"
            parameters.append(since)
        if after is not None:
            query += " AND (ended_at > ? OR (ended_at = ? AND session_id > ?))"
            parameters += [after[0], after[0], after[1]]
        query += " ORDER BY ended_at, session_id LIMIT ?"
        parameters.append(limit)
        with self._group.file_lock:
            rows = self._db.execute(query, parameters).fetchall()
        return [row[0].encode() for row in rows]

    # ----- writing: queued by the ledger during one change, committed at its end ------------

    def admit(self, session: StoredSession) -> None:
        # The id may be that of a session ended long ago, past what the ledger still refuses: its row goes.
        self._pending.append((
            "INSERT OR REPLACE INTO sessions (session_id, vehicle_id, amount_kw, started_at, ends_at, admitted, "
            "start_position, state_changes, lease_seconds, minimum_kw, amounts, need) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (session.session_id, session.vehicle_id, session.amount_kw, session.started_at, session.ends_at,
             session.admitted, session.start_position, jsonfast.dumps_text(session.state_changes),
             session.lease_seconds, session.minimum_kw, jsonfast.dumps_text(session.amounts), session.need),
        ))

    def amount_changed(self, session_id: str, amount_kw: float, minimum_kw: float | None,
                       amounts: list[tuple[float, float, float | None]]) -> None:
        self._pending.append((
            "UPDATE sessions SET amount_kw = ?, minimum_kw = ?, amounts = ? WHERE session_id = ?",
            (amount_kw, minimum_kw, jsonfast.dumps_text(amounts), session_id),
        ))

    def need_changed(self, session_id: str, need_json: str | None) -> None:
        self._pending.append(("UPDATE sessions SET need = ? WHERE session_id = ?", (need_json, session_id)))

    def lease_changed(self, session_id: str, lease_seconds: float) -> None:
        """A renewal with another lease length; renewals of the same length write nothing (the lease
        runs again from a restart)."""
        self._pending.append(("UPDATE sessions SET lease_seconds = ? WHERE session_id = ?", (lease_seconds, session_id)))

    def state_changed(self, session_id: str, state_changes: list[tuple[float, bool]]) -> None:
        self._pending.append(
            ("UPDATE sessions SET state_changes = ? WHERE session_id = ?", (jsonfast.dumps_text(state_changes), session_id))
        )

    def ended(self, session_id: str, ended_at: float, report_json: str) -> None:
        """The session's final record, already encoded (the ledger keeps the same text in memory)."""
        self._pending.append(
            ("UPDATE sessions SET ended_at = ?, report = ? WHERE session_id = ?", (ended_at, report_json, session_id))
        )

    def levels_from(self, position: int, points: list[tuple[int, float, int | None]], dropped_past: bool) -> None:
        """Write the level history from ``position`` on; ``dropped_past``: points after them were removed."""
        if dropped_past:
            last = points[-1][0] if points else position - 1
            self._pending.append(("DELETE FROM levels WHERE position > ?", (last,)))
        for point in points:
            self._pending.append(("INSERT OR REPLACE INTO levels (position, at, level_mw) VALUES (?, ?, ?)", point))

    def prune_levels_before(self, position: int) -> None:
        if self._pruned_before is not None and position <= self._pruned_before:
            return  # nothing before it is left
        self._pruned_before = position
        self._pending.append(("DELETE FROM levels WHERE position < ?", (position,)))

    def limit(self, at: float, limit_kw: float, source: str) -> None:
        self._pending.append(("INSERT INTO limits (at, limit_kw, source) VALUES (?, ?, ?)", (at, limit_kw, source)))

    def retire(self, session_id: str, forget_at: float) -> None:
        self._pending.append(
            ("INSERT OR REPLACE INTO retired (session_id, forget_at) VALUES (?, ?)", (session_id, forget_at))
        )

    def meta(self, values: dict[str, Any]) -> None:
        """The counters, all in one row: one statement per change, however many there are."""
        self._meta = jsonfast.dumps_text(values)

    def trim(self, now: float, retention_seconds: float, max_records: int, limits_kept: int) -> None:
        """Forget what no longer needs keeping: records past their retention or beyond the row bound (the
        oldest first), old limits, retired ids past their time."""
        self._pending += [
            ("DELETE FROM retired WHERE forget_at <= ?", (now,)),
            ("DELETE FROM sessions WHERE ended_at IS NOT NULL AND ended_at < ?", (now - retention_seconds,)),
            ("DELETE FROM sessions WHERE ended_at IS NOT NULL AND session_id IN (SELECT session_id FROM sessions "
             "WHERE ended_at IS NOT NULL ORDER BY ended_at DESC LIMIT -1 OFFSET ?)", (max_records,)),
            ("DELETE FROM limits WHERE id <= (SELECT MAX(id) FROM limits) - ?", (limits_kept,)),
        ]

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def seal(self) -> int:
        """Hand the change's statements to the next commit; its number (the last one's if it wrote nothing)."""
        if not self._pending and self._meta is None:
            return self._group.submitted
        statements = self._pending
        if self._meta is not None:
            statements.append(("INSERT OR REPLACE INTO meta (key, value) VALUES ('state', ?)", (self._meta,)))
        self._pending, self._meta = [], None
        return self._group.submit(statements)

    def commit_through(self, number: int) -> None:
        """Return once every change sealed up to ``number`` is committed; ``StoreError`` if its group failed."""
        self._group.wait(number)

    def close(self) -> None:
        with self._group.file_lock:
            self._db.close()


def _schema_1_to_2(db: sqlite3.Connection) -> int:
    """Leased sessions, own minimums, amount changes: ``ends_at`` becomes nullable, three columns are added.

    SQLite cannot drop a NOT NULL constraint in place, so the table is rebuilt and renamed.
    """
    db.execute(SESSIONS_TABLE.format(name="sessions_v2"))
    db.execute(
        "INSERT INTO sessions_v2 (session_id, vehicle_id, amount_kw, started_at, ends_at, admitted, start_position, "
        "state_changes, ended_at, report) SELECT session_id, vehicle_id, amount_kw, started_at, ends_at, admitted, "
        "start_position, state_changes, ended_at, report FROM sessions"
    )
    db.execute("DROP TABLE sessions")
    db.execute("ALTER TABLE sessions_v2 RENAME TO sessions")
    db.execute("CREATE INDEX IF NOT EXISTS sessions_by_end ON sessions (ended_at)")
    return 2


def _schema_2_to_3(db: sqlite3.Connection) -> int:
    """Energy needs: one column more (a file migrated from schema 1 has it already, from today's table)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(sessions)")}
    if "need" not in columns:
        db.execute("ALTER TABLE sessions ADD COLUMN need TEXT")
    return 3


# Schema version -> the step that brings a file of it one version further.
MIGRATIONS = {1: _schema_1_to_2, 2: _schema_2_to_3}
