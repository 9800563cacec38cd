"""Peer-balancing messages: what is accepted, and what is rejected with which field named."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gridcommon.validation import ValidationError
from substation_service.peering.messages import (
    CollectedState,
    DraftAccept,
    DraftAge,
    DraftRequest,
    DraftSelect,
    Message,
    NodeState,
    StateChange,
    TooLate,
    message_json,
    parse_message,
)

HEADER = {"sender": "substation-3", "phase": 7, "round": 2, "epoch": 1700000000.5}

EVERY_TYPE: list[Message] = [
    StateChange(**HEADER, state=NodeState.DEMAND),
    DraftRequest(**HEADER),
    DraftAge(**HEADER, age=6.5),
    DraftSelect(**HEADER, migration="substation-3:12", amount=2.0),
    DraftAccept(**HEADER, migration="substation-3:12", amount=2.0),
    TooLate(**HEADER, migration="substation-3:12", amount=2.0),
    CollectedState(**HEADER, gateway_total_kw=-0.0),
]


@pytest.mark.parametrize("message", EVERY_TYPE, ids=lambda message: message.type)
def test_every_message_survives_json(message: Message) -> None:
    document = message_json(message)
    assert document["type"] == message.type and document["sender"] == "substation-3"
    assert parse_message(document) == message


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"type": "Gossip"}, "type"),
        ({"type": None}, "type"),
        ({"sender": ""}, "sender"),
        ({"sender": "a b"}, "sender"),
        ({"phase": -1}, "phase"),
        ({"phase": "7"}, "phase"),
        ({"round": 1.5}, "round"),
        ({"epoch": True}, "epoch"),
        ({"amount": 0}, "amount"),
        ({"amount": float("nan")}, "amount"),
        ({"amount": float("inf")}, "amount"),
        ({"amount": True}, "amount"),
        ({"migration": "x" * 200}, "migration"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_malformed_select_is_rejected_naming_the_field(change: dict, field: str) -> None:
    document = {**message_json(EVERY_TYPE[3]), **change}
    with pytest.raises(ValidationError) as caught:
        parse_message(document)
    assert caught.value.field == field
    assert field in caught.value.message


def test_missing_fields_and_non_objects_are_rejected() -> None:
    with pytest.raises(ValidationError) as caught:
        parse_message({**HEADER, "type": "DraftAge"})
    assert caught.value.field == "age"
    with pytest.raises(ValidationError) as caught:
        parse_message([1, 2])
    assert caught.value.field == "body"
    with pytest.raises(ValidationError) as caught:
        parse_message({**HEADER, "type": "StateChange", "state": "panic"})
    assert caught.value.field == "state"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(
    base=st.sampled_from(EVERY_TYPE),
    changes=st.dictionaries(
        st.sampled_from(["type", "sender", "phase", "round", "epoch", "state", "age", "migration", "amount",
                         "gateway_total_kw", "other"]),
        JSON_VALUES,
        max_size=3,
    ),
)
def test_any_document_is_either_a_message_or_a_validation_error(base: Message, changes: dict) -> None:
    document = {**message_json(base), **changes}
    try:
        message = parse_message(document)
    except ValidationError as exc:
        assert exc.field and exc.message
    else:
        assert message_json(message)["type"] == document["type"]
