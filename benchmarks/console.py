"""What one operator console following the live stream costs the charge API, from /proc.

A real stack (three substations, a balancer, the charge API, each behind its edge); CPU
seconds of the charge API's processes (edge and gunicorn) and of the substations are read
from /proc over a window with no console, then with one client on ``/console/events``, with a
few sessions and with 1,000 (admitted straight at the substations), and given per minute.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import requests

from benchmarks.endtoend import process_ids
from benchmarks.stations import cpu_seconds
from tests.harness import OPERATOR_TOKEN, Service, start_stack

WINDOW_SECONDS = 20.0
SESSIONS = 1_000


def cpu_of(services: list[Service]) -> float:
    return sum(cpu_seconds(pid) for service in services for pid in process_ids(service))


def per_minute(services: list[Service], seconds: float) -> float:
    before = cpu_of(services)
    time.sleep(seconds)
    return (cpu_of(services) - before) * 60.0 / seconds


class Follower:
    """One console client: logs in, then reads the live stream until stopped."""

    def __init__(self, base: str) -> None:
        self.http = requests.Session()
        login = self.http.post(f"{base}/console/login", data={"token": OPERATOR_TOKEN}, timeout=10,
                               allow_redirects=False)
        login.raise_for_status()
        self.events = 0
        self._stream = self.http.get(f"{base}/console/events", stream=True, timeout=10)
        self._stream.raise_for_status()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for line in self._stream.iter_lines():
                if line.startswith(b"event: snapshot"):
                    self.events += 1
        except (requests.RequestException, AttributeError):
            return  # closed by stop()

    def stop(self) -> None:
        self._stream.close()
        self.http.close()


def measure(charge: Service, substations: list[Service], label: str, followed: bool) -> tuple[float, float]:
    follower = Follower(charge.url) if followed else None
    try:
        if follower is not None:
            time.sleep(2.0)  # the first snapshots, connections made
        before_subs = cpu_of(substations)
        charge_cpu = per_minute([charge], WINDOW_SECONDS)
        subs_cpu = (cpu_of(substations) - before_subs) * 60.0 / WINDOW_SECONDS
        events = f", {follower.events} snapshots received" if follower else ""
        print(f"  {label:<34} charge API {charge_cpu:6.2f} CPU s/min, substations {subs_cpu:6.2f}{events}")
        return charge_cpu, subs_cpu
    finally:
        if follower is not None:
            follower.stop()


def live_stream_cost(log_dir: Path) -> None:
    print(f"\n## Cost of one console on the live stream (CPU seconds per minute, {WINDOW_SECONDS:g} s windows)")
    stack = start_stack(log_dir / "console", capacities=(1000.0, 1000.0, 1000.0),
                        substation_env={"ADMIN_TOKEN": OPERATOR_TOKEN, "SESSION_SECONDS": "3600"})
    http = requests.Session()

    def admit(first: int, last: int) -> None:
        for index in range(first, last):
            http.post(f"{stack.substations[index % 3].url}/charge",
                      json={"vehicle_id": f"console-{index}", "amount": 3 + index % 20}, timeout=10).raise_for_status()

    try:
        admit(0, 3)
        idle, _ = measure(stack.charge, stack.substations, "no console, 3 sessions", followed=False)
        few, _ = measure(stack.charge, stack.substations, "1 console, 3 sessions", followed=True)
        admit(3, SESSIONS)
        # The gatherer lingers a minute after the last console: wait it out so "no console" is really idle.
        time.sleep(62.0)
        idle_many, _ = measure(stack.charge, stack.substations, f"no console, {SESSIONS} sessions", followed=False)
        many, _ = measure(stack.charge, stack.substations, f"1 console, {SESSIONS} sessions", followed=True)
        print(f"  1 console costs the charge API {few - idle:.2f} CPU s/min with 3 sessions, "
              f"{many - idle_many:.2f} with {SESSIONS} ({(many - idle_many) / max(few - idle, 1e-9):.1f}x)")
    finally:
        http.close()
        stack.stop()
