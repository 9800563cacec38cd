"""Where the charge API keeps its records: an SQLite file of its own, or a PostgreSQL database shared by replicas.

One set of statements for both, written with named parameters (``:name``); the dialect layer is
only how a statement reaches the database:

* SQLite (``STATE_DIR``): the stdlib ``sqlite3`` connection of ``gridcommon.sqlitestate`` (WAL,
  private file modes), writes committed in groups by ``gridcommon.groupcommit``, so a single
  replica commits many changes at the cost of one;
* PostgreSQL (``DATABASE_URL``): psycopg 3 connections from SQLAlchemy's engine and pool (its
  URL handling, pool bounds and dialect), each change committed on its own (a statement alone in
  autocommit, several in one transaction); PostgreSQL groups concurrent commits itself.

The schema is versioned (``schema_version``) and migrated on start (``migrate``), under a lock so
replicas starting together migrate once. Plain Python, no Flask.
"""
from __future__ import annotations

import hashlib
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gridcommon import jsonfast
from gridcommon.groupcommit import FAILED_GROUPS_KEPT, GroupCommit
from gridcommon.sqlitestate import StateFileError, open_state_file

# States of a session that holds its vehicle (one per vehicle, a database constraint), and how it can end.
OPEN_STATES = ("pending", "queued", "active")
FINISHED_STATES = ("ended", "stopped", "expired", "cancelled", "abandoned")
POSTGRES_SCHEMES = ("postgresql://", "postgres://", "postgresql+psycopg://")
# Every call to PostgreSQL has a bound: to connect, to run a statement, to wait for a lock or a pooled connection.
CONNECT_TIMEOUT_SECONDS = 5
STATEMENT_TIMEOUT_MS = 10_000
LOCK_TIMEOUT_MS = 5_000
POOL_SIZE = 8
POOL_OVERFLOW = 16
POOL_TIMEOUT_SECONDS = 10
# Any constant: the key of the transaction-level advisory lock under which a replica migrates the schema.
MIGRATION_LOCK = 2022_0001
QUEUE_LOCK = 2022_0002
# The first of the two keys of the advisory lock on one client key's quotas (the second: ``owner_lock_key``);
# two 32-bit keys are a key space apart from the single 64-bit keys of the queue and the migration.
OWNER_LOCK_SPACE = 2022_0003

Row = tuple[Any, ...]


class DatabaseError(StateFileError):
    """The records could not be read or written; the message says what to check."""


class PostgresUnavailable(DatabaseError):
    """PostgreSQL did not answer, or refused a change."""

    operator_check = "the database (DATABASE_URL) and its server"


class Transaction(Protocol):
    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> int:
        """Run one statement; how many rows it changed."""

    def rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        """Run one query; its rows."""


def owner_lock_key(owner: str) -> int:
    """The second key of the advisory lock on one client key's quotas: a signed 32-bit hash of its id, the same
    in every replica (Python's own ``hash`` of a string differs from process to process)."""
    return int.from_bytes(hashlib.sha256(owner.encode()).digest()[:4], "big", signed=True)


def is_postgres_url(url: str) -> bool:
    return url.startswith(POSTGRES_SCHEMES)


def redacted(url: str) -> str:
    """The URL without its password, for logs and errors."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


_NAMED = re.compile(r"(?<!:):([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True)
class _Positional:
    sql: str
    names: tuple[str, ...]


class Database:
    """Statements to one SQLite file or one PostgreSQL database; ``shared`` when replicas may share it."""

    dialect: str
    shared: bool
    where: str

    def transaction(self) -> Any:
        raise NotImplementedError

    def rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        with self.transaction() as tx:
            return tx.rows(sql, params)

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> int:
        """Run one statement, committed on its own; how many rows it changed."""
        with self.transaction() as tx:
            return tx.execute(sql, params)

    def submit(self, statements: Sequence[tuple[str, Mapping[str, Any]]]) -> int:
        """Queue one change (its statements) to be committed; its number for ``wait``."""
        raise NotImplementedError

    def wait(self, first: int, last: int) -> None:
        """Return once the changes numbered ``first`` to ``last`` are committed; ``DatabaseError`` if not."""
        raise NotImplementedError

    def lock_queue(self, tx: Transaction) -> None:
        """Serialise, until ``tx`` ends, every transaction that changes the queue's length or order."""

    def close(self) -> None:
        raise NotImplementedError


