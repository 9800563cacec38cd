"""``Idempotency-Key`` on ``POST /charge``, after the IETF httpapi draft. Plain Python, no Flask.

A repeat of a request with the same key and the same body gets the first
answer again, and books nothing new; the same key with another body is a
client error (422); a repeat that arrives while the first is still being
answered is told to retry (409). Only final answers are kept: a 201, a 202 or
a client error in the request itself. A 502, 503, 429 or 409 (the vehicle
still has a session) may be different a moment later, so a repeat of those
tries again.

With a database replicas share, the key is claimed by a row committed before
the request is forwarded, so a repeat sent to another replica meanwhile is told
to retry (409) too; a claim whose replica died answering is taken over once it
is older than ``claim_seconds`` (by then no answer to its forward can come).
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from charge_request_service.store import ChargeStore, StoredAnswer

KEY_HEADER = "Idempotency-Key"
# Printable ASCII, as the draft asks of a key; long enough for a UUID or a ULID with a prefix.
KEY_PATTERN = re.compile(r"[\x21-\x7e]{1,255}")
KEPT_STATUSES = frozenset({201, 202, 400, 413, 415, 422})
ANSWERS_IN_MEMORY = 100_000


class KeyMisused(Exception):
    """The key was used before with another body."""


class KeyBusy(Exception):
    """A request with this key is being answered right now."""


def fingerprint(body: Any) -> str:
    """The same JSON value gives the same fingerprint, whatever its key order or spacing."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class Idempotency:
    """The answers given to requests that carried a key: in the store if there is one, else in memory."""

    store: ChargeStore | None = None
    claim_seconds: float = 30.0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight: set[str] = set()
        self._answers: OrderedDict[str, StoredAnswer] = OrderedDict()

    def begin(self, key: str, body_fingerprint: str) -> StoredAnswer | None:
        """The answer to replay, or None for a new request (the key is then held until ``finish``)."""
        if self.store is not None and self.store.shared:
            now = time.time()
            outcome, answer = self.store.claim_answer(key, body_fingerprint, now, now - self.claim_seconds)
            if outcome == "misused":
                raise KeyMisused(key)
            if outcome == "busy":
                raise KeyBusy(key)
            return answer
        with self._lock:
            answer = self.store.answer(key) if self.store is not None else self._answers.get(key)
            if answer is not None:
                if answer.fingerprint != body_fingerprint:
                    raise KeyMisused(key)
                return answer
            if key in self._in_flight:
                raise KeyBusy(key)
            self._in_flight.add(key)
            return None

    def finish(self, key: str, body_fingerprint: str, status: int, body: dict[str, Any],
               headers: dict[str, str]) -> None:
        """Keep the answer if it is final, and release the key."""
        if self.store is not None and self.store.shared:
            if status in KEPT_STATUSES:
                self.store.put_answer(key, StoredAnswer(body_fingerprint, status, body, headers, time.time()))
            else:
                self.store.release_claim(key)
            return
        with self._lock:
            self._in_flight.discard(key)
            if status not in KEPT_STATUSES:
                return
            answer = StoredAnswer(body_fingerprint, status, body, headers, time.time())
            if self.store is not None:
                self.store.put_answer(key, answer)
                return
            self._answers[key] = answer
            while len(self._answers) > ANSWERS_IN_MEMORY:
                self._answers.popitem(last=False)
