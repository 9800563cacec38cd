"""Client keys of the public API and the quotas they bound. Plain Python, no Flask.

A fleet operator, a roaming platform or a charging app holds a client key
and sends it with every request (``Authorization: Bearer <key>`` or
``X-API-Key: <key>``). A key is 32 random bytes (``secrets.token_urlsafe``)
after the prefix ``sgk_``; only its SHA-256 is kept. A fast hash is right
here: the key is random, not a password, so there is nothing to guess
faster than the 256 bits themselves, and checking a flood of wrong keys
costs one hash and one dictionary look-up each.

Each key has quotas: how many sessions it may hold at once (waiting in the
queue, being forwarded or charging), how many kW those may ask for together,
how many of them may wait in the queue, and how many charge requests a
second it may send. ``QuotaLedger`` books a request against its key's quotas
before it is forwarded, under one lock, so two requests racing under one
key can never pass a quota together. Replicas sharing a database
(``SharedQuotaLedger``) book in the database instead: a request's pending
row is inserted only after the key's open sessions on every replica are
counted under the key's lock (``ChargeStore.claim_vehicle``).
"""
from __future__ import annotations

import hashlib
import math
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from charge_request_service.store import ChargeStore, OwnerQuotas, QuotaExceeded, StoredClientKey

KEY_PREFIX = "sgk_"
KEY_BYTES = 32
API_KEY_HEADER = "X-API-Key"
# What a client key looks like: the prefix and 43 URL-safe base64 characters.
KEY_PATTERN = re.compile(r"sgk_[A-Za-z0-9_-]{43}")
NAME_PATTERN = re.compile(r"[\w .,:@()/+-]{1,80}")

# Quotas a new key gets when the operator names none: one small fleet's worth.
DEFAULT_QUOTAS = {"sessions": 10, "kw": 110.0, "queued": 10, "requests_per_second": 5}
QUOTA_MAXIMA = {"sessions": 100_000, "kw": 1_000_000.0, "queued": 100_000, "requests_per_second": 10_000}
QUOTA_NAMES = tuple(DEFAULT_QUOTAS)
# Why a key's request was refused, for its figures: a quota, or its vehicle's rate limit.
REFUSAL_REASONS = (*QUOTA_NAMES, "vehicle_rate")
# Revoked keys kept for the record at most, past which the oldest revoked ones are forgotten.
REVOKED_KEPT = 1_000
# Hint for a client over its session or kW quota when none of its sessions has a known end.
RETRY_AFTER_DEFAULT_SECONDS = 5
# With a database several replicas share, how stale one replica's copy of the keys may get: a key another
# replica created, rotated or revoked counts here within this time. At most one read per this time, however
# many wrong keys arrive.
RELOAD_SECONDS = 2.0