class SqliteDatabase(Database):
    """One process's file: reads and immediate transactions under the file lock, writes in groups."""

    dialect = "sqlite"
    shared = False

    def __init__(self, path: Path, full_sync: bool = False) -> None:
        self.path = path
        self.where = str(path)
        self._db = open_state_file(path, "", full_sync)
        self._group = GroupCommit(self._db, path)
        self._positional: dict[str, _Positional] = {}

    def _convert(self, sql: str) -> _Positional:
        converted = self._positional.get(sql)
        if converted is None:
            converted = self._positional[sql] = _Positional(
                _NAMED.sub("?", sql), tuple(_NAMED.findall(sql)))
        return converted

    def _params(self, sql: str, params: Mapping[str, Any] | None) -> tuple[str, tuple]:
        converted = self._convert(sql)
        return converted.sql, tuple((params or {})[name] for name in converted.names)

    def rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        with self._group.file_lock:  # autocommit: a read sees every committed change
            return self._db.execute(*self._params(sql, params)).fetchall()

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        import sqlite3

        database = self

        class _Tx:
            def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> int:
                return database._db.execute(*database._params(sql, params)).rowcount

            def rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
                return database._db.execute(*database._params(sql, params)).fetchall()

        with self._group.file_lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield _Tx()
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise DatabaseError(f"could not use the state file {self.path} ({exc}): is the disk full?") from None

    def submit(self, statements: Sequence[tuple[str, Mapping[str, Any]]]) -> int:
        return self._group.submit([self._params(sql, params) for sql, params in statements])

    def wait(self, first: int, last: int) -> None:
        self._group.wait(first, last)

    def close(self) -> None:
        with self._group.file_lock:
            self._db.close()


class PostgresDatabase(Database):
    """A database replicas share: a pool of connections, a transaction per change."""

    dialect = "postgresql"
    shared = True

    def __init__(self, url: str) -> None:
        from sqlalchemy import create_engine

        self.where = redacted(url)
        driver_url = re.sub(r"^(postgresql|postgres)(\+psycopg)?://", "postgresql+psycopg://", url)
        self._engine = create_engine(
            driver_url,
            pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW, pool_timeout=POOL_TIMEOUT_SECONDS,
            connect_args={
                "connect_timeout": CONNECT_TIMEOUT_SECONDS,
                "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS} -c lock_timeout={LOCK_TIMEOUT_MS}",
                "application_name": "charge_request_service",
            },
        )
        self._statements: dict[str, str] = {}
        self._commit_lock = threading.Lock()
        # Guards the queue and its counters; never held over a round trip.
        self._queue_lock = threading.Lock()
        self._queue: list[tuple[Sequence[tuple[str, Mapping[str, Any]]], bool]] = []
        # The rows of the changes that asked for them, by number, until their waiter takes them.
        self._results: dict[int, list[list[Row]]] = {}
        self._submitted = 0  # changes submitted since the start, numbered from 1
        self._tried = 0  # every change numbered up to this one has been in a transaction
        self._failed: deque[tuple[int, int, str]] = deque(maxlen=FAILED_GROUPS_KEPT)

    def _sql(self, sql: str) -> str:
        """The statement in psycopg's parameter style (``%(name)s``)."""
        converted = self._statements.get(sql)
        if converted is None:
            converted = self._statements[sql] = _NAMED.sub(r"%(\1)s", sql)
        return converted

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        """A pooled psycopg connection in autocommit mode: one statement alone is one round trip, with no
        BEGIN and COMMIT of its own (SQLAlchemy's Connection would add both, and its own work, to each)."""
        import psycopg
        from sqlalchemy import exc as sa_exc

        try:
            pooled = self._engine.raw_connection()
        except sa_exc.SQLAlchemyError as exc:
            raise PostgresUnavailable(
                f"the database {self.where} did not answer ({_first_line(exc)}): check that it runs and that "
                "DATABASE_URL names it"
            ) from None
        try:
            connection = pooled.driver_connection
            if not connection.autocommit:
                connection.autocommit = True
            yield connection
        except psycopg.OperationalError as exc:
            pooled.invalidate()  # a connection the server dropped is not handed out again
            raise PostgresUnavailable(
                f"the database {self.where} did not answer ({_first_line(exc)}): check that it runs and that "
                "DATABASE_URL names it"
            ) from None
        except psycopg.Error as exc:
            raise PostgresUnavailable(f"the database {self.where} refused a change ({_first_line(exc)})") from None
        finally:
            pooled.close()  # back to the pool

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        database = self
        with self._connection() as connection, connection.transaction():
            class _Tx:
                def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> int:
                    return connection.execute(database._sql(sql), params or {}).rowcount

                def rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
                    return connection.execute(database._sql(sql), params or {}).fetchall()

            yield _Tx()

    def rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        with self._connection() as connection:
            return connection.execute(self._sql(sql), params or {}).fetchall()

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> int:
        with self._connection() as connection:
            return connection.execute(self._sql(sql), params or {}).rowcount

    # Group commit, as gridcommon.groupcommit does for SQLite: whoever waits for a change that is not
    # committed yet takes the commit lock and commits every change queued so far in one transaction, its
    # statements pipelined (one round trip, one WAL flush), while the other waiters find theirs done.
    # A change may need advisory locks (``owner_lock_key``): the group takes all its changes' locks first,
    # in one order for every replica, so two replicas' groups never wait for each other's.

    def submit(self, statements: Sequence[tuple[str, Mapping[str, Any]]], keep_results: bool = False,
               locks: Sequence[int] = ()) -> int:
        with self._queue_lock:
            self._queue.append((statements, keep_results, locks))
            self._submitted += 1
            return self._submitted

    def committed(self, statements: Sequence[tuple[str, Mapping[str, Any]]],
                  locks: Sequence[int] = ()) -> list[list[Row]]:
        """Commit one change with the next group and return each statement's rows (``RETURNING``, or a query's);
        ``locks`` are held from the group's start until its commit."""
        number = self.submit(statements, keep_results=True, locks=locks)
        try:
            self.wait(number, number)
        finally:
            results = self._results.pop(number, None)
        assert results is not None
        return results

    def wait(self, first: int, last: int) -> None:
        if self._tried < last:
            with self._commit_lock:
                if self._tried < last:  # nobody committed them while this thread waited for the lock
                    self._commit_queued()
        for failed_first, failed_last, reason in tuple(self._failed):
            if failed_first <= last and first <= failed_last:
                raise PostgresUnavailable(reason)

    def _commit_queued(self) -> None:
        with self._queue_lock:
            group, self._queue = self._queue, []
            first, last = self._tried + 1, self._submitted
        locks = sorted({key for _, _, change_locks in group for key in change_locks})
        try:
            with self._connection() as connection, connection.transaction():
                with connection.pipeline():
                    for key in locks:
                        connection.execute("SELECT pg_advisory_xact_lock(%(space)s, %(key)s)",
                                           {"space": OWNER_LOCK_SPACE, "key": key})
                    cursors = [[connection.execute(self._sql(sql), params or {}) for sql, params in statements]
                               for statements, _, _ in group]
                for number, (cursors_of_change, (_, keep, _)) in enumerate(zip(cursors, group), start=first):
                    if keep:
                        self._results[number] = [cursor.fetchall() for cursor in cursors_of_change]
        except DatabaseError as exc:
            self._failed.append((first, last, str(exc)))
        finally:
            self._tried = last

    def lock_queue(self, tx: Transaction) -> None:
        tx.rows("SELECT pg_advisory_xact_lock(:key)", {"key": QUEUE_LOCK})

    def close(self) -> None:
        self._engine.dispose()


