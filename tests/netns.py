"""Test hosts of our own: network namespaces on one virtual LAN, like containers.

A :class:`VirtualLan` is a Linux bridge on this machine holding the first
address of a /24 of 10.231.0.0/16: addresses that exist only inside this
machine. Each :class:`LanHost` is a network namespace plugged into the bridge
by a veth pair and given the next address, so a service in it is reached over
a real link, from here and from every other host of the LAN, and a test can
cut that link as a container's network fails.

Cutting takes the link down inside the host. Packets to it then vanish and
callers time out, as across a real network split, because every neighbour
(ARP) entry is pinned: left to ARP, a peer whose resolution fails (after about
three seconds) would answer "No route to host" at once instead. Inside the cut
host nothing is reachable ("Network is unreachable"), as for a node whose own
link is down.

Needs root and iproute2 (both present on the machines that run the suite).
"""
from __future__ import annotations

import fcntl
import json
import secrets
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ADDRESS_PREFIX = "10.231"
# Third octets a LAN may take; runs of the suite at the same time each find a free one.
LAN_NUMBERS = range(50, 250)
HOSTS_PER_LAN = 250
_ALLOCATION_LOCK = Path(tempfile.gettempdir()) / "smart-grid-test-lan.lock"


class NetworkSetupError(RuntimeError):
    pass


def _ip(*args: str) -> str:
    try:
        done = subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)
    except subprocess.CalledProcessError as exc:
        raise NetworkSetupError(f"'ip {' '.join(args)}' failed: {exc.stderr.strip()}") from None
    return done.stdout


def _quietly(*args: str) -> None:
    """Clean-up: the thing may already be gone, and nothing must stop the rest of the clean-up."""
    subprocess.run(["ip", *args], capture_output=True, timeout=10, check=False)


def _mac_of(device: str, namespace: str | None = None) -> str:
    where = ("-n", namespace) if namespace else ()
    return json.loads(_ip(*where, "-j", "link", "show", "dev", device))[0]["address"]


def _random_mac() -> str:
    # Locally administered, unicast.
    return "02:" + ":".join(f"{byte:02x}" for byte in secrets.token_bytes(5))


@dataclass
class LanHost:
    namespace: str
    host_side: str
    inner_side: str
    address: str
    mac: str
    lan: VirtualLan

    def cut(self) -> None:
        """Take the link down inside the host: packets to and from it vanish, as in a network split."""
        _ip("-n", self.namespace, "link", "set", self.inner_side, "down")

    def restore(self) -> None:
        _ip("-n", self.namespace, "link", "set", self.inner_side, "up")
        # Taking a link down flushes its neighbour entries, pinned ones included.
        self.pin_neighbours()

    def pin_neighbours(self) -> None:
        for address, mac in self.lan.neighbours().items():
            if address != self.address:
                _ip("-n", self.namespace, "neigh", "replace", address, "lladdr", mac,
                    "dev", self.inner_side, "nud", "permanent")

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def remove(self) -> None:
        _quietly("netns", "del", self.namespace)
        # Removing the namespace removes both ends of the veth; this covers a half-made host.
        _quietly("link", "del", self.host_side)


@dataclass
class VirtualLan:
    bridge: str
    prefix: str  # the first three octets, e.g. "10.231.50"
    mac: str
    hosts: list[LanHost] = field(default_factory=list)

    @property
    def gateway(self) -> str:
        """This machine's own address on the LAN."""
        return f"{self.prefix}.1"

    def neighbours(self) -> dict[str, str]:
        """Every address on the LAN and its MAC."""
        return {self.gateway: self.mac, **{host.address: host.mac for host in self.hosts}}

    def add_host(self) -> LanHost:
        """A new namespace on the LAN, reachable at the next free address."""
        if len(self.hosts) >= HOSTS_PER_LAN:
            raise NetworkSetupError(f"a test LAN holds at most {HOSTS_PER_LAN} hosts")
        tag = secrets.token_hex(3)
        inner_side = f"sgn{tag}"
        host = LanHost(
            namespace=f"sg-{tag}",
            host_side=f"sgh{tag}",
            inner_side=inner_side,
            address=f"{self.prefix}.{len(self.hosts) + 2}",
            mac="",
            lan=self,
        )
        try:
            _ip("netns", "add", host.namespace)
            _ip("link", "add", host.host_side, "type", "veth", "peer", "name", inner_side, "netns", host.namespace)
            _ip("link", "set", host.host_side, "master", self.bridge, "up")
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", inner_side)
            _ip("-n", host.namespace, "link", "set", inner_side, "up")
            _ip("-n", host.namespace, "link", "set", "lo", "up")
            host.mac = _mac_of(inner_side, host.namespace)
        except NetworkSetupError:
            host.remove()
            raise
        self.hosts.append(host)
        self._pin_everywhere()
        return host

    def _pin_everywhere(self) -> None:
        for host in self.hosts:
            _ip("neigh", "replace", host.address, "lladdr", host.mac, "dev", self.bridge, "nud", "permanent")
            host.pin_neighbours()

    def forget_learnt_neighbours(self) -> None:
        """Drop every neighbour entry ARP learnt on the LAN, as the kernel does after 15 to 45 s of disuse.

        Shows at once what a long cut would: pinned entries stay, so a cut host still just goes silent.
        """
        _ip("neigh", "flush", "dev", self.bridge)
        for host in self.hosts:
            _ip("-n", host.namespace, "neigh", "flush", "dev", host.inner_side)

    def remove(self) -> None:
        for host in self.hosts:
            host.remove()
        _quietly("link", "del", self.bridge)


def _create_lan() -> VirtualLan:
    tag = secrets.token_hex(3)
    # The bridge would otherwise take the lowest MAC of its ports, changing as hosts join.
    lan = VirtualLan(bridge=f"sgb{tag}", prefix="", mac=_random_mac())
    with open(_ALLOCATION_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        in_use = _ip("-4", "-o", "addr", "show")
        free = (n for n in LAN_NUMBERS if f" {ADDRESS_PREFIX}.{n}." not in in_use)
        number = next(free, None)
        if number is None:
            raise NetworkSetupError(f"no free /24 left in {ADDRESS_PREFIX}.{LAN_NUMBERS.start}-{LAN_NUMBERS.stop - 1}")
        lan.prefix = f"{ADDRESS_PREFIX}.{number}"
        try:
            _ip("link", "add", "name", lan.bridge, "address", lan.mac, "type", "bridge")
            _ip("addr", "add", f"{lan.gateway}/24", "dev", lan.bridge)
            _ip("link", "set", lan.bridge, "up")
        except NetworkSetupError:
            lan.remove()
            raise
    return lan


@contextmanager
def virtual_lan() -> Iterator[VirtualLan]:
    """A LAN for one test; it and every host on it are gone afterwards, whatever happened."""
    lan = _create_lan()
    try:
        yield lan
    finally:
        lan.remove()
