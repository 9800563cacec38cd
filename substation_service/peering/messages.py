"""The peer-balancing messages, as JSON documents validated on receipt.

Every message names its ``sender`` (a substation id), the ``phase`` and
``round`` the sender was in, and the ``epoch`` of the sender's link to the
receiver (see ``machine.py``: it tells which power exchanges between the two
are still in force). The fields after those depend on the ``type``:

| type             | from -> to                 | fields                         |
|------------------|----------------------------|--------------------------------|
| `StateChange`    | any -> every group member  | `state`: supply/demand/normal  |
| `DraftRequest`   | supply -> demand peers     | (none)                         |
| `DraftAge`       | demand -> supply           | `age`: kW it lacks, 0 if none  |
| `DraftSelect`    | supply -> chosen demand    | `migration` id, `amount` kW    |
| `DraftAccept`    | demand -> supply           | `migration` id, `amount` kW    |
| `TooLate`        | demand -> supply           | `migration` id, `amount` kW    |
| `CollectedState` | leader -> every member     | `gateway_total_kw`             |

Anything else (an unknown type, a missing or extra field, a wrong type, a
number that is not finite) is rejected with the name of the faulty field.
A well-formed message is not yet a trusted one: its ``sender`` must be the
substation that signed it (``auth.py``) and its fields must fit the state of
the receiver (``BalancingMachine.handle``).
"""
from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from pydantic import ValidationError as PydanticValidationError

from gridcommon.validation import ValidationError

NODE_ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
MIGRATION_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"


class NodeState(str, Enum):
    SUPPLY = "supply"
    DEMAND = "demand"
    NORMAL = "normal"


class _Header(BaseModel):
    # strict: `true` is not a number and "3" is not a phase; extra fields mean a sender speaks another protocol.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    sender: str = Field(pattern=NODE_ID_PATTERN)
    phase: int = Field(ge=0)
    round: int = Field(ge=0)
    epoch: float = Field(ge=0)


class StateChange(_Header):
    type: Literal["StateChange"] = "StateChange"
    state: NodeState = Field(strict=False)


class DraftRequest(_Header):
    type: Literal["DraftRequest"] = "DraftRequest"


class DraftAge(_Header):
    type: Literal["DraftAge"] = "DraftAge"
    age: float = Field(ge=0)


class _MigrationMessage(_Header):
    migration: str = Field(pattern=MIGRATION_ID_PATTERN)
    amount: float = Field(gt=0)


class DraftSelect(_MigrationMessage):
    type: Literal["DraftSelect"] = "DraftSelect"


class DraftAccept(_MigrationMessage):
    type: Literal["DraftAccept"] = "DraftAccept"


class TooLate(_MigrationMessage):
    type: Literal["TooLate"] = "TooLate"


class CollectedState(_Header):
    type: Literal["CollectedState"] = "CollectedState"
    gateway_total_kw: float


Message = Union[StateChange, DraftRequest, DraftAge, DraftSelect, DraftAccept, TooLate, CollectedState]
MESSAGE_TYPES: tuple[str, ...] = (
    "StateChange",
    "DraftRequest",
    "DraftAge",
    "DraftSelect",
    "DraftAccept",
    "TooLate",
    "CollectedState",
)
_MESSAGE = TypeAdapter(Annotated[Message, Field(discriminator="type")])


def parse_message(document: Any) -> Message:
    """A received JSON document as a message, or ``ValidationError`` naming the faulty field."""
    try:
        return _MESSAGE.validate_python(document)
    except PydanticValidationError as exc:
        raise _explain(exc) from None


def message_json(message: Message) -> dict[str, Any]:
    return message.model_dump(mode="json")


def _explain(exc: PydanticValidationError) -> ValidationError:
    error = exc.errors()[0]
    if error["type"] in {"union_tag_invalid", "union_tag_not_found"}:
        return ValidationError("type", f"type must be one of {', '.join(MESSAGE_TYPES)}.")
    # The first location item is the message type pydantic tried; the field comes after it.
    location = [str(part) for part in error["loc"][1:]]
    if not location:
        return ValidationError("body", "A peer-balancing message must be a JSON object.")
    field = ".".join(location)
    return ValidationError(field, f"{field}: {error['msg']}.")