class KeyRequestError(ValueError):
    """An operator's request about keys that cannot be done; ``error`` names why, the message says what to do."""

    def __init__(self, status: int, error: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.field = field


@dataclass(frozen=True)
class Quotas:
    sessions: int
    kw: float
    queued: int
    requests_per_second: int

    @classmethod
    def from_json(cls, body: Any) -> "Quotas":
        """Quotas from an operator's JSON object; a missing one takes its default; ``KeyRequestError`` names
        a bad one."""
        body = _quota_object({} if body is None else body)
        unknown = sorted(set(body) - set(QUOTA_NAMES))
        if unknown:
            raise KeyRequestError(400, "invalid_field", f"Unknown quota {unknown[0]!r}: the quotas are "
                                  f"{', '.join(QUOTA_NAMES)}.", field=f"quotas.{unknown[0]}")
        values: dict[str, Any] = {}
        for name, default in DEFAULT_QUOTAS.items():
            value = body.get(name, default)
            whole = name != "kw"
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or (whole and value != int(value)) or not 0 <= value <= QUOTA_MAXIMA[name]:
                kind = "a whole number" if whole else "a number"
                raise KeyRequestError(400, "invalid_field", f"quotas.{name} must be {kind} from 0 to "
                                      f"{QUOTA_MAXIMA[name]:g}; got {value!r}.", field=f"quotas.{name}")
            values[name] = int(value) if whole else float(value)
        if values["requests_per_second"] == 0:
            raise KeyRequestError(400, "invalid_field", "quotas.requests_per_second must be at least 1: a key "
                                  "that may send nothing is a revoked key (DELETE it instead).",
                                  field="quotas.requests_per_second")
        return cls(**values)

    def as_json(self) -> dict[str, Any]:
        return {"sessions": self.sessions, "kw": self.kw, "queued": self.queued,
                "requests_per_second": self.requests_per_second}


@dataclass(frozen=True)
class ClientKey:
    key_id: str
    name: str
    key_digest: str
    quotas: Quotas
    created_at: float
    rotated_at: float | None = None
    revoked_at: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def stored(self) -> StoredClientKey:
        return StoredClientKey(self.key_id, self.name, self.key_digest, self.quotas.as_json(), self.created_at,
                               self.rotated_at, self.revoked_at)

    @classmethod
    def from_stored(cls, stored: StoredClientKey) -> "ClientKey":
        return cls(stored.key_id, stored.name, stored.key_digest, Quotas(**stored.quotas), stored.created_at,
                   stored.rotated_at, stored.revoked_at)

    def as_json(self) -> dict[str, Any]:
        """What the operator sees of a key: never the key, nor its hash."""
        return {"key_id": self.key_id, "name": self.name, "quotas": self.quotas.as_json(),
                "created_at": _iso(self.created_at), "rotated_at": _iso(self.rotated_at),
                "revoked_at": _iso(self.revoked_at), "state": "revoked" if self.revoked else "active"}


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise KeyRequestError(400, "invalid_field", "name must be 1 to 80 letters, digits, spaces or "
                              ". , : @ ( ) / + - _ such as 'Fleet North': it names the key in the console "
                              "and the metrics.", field="name")


def _quota_object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise KeyRequestError(400, "invalid_field", "quotas, when given, must be a JSON object such as "
                              '{"sessions": 10, "kw": 110, "queued": 10, "requests_per_second": 5}.', field="quotas")
    return body


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))


def new_key() -> tuple[str, str]:
    """``(key, digest)``: the key goes to the operator once, the digest is what is kept."""
    key = KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)
    return key, key_digest(key)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def looks_like_key(value: str) -> bool:
    """Whether a bearer token is meant as a client key (rather than a session token or the operator's)."""
    return value.startswith(KEY_PREFIX)


