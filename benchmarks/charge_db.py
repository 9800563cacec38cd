"""The charge API's throughput with its records on PostgreSQL (DATABASE_URL) relative to its SQLite file.

One replica of each in front of the same balancer and substations, driven by the same closed loop
(benchmarks/closedloop.py), run in turns so a busy neighbour slows both alike; the best run of each
is compared. PostgreSQL is a cluster of the benchmark's own (tests/postgres_support.py), with its
defaults: every commit is flushed to disk, as the SQLite file's are (synchronous=NORMAL in WAL).
"""
from __future__ import annotations

from pathlib import Path

from benchmarks.closedloop import closed_loop
from tests.harness import OPERATOR_TOKEN, Service, start_stack, stop_all
from tests.postgres_support import start_postgres

CLIENTS = 16
SECONDS = 6.0
REPEATS = 4
FLOOR = 0.7


def charge_api(name: str, balancer_url: str, log_dir: Path, records: dict[str, str]) -> Service:
    return Service(name=name, app="charge_request_service:create_app()", env={
        "LOAD_BALANCER_URL": balancer_url, "ADMIN_TOKEN": OPERATOR_TOKEN, "RATE_LIMIT_PER_VEHICLE": "", **records,
    }, log_dir=log_dir)


def main(log_dir: Path) -> None:
    print(f"\n## Charge API throughput, records on PostgreSQL vs SQLite (one replica, {CLIENTS} clients, "
          f"best of {REPEATS} x {SECONDS:g} s)")
    postgres = start_postgres()
    stack = start_stack(log_dir / "charge-db", capacities=(1e6, 1e6, 1e6))
    apis = {
        "sqlite": charge_api("charge-sqlite", stack.balancer.url, log_dir,
                             {"STATE_DIR": str(log_dir / "charge-db" / "state")}),
        "postgresql": charge_api("charge-postgresql", stack.balancer.url, log_dir,
                                 {"DATABASE_URL": postgres.new_database()}),
    }
    try:
        for api in apis.values():
            api.start()
            closed_loop(api.url, CLIENTS, 1.0, prefix=f"EV-warm-{api.name}", duration_seconds=2.0)
        rates: dict[str, list[float]] = {kind: [] for kind in apis}
        for repeat in range(REPEATS):
            for kind, api in apis.items():
                loop = closed_loop(api.url, CLIENTS, SECONDS, prefix=f"EV-{kind}-{repeat}", duration_seconds=2.0)
                rates[kind].append(loop.statuses[201] / loop.elapsed_seconds)
        sqlite, postgresql = max(rates["sqlite"]), max(rates["postgresql"])
        print(f"  SQLite file (group commit)   1.00x ({sqlite:.0f} admitted/s)")
        print(f"  PostgreSQL (DATABASE_URL)    {postgresql / sqlite:5.2f}x ({postgresql:.0f} admitted/s)")
        print(f"  floor: PostgreSQL at least {FLOOR}x the SQLite file -> {postgresql / sqlite:.2f}x")
    finally:
        stop_all([*apis.values(), *stack.services])
        postgres.stop()


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sglb-bench-") as folder:
        main(Path(folder))
