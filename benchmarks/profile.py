"""``python -m benchmarks.profile``: where each service's CPU goes under the closed loop.

Starts the stack as deployed (``benchmarks.endtoend``), runs a closed loop of charge
requests through it, and samples every service's worker with py-spy meanwhile. For
each service it writes the collapsed stacks (``<service>.folded``: open them in
speedscope or feed them to flamegraph.pl) and prints the functions that held the
GIL most, inclusive and by themselves, with the CPU each service spent per request.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from benchmarks.closedloop import closed_loop
from benchmarks.endtoend import app_worker, cpu_seconds, start_deployed_stack

# Frames of the services and of the libraries they call on the hot path; the rest is the server's loop.
SHOWN = re.compile(r"\((charge_request_service|load_balancer|substation_service|gridcommon|flask_limiter|limits"
                   r"|logging|prometheus_client|json|urllib3|sqlite3|werkzeug|flask)/")


def top_functions(folded: Path, count: int) -> tuple[int, list[tuple[str, float]], list[tuple[str, float]]]:
    """Samples in all, and the ``count`` functions with the most samples inclusive and by themselves (shares)."""
    inclusive: Counter = Counter()
    own: Counter = Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack:
            continue
        weight = int(samples)
        total += weight
        frames = [re.sub(r":\d+\)$", ")", re.sub(r" \(/.*?/(site-packages|main)/", " (", frame))
                  for frame in stack.split(";")[1:]]
        for frame in set(frames):
            if SHOWN.search(frame):
                inclusive[frame] += weight
        if frames:
            own[frames[-1]] += weight
    share = lambda counter: [(frame, n / max(1, total)) for frame, n in counter.most_common(count)]  # noqa: E731
    return total, share(inclusive), share(own)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each service is sampled")
    parser.add_argument("--output", type=Path, default=Path("profile-results"))
    parser.add_argument("--top", type=int, default=25)
    options = parser.parse_args(argv)
    if shutil.which("py-spy") is None:
        print("py-spy is not installed: make install brings it (or pip install py-spy)", file=sys.stderr)
        return 2
    options.output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sglb-profile-") as tmp:
        stack = start_deployed_stack(Path(tmp))
        try:
            closed_loop(stack.charge.url, options.clients, 1.0, prefix="EV-profile-warm")
            answers: list[int] = []
            loop = threading.Thread(target=lambda: answers.append(sum(closed_loop(
                stack.charge.url, options.clients, options.seconds + 2.0, prefix="EV-profile").statuses.values())))
            before = {service.name: cpu_seconds(service) for service in stack.services}
            loop.start()
            time.sleep(1.0)
            samplers = [
                subprocess.Popen(
                    ["py-spy", "record", "--pid", str(app_worker(service)), "--duration", str(int(options.seconds)),
                     "--rate", "250", "--gil", "--format", "raw", "--output", str(options.output / f"{service.name}.folded")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
                for service in stack.services
            ]
            for sampler in samplers:
                sampler.wait()
            loop.join()
            spent = {service.name: cpu_seconds(service) - before[service.name] for service in stack.services}
        finally:
            stack.stop()
    requests_answered = max(1, answers[0] if answers else 1)
    print(f"# Where the CPU goes: {options.clients} clients, {requests_answered} requests answered")
    for name, seconds in spent.items():
        total, inclusive, own = top_functions(options.output / f"{name}.folded", options.top)
        print(f"\n## {name}: {1000 * seconds / requests_answered:.2f} ms CPU per request; {total} samples holding the GIL")
        print("  inclusive:")
        for frame, share in inclusive:
            print(f"    {100 * share:5.1f}%  {frame}")
        print("  by itself:")
        for frame, share in own[:10]:
            print(f"    {100 * share:5.1f}%  {frame}")
    print(f"\nCollapsed stacks in {options.output}/ (speedscope.app or flamegraph.pl read them).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