class Rejection(Exception):
    """A presented key opens nothing: ``reason`` is ``unknown`` (never issued, or rotated away) or ``revoked``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ClientKeys:
    """Every client key, in memory for the check of each request and written through to the store.

    At most ``max_keys`` may be active at once: each active key is a label value of the
    per-key metrics, so the bound keeps their cardinality known.
    """

    def __init__(self, store: ChargeStore | None, max_keys: int, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._by_id: dict[str, ClientKey] = {}
        self._by_digest: dict[str, ClientKey] = {}
        self._loaded_at = time.monotonic()
        for stored in store.client_keys() if store is not None else []:
            self._index(ClientKey.from_stored(stored))

    def _reload_if_stale(self) -> None:
        """Read the keys again from a database other replicas write too, at most every ``RELOAD_SECONDS``."""
        if self._store is None or not self._store.shared or time.monotonic() - self._loaded_at < RELOAD_SECONDS:
            return
        with self._lock:
            if time.monotonic() - self._loaded_at < RELOAD_SECONDS:
                return  # another thread just did
            self._loaded_at = time.monotonic()
            fresh = [ClientKey.from_stored(stored) for stored in self._store.client_keys()]
            self._by_id = {key.key_id: key for key in fresh}
            self._by_digest = {key.key_digest: key for key in fresh}

    def _index(self, key: ClientKey) -> None:
        old = self._by_id.get(key.key_id)
        if old is not None:
            self._by_digest.pop(old.key_digest, None)
        self._by_id[key.key_id] = key
        self._by_digest[key.key_digest] = key

    def _put(self, key: ClientKey) -> None:
        if self._store is not None:
            self._store.put_client_key(key.stored())
        self._index(key)

    def check(self, presented: str) -> ClientKey:
        """The key a request presents; ``Rejection`` when it opens nothing."""
        self._reload_if_stale()
        found = self._by_digest.get(key_digest(presented)) if KEY_PATTERN.fullmatch(presented) else None
        if found is None:
            raise Rejection("unknown")
        if found.revoked:
            raise Rejection("revoked")
        return found

    def create(self, name: str, quotas: Quotas) -> tuple[ClientKey, str]:
        """A new key and the key itself (shown once); ``KeyRequestError`` past ``max_keys`` active keys."""
        _check_name(name)
        secret, digest = new_key()
        with self._lock:
            if len(self.active()) >= self._max_keys:
                raise KeyRequestError(409, "too_many_client_keys", f"{self._max_keys} client keys are active, "
                                      "the most this service allows (MAX_CLIENT_KEYS). Revoke one that is no "
                                      "longer used, or raise MAX_CLIENT_KEYS.")
            key = ClientKey(f"ck_{secrets.token_hex(6)}", name, digest, quotas, self._clock())
            self._put(key)
            self._forget_old_revoked()
        return key, secret

    def rotate(self, key_id: str) -> tuple[ClientKey, str]:
        """A new secret for the key; the old one stops working at once. Its sessions stay its own."""
        secret, digest = new_key()
        with self._lock:
            key = self._active(key_id)
            rotated = replace(key, key_digest=digest, rotated_at=self._clock())
            self._put(rotated)
        return rotated, secret

    def change(self, key_id: str, name: str | None = None, quotas: Mapping[str, Any] | None = None) -> ClientKey:
        """A new name, or new values of some quotas (the others kept); the key itself and its sessions stay.

        Sessions already held past a lowered quota run on; the key's next request waits until it is under.
        """
        if name is not None:
            _check_name(name)
        with self._lock:
            key = self._active(key_id)
            changed = replace(key, name=key.name if name is None else name,
                              quotas=key.quotas if quotas is None else Quotas.from_json(
                                  {**key.quotas.as_json(), **_quota_object(quotas)}))
            self._put(changed)
        return changed

    def revoke(self, key_id: str) -> ClientKey:
        """The key opens nothing from now on; revoking a revoked key changes nothing."""
        with self._lock:
            key = self.get(key_id)
            if not key.revoked:
                key = replace(key, revoked_at=self._clock())
                self._put(key)
            return key

    def get(self, key_id: str) -> ClientKey:
        key = self._by_id.get(key_id)
        if key is None:
            raise KeyRequestError(404, "client_key_not_found",
                                  f"No client key {key_id!r}. GET /client-keys lists them.")
        return key

    def _active(self, key_id: str) -> ClientKey:
        key = self.get(key_id)
        if key.revoked:
            raise KeyRequestError(409, "client_key_revoked", f"Client key {key_id!r} is revoked: create a new "
                                  "key instead (POST /client-keys).")
        return key

    def all(self) -> list[ClientKey]:
        return sorted(self._by_id.values(), key=lambda key: (key.created_at, key.key_id))

    def active(self) -> list[ClientKey]:
        return [key for key in self.all() if not key.revoked]

    def _forget_old_revoked(self) -> None:
        revoked = sorted((key for key in self._by_id.values() if key.revoked), key=lambda key: key.revoked_at or 0)
        for key in revoked[:max(0, len(revoked) - REVOKED_KEPT)]:
            del self._by_id[key.key_id]
            self._by_digest.pop(key.key_digest, None)
            if self._store is not None:
                self._store.drop_client_key(key.key_id)


@dataclass
class Holding:
    """One session (or request about to become one) booked against a key."""

    kw: float
    queued: bool = False
    # True while the request that booked it is still being answered: it is then counted whatever
    # the tracker says, since the tracker may not know of it yet.
    in_flight: bool = True


class Bookings:
    """One key's bookings by session id, their kW summed as they come and go: booking a request costs the
    same however many sessions the key holds (a drop of the finished ones sums them again, exactly)."""

    def __init__(self) -> None:
        self.by_session: dict[str, Holding] = {}
        self.kw = 0.0

    def __len__(self) -> int:
        return len(self.by_session)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self.by_session

    def add(self, session_id: str, holding: Holding) -> None:
        self.pop(session_id)
        self.by_session[session_id] = holding
        self.kw += holding.kw

    def pop(self, session_id: str) -> Holding | None:
        holding = self.by_session.pop(session_id, None)
        if holding is not None:
            self.kw -= holding.kw
        return holding

    def resum(self) -> None:
        self.kw = math.fsum(holding.kw for holding in self.by_session.values())


@dataclass
class KeyUsage:
    sessions: int = 0
    kw: float = 0.0
    queued: int = 0
    refusals: Counter = field(default_factory=Counter)


# What the service says of a booked session now: "queued", "pending", "active" (with the seconds it has
# left) or None once it is over.
SessionState = tuple[str, float | None] | None


class QuotaLedger:
    """Sessions booked against each key, checked and booked under one lock.

    A booking is made before the request is forwarded and kept while the session waits or
    charges. Bookings are not released one by one on every way a session ends (stopped,
    expired, refused, ended at its substation): ``state_of`` says whether a session is still
    held, and bookings whose session is over are dropped whenever a key would otherwise be
    over a quota, and when its figures are read.
    """

    def __init__(self, state_of: Callable[[str], SessionState]) -> None:
        self._state_of = state_of
        self._lock = threading.Lock()
        self._held: dict[str, Bookings] = {}
        self._refusals: dict[str, Counter] = {}

    def book(self, key: ClientKey, session_id: str, kw: float) -> None:
        """Count a new session against the key; ``QuotaExceeded`` (and nothing booked) if it would not fit."""
        with self._lock:
            held = self._held.setdefault(key.key_id, Bookings())
            retry_after = None
            for attempt in range(2):
                sessions, total_kw = len(held), held.kw
                over = None
                if sessions + 1 > key.quotas.sessions:
                    over = ("sessions", key.quotas.sessions, sessions)
                elif total_kw + kw > key.quotas.kw + 1e-9:
                    over = ("kw", key.quotas.kw, total_kw)
                if over is None:
                    held.add(session_id, Holding(kw))
                    return
                if attempt == 0:  # only bookings of sessions since over can make room: look, once
                    retry_after = self._drop_finished(held)
            self._refused(key.key_id, over[0])
            raise QuotaExceeded(*over, retry_after=retry_after or RETRY_AFTER_DEFAULT_SECONDS)

    def queue(self, key: ClientKey, session_id: str, retry_after: int) -> None:
        """The booked session is about to wait in the queue; ``QuotaExceeded`` past the key's queued quota."""
        with self._lock:
            held = self._held.setdefault(key.key_id, Bookings())
            for attempt in range(2):
                waiting = sum(1 for other, holding in held.by_session.items() if holding.queued and other != session_id)
                if waiting < key.quotas.queued:
                    held.by_session[session_id].queued = True
                    return
                if attempt == 0:
                    self._drop_finished(held)
            self._refused(key.key_id, "queued")
            raise QuotaExceeded("queued", key.quotas.queued, waiting, retry_after)

    def settle(self, key_id: str, session_id: str, final_session_id: str) -> None:
        """The request is answered: from now on its booking lasts as long as its session does.

        ``final_session_id`` is the id the session ended up with (a retry renames it). A request
        refused, or answered with an error, may still have a session the service holds (one whose
        answer was lost is stopped later): the booking goes when the service no longer holds it.
        """
        with self._lock:
            held = self._held.get(key_id)
            if held is None or session_id not in held:
                return
            holding = held.pop(session_id)
            assert holding is not None
            holding.in_flight = False
            held.add(final_session_id, holding)

    def refused(self, key_id: str, reason: str) -> None:
        """Count a refusal that is not a quota of this ledger (the key's request rate, its vehicle's)."""
        with self._lock:
            self._refused(key_id, reason)

    def _refused(self, key_id: str, reason: str) -> None:
        self._refusals.setdefault(key_id, Counter())[reason] += 1

    def usage(self, key_ids: Iterable[str]) -> dict[str, KeyUsage]:
        """What each key holds now, over sessions still held, and its refusals by reason."""
        with self._lock:
            figures = {}
            for key_id in key_ids:
                held = self._held.get(key_id, Bookings())
                self._drop_finished(held)
                figures[key_id] = KeyUsage(
                    len(held), held.kw, sum(1 for holding in held.by_session.values() if holding.queued),
                    Counter(self._refusals.get(key_id, ())),
                )
            return figures

    def database_quotas(self, key: ClientKey) -> OwnerQuotas | None:
        """None: this ledger books in memory, not in the database."""
        return None

    def forget(self, known: Iterable[str]) -> None:
        """Drop the figures of keys no longer kept, so per-key state stays as bounded as the keys."""
        keep = set(known)
        with self._lock:
            for table in (self._held, self._refusals):
                for key_id in [key_id for key_id in table if key_id not in keep]:
                    del table[key_id]

    def restore(self, key_id: str, session_id: str, kw: float, queued: bool) -> None:
        """Book again a session a previous process had booked (from the service's own records)."""
        with self._lock:
            self._held.setdefault(key_id, Bookings()).add(session_id, Holding(kw, queued, in_flight=False))

    def _drop_finished(self, held: Bookings) -> int | None:
        """Drop bookings whose session is over; the seconds until the first held session ends, if known."""
        soonest: float | None = None
        for session_id in [session_id for session_id, holding in held.by_session.items() if not holding.in_flight]:
            state = self._state_of(session_id)
            if state is None:
                del held.by_session[session_id]
                continue
            kind, remaining = state
            held.by_session[session_id].queued = kind == "queued"
            if remaining is not None:
                soonest = remaining if soonest is None else min(soonest, remaining)
        held.resum()
        return None if soonest is None else max(1, math.ceil(soonest))


