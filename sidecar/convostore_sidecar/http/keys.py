"""The routes a key rotation is checked with: which keys a store holds, and which key
seals how many of a session's stored items. Key ids only, never a key."""

from __future__ import annotations

from aiohttp import web

from ..jsonbody import dumps
from . import validation
from .state import STORES

routes = web.RouteTableDef()


@routes.get("/v1/stores/{store}/keys")
async def store_keys(request: web.Request) -> web.Response:
    store = request.app[STORES].get(request.match_info["store"])
    primary, keys = store.keyring()
    return web.Response(
        body=dumps({"primary": primary, "keys": keys}), content_type="application/json"
    )


@routes.get("/v1/stores/{store}/sessions/{session_id}/keys")
async def session_keys(request: web.Request) -> web.Response:
    """Every stored item of the session counted: each branch, the compaction archive."""
    store = request.app[STORES].get(request.match_info["store"])
    session_id = validation.session_id(request.match_info["session_id"], store.config.limits)
    sealed, clear = await store.key_census(session_id)
    return web.Response(
        body=dumps({"sealed": sealed, "plaintext": clear}), content_type="application/json"
    )
