"""The signatures of peer traffic: what they cover, and every way a forged or replayed one fails."""
from __future__ import annotations

import hashlib
import hmac

import pytest

from substation_service.peering.auth import (
    NONCE_HEADER,
    SENDER_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    AuthError,
    PeerKey,
)
from substation_service.peering.machine import Rejection
from substation_service.peering.transport import MESSAGES_PATH

KEY = PeerKey.from_text("k" * 16 + "0123456789abcdef")
OTHER_KEY = PeerKey.from_text("z" * 16 + "0123456789abcdef")
NOW = 1_718_000_000.0
BODY = b'{"type":"DraftSelect","sender":"substation-2","amount":2}'
TOLERANCE = 5.0


def signed(key: PeerKey = KEY, body: bytes = BODY, sender: str = "substation-2", now: float = NOW) -> dict[str, str]:
    return key.sign_request("POST", MESSAGES_PATH, sender, body, now)


def verify(headers: dict[str, str], body: bytes = BODY, method: str = "POST", path: str = MESSAGES_PATH,
           now: float = NOW) -> str:
    return KEY.verify_request(method, path, headers, body, now, TOLERANCE).sender


def refusal(headers: dict[str, str], **changes) -> Rejection:
    with pytest.raises(AuthError) as caught:
        verify(headers, **changes)
    assert caught.value.message  # a sentence for whoever reads the 401
    return caught.value.reason


def test_a_signed_request_names_its_sender() -> None:
    headers = signed()
    assert verify(headers) == "substation-2"
    assert set(headers) == {SENDER_HEADER, TIMESTAMP_HEADER, NONCE_HEADER, SIGNATURE_HEADER}
    assert headers[TIMESTAMP_HEADER] == "1718000000.000"
    # Every request gets a nonce of its own, so two signatures of the same body differ.
    assert signed()[SIGNATURE_HEADER] != headers[SIGNATURE_HEADER]


def test_the_wire_format_is_hmac_sha256_of_the_documented_lines() -> None:
    headers = KEY.sign_request("POST", MESSAGES_PATH, "substation-2", BODY, NOW, nonce="ab" * 16)
    text = "\n".join([
        "peer-request-v1", "POST", MESSAGES_PATH, "substation-2", "1718000000.000", "ab" * 16,
        hashlib.sha256(BODY).hexdigest(),
    ]).encode()
    assert headers[SIGNATURE_HEADER] == hmac.new(KEY.secret, text, hashlib.sha256).hexdigest()


@pytest.mark.parametrize(
    "changes",
    [
        {"body": BODY.replace(b'"amount":2', b'"amount":30')},  # the exact bytes
        {"body": BODY + b" "},
        {"method": "PUT"},
        {"path": "/metrics"},
    ],
    ids=["body", "one-byte-more", "method", "path"],
)
def test_a_signature_covers_method_path_and_the_exact_body(changes: dict) -> None:
    assert refusal(signed(), **changes) is Rejection.BAD_SIGNATURE


@pytest.mark.parametrize("header", [SENDER_HEADER, TIMESTAMP_HEADER, NONCE_HEADER])
def test_a_signature_covers_sender_timestamp_and_nonce(header: str) -> None:
    headers = signed()
    replacement = {SENDER_HEADER: "substation-3", TIMESTAMP_HEADER: "1718000001.000", NONCE_HEADER: "cd" * 16}
    assert refusal({**headers, header: replacement[header]}) is Rejection.BAD_SIGNATURE


def test_unsigned_wrongly_signed_and_malformed_requests_are_bad_signatures() -> None:
    assert refusal({}) is Rejection.BAD_SIGNATURE
    assert refusal(signed(key=OTHER_KEY)) is Rejection.BAD_SIGNATURE
    headers = signed()
    assert refusal({k: v for k, v in headers.items() if k != SIGNATURE_HEADER}) is Rejection.BAD_SIGNATURE
    assert refusal({**headers, SIGNATURE_HEADER: headers[SIGNATURE_HEADER].upper()}) is Rejection.BAD_SIGNATURE
    # A timestamp float() would read but no peer writes: no exponents, no nan.
    for timestamp in ("1e17", "nan", "-5", " 1718000000"):
        assert refusal({**headers, TIMESTAMP_HEADER: timestamp}) is Rejection.BAD_SIGNATURE


def test_a_replayed_request_outside_the_clock_tolerance_is_refused() -> None:
    assert verify(signed(now=NOW - TOLERANCE)) == "substation-2"  # within the tolerance
    assert refusal(signed(now=NOW - 60)) is Rejection.STALE_TIMESTAMP
    assert refusal(signed(now=NOW + 60)) is Rejection.STALE_TIMESTAMP  # signed "in the future" too


def test_a_poll_answer_is_bound_to_its_poll() -> None:
    poll = KEY.sign_request("GET", "/metrics", "substation-1", b"", NOW)
    answer = b'current_load{substation="substation-2"} 0.0\n'
    headers = KEY.sign_response(poll[SIGNATURE_HEADER], "substation-2", 200, answer)
    assert KEY.verify_response(poll[SIGNATURE_HEADER], headers, 200, answer) == "substation-2"

    another_poll = KEY.sign_request("GET", "/metrics", "substation-1", b"", NOW + 1)
    for request_signature, status, body, key in (
        (another_poll[SIGNATURE_HEADER], 200, answer, KEY),  # an old answer served to a new poll
        (poll[SIGNATURE_HEADER], 500, answer, KEY),
        (poll[SIGNATURE_HEADER], 200, answer.replace(b"0.0", b"1e17"), KEY),
        (poll[SIGNATURE_HEADER], 200, answer, OTHER_KEY),
    ):
        with pytest.raises(AuthError) as caught:
            key.verify_response(request_signature, headers, status, body)
        assert caught.value.reason is Rejection.BAD_SIGNATURE
    with pytest.raises(AuthError, match="not signed"):
        KEY.verify_response(poll[SIGNATURE_HEADER], {}, 200, answer)


def test_the_key_is_not_in_its_repr() -> None:
    assert "0123456789abcdef" not in repr(KEY)
