"""A real PostgreSQL 15 server for the tests: its own cluster in a temporary folder, on 127.0.0.1 and a free port.

initdb refuses to run as root, so under root the cluster belongs to ``nobody`` (``runuser``), in a
folder made for it. Every test that wants a database gets a fresh one (``new_database``), so tests
never see each other's rows; the server itself starts once per pytest run.
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.harness import free_port

POSTGRES_BIN = Path(os.environ.get("POSTGRES_BIN", "/usr/lib/postgresql/15/bin"))
# Enough for two charge API replicas' pools, a benchmark's and the tests' own connections.
MAX_CONNECTIONS = 300
START_TIMEOUT_SECONDS = 60


class PostgresMissing(RuntimeError):
    """PostgreSQL's server programs are not installed where expected."""


@dataclass
class PostgresServer:
    folder: Path
    port: int
    user: str

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """Create an empty database; its URL, as DATABASE_URL takes it."""
        import psycopg

        name = f"charge_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        _run_as(self.user, [str(POSTGRES_BIN / "pg_ctl"), "stop", "-D", str(self.folder / "data"), "-m", "immediate",
                            "-w", "-t", "30"], check=False)
        shutil.rmtree(self.folder, ignore_errors=True)


def _run_as(user: str, command: list[str], check: bool = True) -> subprocess.CompletedProcess:
    if os.geteuid() == 0:
        command = ["runuser", "-u", user, "--", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=START_TIMEOUT_SECONDS)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stdout}{result.stderr}")
    return result


def start_postgres() -> PostgresServer:
    """initdb and start a cluster of our own; ``PostgresMissing`` says how to install the server."""
    if not (POSTGRES_BIN / "initdb").exists():
        raise PostgresMissing(
            f"PostgreSQL 15 is not installed ({POSTGRES_BIN / 'initdb'} is missing): run `make postgresql` "
            "(Debian's postgresql package), or set POSTGRES_BIN to the folder of initdb and pg_ctl"
        )
    user = "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    folder = Path(tempfile.mkdtemp(prefix="sglb-postgres-"))
    if os.geteuid() == 0:
        entry = pwd.getpwnam(user)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    data = folder / "data"
    _run_as(user, [str(POSTGRES_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                   "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"])
    port = free_port()
    options = (f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={folder} "
               f"-c max_connections={MAX_CONNECTIONS}")
    _run_as(user, [str(POSTGRES_BIN / "pg_ctl"), "start", "-D", str(data), "-w", "-t", str(START_TIMEOUT_SECONDS),
                   "-l", str(folder / "postgres.log"), "-o", options])
    return PostgresServer(folder, port, user)


@dataclass
class ChargeRecords:
    """Where a charge API under test keeps its records: ``sqlite`` (STATE_DIR) or ``postgresql`` (DATABASE_URL).

    ``env`` gives fresh, empty records every call, so two stacks of one module never share rows.
    """

    backend: str
    postgres: PostgresServer | None = None

    def env(self, folder: Path) -> dict[str, str]:
        if self.backend == "postgresql":
            assert self.postgres is not None
            return {"DATABASE_URL": self.postgres.new_database()}
        return {"STATE_DIR": str(folder / f"charge-state-{uuid.uuid4().hex[:8]}")}

    def store_target(self, folder: Path) -> Path | str:
        """What ``ChargeStore`` opens: a file in ``folder``, or a new database's URL."""
        if self.backend == "postgresql":
            assert self.postgres is not None
            return self.postgres.new_database()
        return folder / f"charge-{uuid.uuid4().hex[:8]}.sqlite3"
