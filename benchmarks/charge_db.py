"""The charge API's throughput with its records on PostgreSQL (DATABASE_URL) relative to its SQLite file.

One replica of each in front of the same balancer and substations, driven by the same closed loop
(benchmarks/closedloop.py), run in turns so a busy neighbour slows both alike; the best run of each
is compared. PostgreSQL is a cluster of the benchmark's own (tests/postgres_support.py), with its
defaults: every commit is flushed to disk, as the SQLite file's are (synchronous=NORMAL in WAL).
"""
from __future__ import annotations

from pathlib import Path

import requests

from benchmarks.closedloop import closed_loop
from tests.harness import OPERATOR_TOKEN, Service, start_stack, stop_all
from tests.postgres_support import start_postgres

CLIENTS = 16
SECONDS = 6.0
REPEATS = 4
FLOOR = 0.7


def charge_api(name: str, balancer_url: str, log_dir: Path, records: dict[str, str], auth: str) -> Service:
    return Service(name=name, app="charge_request_service:create_app()", env={
        "LOAD_BALANCER_URL": balancer_url, "ADMIN_TOKEN": OPERATOR_TOKEN, "RATE_LIMIT_PER_VEHICLE": "",
        "PUBLIC_API_AUTH": auth, **records,
    }, log_dir=log_dir)


def client_key(api: Service) -> dict[str, str]:
    """A key whose quotas the loop never meets: what is measured is booking against them, not refusals."""
    made = requests.post(f"{api.url}/client-keys", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"}, timeout=10,
                         json={"name": "bench", "quotas": {"sessions": 100_000, "kw": 1_000_000, "queued": 100_000,
                                                           "requests_per_second": 10_000}})
    made.raise_for_status()
    return {"X-API-Key": made.json()["api_key"]}


def main(log_dir: Path) -> None:
    print(f"\n## Charge API throughput, records on PostgreSQL vs SQLite (one replica, {CLIENTS} clients, "
          f"best of {REPEATS} x {SECONDS:g} s)")
    postgres = start_postgres()
    stack = start_stack(log_dir / "charge-db", capacities=(1e6, 1e6, 1e6))
    # Each database without client keys, and with one (its quotas booked with every request: in memory on
    # SQLite, in the database under the key's lock on PostgreSQL, where replicas share them).
    def records(backend: str, auth: str) -> dict[str, str]:
        if backend == "sqlite":
            return {"STATE_DIR": str(log_dir / "charge-db" / f"state-{auth}")}
        return {"DATABASE_URL": postgres.new_database()}

    apis = {
        (backend, auth): charge_api(f"charge-{backend}-{auth}", stack.balancer.url, log_dir, records(backend, auth),
                                    auth)
        for backend in ("sqlite", "postgresql") for auth in ("open", "keys")
    }
    try:
        headers: dict[tuple[str, str], dict[str, str]] = {}
        for kind, api in apis.items():
            api.start()
            headers[kind] = client_key(api) if kind[1] == "keys" else {}
            closed_loop(api.url, CLIENTS, 1.0, prefix=f"EV-warm-{api.name}", duration_seconds=2.0,
                        headers=headers[kind])
        rates: dict[tuple[str, str], list[float]] = {kind: [] for kind in apis}
        for repeat in range(REPEATS):
            for kind, api in apis.items():
                loop = closed_loop(api.url, CLIENTS, SECONDS, prefix=f"EV-{api.name}-{repeat}", duration_seconds=2.0,
                                   headers=headers[kind])
                rates[kind].append(loop.statuses[201] / loop.elapsed_seconds)
        best = {kind: max(found) for kind, found in rates.items()}
        for auth, label in (("open", "without client keys"), ("keys", "one client key")):
            sqlite, postgresql = best[("sqlite", auth)], best[("postgresql", auth)]
            print(f"  {label}:")
            print(f"    SQLite file (group commit)   1.00x ({sqlite:.0f} admitted/s)")
            print(f"    PostgreSQL (DATABASE_URL)    {postgresql / sqlite:5.2f}x ({postgresql:.0f} admitted/s)")
            print(f"    floor: PostgreSQL at least {FLOOR}x the SQLite file -> {postgresql / sqlite:.2f}x "
                  f"({'FLOOR MET' if postgresql / sqlite >= FLOOR else 'FLOOR MISSED'})")
    finally:
        stop_all([*apis.values(), *stack.services])
        postgres.stop()


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sglb-bench-") as folder:
        main(Path(folder))
