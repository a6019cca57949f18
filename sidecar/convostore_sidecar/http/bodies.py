"""Reading a request's body: within its size limit, its time limit and the sidecar's
memory budget for bodies, and as JSON where a route takes an object."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from ..jsonbody import loads
from .errors import ApiError
from .state import BODY_BUDGET, REQUEST_LIMITS


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, within `requests.bodyTimeout` (a client that stalls mid-body
    gets 408 instead of holding a request slot), `limit` bytes, and the sidecar's
    `BodyBudget` (reserved for the declared length, or `limit` for a chunked body)."""
    declared = request.content_length
    if (declared or 0) > limit:
        raise ApiError(413, "request_too_large", f"the limit is {limit} bytes")
    request.app[BODY_BUDGET].reserve(request, limit if declared is None else declared)
    body = bytearray()
    try:
        async with asyncio.timeout(request.app[REQUEST_LIMITS].body_timeout):
            async for chunk in request.content.iter_chunked(1 << 16):
                body += chunk
                if len(body) > limit:
                    raise ApiError(413, "request_too_large", f"the limit is {limit} bytes")
    except TimeoutError:
        raise ApiError(408, "body_timeout", "the request body did not arrive in time") from None
    return bytes(body)


async def read_object(request: web.Request, limit: int) -> dict[str, Any]:
    """A JSON object sent as application/json, within `limit` bytes."""
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    raw = await read_body(request, limit)
    try:
        body = loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ApiError(400, "invalid_body", f"the body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", "the body must be a JSON object")
    return body
