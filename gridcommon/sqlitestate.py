"""Opening a service's state file: SQLite (stdlib ``sqlite3``) in WAL mode, shared by every store.

WAL with ``synchronous=NORMAL`` keeps every committed change through a killed
process; ``FULL`` also through a power cut, at the cost of an fsync per commit.
A file that cannot be opened is a ``StateFileError`` that says what to do.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path


class StateFileError(RuntimeError):
    """The state cannot be opened or written; the message says what to do."""


def open_state_file(path: Path, schema: str, full_sync: bool) -> sqlite3.Connection:
    """Open (or create) ``path`` with ``schema``; autocommit, usable from any thread under the caller's lock."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # check_same_thread off: gunicorn's threads take turns under the store's or ledger's lock.
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={'FULL' if full_sync else 'NORMAL'}")
        db.executescript(schema)
        return db
    except sqlite3.DatabaseError as exc:
        raise StateFileError(
            f"the state file {path} cannot be used ({exc}). If it is damaged, move it away (the service then "
            "starts with no state) or restore it from a backup; check that the folder is writable."
        ) from None
    except OSError as exc:
        raise StateFileError(f"the state folder {path.parent} cannot be used ({exc}): check STATE_DIR") from None
