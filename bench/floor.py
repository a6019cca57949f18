"""`python bench/floor.py PORT`: the hop's own cost, to measure the sidecar against.

A bare aiohttp server that keeps each session's items in memory and answers the two
calls of a turn as the sidecar would (same paths, same JSON), with no validation,
storage, metrics or middleware: what any sidecar built on aiohttp pays at least. It
runs on uvloop, as the sidecar does.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

import orjson
import uvloop
from aiohttp import web

ITEMS = "/v1/stores/{store}/sessions/{session_id}/items"
KEPT = 100
"""Items kept per session: enough for the reads of a turn, so its memory stays flat."""


def make_app() -> web.Application:
    sessions: dict[str, list[bytes]] = {}

    async def append(request: web.Request) -> web.Response:
        items = orjson.loads(await request.read())["items"]
        kept = sessions.setdefault(request.match_info["session_id"], [])
        kept.extend(map(orjson.dumps, items))
        del kept[:-KEPT]
        return web.json_response(body=b'{"appended":%d,"replayed":false}' % len(items))

    async def latest(request: web.Request) -> web.Response:
        limit = int(request.query.get("limit", "0")) or None
        items = sessions.get(request.match_info["session_id"], [])
        tail = items[-limit:] if limit else items
        return web.json_response(body=b'{"items":[' + b",".join(tail) + b"]}")

    async def healthy(request: web.Request) -> web.Response:
        return web.json_response(body=b'{"status":"ok"}')

    app = web.Application()
    app.router.add_post(ITEMS, append)
    app.router.add_get(ITEMS, latest)
    app.router.add_get("/readyz", healthy)
    return app


async def serve(port: int) -> None:
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
