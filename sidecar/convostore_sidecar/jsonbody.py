"""JSON in and out of the sidecar, exactly.

Requests are parsed with the standard library, which keeps integers of any size exact
(orjson would turn a 30-digit integer into a float), and rejects NaN and Infinity, which
JSON does not have, and numbers too large for a double (`1e400` would become infinity,
then `null`): refused, not changed. Each item is then serialized once, compactly, with
orjson when it can (it refuses integers beyond 64 bits, and strings holding a lone
surrogate escape such as `"\ud800"`, which the SDK's own sessions store) and the
standard library otherwise; the stored bytes are spliced into responses unparsed, so an
item reads back as the same value.

An append body is parsed one item at a time (`append_items`): a parsed JSON value takes
up to about 30 times its text in memory (an empty object is a 64-byte dict), so holding
only one parsed item bounds that cost by the item limit, not by the request limit.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
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


_SPACE = re.compile(r"[ \t\n\r]*")
BODY_SHAPE = '{"items": [...]}'


class WrongShape(ValueError):
    """Valid JSON, or the start of it, that is not an append body."""


class _Cursor:
    """A position in a JSON text that steps over whitespace and punctuation."""

    def __init__(self, text: str) -> None:
        self.text, self.at = text, 0

    def peek(self) -> str:
        match = _SPACE.match(self.text, self.at)
        assert match is not None
        self.at = match.end()
        return self.text[self.at : self.at + 1]

    def take(self, char: str) -> bool:
        if self.peek() != char:
            return False
        self.at += 1
        return True

    def need(self, char: str) -> None:
        if not self.take(char):
            raise ValueError(f"expected {char!r} at character {self.at}")

    def value(self) -> Any:
        self.peek()
        value, self.at = _decoder.raw_decode(self.text, self.at)
        return value


def append_items(raw: bytes) -> Iterator[Any]:
    """The values of an append body, parsed and handed over one at a time. Raises
    WrongShape for any other document, ValueError (UnicodeDecodeError, RecursionError)
    where the text is not JSON."""
    cursor = _Cursor(raw.decode("utf-8"))
    if not cursor.take("{"):
        raise WrongShape(f"the body must be a JSON object {BODY_SHAPE}")
    if cursor.peek() == "}":
        raise WrongShape(f"the body needs {BODY_SHAPE}")
    key = cursor.value()
    if key != "items":
        raise WrongShape(f"unknown field {key!r}; the body is {BODY_SHAPE}")
    cursor.need(":")
    if not cursor.take("["):
        cursor.value()
        raise WrongShape('"items" must be a non-empty array')
    if cursor.peek() == "]":
        raise WrongShape('"items" must be a non-empty array')
    yield cursor.value()
    while cursor.take(","):
        yield cursor.value()
    cursor.need("]")
    if cursor.take(","):
        key = cursor.value()
        if key == "items":
            raise WrongShape('"items" is given twice')
        raise WrongShape(f"unknown field {key!r}; the body is {BODY_SHAPE}")
    cursor.need("}")
    if cursor.peek():
        raise ValueError(f"extra data at character {cursor.at}")


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: kept as its \uXXXX escape
        return json.dumps(value, separators=(",", ":")).encode("ascii")


def items_document(items: list[bytes], *, truncated: bool = False) -> bytes:
    """`{"items": [...]}` built from stored item bytes without decoding them; with
    `"truncated": true` when older items were left out (`limits.maxReadItems`,
    `limits.maxReadBytes`)."""
    document = b'{"items":[' + b",".join(items) + b"]"
    return document + (b',"truncated":true}' if truncated else b"}")
