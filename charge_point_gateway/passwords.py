"""Station passwords (OCPP security profiles 1 and 2: HTTP Basic): only a salted scrypt hash is kept.

The stored form is ``scrypt$<n>$<r>$<p>$<salt hex>$<hash hex>``, so the cost can be raised
later without making the hashes already stored unreadable. A check takes tens of
milliseconds on purpose: the gateway runs it off the event loop.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets

MIN_PASSWORD_LENGTH = 16
MAX_PASSWORD_LENGTH = 40
# 16 MiB and ~50 ms a hash on one core: dear for a guesser, cheap for one station's handshake.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_HASH_BYTES = 32


def password_problem(password: object) -> str | None:
    """Why ``password`` cannot be a station's password, or None when it can."""
    if not isinstance(password, str):
        return "password must be a string"
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        return (
            f"password must be {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters "
            f"(OCPP security profiles 1 and 2), got {len(password)}"
        )
    if not password.isprintable() or not password.isascii():
        return "password must be printable ASCII characters"
    return None


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored``; compared in constant time, False on a malformed hash."""
    try:
        scheme, n, r, p, salt, expected = stored.split("$")
        if scheme != "scrypt":
            return False
        digest = _scrypt(password, bytes.fromhex(salt), int(n), int(r), int(p))
        return hmac.compare_digest(digest, bytes.fromhex(expected))
    except ValueError:
        return False


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * r * n + 1024 * 1024, dklen=_HASH_BYTES
    )
