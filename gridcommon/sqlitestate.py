"""Opening a service's state file: SQLite (stdlib ``sqlite3``) in WAL mode, shared by every store.

WAL with ``synchronous=NORMAL`` keeps every committed change through a killed
process; ``FULL`` also through a power cut, at the cost of an fsync per commit.
A file that cannot be opened is a ``StateFileError`` that says what to do.

The state (who charges where, and when) is private: the folder is 0700 and the
files 0600, whatever the umask of whoever started the service.
"""
from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

PRIVATE_FOLDER = 0o700
PRIVATE_FILE = 0o600
# The files SQLite keeps beside the state file.
COMPANIONS = ("-wal", "-shm", "-journal")


class StateFileError(RuntimeError):
    """The state cannot be opened or written; the message says what to do."""

    # What the operator should look at, named in the 503 a client gets (gridcommon.web).
    operator_check = "the state folder (STATE_DIR)"


def open_state_file(path: Path, schema: str, full_sync: bool) -> sqlite3.Connection:
    """Open (or create) ``path`` with ``schema``; autocommit, usable from any thread under the caller's lock."""
    try:
        _make_private(path)
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


def _make_private(path: Path) -> None:
    """The folder 0700 and the state file 0600 before SQLite opens it.

    The umask alone does not do it: a service inherits whatever umask its starter had
    (supervisord applies its own only when it daemonizes), usually 022. SQLite creates the
    -wal and -shm files with the mode of the state file, so a new state file is created
    0600 here first; files of an earlier, more open version lose their group and other bits.
    """
    folder = path.parent
    folder.mkdir(mode=PRIVATE_FOLDER, parents=True, exist_ok=True)
    # A shared folder (sticky, as /tmp) or someone else's is not ours to close.
    details = folder.stat()
    if details.st_uid == os.geteuid() and not details.st_mode & stat.S_ISVTX:
        _drop_group_and_other(folder, details)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE))
    except FileExistsError:
        pass  # an existing file, or something else SQLite then refuses with a clear error
    for file in (path, *(path.with_name(path.name + suffix) for suffix in COMPANIONS)):
        try:
            details = file.stat()
        except FileNotFoundError:
            continue
        if stat.S_ISREG(details.st_mode) and details.st_uid == os.geteuid():
            _drop_group_and_other(file, details)


def _drop_group_and_other(path: Path, details: os.stat_result) -> None:
    mode = stat.S_IMODE(details.st_mode)
    if mode & 0o077:
        os.chmod(path, mode & ~0o077)