def _first_line(exc: BaseException) -> str:
    return str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]


def open_database(url: str | None, path: Path | None, full_sync: bool = False) -> Database | None:
    """PostgreSQL when ``url`` is set, else the SQLite file at ``path``, else None (records in memory only)."""
    if url:
        database: Database = PostgresDatabase(url)
    elif path is not None:
        database = SqliteDatabase(path, full_sync)
    else:
        return None
    try:
        migrate(database)
    except BaseException:
        database.close()
        raise
    return database


# ----- schema ------------------------------------------------------------------------------------


def _types(dialect: str) -> dict[str, str]:
    # REAL is 4 bytes in PostgreSQL: Unix seconds need 8.
    return {"float": "REAL" if dialect == "sqlite" else "DOUBLE PRECISION"}


# Version 1: the schema of the releases before DATABASE_URL (SQLite only), as their files hold it.
_V1 = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    vehicle_id TEXT NOT NULL,
    state TEXT NOT NULL,
    record TEXT NOT NULL,
    updated_at {float} NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_state ON sessions (state, updated_at);
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    status INTEGER NOT NULL,
    answer TEXT NOT NULL,
    created_at {float} NOT NULL
);
CREATE INDEX IF NOT EXISTS idempotency_by_age ON idempotency (created_at);
CREATE TABLE IF NOT EXISTS client_keys (
    key_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    key_digest TEXT NOT NULL UNIQUE,
    quotas TEXT NOT NULL,
    created_at {float} NOT NULL,
    rotated_at {float},
    revoked_at {float}
)
"""

_OPEN = ", ".join(f"'{state}'" for state in OPEN_STATES)


def _v2(tx: Transaction, dialect: str) -> None:
    """Replicas: when a session ends or a queued request expires (``due_at``), the queue's arrival order
    (``sequence``), one open session per vehicle as a constraint, leases for the work one replica does."""
    types = _types(dialect)
    tx.execute(f"ALTER TABLE sessions ADD COLUMN due_at {types['float']}")
    tx.execute("ALTER TABLE sessions ADD COLUMN sequence BIGINT")
    # Records written before these columns: the end of each active session, the expiry and order of each queued one.
    queued = []
    for session_id, state, record in tx.rows(
        "SELECT session_id, state, record FROM sessions WHERE state IN ('active', 'queued')"
    ):
        fields = jsonfast.loads(record)
        if state == "active":
            tx.execute("UPDATE sessions SET due_at = :due WHERE session_id = :id",
                       {"due": _timestamp(fields["ends_at"]), "id": session_id})
        else:
            queued.append((fields["queued_at"], session_id, _timestamp(fields["expires_at"])))
    for sequence, (_, session_id, expires) in enumerate(sorted(queued), start=1):
        tx.execute("UPDATE sessions SET due_at = :due, sequence = :sequence WHERE session_id = :id",
                   {"due": expires, "sequence": sequence, "id": session_id})
    # Should a file hold two open sessions of one vehicle, the newest keeps it and the others are abandoned.
    seen: set[str] = set()
    for session_id, vehicle_id in tx.rows(
        f"SELECT session_id, vehicle_id FROM sessions WHERE state IN ({_OPEN}) ORDER BY updated_at DESC"
    ):
        if vehicle_id in seen:
            tx.execute("UPDATE sessions SET state = 'abandoned' WHERE session_id = :id", {"id": session_id})
        seen.add(vehicle_id)
    tx.execute(f"CREATE UNIQUE INDEX one_open_session_per_vehicle ON sessions (vehicle_id) WHERE state IN ({_OPEN})")
    tx.execute("CREATE INDEX sessions_by_due ON sessions (state, due_at)")
    tx.execute("CREATE INDEX sessions_by_sequence ON sessions (sequence)")
    tx.execute(f"CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at {types['float']} NOT NULL)")


def booked_kw(state: str, record: Mapping[str, Any]) -> float:
    """The kW a session's client key is charged for while it is open: what its request asked for."""
    return record["request"]["amount"] if state == "queued" else record["amount_kw"]


