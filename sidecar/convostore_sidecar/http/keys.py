"""The routes a key rotation runs and is checked with: which keys a store holds (and
how many subjects' keys each wraps), re-wrapping the subjects' keys under the primary,
and which key seals how many of a session's stored items. Key ids only, never a key."""

from __future__ import annotations

from aiohttp import web

from ..jsonbody import dumps
from . import validation
from .state import STORES

routes = web.RouteTableDef()
REWRAP_BUDGET = 20.0
"""Seconds a re-wrap call works before it answers, within any client's timeout."""


@routes.get("/v1/stores/{store}/keys")
async def store_keys(request: web.Request) -> web.Response:
    store = request.app[STORES].get(request.match_info["store"])
    primary, keys = store.keyring()
    answer: dict[str, object] = {"primary": primary, "keys": keys}
    subject_keys = await store.subject_key_census()
    if subject_keys is not None:
        answer["subjectKeys"] = subject_keys
    return web.Response(body=dumps(answer), content_type="application/json")


@routes.post("/v1/stores/{store}/keys:rewrap")
async def rewrap_subject_keys(request: web.Request) -> web.Response:
    """Seal every subject's key under the primary key, the first step of a rotation. An
    answer with `"complete": false` ran out of its time: ask again to go on."""
    store = request.app[STORES].get(request.match_info["store"])
    rewrapped, complete = await store.rewrap(REWRAP_BUDGET)
    return web.Response(
        body=dumps({"rewrapped": rewrapped, "complete": complete}),
        content_type="application/json",
    )


@routes.get("/v1/stores/{store}/sessions/{session_id}/keys")
async def session_keys(request: web.Request) -> web.Response:
    """Every stored item of the session counted: each branch, the compaction archive."""
    store = request.app[STORES].get(request.match_info["store"])
    session_id = validation.session_id(request.match_info["session_id"], store.config.limits)
    sealed, clear, shredded = await store.key_census(session_id)
    return web.Response(
        body=dumps({"sealed": sealed, "plaintext": clear, "shredded": shredded}),
        content_type="application/json",
    )
