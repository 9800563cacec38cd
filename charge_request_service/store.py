"""The charge API's records: an SQLite file, or a PostgreSQL database replicas share
(``charge_request_service.database``). Plain Python, no Flask.

Kept: every session this service started or queued, in its state —
``pending`` (forwarded, no answer yet: the write-ahead record that lets a
restart find a session a substation may hold but no client was told of),
``queued``, ``active``, and how the finished ones ended (for
``FINISHED_RETENTION_DAYS``, at most ``FINISHED_KEPT`` of them) — and the answers
given to requests with an ``Idempotency-Key``, and the client keys (their
SHA-256, name and quotas; ``charge_request_service.client_keys``). Each change is committed
before the client is answered.

Each session is one row: its id, vehicle and state as columns, everything else in a JSON
``record``, so a field added to a session needs no migration. A vehicle has at most one
session that is pending, queued or active: a unique index says so, which is what keeps it
true across replicas.
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gridcommon import jsonfast
from gridcommon.sqlitestate import StateFileError
from charge_request_service.database import (
    FINISHED_STATES,
    OPEN_STATES,
    Database,
    DatabaseError,
    PostgresDatabase,
    booked_kw,
    is_postgres_url,
    owner_lock_key,
    open_database,
)

# Finished sessions kept: for this long, and at most this many (the oldest go first).
FINISHED_RETENTION_SECONDS = 90 * 86_400.0
FINISHED_KEPT = 1_000_000
ANSWERS_KEPT = 100_000
# How often an SQLite file forgets what is past those bounds (a shared database: at each reconciliation).
TRIM_EVERY_WRITES = 1_000
# Status of an idempotency row whose request is still being answered: the key is claimed.
CLAIMED = 0

# What a failed read or write raises, on either database (``DatabaseError`` is one).
StoreError = StateFileError

_OPEN = ", ".join(f"'{state}'" for state in OPEN_STATES)
_FINISHED = ", ".join(f"'{state}'" for state in FINISHED_STATES)
_SESSION_COLUMNS = "session_id, vehicle_id, state, record, due_at, sequence"
# An open session a key holds: not one past its end that nobody has marked ended yet.
_NOT_PAST_END = "(state <> 'active' OR due_at IS NULL OR due_at > :now)"
# A request's pending row, inserted only if its key's open rows leave room under its quotas; what was counted
# comes back with it, and the queue's length (which the request asks next).
_CLAIM_WITHIN_QUOTAS = f"""
WITH held AS (
    SELECT count(*) AS sessions, coalesce(sum(booked_kw), 0) AS kw,
           min(CASE WHEN state = 'active' THEN due_at END) AS soonest_end
    FROM sessions WHERE owner = :owner AND state IN ({_OPEN}) AND {_NOT_PAST_END}
), claimed AS (
    INSERT INTO sessions ({_SESSION_COLUMNS}, updated_at, owner, booked_kw)
    SELECT :id, :vehicle, 'pending', :record, NULL, NULL, :now, :owner, :booked FROM held
    WHERE held.sessions + 1 <= :most_sessions AND held.kw + :booked <= :most_kw + 1e-9
    ON CONFLICT DO NOTHING RETURNING 1
)
SELECT (SELECT count(*) FROM claimed), held.sessions, held.kw, held.soonest_end,
       (SELECT count(*) FROM sessions WHERE state = 'queued')
FROM held"""


@dataclass(frozen=True)
class OwnerQuotas:
    """What one client key (``owner``) may hold at once, for a database that counts it across replicas."""

    owner: str
    sessions: int
    kw: float
    queued: int


class QuotaExceeded(Exception):
    """A request would take its key past a quota; ``quota`` names it."""

    def __init__(self, quota: str, limit: float, used: float, retry_after: int | None) -> None:
        super().__init__(f"{quota} quota of {limit:g} reached ({used:g} in use)")
        self.quota = quota
        self.limit = limit
        self.used = used
        self.retry_after = retry_after


def _booking(state: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """The ``owner`` and ``booked_kw`` columns of an open session's row (None for a session without a key)."""
    owner = record.get("owner")
    kw = booked_kw(state, record) if owner is not None and state in OPEN_STATES else None
    return {"owner": owner if kw is not None else None, "booked": kw}


