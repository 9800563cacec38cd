"""Test hosts of our own: network namespaces joined to this host by veth pairs.

Each host gets a /30 of 10.231.N.0 that exists only inside this machine, so a
service in it is reached over a real link that a test can cut, like a container
whose network fails. Needs root and iproute2 (both present on the machines that
run the suite).
"""
from __future__ import annotations

import subprocess
import uuid
from dataclasses import dataclass


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@dataclass
class TestHost:
    namespace: str
    host_side: str
    inner_side: str
    address: str
    gateway: str

    def cut(self) -> None:
        """Take the link down inside the host: packets to it vanish, as in a network split."""
        _ip("netns", "exec", self.namespace, "ip", "link", "set", self.inner_side, "down")

    def restore(self) -> None:
        _ip("netns", "exec", self.namespace, "ip", "link", "set", self.inner_side, "up")

    def remove(self) -> None:
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", self.host_side], capture_output=True, timeout=10)


def create_test_host(index: int) -> TestHost:
    """A namespace reachable from here at 10.231.<index>.2 (index 0-255)."""
    tag = uuid.uuid4().hex[:6]
    host = TestHost(
        namespace=f"sg-{tag}",
        host_side=f"sgh{tag}",
        inner_side=f"sgn{tag}",
        address=f"10.231.{index}.2",
        gateway=f"10.231.{index}.1",
    )
    try:
        _ip("netns", "add", host.namespace)
        _ip("link", "add", host.host_side, "type", "veth", "peer", "name", host.inner_side)
        _ip("link", "set", host.inner_side, "netns", host.namespace)
        _ip("addr", "add", f"{host.gateway}/30", "dev", host.host_side)
        _ip("link", "set", host.host_side, "up")
        inside = ("netns", "exec", host.namespace, "ip")
        _ip(*inside, "addr", "add", f"{host.address}/30", "dev", host.inner_side)
        _ip(*inside, "link", "set", host.inner_side, "up")
        _ip(*inside, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as exc:
        host.remove()
        raise RuntimeError(f"could not create test host {host.namespace}: {exc.stderr.strip()}") from exc
    return host
