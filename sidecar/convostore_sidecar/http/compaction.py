"""`POST .../items:compact`: what the client's `run_compaction` calls after each turn."""

from __future__ import annotations

import logging
import re
from typing import Any

from aiohttp import web

from ..compaction import policy
from ..compaction.settings import COMPACTION_MODES
from ..drivers.base import BackendUnavailable
from ..jsonbody import dumps
from ..refusals import Refused
from . import validation
from .bodies import read_object
from .errors import ApiError
from .state import METRICS, STORES

log = logging.getLogger("convostore.sidecar")
routes = web.RouteTableDef()
MAX_BODY = 4 << 10
RESPONSE_ID = re.compile(r"[\x21-\x7e]{1,256}")
FIELDS = {"response_id", "store", "compaction_mode", "force"}


@routes.post("/v1/stores/{store}/sessions/{session_id}/items:compact")
async def compact_items(request: web.Request) -> web.Response:
    store = request.app[STORES].get(request.match_info["store"])
    session_id = validation.session_id(request.match_info["session_id"], store.config.limits)
    branch = validation.branch_id(request.query.get("branch"))
    asked = _request(await _body(request))
    store.require_compaction()  # refused before it counts as a compaction
    counted = request.app[METRICS].compactions
    try:
        outcome = await store.compact(session_id, branch, asked)
    except Refused as exc:
        counted.labels(store.name, exc.code).inc()
        log.warning("store %s: a compaction failed: %s: %s", store.name, exc.code, exc.message)
        raise
    except BackendUnavailable as exc:
        counted.labels(store.name, exc.cause).inc()
        raise  # logged with its cause where every backend failure is
    result = "compacted" if outcome["compacted"] else outcome["reason"]
    counted.labels(store.name, result).inc()
    return web.Response(body=dumps(outcome), content_type="application/json")


async def _body(request: web.Request) -> dict[str, Any]:
    """An object, or nothing at all (`run_compaction()` without arguments)."""
    if request.content_length == 0 or (request.content_length is None and not request.body_exists):
        return {}
    return await read_object(request, MAX_BODY)


def _request(body: dict[str, Any]) -> policy.Request:
    unknown = set(body) - FIELDS
    if unknown:
        raise ApiError(400, "invalid_body", f"unknown field(s) {sorted(unknown)}")
    response_id = body.get("response_id")
    if response_id is not None and (
        not isinstance(response_id, str) or not RESPONSE_ID.fullmatch(response_id)
    ):
        raise ApiError(
            400, "invalid_body", "'response_id' must be 1 to 256 printable ASCII characters"
        )
    store = body.get("store")
    if store is not None and not isinstance(store, bool):
        raise ApiError(400, "invalid_body", "'store' must be true, false or null")
    mode = body.get("compaction_mode")
    if mode is not None and mode not in COMPACTION_MODES:
        raise ApiError(
            400, "invalid_body", f"'compaction_mode' must be one of {', '.join(COMPACTION_MODES)}"
        )
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise ApiError(400, "invalid_body", "'force' must be true or false")
    return policy.Request(response_id, store, mode, force)