@dataclass(frozen=True)
class StoredAnswer:
    fingerprint: str
    status: int
    body: dict[str, Any]
    headers: dict[str, str]
    created_at: float


@dataclass(frozen=True)
class StoredClientKey:
    """A client key as kept: ``key_digest`` is the SHA-256 (hex) of the key; times are Unix seconds."""

    key_id: str
    name: str
    key_digest: str
    quotas: dict[str, Any]
    created_at: float
    rotated_at: float | None = None
    revoked_at: float | None = None


@dataclass(frozen=True)
class StoredSession:
    session_id: str
    vehicle_id: str
    state: str
    record: dict[str, Any]
    # When an active session ends, or a queued request expires (Unix seconds).
    due_at: float | None
    # A queued request's place in arrival order.
    sequence: int | None


def _session(row: tuple) -> StoredSession:
    return StoredSession(row[0], row[1], row[2], jsonfast.loads(row[3]), row[4], row[5])


class ChargeStore:
    """Thread-safe access to the charge API's records.

    A write returns once it is committed. On SQLite, writes commit in groups
    (``gridcommon.groupcommit``): inside ``batch()`` a thread's writes are only
    queued, and committed when the block ends, so a caller writes under its own
    lock and waits for the file after releasing it. On PostgreSQL each write is
    a transaction of its own, and the methods for replicas (``claim_vehicle``,
    ``change_session``, ``enqueue``, ``claim_answer``, ``take_lease``) decide
    conflicts in the database, never in one process's memory.
    """

    def __init__(self, where: Path | str, full_sync: bool = False, *,
                 finished_retention_seconds: float = FINISHED_RETENTION_SECONDS,
                 finished_kept: int = FINISHED_KEPT) -> None:
        url = where if isinstance(where, str) and is_postgres_url(where) else None
        database = open_database(url, None if url else Path(where), full_sync)
        assert database is not None
        self._database: Database = database
        self.path = database.where
        self.finished_retention_seconds = finished_retention_seconds
        self.finished_kept = finished_kept
        # The first and last write this thread queued and has not waited for yet, and how deep in batch() it is.
        self._thread = threading.local()

    @property
    def shared(self) -> bool:
        """Whether other replicas may use the same records (PostgreSQL)."""
        return self._database.shared

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

    # ----- sessions ------------------------------------------------------------------------------

    def put_session(self, session_id: str, vehicle_id: str, state: str, record: dict[str, Any], now: float,
                    due_at: float | None = None) -> None:
        self._write(
            f"INSERT INTO sessions ({_SESSION_COLUMNS}, updated_at, owner, booked_kw) "
            "VALUES (:id, :vehicle, :state, :record, :due, NULL, :now, :owner, :booked) "
            "ON CONFLICT (session_id) DO UPDATE SET "
            "vehicle_id = excluded.vehicle_id, state = excluded.state, record = excluded.record, "
            "due_at = excluded.due_at, updated_at = excluded.updated_at",
            {"id": session_id, "vehicle": vehicle_id, "state": state, "record": jsonfast.dumps_text(record),
             "due": due_at, "now": now, **_booking(state, record)},
        )

    def drop_session(self, session_id: str) -> None:
        self._write("DELETE FROM sessions WHERE session_id = :id", {"id": session_id})

    def sessions(self) -> list[tuple[str, str, dict[str, Any]]]:
        """``(session_id, state, record)`` of every pending, queued or active session, oldest change first.

        Finished sessions stay on disk (``session``) but are not read back all at once.
        """
        rows = self._database.rows(
            f"SELECT session_id, state, record FROM sessions WHERE state IN ({_OPEN}) ORDER BY updated_at")
        return [(session_id, state, jsonfast.loads(record)) for session_id, state, record in rows]

    def session(self, session_id: str) -> StoredSession | None:
        rows = self._database.rows(f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE session_id = :id",
                                   {"id": session_id})
        return _session(rows[0]) if rows else None

    def claim_vehicle(self, session_id: str, vehicle_id: str, record: dict[str, Any], now: float,
                      quotas: OwnerQuotas | None = None) -> StoredSession | None:
        """Insert the ``pending`` row of a request about to be forwarded, committed.

        None when it is in; else the session that holds the vehicle (the unique index refused the row).
        With ``quotas``, the key's sessions of every replica are counted under the key's lock first,
        and ``QuotaExceeded`` (nothing inserted) says which quota the row would pass. On PostgreSQL
        the same round trip reads how many requests wait in the queue, which the request asks next
        (``noted_queue_length``): a round trip less on the public API's hottest path.
        """
        insert = (f"INSERT INTO sessions ({_SESSION_COLUMNS}, updated_at, owner, booked_kw) "
                  "VALUES (:id, :vehicle, 'pending', :record, NULL, NULL, :now, :owner, :booked) ON CONFLICT DO NOTHING")
        params = {"id": session_id, "vehicle": vehicle_id, "record": jsonfast.dumps_text(record), "now": now,
                  **_booking("pending", record)}
        for _ in range(3):  # the holder may finish between the refused insert and the read of it
            if quotas is not None:
                inserted = self._claim_within_quotas(params, quotas, now)
            elif isinstance(self._database, PostgresDatabase):  # committed with the next group
                inserted, self._thread.queue_length = self._database.committed([(
                    f"WITH claimed AS ({insert} RETURNING 1) SELECT (SELECT count(*) FROM claimed), "
                    "(SELECT count(*) FROM sessions WHERE state = 'queued')", params)])[0][0]
            else:
                inserted = self._database.execute(insert, params)
            if inserted:
                return None
            self._thread.queue_length = None  # read for a request that goes no further: never for a later one
            holder = self._database.rows(f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE vehicle_id = :vehicle "
                                         f"AND state IN ({_OPEN})", {"vehicle": vehicle_id})
            if holder:
                return _session(holder[0])
        raise DatabaseError(f"session id {session_id} is already taken, or vehicle {vehicle_id}'s session "
                            "keeps changing: retry the request")

    def _claim_within_quotas(self, insert_params: Mapping[str, Any], quotas: OwnerQuotas, now: float) -> int:
        """Insert the pending row if the key's open rows of every replica leave room for it; 0 if the vehicle is
        held. The key's lock is taken before the count is read and held until the row is committed, with the
        next group of changes (whose other rows of the key the count includes: one transaction)."""
        if not isinstance(self._database, PostgresDatabase):
            raise ValueError("client keys' quotas are counted in the database only where replicas share it")
        params = {**insert_params, "most_sessions": quotas.sessions, "most_kw": quotas.kw}
        claimed, sessions, kw, soonest_end, self._thread.queue_length = self._database.committed(
            [(_CLAIM_WITHIN_QUOTAS, params)], locks=[owner_lock_key(quotas.owner)])[0][0]
        if claimed:
            return 1
        self._thread.queue_length = None
        retry_after = None if soonest_end is None else max(1, math.ceil(soonest_end - now))
        if sessions + 1 > quotas.sessions:
            raise QuotaExceeded("sessions", quotas.sessions, sessions, retry_after)
        if kw + params["booked"] > quotas.kw + 1e-9:
            raise QuotaExceeded("kw", quotas.kw, kw, retry_after)
        return 0  # within the quotas, so the vehicle's own row refused it

    def owner_holdings(self, now: float) -> dict[str, tuple[int, float, int]]:
        """``owner -> (sessions, kW, queued)`` of every key's open sessions, on every replica."""
        rows = self._database.rows(
            "SELECT owner, count(*), coalesce(sum(booked_kw), 0), sum(CASE WHEN state = 'queued' THEN 1 ELSE 0 END) "
            f"FROM sessions WHERE owner IS NOT NULL AND state IN ({_OPEN}) AND {_NOT_PAST_END} GROUP BY owner",
            {"now": now})
        return {owner: (sessions, kw, queued) for owner, sessions, kw, queued in rows}

    def noted_queue_length(self) -> int | None:
        """The queue's length read by this thread's last ``claim_vehicle``, once; None if there is none."""
        length = getattr(self._thread, "queue_length", None)
        self._thread.queue_length = None
        return length

    def rename_pending(self, old_session_id: str, new_session_id: str, record: dict[str, Any], now: float) -> None:
        """A pending request is sent again under a new id: one transaction, so its vehicle stays held."""
        with self._database.transaction() as tx:
            held = tx.rows("SELECT vehicle_id, owner, booked_kw FROM sessions WHERE session_id = :id "
                           "AND state = 'pending'", {"id": old_session_id})
            tx.execute("DELETE FROM sessions WHERE session_id = :id", {"id": old_session_id})
            if held:
                vehicle, owner, booked = held[0]
                tx.execute(
                    f"INSERT INTO sessions ({_SESSION_COLUMNS}, updated_at, owner, booked_kw) "
                    "VALUES (:id, :vehicle, 'pending', :record, NULL, NULL, :now, :owner, :booked)",
                    {"id": new_session_id, "vehicle": vehicle, "record": jsonfast.dumps_text(record),
                     "now": now, "owner": owner, "booked": booked},
                )

    def change_session(self, session_id: str, from_states: tuple[str, ...], state: str, record: dict[str, Any],
                       now: float, due_at: float | None = None) -> bool:
        """Move a session to ``state`` if it is in one of ``from_states``, committed; whether this call did it.

        Two replicas racing to stop, end or start one session: exactly one of them moves it.
        """
        names = {f"from{index}": value for index, value in enumerate(from_states)}
        changed = self._database.execute(
            "UPDATE sessions SET state = :state, record = :record, due_at = :due, updated_at = :now "
            f"WHERE session_id = :id AND state IN ({', '.join(':' + name for name in names)})",
            {"state": state, "record": jsonfast.dumps_text(record), "due": due_at, "now": now, "id": session_id,
             **names},
        )
        return changed == 1

    def delete_session(self, session_id: str, state: str) -> bool:
        """Delete the session if it is in ``state``, committed; whether this call did it."""
        return self._database.execute("DELETE FROM sessions WHERE session_id = :id AND state = :state",
                                      {"id": session_id, "state": state}) == 1

    def sessions_in(self, state: str, due_after: float | None = None, due_by: float | None = None,
                    limit: int = 10_000) -> list[StoredSession]:
        """Sessions in ``state`` (with ``due_at`` after/at most the bounds given), in arrival order."""
        where, params = self._due_filter(state, due_after, due_by)
        rows = self._database.rows(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE {where} ORDER BY sequence, updated_at, session_id "
            "LIMIT :limit", {**params, "limit": limit})
        return [_session(row) for row in rows]

    def count_in(self, state: str, due_after: float | None = None) -> int:
        where, params = self._due_filter(state, due_after, None)
        return self._database.rows(f"SELECT count(*) FROM sessions WHERE {where}", params)[0][0]

    @staticmethod
    def _due_filter(state: str, due_after: float | None, due_by: float | None) -> tuple[str, dict[str, Any]]:
        where, params = ["state = :state"], {"state": state}
        if due_after is not None:
            where.append("due_at > :after")
            params["after"] = due_after
        if due_by is not None:
            where.append("due_at <= :by")
            params["by"] = due_by
        return " AND ".join(where), params

    # ----- the queue (replicas) ------------------------------------------------------------------

    def enqueue(self, session_id: str, record: dict[str, Any], now: float, expires_at: float,
                max_queued: int, quotas: OwnerQuotas | None = None) -> tuple[int, int] | None:
        """Move a pending request to the end of the queue: ``(sequence, position)``, or None if the queue is full.

        Under the queue's lock, so the bound holds and arrival order is one order across replicas;
        with ``quotas``, ``QuotaExceeded`` once the key has its quota of requests waiting (on any replica).
        """
        with self._database.transaction() as tx:
            self._database.lock_queue(tx)
            waiting = tx.rows("SELECT count(*) FROM sessions WHERE state = 'queued'")[0][0]
            if waiting >= max_queued:
                return None
            if quotas is not None:
                owned = tx.rows("SELECT count(*) FROM sessions WHERE owner = :owner AND state = 'queued'",
                                {"owner": quotas.owner})[0][0]
                if owned >= quotas.queued:
                    raise QuotaExceeded("queued", quotas.queued, owned, None)
            sequence = tx.rows("SELECT coalesce(max(sequence), 0) + 1 FROM sessions")[0][0]
            moved = tx.execute(
                "UPDATE sessions SET state = 'queued', record = :record, due_at = :due, sequence = :sequence, "
                "updated_at = :now WHERE session_id = :id AND state = 'pending'",
                {"record": jsonfast.dumps_text(record), "due": expires_at, "sequence": sequence, "now": now,
                 "id": session_id},
            )
            if not moved:
                raise DatabaseError(f"request {session_id} was no longer pending when it was to be queued")
            return sequence, waiting + 1

    def queue_position(self, sequence: int) -> int:
        """1 for the head of the queue."""
        return self._database.rows("SELECT count(*) FROM sessions WHERE state = 'queued' AND sequence < :sequence",
                                   {"sequence": sequence})[0][0] + 1

    # ----- idempotency ---------------------------------------------------------------------------

    def answer(self, key: str) -> StoredAnswer | None:
        rows = self._database.rows(
            "SELECT fingerprint, status, answer, created_at FROM idempotency WHERE key = :key AND status <> :claimed",
            {"key": key, "claimed": CLAIMED})
        return self._answer(rows[0]) if rows else None

    @staticmethod
    def _answer(row: tuple) -> StoredAnswer:
        answer = jsonfast.loads(row[2])
        return StoredAnswer(row[0], row[1], answer["body"], answer["headers"], row[3])

    def put_answer(self, key: str, answer: StoredAnswer) -> None:
        self._write(
            "INSERT INTO idempotency (key, fingerprint, status, answer, created_at) "
            "VALUES (:key, :fingerprint, :status, :answer, :created) ON CONFLICT (key) DO UPDATE SET "
            "fingerprint = excluded.fingerprint, status = excluded.status, answer = excluded.answer, "
            "created_at = excluded.created_at",
            {"key": key, "fingerprint": answer.fingerprint, "status": answer.status,
             "answer": jsonfast.dumps_text({"body": answer.body, "headers": answer.headers}),
             "created": answer.created_at},
        )

    def claim_answer(self, key: str, fingerprint: str, now: float,
                     stale_before: float) -> tuple[str, StoredAnswer | None]:
        """Claim ``key`` for a request about to be answered, committed, so no other replica answers it too.

        ``("claimed", None)``: this request is to be answered (a claim older than ``stale_before``,
        of a replica that died answering, is taken over); ``("answered", answer)``: the answer to
        replay; ``("busy", None)``: another request with the key is being answered now;
        ``("misused", None)``: the key came before with another body.
        """
        database = self._database
        if database.execute("INSERT INTO idempotency (key, fingerprint, status, answer, created_at) "
                            "VALUES (:key, :fingerprint, :claimed, '{}', :now) ON CONFLICT DO NOTHING",
                            {"key": key, "fingerprint": fingerprint, "claimed": CLAIMED, "now": now}):
            return "claimed", None
        rows = database.rows("SELECT fingerprint, status, answer, created_at FROM idempotency WHERE key = :key",
                             {"key": key})
        if not rows:
            return "busy", None  # released between the insert and the read: a retry claims it
        found_print, status, _, created_at = rows[0]
        if found_print != fingerprint:
            return "misused", None
        if status != CLAIMED:
            return "answered", self._answer(rows[0])
        # Taken over only if nobody took it over first: the claim's time is the one just read.
        if created_at < stale_before and database.execute(
            "UPDATE idempotency SET created_at = :now WHERE key = :key AND status = :claimed "
            "AND created_at = :created", {"now": now, "key": key, "claimed": CLAIMED, "created": created_at}
        ):
            return "claimed", None
        return "busy", None

    def release_claim(self, key: str) -> None:
        """The request was answered with nothing worth keeping: a repeat is answered afresh."""
        self._database.execute("DELETE FROM idempotency WHERE key = :key AND status = :claimed",
                               {"key": key, "claimed": CLAIMED})

    # ----- leases --------------------------------------------------------------------------------

    def take_lease(self, name: str, holder: str, now: float, seconds: float) -> bool:
        """Hold (or keep holding) the lease ``name`` for ``seconds``; False while another holder's runs."""
        return self._database.execute(
            "INSERT INTO leases (name, holder, expires_at) VALUES (:name, :holder, :until) "
            "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at "
            "WHERE leases.holder = excluded.holder OR leases.expires_at < :now",
            {"name": name, "holder": holder, "until": now + seconds, "now": now},
        ) == 1

    # ----- client keys ---------------------------------------------------------------------------

    def put_client_key(self, key: StoredClientKey) -> None:
        """Keep a client key (only its SHA-256: the key itself is shown once and never stored)."""
        self._write(
            "INSERT INTO client_keys (key_id, name, key_digest, quotas, created_at, rotated_at, revoked_at) "
            "VALUES (:id, :name, :digest, :quotas, :created, :rotated, :revoked) ON CONFLICT (key_id) DO UPDATE SET "
            "name = excluded.name, key_digest = excluded.key_digest, quotas = excluded.quotas, "
            "created_at = excluded.created_at, rotated_at = excluded.rotated_at, revoked_at = excluded.revoked_at",
            {"id": key.key_id, "name": key.name, "digest": key.key_digest, "quotas": jsonfast.dumps_text(key.quotas),
             "created": key.created_at, "rotated": key.rotated_at, "revoked": key.revoked_at},
        )

    def drop_client_key(self, key_id: str) -> None:
        self._write("DELETE FROM client_keys WHERE key_id = :id", {"id": key_id})

    def client_keys(self) -> list[StoredClientKey]:
        """Every client key ever created, revoked ones included, oldest first."""
        rows = self._database.rows(
            "SELECT key_id, name, key_digest, quotas, created_at, rotated_at, revoked_at FROM client_keys "
            "ORDER BY created_at, key_id")
        return [StoredClientKey(row[0], row[1], row[2], jsonfast.loads(row[3]), row[4], row[5], row[6])
                for row in rows]

    # ----- writing -------------------------------------------------------------------------------

    def _write(self, sql: str, params: Mapping[str, Any]) -> None:
        number = self._database.submit([(sql, params)])
        if not self.shared and number % TRIM_EVERY_WRITES == 0:
            # One writer in so many also forgets what is past the bounds (a shared database: the reconciler).
            self._database.submit(self._trim_statements(time.time()))
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
            self._database.wait(first, thread.last)

    def trim(self, now: float) -> None:
        """Forget finished sessions past their retention or their bound, and answers past theirs."""
        with self._database.transaction() as tx:
            for sql, params in self._trim_statements(now):
                tx.execute(sql, params)

    def _trim_statements(self, now: float) -> list[tuple[str, dict[str, Any]]]:
        every = "-1" if self._database.dialect == "sqlite" else "ALL"
        return [
            (f"DELETE FROM sessions WHERE state IN ({_FINISHED}) AND updated_at < :cutoff",
             {"cutoff": now - self.finished_retention_seconds}),
            (f"DELETE FROM sessions WHERE session_id IN (SELECT session_id FROM sessions WHERE state IN ({_FINISHED}) "
             f"ORDER BY updated_at DESC LIMIT {every} OFFSET :kept)", {"kept": self.finished_kept}),
            (f"DELETE FROM idempotency WHERE key IN (SELECT key FROM idempotency ORDER BY created_at DESC "
             f"LIMIT {every} OFFSET :kept)", {"kept": ANSWERS_KEPT}),
        ]

    def close(self) -> None:
        self._database.close()
