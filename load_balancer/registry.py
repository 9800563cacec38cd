"""Which substations the balancer routes to: the SUBSTATIONS setting plus the
ones registered and deregistered at run time.

A registered URL is polled at once and then every few seconds, and whatever it
reports decides where charge requests go. So registration is an operator's act
(the routes check the token), and only URLs on hosts the operator allowed
(``SUBSTATION_URL_ALLOW``, see :class:`UrlAllowList`) are accepted, up to
``MAX_SUBSTATIONS`` of them.
"""
from __future__ import annotations

import ipaddress
import re
import threading
from dataclasses import dataclass
from typing import Callable, Iterable
from urllib.parse import urlsplit

from gridcommon.settings import normalise_base_url
from load_balancer.poller import Poller
from load_balancer.view import GridView, SubstationSnapshot

EXAMPLE_URL = "http://127.0.0.1:5011"
# What RFC 3986 allows in a URL; anything else (a space, a backslash, a control character,
# a quote) has no business in a substation's URL and can make two parsers disagree on its host.
_URL_CHARACTERS = re.compile(r"\A[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+\Z")
_HOST_LABEL = re.compile(r"\A[a-z0-9_-]{1,63}\Z")
# inet_aton, behind getaddrinfo, reads "127.1", "2130706433" and "0x7f.0.0.1" as IPv4 addresses.
_NUMBER_LIKE = re.compile(r"\A(0x[0-9a-f]*|[0-9]+)\Z")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class UrlNotAllowed(Exception):
    """A well-formed URL whose host the allow-list does not cover."""


class TooManySubstations(Exception):
    """Registering one more would pass MAX_SUBSTATIONS."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the balancer already tracks {limit} substations, the most MAX_SUBSTATIONS allows")
        self.limit = limit


def _ip(host: str) -> IpAddress | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
    return address


def _check_host_name(host: str, where: str, wildcards: bool = False) -> None:
    """``ValueError`` unless ``host`` is an IP address or a plain DNS name (with ``*`` if ``wildcards``)."""
    if _ip(host) is not None:
        return
    labels = host.split(".")
    plain = [label.replace("*", "x") if wildcards else label for label in labels]
    if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in plain):
        raise ValueError(
            f"{where} names the host {host!r}: use a DNS name of letters, digits, '-' and '_' between dots, "
            "or an IP address"
        )
    if labels[-1].isdigit() or all(_NUMBER_LIKE.fullmatch(label) for label in labels):
        raise ValueError(
            f"{where} names the host {host!r}: write an IPv4 address as four decimal numbers, e.g. 10.0.0.5"
        )


def normalise_substation_url(raw: object) -> str:
    """A substation's base URL, normalised; ``ValueError`` saying what is wrong.

    ``http(s)://host[:port][/prefix]`` only: no credentials, query or fragment, a
    host that is a DNS name or an IP address, and nothing but URL characters.
    """
    if isinstance(raw, str) and raw.strip() and not _URL_CHARACTERS.fullmatch(raw.strip()):
        raise ValueError(
            "a substation URL may only contain the characters of a URL (no spaces, backslashes, quotes or "
            f"control characters), for example {EXAMPLE_URL}"
        )
    url = normalise_base_url(raw, example=EXAMPLE_URL)
    parts = urlsplit(url)
    _check_host_name(parts.hostname or "", url)
    if parts.port == 0:
        raise ValueError(f"{url!r} names port 0; use the port the substation listens on, e.g. {EXAMPLE_URL}")
    return url


@dataclass(frozen=True)
class _HostRule:
    """One entry of the allow-list."""

    text: str
    name: re.Pattern[str] | None = None
    network: IpNetwork | None = None
    port: int | None = None

    def allows(self, host: str, address: IpAddress | None, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if address is not None:
            return self.network is not None and address in self.network
        return self.name is not None and self.name.fullmatch(host) is not None


def _split_port(entry: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 address -> (host, port)."""
    if entry.startswith("["):
        host, bracket, rest = entry[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{entry!r}: write an IPv6 address as [address] or [address]:port")
        port_text = rest[1:] if rest else None
    elif entry.count(":") == 1:
        host, _, port_text = entry.partition(":")
    else:
        host, port_text = entry, None  # no colon, or an IPv6 address without a port
    if port_text is None:
        return host, None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{entry!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)


def _parse_rule(raw: str) -> _HostRule:
    entry = raw.strip().lower()
    if "://" in entry or "@" in entry or "?" in entry or "#" in entry:
        raise ValueError(
            f"{raw!r}: write a host pattern or a CIDR, without scheme or path, e.g. substation_* or 10.0.0.0/8"
        )
    if "/" in entry:
        try:
            network = ipaddress.ip_network(entry, strict=True)
        except ValueError:
            try:
                loose = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{raw!r} is not a valid CIDR such as 10.0.0.0/8 or fd00::/8") from None
            raise ValueError(f"{raw!r} has bits set past its prefix length; did you mean {loose}?") from None
        return _HostRule(raw.strip(), network=network)
    host, port = _split_port(entry)
    address = _ip(host)
    if address is not None:
        return _HostRule(raw.strip(), network=ipaddress.ip_network(address), port=port)
    if not host:
        raise ValueError(f"{raw!r} names no host")
    _check_host_name(host, repr(raw), wildcards=True)
    # '*' stands for any run of letters, digits, '-' and '_', never a dot: substation_* must not
    # also cover substation_.attacker.example.
    pattern = "".join("[a-z0-9_-]*" if char == "*" else re.escape(char) for char in host)
    return _HostRule(raw.strip(), name=re.compile(pattern), port=port)


class UrlAllowList:
    """The hosts a substation may be registered on (``SUBSTATION_URL_ALLOW``).

    Entries, comma-separated, any of which may let a URL through:

    * a host name, with ``*`` matching any run of letters, digits, ``-`` and
      ``_`` within one label (never a dot), case-insensitively: ``substation_*``,
      ``localhost``, ``*.grid.internal``;
    * an IP address: ``127.0.0.1``, ``::1`` (or ``[::1]``);
    * a CIDR: ``10.0.0.0/8``, ``fd00::/8``;
    * a name or address may end in ``:port`` (``[v6]:port`` for IPv6): then only
      that port, where the URL's port is its explicit one or 80/443 by scheme.

    Names match only the URL's name and addresses and CIDRs only a URL written
    with an IP address: nothing is resolved, so a DNS answer cannot turn an
    allowed name into another address, or a name into an allowed address.
    """

    def __init__(self, rules: Iterable[_HostRule]) -> None:
        self._rules = tuple(rules)

    @classmethod
    def parse(cls, entries: Iterable[str]) -> "UrlAllowList":
        """Read entries; ``ValueError`` naming the first bad one."""
        return cls(_parse_rule(entry) for entry in entries if entry.strip())

    @classmethod
    def default_for(cls, substation_urls: Iterable[str]) -> "UrlAllowList":
        """The hosts of the configured substations (any port), 127.0.0.1 and localhost."""
        hosts: list[str] = []
        for url in substation_urls:
            host = urlsplit(url).hostname or ""
            entry = f"[{host}]" if ":" in host else host
            if entry and entry not in hosts:
                hosts.append(entry)
        hosts.extend(host for host in LOOPBACK_HOSTS if host not in hosts)
        return cls.parse(hosts)

    @property
    def entries(self) -> tuple[str, ...]:
        return tuple(rule.text for rule in self._rules)

    def allows(self, url: str) -> bool:
        """Whether a normalised substation URL is on an allowed host (and port)."""
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = _ip(host)
        return any(rule.allows(host, address, port) for rule in self._rules)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UrlAllowList) and self.entries == other.entries

    def __hash__(self) -> int:
        return hash(self.entries)

    def __repr__(self) -> str:
        return f"UrlAllowList({', '.join(self.entries)})"


