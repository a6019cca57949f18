"""What a well-formed request is: session ids, append bodies, limits and keys.

Everything here runs before a driver is called, so a rejected request changes nothing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..config import Limits
from ..drivers.base import MAIN, Meta
from ..exports import NotSealedItem, SealedItem, is_sealed, most_sealed_bytes, sealed_item
from ..jsonbody import WrongShape, append_items, dumps, loads
from ..structure import describe
from .errors import ApiError

SESSION_ID = re.compile(r"[A-Za-z0-9._:@-]+")
BRANCH_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
MAX_LIST_LIMIT = 1000
DEFAULT_PAGE = 100


def session_id(value: str, limits: Limits) -> str:
    if not 1 <= len(value) <= limits.max_session_id_length:
        raise ApiError(
            400,
            "invalid_session_id",
            f"a session id has 1 to {limits.max_session_id_length} characters, got {len(value)}",
        )
    if not SESSION_ID.fullmatch(value) or value in (".", ".."):
        raise ApiError(
            400,
            "invalid_session_id",
            "a session id may only contain letters, digits and . _ : @ - (and is not '.' or '..')",
        )
    return value


def branch_id(value: object) -> str:
    """A branch id from the query, the path or a JSON body (where it may be any value)."""
    if value is None:
        return MAIN
    if not isinstance(value, str) or not BRANCH_ID.fullmatch(value) or value in (".", ".."):
        raise ApiError(
            400,
            "invalid_branch_id",
            "a branch id has 1 to 128 letters, digits or . _ : @ - (and is not '.' or '..')",
        )
    return value


def session_prefix(value: str, limits: Limits) -> str:
    if value and (len(value) > limits.max_session_id_length or not SESSION_ID.fullmatch(value)):
        raise ApiError(400, "invalid_prefix", "a prefix uses the characters of session ids")
    return value


LARGEST_LIMIT = 999_999_999
"""A read limit above it reads as it: more items than any session holds. The SDK's own
wrappers ask for `2**31 - 1` (its compaction session) and expect every item."""


def limit_param(
    raw: str | None,
    *,
    default: int | None,
    maximum: int | None,
    name: str = "limit",
    minimum: int = 0,
) -> int | None:
    """A non-negative integer parameter; with no `maximum`, any size, capped at
    `LARGEST_LIMIT`."""
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()):
        raise ApiError(
            400, f"invalid_{name}", f"{name} must be a non-negative integer, got {raw[:40]!r}"
        )
    value = int(raw) if len(raw) <= 12 else LARGEST_LIMIT + 1
    highest = LARGEST_LIMIT if maximum is None else maximum
    if maximum is None:
        value = min(value, highest)
    if not minimum <= value <= highest:
        raise ApiError(
            400, f"invalid_{name}", f"{name} must be from {minimum} to {highest}, got {raw[:40]}"
        )
    return value


def page_size(raw: str | None) -> int:
    """A listing's `limit`: 1 to `MAX_LIST_LIMIT`, `DEFAULT_PAGE` when not given."""
    size = limit_param(raw, default=DEFAULT_PAGE, maximum=MAX_LIST_LIMIT, minimum=1)
    assert size is not None
    return size


def flag_param(raw: str | None, name: str) -> bool:
    if raw is None or raw == "false":
        return False
    if raw == "true":
        return True
    raise ApiError(400, f"invalid_{name}", f"{name} must be true or false, got {raw!r}")


def idempotency_key(raw: str | None) -> str | None:
    if raw is None:
        return None
    if not IDEMPOTENCY_KEY.fullmatch(raw):
        raise ApiError(
            400,
            "invalid_idempotency_key",
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        )
    return raw


@dataclass(frozen=True)
class AppendBody:
    items: list[bytes]
    meta: list[Meta]
    fingerprint: str
    sealed: dict[int, SealedItem] = field(default_factory=dict)
    """The items an export sealed (`exports`), by index: only their store opens them."""


def append_body(raw: bytes, limits: Limits) -> AppendBody:
    """Parse `{"items": [...]}`; each item must be a JSON object within the size limit
    (a sealed one, within the size it has sealed). Items are parsed one at a time and
    kept only as their compact bytes."""
    encoded: list[bytes] = []
    meta: list[Meta] = []
    sealed: dict[int, SealedItem] = {}
    try:
        for index, item in enumerate(append_items(raw)):
            if index == limits.max_items_per_request:
                raise ApiError(
                    413,
                    "too_many_items",
                    f"more than {index} items in one request; the limit is {index}",
                )
            if not isinstance(item, dict):
                raise ApiError(
                    400,
                    "invalid_item",
                    f"item {index} must be a JSON object, got {type(item).__name__}",
                )
            most = limits.max_item_bytes
            if is_sealed(item):
                sealed[index] = _sealed_item(index, item)
                most = most_sealed_bytes(most)
            data = dumps(item)
            if len(data) > most:
                why = f"item {index} has {len(data)} bytes; the limit is {most}"
                raise ApiError(413, "item_too_large", why)
            encoded.append(data)
            meta.append(describe(item))
    except WrongShape as exc:
        raise ApiError(400, "invalid_body", str(exc)) from exc
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ApiError(400, "invalid_body", f"the body is not valid JSON: {exc}") from exc
    fingerprint = hashlib.sha256(raw).hexdigest()
    return AppendBody(items=encoded, meta=meta, fingerprint=fingerprint, sealed=sealed)


def _sealed_item(index: int, item: dict[str, object]) -> SealedItem:
    try:
        return sealed_item(item)
    except NotSealedItem as exc:
        raise ApiError(400, "invalid_item", f"item {index}: {exc}") from None


def opened(body: AppendBody, plaintexts: Mapping[int, bytes], limits: Limits) -> AppendBody:
    """The body with its sealed items as they were, each within the item size limit."""
    items, meta = list(body.items), list(body.meta)
    for index, data in plaintexts.items():
        if len(data) > limits.max_item_bytes:
            raise ApiError(
                413,
                "item_too_large",
                f"item {index} has {len(data)} bytes opened; the limit is {limits.max_item_bytes}",
            )
        items[index], meta[index] = data, describe(loads(data))
    return AppendBody(items=items, meta=meta, fingerprint=body.fingerprint)
