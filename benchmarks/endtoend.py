"""End to end: the whole public path against a trivial three-hop chain, in one run.

Both are real server processes, one worker with 16 threads each, loaded by the same closed
loop (``benchmarks.closedloop``). The stack runs as deployed: each service granian behind its
edge (nginx, gridcommon.edge), live allocation, durable state in SQLite, operator tokens,
signed peer balancing. The chain is gunicorn alone, as the services were served before they
had an edge: the fixed yardstick.
"""
from __future__ import annotations

import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from benchmarks.closedloop import LoopResult, closed_loop
from tests.harness import OPERATOR_TOKEN, Service, Stack, scrape, start_all, start_stack, stop_all

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Enough room that every tiny request is admitted whole: the loop measures the path, not a full grid.
ROOMY_CAPACITIES = (10_000.0, 10_000.0, 10_000.0)
# Runs of each loop, alternated between the chain and the stack.
REPEATS = 3


def process_ids(service: Service) -> list[int]:
    """The service's process and all its descendants: the edge and its server, their masters and workers."""
    assert service.process is not None
    found, pending = [], [service.process.pid]
    while pending:
        pid = pending.pop()
        found.append(pid)
        for task in Path(f"/proc/{pid}/task").iterdir():
            pending += (int(child) for child in (task / "children").read_text().split())
    return found


# The servers that run the services' code in a worker process their own main process started.
SERVERS = (b"granian", b"gunicorn")


def app_worker(service: Service) -> int:
    """The worker where the service's own code runs: a granian (or, in the chain, gunicorn) process
    whose parent is one too."""
    def command(pid: int) -> bytes:
        return Path(f"/proc/{pid}/cmdline").read_bytes()

    for pid in process_ids(service):
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        if any(server in command(pid) and server in command(parent) for server in SERVERS):
            return pid
    raise RuntimeError(f"{service.name}: no granian or gunicorn worker among its processes")


def cpu_seconds(service: Service) -> float:
    """User and system CPU the service's processes have used so far."""
    ticks = 0
    for pid in process_ids(service):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / CLOCK_TICKS


def resident_mib(service: Service) -> float:
    total_kib = 0
    for pid in process_ids(service):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total_kib += int(line.split()[1])
    return total_kib / 1024


@dataclass
class Measured:
    loop: LoopResult
    # CPU seconds each service used during the loop, by service name.
    cpu_by_service: dict[str, float]

    @property
    def answers(self) -> int:
        return sum(self.loop.statuses.values())

    @property
    def cpu_ms_per_request(self) -> float:
        return 1000 * sum(self.cpu_by_service.values()) / max(1, self.answers)

    def service_cpu_ms_per_request(self, name: str) -> float:
        return 1000 * self.cpu_by_service[name] / max(1, self.answers)


def measure(url: str, services: list[Service], clients: int, seconds: float, prefix: str) -> Measured:
    closed_loop(url, clients, 1.0, prefix=f"{prefix}-warm")  # connections, caches, the first sessions
    before = {service.name: cpu_seconds(service) for service in services}
    loop = closed_loop(url, clients, seconds, prefix=prefix)
    return Measured(loop, {service.name: cpu_seconds(service) - before[service.name] for service in services})


def start_chain(log_dir: Path) -> list[Service]:
    log_dir.mkdir(parents=True, exist_ok=True)
    # gunicorn alone, as before the services had an edge: the fixed yardstick.
    hops = [Service(name=f"chain-{index}", app="benchmarks.chain:create_app()", env={}, log_dir=log_dir, edge=False)
            for index in range(3)]
    for hop, next_hop in zip(hops, hops[1:]):
        hop.env["NEXT_URL"] = next_hop.url
    return start_all(list(reversed(hops)))[::-1]


def start_deployed_stack(log_dir: Path, balancer_env: dict[str, str] | None = None) -> Stack:
    state = str(log_dir / "state")
    return start_stack(
        log_dir,
        capacities=ROOMY_CAPACITIES,
        substation_env={"STATE_DIR": state, "ADMIN_TOKEN": OPERATOR_TOKEN},
        balancer_env={"ADMIN_TOKEN": OPERATOR_TOKEN, **(balancer_env or {})},
        charge_env={"STATE_DIR": state},
        peers=True,
    )


def print_comparison(clients: int, chain: Measured, stack: Measured) -> None:
    rows = (
        ("answers/s", chain.loop.answers_per_second, stack.loop.answers_per_second, "{:.0f}"),
        ("p50 ms", 1000 * chain.loop.latency_percentile(0.5), 1000 * stack.loop.latency_percentile(0.5), "{:.1f}"),
        ("p99 ms", 1000 * chain.loop.latency_percentile(0.99), 1000 * stack.loop.latency_percentile(0.99), "{:.1f}"),
        ("CPU ms/request", chain.cpu_ms_per_request, stack.cpu_ms_per_request, "{:.2f}"),
    )
    print(f"  {clients} clients            chain      stack   stack/chain")
    for name, chain_value, stack_value, shape in rows:
        print(f"    {name:<16} {shape.format(chain_value):>9} {shape.format(stack_value):>10}   {stack_value / chain_value:5.2f}x")
    for measured in (chain, stack):
        print("    CPU ms/request by service: " + ", ".join(
            f"{name} {measured.service_cpu_ms_per_request(name):.2f}" for name in measured.cpu_by_service))
    failures = chain.loop.failures + stack.loop.failures
    print(f"    statuses: chain {dict(chain.loop.statuses)}, stack {dict(stack.loop.statuses)}, failures {failures}")