class SharedQuotaLedger:
    """``QuotaLedger``'s methods for replicas that share one database, where the quotas are counted.

    Nothing is booked in memory: every replica's open sessions of a key are rows with its ``owner``,
    and a new one is inserted (``ChargeStore.claim_vehicle``) or queued (``ChargeStore.enqueue``) only
    after they are counted under the key's lock, with ``database_quotas``. Refusals are this
    replica's count, as every counter of a process is.
    """

    def __init__(self, store: ChargeStore, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._lock = threading.Lock()
        self._refusals: dict[str, Counter] = {}

    def database_quotas(self, key: ClientKey) -> OwnerQuotas:
        return OwnerQuotas(key.key_id, key.quotas.sessions, key.quotas.kw, key.quotas.queued)

    def book(self, key: ClientKey, session_id: str, kw: float) -> None:
        """Nothing to do: the database books the session with its pending row."""

    def queue(self, key: ClientKey, session_id: str, retry_after: int) -> None:
        """Nothing to do: the database counts the key's queued requests as it queues one."""

    def settle(self, key_id: str, session_id: str, final_session_id: str) -> None:
        """Nothing to do: a booking is its session's row, for as long as the row is open."""

    def restore(self, key_id: str, session_id: str, kw: float, queued: bool) -> None:
        """Nothing to do: the database holds every booking."""

    def refused(self, key_id: str, reason: str) -> None:
        with self._lock:
            self._refusals.setdefault(key_id, Counter())[reason] += 1

    def usage(self, key_ids: Iterable[str]) -> dict[str, KeyUsage]:
        holdings = self._store.owner_holdings(self._clock())
        with self._lock:
            return {key_id: KeyUsage(*holdings.get(key_id, (0, 0.0, 0)), Counter(self._refusals.get(key_id, ())))
                    for key_id in key_ids}

    def forget(self, known: Iterable[str]) -> None:
        keep = set(known)
        with self._lock:
            for key_id in [key_id for key_id in self._refusals if key_id not in keep]:
                del self._refusals[key_id]