class SubstationRegistry:
    """Adds and removes substations; learns each one's id by polling it first."""

    def __init__(
        self,
        view: GridView,
        poller: Poller,
        on_removed: Callable[[str], None],
        allow: UrlAllowList | None = None,
        max_substations: int = 64,
    ) -> None:
        self._view = view
        self._poller = poller
        self._on_removed = on_removed
        self._allow = allow if allow is not None else UrlAllowList.default_for(())
        self._max = max_substations
        # Counting and adding under one lock: two registrations at once cannot both take the last place.
        self._lock = threading.Lock()

    def add_configured(self, urls: tuple[str, ...]) -> None:
        """URLs from the settings: tracked at once, routable after their first successful poll."""
        for url in urls:
            self._view.add_url(url)

    def register(self, raw_url: object) -> tuple[SubstationSnapshot, bool]:
        """Poll ``raw_url`` and add it; ``(entry, created)``.

        Raises ``ValueError`` for a malformed URL, :class:`UrlNotAllowed` for one on
        a host the allow-list does not cover, :class:`TooManySubstations` when
        MAX_SUBSTATIONS are tracked already, :class:`~load_balancer.poller.PollError`
        when it cannot be polled, :class:`~load_balancer.view.SubstationConflict`
        when its id belongs to another registered URL. The URL is checked before
        anything is sent to it.
        """
        url = normalise_substation_url(raw_url)
        if not self._allow.allows(url):
            raise UrlNotAllowed(url)
        self._check_room(url)  # before polling: a full balancer sends nothing anywhere
        substation_id, observation = self._poller.fetch(url)
        with self._lock:
            self._check_room(url)
            return self._view.add_polled(url, substation_id, observation)

    def _check_room(self, url: str) -> None:
        tracked = {snapshot.url for snapshot in self._view.snapshots()}
        if url not in tracked and len(tracked) >= self._max:
            raise TooManySubstations(self._max)

    def deregister(self, substation_id: str) -> SubstationSnapshot | None:
        removed = self._view.remove(substation_id)
        if removed is not None:
            self._on_removed(substation_id)
        return removed