def throughput(log_dir: Path, seconds: float = 10.0, balancer_env: dict[str, str] | None = None) -> None:
    print("\n## The whole public path vs a trivial three-hop chain (same server, client and loop)"
          + (f", balancer {balancer_env}" if balancer_env else ""))
    chain_hops = start_chain(log_dir / "chain")
    stack = start_deployed_stack(log_dir / "stack", balancer_env)
    try:
        for clients in (16, 64):
            # Chain, stack, chain, stack: a neighbour busy for a while slows a chain and a stack run alike.
            # The best of each is compared.
            chains, reals = [], []
            for repeat in range(REPEATS):
                chains.append(measure(chain_hops[0].url, chain_hops, clients, seconds, f"EV-chain-{clients}-{repeat}"))
                reals.append(measure(stack.charge.url, stack.services, clients, seconds, f"EV-stack-{clients}-{repeat}"))
            chain = max(chains, key=lambda m: m.loop.answers_per_second)
            real = max(reals, key=lambda m: m.loop.answers_per_second)
            print_comparison(clients, chain, real)
            print(f"    floors: answers/s >= 0.85x -> {real.loop.answers_per_second / chain.loop.answers_per_second:.2f}x;"
                  f" p99 <= 1.3x -> {real.loop.latency_percentile(0.99) / chain.loop.latency_percentile(0.99):.2f}x;"
                  f" CPU/request <= 1.2x -> {real.cpu_ms_per_request / chain.cpu_ms_per_request:.2f}x")
    finally:
        stop_all([*chain_hops, *stack.services])


def frozen_substation(log_dir: Path, clients: int = 16, hedging: bool = True) -> None:
    """The loop while one substation is frozen (SIGSTOP) for a few seconds, then thawed."""
    print(f"\n## {clients} clients while one substation is frozen (SIGSTOP) for 4 s, "
          f"hedged forwards {'on' if hedging else 'off'}")
    stack = start_deployed_stack(log_dir / f"frozen-{hedging}", {"HEDGE_FORWARDS": str(hedging).lower()})
    freeze_at, thaw_at, seconds = 5.0, 9.0, 14.0
    try:
        closed_loop(stack.charge.url, clients, 1.0, prefix="EV-freeze-warm")

        def freeze() -> None:
            time.sleep(freeze_at)
            stack.substations[1].suspend()
            time.sleep(thaw_at - freeze_at)
            stack.substations[1].resume()

        freezer = threading.Thread(target=freeze, daemon=True)
        freezer.start()
        loop = closed_loop(stack.charge.url, clients, seconds, prefix="EV-freeze")
        freezer.join()
        time.sleep(2.0)  # the sweep after the thawed substation's next poll
        balancer = scrape(stack.balancer)
    finally:
        stack.substations[1].resume()
        stack.stop()
    usual_p99 = loop.latency_percentile(0.99, 0.0, freeze_at)
    frozen_p99 = loop.latency_percentile(0.99, freeze_at, thaw_at)
    usual_longest = max((latency for sent, latency in loop.requests if sent + latency < freeze_at), default=0.0)
    frozen_longest = loop.longest(freeze_at, thaw_at)
    print(f"    before the freeze: p99 {1000 * usual_p99:.1f} ms, longest wait {1000 * usual_longest:.0f} ms")
    print(f"    during the freeze: p99 {1000 * frozen_p99:.1f} ms, longest wait {1000 * frozen_longest:.0f} ms")
    print(f"    statuses {dict(loop.statuses)}, failures {loop.failures}")
    def counted(name: str) -> dict[str, int]:
        return {",".join(labels.values()): int(value) for labels, value in balancer.samples.get(name, [])}

    print(f"    hedges {counted('load_balancer_hedges_total')}; forward failures {counted('forward_failures_total')}; "
          f"copies admitted after their answer was lost, then stopped {counted('lost_sessions_freed_total')}")
    print(f"    floors: longest wait at most 0.5 s over usual -> {frozen_longest - usual_longest:+.3f} s;"
          f" p99 <= 3x -> {frozen_p99 / usual_p99:.2f}x; 0 failures -> {loop.failures}")


# A fleet that charges again and again: each vehicle's session (2 s) is over long before its next
# request, so the stack holds what a steady grid holds, and any growth is per request.
MEMORY_FLEET = 5_000
MEMORY_SESSION_SECONDS = 2.0


def memory_growth(log_dir: Path, clients: int = 32) -> None:
    print(f"\n## Memory of each service after 10,000 and after 100,000 requests "
          f"(a fleet of {MEMORY_FLEET:,} vehicles, {MEMORY_SESSION_SECONDS:g} s sessions)")
    stack = start_deployed_stack(log_dir / "memory")
    statuses: Counter = Counter()
    try:
        for requests_so_far, more in ((10_000, 10_000), (100_000, 90_000)):
            loop = closed_loop(stack.charge.url, clients, 1200.0, max_requests=more, prefix="EV-fleet",
                               duration_seconds=MEMORY_SESSION_SECONDS, fleet=MEMORY_FLEET)
            statuses += loop.statuses
            resident = {service.name: resident_mib(service) for service in stack.services}
            if requests_so_far == 10_000:
                after_10k = resident
        after_100k = resident
    finally:
        stack.stop()
    for name, first in after_10k.items():
        print(f"    {name:<24} {first:6.1f} MiB -> {after_100k[name]:6.1f} MiB  {after_100k[name] / first:5.2f}x")
    worst = max(after_100k[name] / first for name, first in after_10k.items())
    print(f"    answers {dict(statuses)}")
    print(f"    floor: within 1.10x -> worst {worst:.2f}x")
