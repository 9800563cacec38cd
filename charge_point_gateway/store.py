"""The gateway's durable state: stations and transactions in one SQLite file (WAL). Plain module.

Written before the gateway answers the station, so a killed gateway comes back knowing
every transaction it acknowledged: a 1.6 StartTransaction sent again gets the same
transaction id, a StopTransaction of a transaction started before the restart ends it,
and nothing is counted twice.
"""
from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

from gridcommon.sqlitestate import open_state_file
from charge_point_gateway.registry import Station
from charge_point_gateway.transactions import Transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS stations (
    station_id TEXT PRIMARY KEY,
    substation_url TEXT NOT NULL,
    connectors INTEGER NOT NULL,
    phases INTEGER NOT NULL,
    max_current_a REAL NOT NULL,
    password_hash TEXT NOT NULL,
    last_seen REAL,
    last_state TEXT NOT NULL DEFAULT 'never_connected',
    protocol TEXT
);
CREATE TABLE IF NOT EXISTS transactions (
    session_id TEXT PRIMARY KEY,
    station_id TEXT NOT NULL,
    transaction_id TEXT NOT NULL,
    start_key TEXT UNIQUE,
    record TEXT NOT NULL,
    ended INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS transactions_active ON transactions (ended, station_id);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
# Ended transactions kept for GET /stations and for replays of a late StopTransaction.
MAX_ENDED_KEPT = 10000


class GatewayStore:
    def __init__(self, path: Path, full_sync: bool = False) -> None:
        self._db = open_state_file(path, SCHEMA, full_sync)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # Stations -----------------------------------------------------------------------------

    def put_station(self, station: Station) -> bool:
        """Create or replace ``station``; True when it is new."""
        with self._lock:
            existed = self._db.execute("SELECT 1 FROM stations WHERE station_id=?", (station.station_id,)).fetchone()
            self._db.execute(
                "INSERT INTO stations (station_id, substation_url, connectors, phases, max_current_a, password_hash) "
                "VALUES (?,?,?,?,?,?) ON CONFLICT(station_id) DO UPDATE SET substation_url=excluded.substation_url, "
                "connectors=excluded.connectors, phases=excluded.phases, max_current_a=excluded.max_current_a, "
                "password_hash=excluded.password_hash",
                (station.station_id, station.substation_url, station.connectors, station.phases,
                 station.max_current_a, station.password_hash),
            )
            return existed is None

    def station(self, station_id: str) -> Station | None:
        with self._lock:
            row = self._db.execute(
                "SELECT station_id, substation_url, connectors, phases, max_current_a, password_hash "
                "FROM stations WHERE station_id=?",
                (station_id,),
            ).fetchone()
        return None if row is None else Station(*row)

    def stations(self) -> list[tuple[Station, float | None, str, str | None]]:
        """Every station with its last seen time, last state and protocol, by id."""
        with self._lock:
            rows = self._db.execute(
                "SELECT station_id, substation_url, connectors, phases, max_current_a, password_hash, "
                "last_seen, last_state, protocol FROM stations ORDER BY station_id"
            ).fetchall()
        return [(Station(*row[:6]), row[6], row[7], row[8]) for row in rows]

    def delete_station(self, station_id: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM stations WHERE station_id=?", (station_id,)).rowcount > 0

    def seen(self, station_id: str, at: float, state: str, protocol: str | None = None) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE stations SET last_seen=?, last_state=?, protocol=COALESCE(?, protocol) WHERE station_id=?",
                (at, state, protocol, station_id),
            )

    # Transactions -------------------------------------------------------------------------

    def next_transaction_id(self) -> int:
        """A 1.6 transaction id never handed out before by this gateway."""
        with self._lock:
            row = self._db.execute(
                "INSERT INTO counters (name, value) VALUES ('transaction_id', 1) "
                "ON CONFLICT(name) DO UPDATE SET value=value+1 RETURNING value"
            ).fetchone()
        return int(row[0])

    def by_start_key(self, start_key: str) -> Transaction | None:
        with self._lock:
            row = self._db.execute("SELECT record FROM transactions WHERE start_key=?", (start_key,)).fetchone()
        return None if row is None else _load(row[0])

    def transaction(self, session_id: str) -> Transaction | None:
        with self._lock:
            row = self._db.execute("SELECT record FROM transactions WHERE session_id=?", (session_id,)).fetchone()
        return None if row is None else _load(row[0])

    def save(self, transaction: Transaction, start_key: str | None = None) -> None:
        record = _dump(transaction)
        with self._lock:
            self._db.execute(
                "INSERT INTO transactions (session_id, station_id, transaction_id, start_key, record, ended) "
                "VALUES (?,?,?,?,?,?) ON CONFLICT(session_id) DO UPDATE SET record=excluded.record, "
                "ended=excluded.ended",
                (transaction.session_id, transaction.station_id, transaction.transaction_id, start_key, record,
                 int(not transaction.active)),
            )
            if not transaction.active:
                self._db.execute(
                    "DELETE FROM transactions WHERE ended=1 AND rowid NOT IN "
                    "(SELECT rowid FROM transactions WHERE ended=1 ORDER BY rowid DESC LIMIT ?)",
                    (MAX_ENDED_KEPT,),
                )

    def active_transactions(self) -> list[Transaction]:
        with self._lock:
            rows = self._db.execute("SELECT record FROM transactions WHERE ended=0 ORDER BY rowid").fetchall()
        return [_load(row[0]) for row in rows]


def _dump(transaction: Transaction) -> str:
    return json.dumps(dataclasses.asdict(transaction), separators=(",", ":"))


def _load(record: str) -> Transaction:
    fields = {f.name for f in dataclasses.fields(Transaction)}
    return Transaction(**{k: v for k, v in json.loads(record).items() if k in fields})
