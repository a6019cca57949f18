"""The v1 calls for a conversation's structure: branches, user turns, token usage.

Which branch a client is on is the client's own state, as in the Agents SDK's
`AdvancedSQLiteSession`: every call here names the branch it is about. On backends that
keep no structure these calls answer 501 `not_supported`, naming the backend.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from ..drivers.base import MAIN, BranchIdUsed, Usage
from ..jsonbody import dumps, loads
from ..stores import Store
from ..structure import mentions
from . import validation
from .bodies import read_object
from .errors import ApiError
from .state import STORES

routes = web.RouteTableDef()
SESSION = "/v1/stores/{store}/sessions/{session_id}"
BRANCHES = SESSION + "/branches"
BRANCH = BRANCHES + "/{branch}"
MAX_BODY = 64 << 10
MAX_TERM = 1000
MAX_TOKENS = 1 << 62


def _target(request: web.Request) -> tuple[Store, str]:
    store = request.app[STORES].get(request.match_info["store"])
    return store, validation.session_id(request.match_info["session_id"], store.config.limits)


def _branch(request: web.Request) -> str:
    return validation.branch_id(request.match_info["branch"])


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=dumps(value), status=status, content_type="application/json")


async def _body(request: web.Request) -> dict[str, Any]:
    return await read_object(request, MAX_BODY)


def _count(body: dict[str, Any], key: str, *, required: bool = True) -> int | None:
    """A non-negative integer; `3.0` is one too, as JSON Schema counts integers."""
    value = body.get(key)
    if value is None and not required:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS:
        raise ApiError(400, "invalid_body", f"{key!r} must be a non-negative integer")
    return value


@routes.get(BRANCHES)
async def list_branches(request: web.Request) -> web.Response:
    store, session_id = _target(request)
    branches = await store.branches(session_id)
    return _json(
        {
            "branches": [
                {
                    "branch_id": b.branch_id,
                    "message_count": b.message_count,
                    "user_turns": b.user_turns,
                    "created_at": _timestamp(b.created_at),
                }
                for b in branches
            ]
        }
    )


@routes.post(BRANCHES)
async def create_branch(request: web.Request) -> web.Response:
    """From the source branch's user turn `turn`, or from the first user turn whose text
    contains `containing`: the new branch holds every item before that turn."""
    store, session_id = _target(request)
    body = await _body(request)
    unknown = set(body) - {"from_branch", "turn", "containing", "branch_id"}
    if unknown:
        raise ApiError(400, "invalid_body", f"unknown field(s) {sorted(unknown)}")
    source = validation.branch_id(body.get("from_branch", MAIN))
    if ("turn" in body) == ("containing" in body):
        raise ApiError(400, "invalid_body", "give either 'turn' or 'containing'")
    most = store.config.limits.max_branches
    if len(await store.branches(session_id)) >= most:
        raise ApiError(
            409,
            "too_many_branches",
            f"the session already has {most} branches holding items (limits.maxBranches); "
            "delete one first",
        )
    if "containing" in body:
        turn = await _first_turn_containing(store, session_id, source, body["containing"])
    else:
        turn = _count(body, "turn") or 0
    if "branch_id" in body:
        if not isinstance(body["branch_id"], str):
            raise ApiError(400, "invalid_branch_id", "'branch_id' must be a string")
        new = validation.branch_id(body["branch_id"])
        await store.create_branch(session_id, source, turn, new)
    else:
        new = await _create_with_generated_id(store, session_id, source, turn)
    return _json({"branch_id": new, "turn": turn}, status=201)


async def _first_turn_containing(store: Store, session_id: str, source: str, term: Any) -> int:
    if not isinstance(term, str) or not term or len(term) > MAX_TERM:
        raise ApiError(400, "invalid_body", f"'containing' must be 1 to {MAX_TERM} characters")
    for turn in await store.user_turns(session_id, source):
        if mentions(turn.item, term):
            return turn.turn
    raise ApiError(409, "turn_not_found", f"no user turn in branch {source!r} contains {term!r}")


async def _create_with_generated_id(store: Store, session_id: str, source: str, turn: int) -> str:
    """`branch_from_turn_<turn>_<unix time>`, with `_2`, `_3`... when taken (as the SDK)."""
    base = f"branch_from_turn_{turn}_{int(time.time())}"
    for suffix in range(1, 1000):
        new = base if suffix == 1 else f"{base}_{suffix}"
        try:
            await store.create_branch(session_id, source, turn, new)
        except BranchIdUsed:
            continue
        return new
    raise ApiError(409, "branch_id_used", f"every id from {base!r} on is taken")


@routes.get(BRANCH)
async def get_branch(request: web.Request) -> web.Response:
    """Whether the branch exists (404 otherwise) and holds items, reading at most one."""
    store, session_id = _target(request)
    branch = _branch(request)
    newest = await store.latest(session_id, branch, 1)
    return _json({"branch_id": branch, "has_items": bool(newest)})


@routes.delete(BRANCH)
async def delete_branch(request: web.Request) -> web.Response:
    """`current` is the caller's current branch: deleting it needs `force=true`."""
    store, session_id = _target(request)
    branch = _branch(request)
    current = validation.branch_id(request.query.get("current"))
    force = validation.flag_param(request.query.get("force"), "force")
    if branch == MAIN:
        raise ApiError(409, "cannot_delete_main", "the 'main' branch cannot be deleted")
    if branch == current and not force:
        raise ApiError(
            409,
            "branch_is_current",
            f"branch {branch!r} is the current branch; switch first or delete with force",
        )
    await store.delete_branch(session_id, branch)
    return web.Response(status=204)


