"""JSON on the hot path: orjson, which encodes several times faster than the standard library.

Every answer, every forwarded body and every record written to a state file is
encoded here. Output is compact UTF-8; a value orjson refuses (an integer past
64 bits, say) is encoded by the standard library instead, so nothing that
encoded before fails now. Request bodies from clients are still read by
:func:`gridcommon.web.loads_request_json`, whose rules (no duplicate keys, a
depth limit) orjson does not offer.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson

# Integer keys become strings, as the standard library does.
_OPTIONS = orjson.OPT_NON_STR_KEYS


def dumps(value: Any, *, sort_keys: bool = False, default: Callable[[Any], Any] | None = None,
          passthrough: int = 0) -> bytes:
    """``value`` as compact JSON bytes; ``passthrough`` (orjson options) hands those types to ``default``."""
    options = _OPTIONS | passthrough | (orjson.OPT_SORT_KEYS if sort_keys else 0)
    try:
        return orjson.dumps(value, default=default, option=options)
    except TypeError:
        return json.dumps(value, default=default, sort_keys=sort_keys, separators=(",", ":"),
                          ensure_ascii=False).encode()


def dumps_to_keep(value: Any) -> bytes:
    """``value`` as compact JSON bytes sized to fit, for bytes held in memory for long.

    orjson's own result is allocated in steps of 4 KiB whatever its length: ten thousand
    kept records would hold 40 MiB instead of 4.
    """
    return memoryview(dumps(value)).tobytes()


def dumps_text(value: Any) -> str:
    """``value`` as compact JSON text, for a TEXT column."""
    return dumps(value).decode()


def loads(data: bytes | str) -> Any:
    """JSON another service of the stack (or a state file) wrote; ``ValueError`` if it is not JSON."""
    return orjson.loads(data)
