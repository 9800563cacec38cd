"""Peer traffic signed as a substation of the group signs it, for tests that play a peer."""
from __future__ import annotations

import json
import secrets
import time
from typing import Any

from substation_service.peering.auth import PeerKey
from substation_service.peering.transport import MESSAGES_PATH

# New for every run: no test may depend on a key written down anywhere.
GROUP_KEY = secrets.token_hex(32)
OTHER_KEY = secrets.token_hex(32)


def encode(document: Any) -> bytes:
    return json.dumps(document).encode("utf-8")


def signed_headers(
    body: bytes,
    sender: str,
    key: str = GROUP_KEY,
    now: float | None = None,
    method: str = "POST",
    path: str = MESSAGES_PATH,
) -> dict[str, str]:
    """The headers a holder of ``key`` sends with ``body``, signed at ``now`` (the real clock by default)."""
    return PeerKey.from_text(key).sign_request(method, path, sender, body, time.time() if now is None else now)