@routes.get(BRANCH + "/turns")
async def list_turns(request: web.Request) -> web.Response:
    """The branch's user turns with their message; `containing` keeps those whose text
    contains the term (ASCII case ignored)."""
    store, session_id = _target(request)
    term = request.query.get("containing")
    if term is not None and not 1 <= len(term) <= MAX_TERM:
        raise ApiError(400, "invalid_containing", f"containing must be 1 to {MAX_TERM} characters")
    turns = await store.user_turns(session_id, _branch(request))
    parts = [
        b'{"turn":%d,"created_at":%s,"item":%s}' % (t.turn, dumps(_timestamp(t.created_at)), t.item)
        for t in turns
        if term is None or mentions(t.item, term)
    ]
    return web.Response(
        body=b'{"turns":[' + b",".join(parts) + b"]}", content_type="application/json"
    )


@routes.get(BRANCH + "/shape")
async def branch_shape(request: web.Request) -> web.Response:
    """Each item's turn, kind and tool, oldest first: enough to group a conversation by
    turns and count tool calls without reading the items."""
    store, session_id = _target(request)
    shapes = await store.shapes(session_id, _branch(request))
    return _json({"items": [{"turn": s.turn, "type": s.kind, "tool_name": s.tool} for s in shapes]})


@routes.post(BRANCH + "/usage")
async def record_usage(request: web.Request) -> web.Response:
    """One run's usage, for the turn that starts at item `anchor` (from the append's
    answer), or for the branch's latest turn when neither `turn` nor `anchor` is given."""
    store, session_id = _target(request)
    body = await _body(request)
    allowed = {"turn", "anchor", "requests", "input_tokens", "output_tokens", "total_tokens"}
    unknown = set(body) - allowed - {"input_tokens_details", "output_tokens_details"}
    if unknown:
        raise ApiError(400, "invalid_body", f"unknown field(s) {sorted(unknown)}")
    turn, anchor = _count(body, "turn", required=False), _count(body, "anchor", required=False)
    if (turn is None) != (anchor is None):
        raise ApiError(400, "invalid_body", "give both 'turn' and 'anchor', or neither")
    usage = Usage(
        requests=_count(body, "requests") or 0,
        input_tokens=_count(body, "input_tokens") or 0,
        output_tokens=_count(body, "output_tokens") or 0,
        total_tokens=_count(body, "total_tokens") or 0,
        input_details=_details(body, "input_tokens_details"),
        output_details=_details(body, "output_tokens_details"),
    )
    stored = await store.record_usage(session_id, _branch(request), turn, anchor, usage)
    return _json({"turn": stored})


def _details(body: dict[str, Any], key: str) -> bytes | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ApiError(400, "invalid_body", f"{key!r} must be an object")
    return dumps(value)


@routes.get(BRANCH + "/usage")
async def turn_usage(request: web.Request) -> web.Response:
    store, session_id = _target(request)
    branch = _branch(request)
    if not await store.branch_exists(session_id, branch):
        raise ApiError(404, "branch_not_found", f"no branch {branch!r} in this session")
    rows = await store.usage(session_id, branch)
    return _json({"turns": [_usage_row(row.turn, row.usage) for row in rows]})


@routes.get(SESSION + "/usage")
async def session_usage(request: web.Request) -> web.Response:
    """Totals over every branch, or one (`branch`); `usage` is null when none was stored."""
    store, session_id = _target(request)
    raw = request.query.get("branch")
    branch = None if raw is None else validation.branch_id(raw)
    rows = await store.usage(session_id, branch)
    if not rows:
        return _json({"usage": None})
    totals = {
        "requests": sum(r.usage.requests for r in rows),
        "input_tokens": sum(r.usage.input_tokens for r in rows),
        "output_tokens": sum(r.usage.output_tokens for r in rows),
        "total_tokens": sum(r.usage.total_tokens for r in rows),
        "total_turns": len(rows),
    }
    return _json({"usage": totals})


def _usage_row(turn: int, usage: Usage) -> dict[str, Any]:
    return {
        "user_turn_number": turn,
        "requests": usage.requests,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "input_tokens_details": None if usage.input_details is None else loads(usage.input_details),
        "output_tokens_details": (
            None if usage.output_details is None else loads(usage.output_details)
        ),
    }


def _timestamp(seconds: float) -> str:
    """As SQLite's CURRENT_TIMESTAMP, which the SDK's session returns: UTC, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))