def _v3(tx: Transaction, dialect: str) -> None:
    """Client keys' quotas across replicas: each open session's key (``owner``) and the kW booked against it,
    as columns, so one replica counts every replica's sessions of a key under the key's lock."""
    tx.execute("ALTER TABLE sessions ADD COLUMN owner TEXT")
    tx.execute(f"ALTER TABLE sessions ADD COLUMN booked_kw {_types(dialect)['float']}")
    for session_id, state, record in tx.rows(f"SELECT session_id, state, record FROM sessions WHERE state IN ({_OPEN})"):
        fields = jsonfast.loads(record)
        if fields.get("owner") is not None:
            tx.execute("UPDATE sessions SET owner = :owner, booked_kw = :kw WHERE session_id = :id",
                       {"owner": fields["owner"], "kw": booked_kw(state, fields), "id": session_id})
    tx.execute(f"CREATE INDEX open_sessions_by_owner ON sessions (owner, state) WHERE state IN ({_OPEN})")


def _timestamp(text: str) -> float:
    from gridcommon.timefmt import parse_time

    return parse_time(text).timestamp()


def _v1(tx: Transaction, dialect: str) -> None:
    for statement in _V1.format(**_types(dialect)).split(";"):
        tx.execute(statement)


MIGRATIONS: tuple[Callable[[Transaction, str], None], ...] = (_v1, _v2, _v3)
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(database: Database) -> int:
    with database.transaction() as tx:
        return _version(tx, database.dialect)


def _version(tx: Transaction, dialect: str) -> int:
    tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    found = tx.rows("SELECT version FROM schema_version")
    if found:
        return found[0][0]
    # A file of a release before versions were kept holds version 1's tables.
    if dialect == "sqlite":
        old = tx.rows("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sessions'")
    else:
        old = tx.rows("SELECT 1 FROM information_schema.tables WHERE table_schema = current_schema() "
                      "AND table_name = 'sessions'")
    version = 1 if old else 0
    tx.execute("INSERT INTO schema_version (version) VALUES (:version)", {"version": version})
    return version


def migrate(database: Database) -> int:
    """Bring the schema to ``SCHEMA_VERSION`` in one transaction (all steps or none); the version found.

    A database of a newer release is refused: this code would not know its records.
    """
    with database.transaction() as tx:
        if database.dialect == "postgresql":
            tx.rows("SELECT pg_advisory_xact_lock(:key)", {"key": MIGRATION_LOCK})
        found = _version(tx, database.dialect)
        if found > SCHEMA_VERSION:
            raise DatabaseError(
                f"{database.where} holds records of schema version {found}, newer than this release knows "
                f"({SCHEMA_VERSION}): run the release that wrote them, or a later one"
            )
        for version in range(found + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[version - 1](tx, database.dialect)
            tx.execute("UPDATE schema_version SET version = :version", {"version": version})
    return found
