"""The v1 session API: one small handler per route; see `openapi.yaml` for the contract."""

from __future__ import annotations

import base64
import binascii

from aiohttp import web

from ..drivers.base import MAIN, Idempotency
from ..jsonbody import dumps, items_document
from ..keyring import refuse_ciphertext
from ..stores import Store
from ..turns import from_first_turn, latest_turns, widened_to_turns
from . import validation
from .answers import send
from .bodies import read_body
from .errors import ApiError
from .health import exposition
from .middleware import authorized
from .openapi import openapi_json
from .state import ANSWER_BUDGET, METRICS, READINESS, REQUEST_LIMITS, STORES

routes = web.RouteTableDef()
SESSION = "/v1/stores/{store}/sessions/{session_id}"
MAX_TURNS = 100_000


def _store(request: web.Request) -> Store:
    return request.app[STORES].get(request.match_info["store"])


def _session(request: web.Request, store: Store) -> str:
    return validation.session_id(request.match_info["session_id"], store.config.limits)


def _json(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


@routes.get(SESSION + "/items")
async def get_items(request: web.Request) -> web.StreamResponse:
    store = _store(request)
    session_id = _session(request, store)
    query = request.query
    limit = validation.limit_param(query.get("limit"), default=None, maximum=None)
    turns = validation.limit_param(
        query.get("turns"), default=None, maximum=MAX_TURNS, name="turns"
    )
    whole_turns = validation.flag_param(query.get("whole_turns"), "whole_turns")
    if turns is not None and limit is not None:
        raise ApiError(400, "invalid_limit", "give either limit or turns, not both")
    branch = validation.branch_id(query.get("branch"))
    view = query.get("view", "live")
    if view not in ("live", "full"):
        raise ApiError(400, "invalid_view", "view must be live or full")
    history = store.full_history if view == "full" else store.latest
    sealed = validation.flag_param(query.get("sealed"), "sealed")
    if sealed and (turns is not None or whole_turns):
        why = "a sealed read (an export's) takes no turns or whole_turns"
        raise ApiError(400, "invalid_sealed", why)
    cipher = await store.export_cipher(session_id) if sealed else None
    limits, timeout = store.config.limits, request.app[REQUEST_LIMITS].body_timeout
    most, max_bytes = limits.max_read_items, limits.max_read_bytes

    async def read(count: int | None) -> list[bytes]:
        """Never more than one item past either cap, so a long session is not read
        whole into memory; what passes a cap tells that there was more. The full view
        is what compaction archived, then the live items no compaction wrote."""
        return await history(session_id, branch, min(count or most + 1, most + 1), max_bytes)

    async def answer() -> bytes:
        if turns is not None:
            items = await latest_turns(read, turns)
        elif limit is not None and whole_turns:
            items = await widened_to_turns(read, limit)
        else:
            items = [] if limit == 0 else await read(limit)
        items, truncated = _within(items, most, max_bytes)
        if truncated and (turns is not None or whole_turns):
            items = from_first_turn(items)
        if store.config.encryption is None:
            for item in items:
                refuse_ciphertext(item)
        if cipher is not None:  # the answer's caps count the items as sent
            items, cut = _within([cipher.seal(item) for item in items], most, max_bytes)
            truncated = truncated or cut
        return items_document(items, truncated=truncated)

    async with request.app[ANSWER_BUDGET].hold(limits.most_read_bytes, timeout) as held:
        document = await answer()
        held.keep(len(document))
        return await send(request, document, timeout)


def _within(items: list[bytes], most: int, max_bytes: int) -> tuple[list[bytes], bool]:
    """The newest of `items` within both read caps, and whether any were left out."""
    kept, size = 0, 0
    for item in reversed(items):
        if kept == most or size + len(item) > max_bytes:
            break
        kept, size = kept + 1, size + len(item)
    return items[len(items) - kept :], kept < len(items)


@routes.post(SESSION + "/items")
async def append_items(request: web.Request) -> web.Response:
    store = _store(request)
    session_id = _session(request, store)
    limits = store.config.limits
    key = validation.idempotency_key(request.headers.get("Idempotency-Key"))
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    raw = await read_body(request, limits.max_request_bytes)
    branch = validation.branch_id(request.query.get("branch"))
    body = await _opened(store, session_id, validation.append_body(raw, limits))
    fingerprint = body.fingerprint if branch == MAIN else f"{body.fingerprint}@{branch}"
    idempotency = (
        None if key is None else Idempotency(key, fingerprint, store.config.idempotency_ttl)
    )
    result = await store.append(session_id, branch, body.items, body.meta, idempotency)
    if not result.replayed:
        request.app[METRICS].items_appended.labels(store.name).inc(result.appended)
    answer: dict[str, object] = {"appended": result.appended, "replayed": result.replayed}
    if result.turn is not None:
        answer.update(turn=result.turn, anchor=result.anchor)
    return _json(dumps(answer))


async def _opened(
    store: Store, session_id: str, body: validation.AppendBody
) -> validation.AppendBody:
    """The body as its items were before an export sealed them (an import's)."""
    if not body.sealed:
        return body
    plaintexts = await store.open_sealed(session_id, body.sealed)
    return validation.opened(body, plaintexts, store.config.limits)


@routes.post(SESSION + "/items:archive")
async def archive_items(request: web.Request) -> web.Response:
    """The branch's first `count` items to its archive, `items` (at most as many) in
    their place: what a compaction did, restored by `convostore sessions import`."""
    store = _store(request)
    session_id = _session(request, store)
    limits = store.config.limits
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    count = validation.limit_param(
        request.query.get("count"), default=None, maximum=None, name="count", minimum=1
    )
    if count is None:
        raise ApiError(400, "invalid_count", "name how many items to archive: count=N")
    if count > limits.max_read_items:
        raise ApiError(
            409,
            "history_too_long",
            f"at most limits.maxReadItems ({limits.max_read_items}) items go to the archive "
            "in one call",
        )
    branch = validation.branch_id(request.query.get("branch"))
    raw = await read_body(request, limits.max_request_bytes)
    body = await _opened(store, session_id, validation.append_body(raw, limits))
    if len(body.items) > count:
        raise ApiError(
            409,
            "summary_too_long",
            f"{len(body.items)} items cannot replace {count}: a compaction never grows a branch",
        )
    if not await store.archive_head(session_id, branch, count, body.items):
        raise ApiError(
            409, "too_few_items", f"the branch holds fewer than {count} items; nothing changed"
        )
    return _json(dumps({"archived": count, "items": len(body.items)}))


@routes.post(SESSION + "/items:pop")
async def pop_item(request: web.Request) -> web.Response:
    store = _store(request)
    check = refuse_ciphertext if store.config.encryption is None else None
    session_id = _session(request, store)
    branch = validation.branch_id(request.query.get("branch"))
    item = await store.pop(session_id, branch, check)
    if item is not None:
        request.app[METRICS].items_popped.labels(store.name).inc()
    return _json(b'{"item":' + (item if item is not None else b"null") + b"}")


@routes.post(SESSION + ":reencrypt")
async def reencrypt_session(request: web.Request) -> web.Response:
    """Re-encrypt a session's items under the store's primary key (key rotation)."""
    store = _store(request)
    session_id = _session(request, store)
    count = await store.reencrypt(session_id)
    return _json(dumps({"reencrypted": count}))


@routes.delete(SESSION)
async def clear_session(request: web.Request) -> web.Response:
    store = _store(request)
    await store.clear(_session(request, store))
    return web.Response(status=204)


@routes.get("/v1/stores/{store}/sessions")
async def list_sessions(request: web.Request) -> web.Response:
    store = _store(request)
    prefix = validation.session_prefix(request.query.get("prefix", ""), store.config.limits)
    page_size = validation.page_size(request.query.get("limit"))
    after = _decode_cursor(request.query.get("cursor"))
    ids = await store.list_sessions(prefix, after, page_size + 1)
    more = len(ids) > page_size
    ids = ids[:page_size]
    cursor = _encode_cursor(ids[-1]) if more else None
    return _json(dumps({"sessions": ids, "next_cursor": cursor}))


def _encode_cursor(session_id: str) -> str:
    return base64.urlsafe_b64encode(session_id.encode()).decode().rstrip("=")


def _decode_cursor(raw: str | None) -> str | None:
    if not raw:
        return None
    try:
        decoded = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, "invalid_cursor", "cursor is not one this sidecar returned") from exc
    if not validation.SESSION_ID.fullmatch(decoded):
        raise ApiError(400, "invalid_cursor", "cursor is not one this sidecar returned")
    return decoded


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return _json(b'{"status":"ok"}')


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    registry = request.app[STORES]
    stores = list(registry)
    checked = await request.app[READINESS].states(stores)
    problems = [unreachable or refusing for unreachable, refusing in checked]
    ready = not any(problems)
    states = [_state(*state) for state in checked]
    document: dict[str, object] = {
        "ready": ready,
        "stores": {s.name: state for s, state in zip(stores, states, strict=True)},
    }
    if authorized(request):
        document["details"] = {
            s.name: p for s, p in zip(stores, problems, strict=True) if p is not None
        }
    return _json(dumps(document), status=200 if ready else 503)


def _state(unreachable: str | None, refusing: str | None) -> str:
    return "unavailable" if unreachable else "writes_failing" if refusing else "ok"


routes.get("/metrics")(exposition)


@routes.get("/v1/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return _json(openapi_json())
