"""JSON in and out of the sidecar, exactly.

Requests are parsed with the standard library, which keeps integers of any size exact
(orjson would turn a 30-digit integer into a float), and rejects NaN and Infinity, which
JSON does not have, and numbers too large for a double (`1e400` would become infinity,
then `null`): refused, not changed. Each item is then serialized once, compactly, with
orjson when it can (it refuses integers beyond 64 bits, and strings holding a lone
surrogate escape such as `"\ud800"`, which the SDK's own sessions store) and the
standard library otherwise; the stored bytes are spliced into responses unparsed, so an
item reads back as the same value.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:40]} is too large for a double")
    return value


_decoder = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite)


def loads(raw: bytes) -> Any:
    return _decoder.decode(raw.decode("utf-8"))


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: kept as its \uXXXX escape
        return json.dumps(value, separators=(",", ":")).encode("ascii")


def items_document(items: list[bytes]) -> bytes:
    """`{"items": [...]}` built from stored item bytes without decoding them."""
    return b'{"items":[' + b",".join(items) + b"]}"
