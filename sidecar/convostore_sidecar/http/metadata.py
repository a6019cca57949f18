"""Session records: a session's labels and times, finding sessions by them, and erasing
every session of a person or tenant by them."""

from __future__ import annotations

import base64
import binascii
import logging
import math
from datetime import UTC, datetime

from aiohttp import web

from ..drivers.base import Cursor, ErasureRecord, SessionInfo, SessionQuery
from ..jsonbody import dumps, loads
from ..stores import Store
from . import validation
from .bodies import read_object
from .errors import ApiError
from .items import SESSION
from .state import METRICS, STORES

log = logging.getLogger("convostore.sidecar")
routes = web.RouteTableDef()
ERASE_BUDGET = 20.0
"""Seconds an erasure call erases for before it answers (incomplete, to be asked again)."""
MAX_LABELS_BODY = 64 << 10
TIME_BOUNDS = ("created_after", "created_before", "updated_after", "updated_before")


def _store(request: web.Request) -> Store:
    return request.app[STORES].get(request.match_info["store"])


def _record(info: SessionInfo) -> web.Response:
    return web.json_response(body=dumps(record(info)))


def record(info: SessionInfo) -> dict[str, object]:
    return {
        "session_id": info.session_id,
        "created_at": timestamp(info.created_at),
        "updated_at": timestamp(info.updated_at),
        "labels": dict(sorted(info.labels.items())),
    }


def timestamp(seconds: float) -> str:
    """RFC 3339 in UTC, to the microsecond."""
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


@routes.get(SESSION + "/metadata")
async def get_metadata(request: web.Request) -> web.Response:
    store = _store(request)
    session_id = validation.session_id(request.match_info["session_id"], store.config.limits)
    return _record(await store.session_info(session_id))


@routes.patch(SESSION + "/metadata")
async def patch_metadata(request: web.Request) -> web.Response:
    """`{"labels": {name: value | null}}`: set and remove labels, merging with the rest."""
    store = _store(request)
    session_id = validation.session_id(request.match_info["session_id"], store.config.limits)
    body = await read_object(request, MAX_LABELS_BODY)
    if set(body) != {"labels"}:
        raise ApiError(400, "invalid_body", 'the body is {"labels": {name: value or null}}')
    changes = store.config.labels.changes(body["labels"])
    return _record(await store.label(session_id, changes))


@routes.get("/v1/stores/{store}/sessions:find")
async def find_sessions(request: web.Request) -> web.Response:
    """Sessions newest first by creation, with every `label` asked for, within the times
    given; `cursor` continues a listing, which then neither repeats nor skips a session
    that existed when it began."""
    store = _store(request)
    query = request.query
    limit = validation.page_size(query.get("limit"))
    unknown = set(query) - {"label", "limit", "cursor", *TIME_BOUNDS}
    if unknown:
        raise ApiError(400, "invalid_parameter", f"unknown parameter {sorted(unknown)[0]!r}")
    bounds = {name: _instant(name, query.get(name)) for name in TIME_BOUNDS}
    labels = store.config.labels.selector(query.getall("label", []))
    cursor = _decode_cursor(query.get("cursor"), store.config.limits.max_session_id_length)
    asked = SessionQuery(labels or {}, limit + 1, cursor, **bounds)
    found = [] if labels is None else await store.find_sessions(asked)
    page = found[:limit]
    next_cursor = (
        _encode_cursor((page[-1].created_at, page[-1].session_id)) if len(found) > limit else None
    )
    answer = {"sessions": [record(info) for info in page], "next_cursor": next_cursor}
    return web.json_response(body=dumps(answer))


@routes.post("/v1/stores/{store}/sessions:erase")
async def erase_sessions(request: web.Request) -> web.Response:
    """`{"labels": {name: value}}`: erase every session carrying all of them. An answer
    with `"complete": false` ran out of its time: ask again to go on."""
    store = _store(request)
    body = await read_object(request, MAX_LABELS_BODY)
    if set(body) != {"labels"}:
        raise ApiError(400, "invalid_body", 'the body is {"labels": {name: value}}')
    changes = store.config.labels.changes(body["labels"])
    if None in changes.values():
        raise ApiError(400, "invalid_labels", "an erasure names labels by their values")
    selector = {name: value for name, value in changes.items() if value is not None}
    erasure = await store.erase(selector, ERASE_BUDGET)
    request.app[METRICS].sessions_erased.labels(store.name).inc(erasure.sessions)
    log.info(
        "store %s: erased %d session(s), %d item(s), selected by the labels %s%s",
        store.name,
        erasure.sessions,
        erasure.items,
        ", ".join(sorted(selector)),
        "" if erasure.complete else " (more to erase: asked to go on)",
    )
    return web.json_response(body=dumps(erasure_answer(erasure)))


@routes.get("/v1/stores/{store}/erasures")
async def list_erasures(request: web.Request) -> web.Response:
    """The store's latest erasure records, newest first: when, by which label names, what
    was erased; never whose."""
    store = _store(request)
    limit = validation.page_size(request.query.get("limit"))
    records = [erasure_answer(r) for r in await store.erasures(limit)]
    return web.json_response(body=dumps({"erasures": records}))


def erasure_answer(record: ErasureRecord) -> dict[str, object]:
    return {
        "erasure_id": record.erasure_id,
        "at": timestamp(record.at),
        "label_names": list(record.label_names),
        "erased_sessions": record.sessions,
        "erased_items": record.items,
        "complete": record.complete,
    }


def _instant(name: str, raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None or len(raw) > 40:
        raise ApiError(
            400,
            f"invalid_{name}",
            f"{name} is an RFC 3339 time with its offset, like 2026-01-31T09:30:00Z",
        )
    return when.timestamp()


def _encode_cursor(cursor: Cursor) -> str:
    return base64.urlsafe_b64encode(dumps(list(cursor))).decode().rstrip("=")


def _decode_cursor(raw: str | None, longest: int) -> Cursor | None:
    if not raw:
        return None
    refused = ApiError(400, "invalid_cursor", "cursor is not one this sidecar returned")
    if len(raw) > 4 * longest:
        raise refused
    try:
        value = loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise refused from exc
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not isinstance(value[0], float | int)
        or isinstance(value[0], bool)
        or not math.isfinite(value[0])
        or not isinstance(value[1], str)
        or not validation.SESSION_ID.fullmatch(value[1])
    ):
        raise refused
    return float(value[0]), value[1]
