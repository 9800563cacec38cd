"""The services' state files are private (folder 0700, files 0600) whatever umask they start with.

Real processes open the real stores: a process inherits its starter's umask (supervisord's
own applies only when it daemonizes, a shell's is usually 022), and SQLite creates the
-wal and -shm files beside the state file with its mode. The modes are read with os.stat,
while the process still holds the files open (SQLite removes -wal and -shm at the last close).
"""
from __future__ import annotations

import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO_ROOT

# Opens the charge API's records and a substation's ledger in the folder argv[1], writes a
# record, says so, and holds them open until its stdin closes (or dies, with --crash).
OPEN_STORES = """
import os, sys
from pathlib import Path
from charge_request_service.store import ChargeStore
from substation_service.store import LedgerStore

folder = Path(sys.argv[1])
charge = ChargeStore(folder / "charge_request_service.sqlite3")
ledger = LedgerStore(folder / "substation-1.sqlite3", "substation-1")
charge.put_session("s-1", "EV-1", "pending", {"session_id": "s-1"}, 1.0)
print("open", flush=True)
if "--crash" in sys.argv:
    os.kill(os.getpid(), 9)
sys.stdin.read()
"""
STATE_FILES = [
    f"{name}.sqlite3{suffix}"
    for name in ("charge_request_service", "substation-1")
    for suffix in ("", "-wal", "-shm")
]


def _modes(folder: Path) -> dict[str, str]:
    return {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in folder.iterdir()}


def _open_stores(folder: Path, umask: int, *args: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", OPEN_STORES, str(folder), *args],
        cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, umask=umask,
    )
    line = process.stdout.readline()
    if line != "open\n":
        process.kill()
        _, errors = process.communicate(timeout=30)
        pytest.fail(f"the stores did not open: {line}{errors}")
    return process


def _close(process: subprocess.Popen) -> None:
    process.stdin.close()
    assert process.wait(timeout=30) == 0, process.stderr.read()


def test_new_state_files_are_private_under_any_umask(tmp_path: Path) -> None:
    folder = tmp_path / "run" / "state"
    process = _open_stores(folder, umask=0)
    try:
        assert oct(stat.S_IMODE(folder.stat().st_mode)) == "0o700"
        assert _modes(folder) == {name: "0o600" for name in STATE_FILES}
    finally:
        _close(process)


def test_state_files_of_an_earlier_more_open_run_become_private(tmp_path: Path) -> None:
    """A folder and files left 0755/0644 by an earlier version, the -wal and -shm of a killed one too."""
    folder = tmp_path / "state"
    crashed = _open_stores(folder, 0, "--crash")
    assert crashed.wait(timeout=30) == -signal.SIGKILL
    for path in (folder, *folder.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    assert set(_modes(folder)) == set(STATE_FILES), "the killed process left its -wal and -shm"

    process = _open_stores(folder, umask=0o022)
    try:
        assert oct(stat.S_IMODE(folder.stat().st_mode)) == "0o700"
        assert _modes(folder) == {name: "0o600" for name in STATE_FILES}
    finally:
        _close(process)


def test_a_shared_folder_keeps_its_mode_and_the_files_are_private(tmp_path: Path) -> None:
    """STATE_DIR set to a sticky folder such as /tmp: not the service's to close."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    process = _open_stores(shared, umask=0)
    try:
        assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
        assert _modes(shared) == {name: "0o600" for name in STATE_FILES}
    finally:
        _close(process)
