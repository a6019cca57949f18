"""JSON in and out of the sidecar, exactly.

Requests are parsed with the standard library, which keeps integers of any size exact
(orjson would turn a 30-digit integer into a float), and rejects NaN and Infinity, which
JSON does not have. Each item is then serialized once, compactly, with orjson when it
can (it refuses integers beyond 64 bits) and the standard library otherwise; the stored
bytes are spliced into responses unparsed, so an item reads back as the same value.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_decoder = json.JSONDecoder(parse_constant=_reject_constant)


def loads(raw: bytes) -> Any:
    return _decoder.decode(raw.decode("utf-8"))


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def items_document(items: list[bytes]) -> bytes:
    """`{"items": [...]}` built from stored item bytes without decoding them."""
    return b'{"items":[' + b",".join(items) + b"]}"
