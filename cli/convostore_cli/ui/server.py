"""The session browser's server: the page and its assets, shipped in the package (no
CDN: pods and laptops may have no internet), and a read-only way through to a sidecar.

The page never holds the sidecar's token. It calls this server, which forwards `GET`s on
an allowlist of read routes to the sidecar with the token attached, and refuses every
other method and path: nothing the page does can change a session. The server listens
on 127.0.0.1 alone and answers only a browser that shows the key it printed at start
(carried in the URL's fragment, which browsers never send to a server and the page
drops from the address bar at once), and only for its own host name, so another local
user or a web page (by DNS rebinding) cannot read through it. A strict Content Security
Policy allows the page's own script alone: even text that got into the page as markup
could run nothing.
"""

from __future__ import annotations

import hmac
import re
import secrets
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

KEY_HEADER = "X-Convostore-Ui-Key"
ASSETS = {"/": "index.html", "/app.js": "app.js", "/app.css": "app.css"}
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
SEGMENT = r"[A-Za-z0-9._:@-]+"
READS = re.compile(
    rf"""readyz
    | v1/stores/{SEGMENT}/sessions(:find)?
    | v1/stores/{SEGMENT}/sessions/{SEGMENT}/(items|metadata|usage|branches)
    | v1/stores/{SEGMENT}/sessions/{SEGMENT}/branches/{SEGMENT}/(turns|shape|usage)""",
    re.VERBOSE,
)
"""The sidecar routes the page reads; none of them changes anything."""
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
FORWARDED_HEADERS = ("Content-Type",)


@dataclass
class Sidecar:
    url: str
    token_file: str | None

    def headers(self) -> dict[str, str]:
        """Read at each call: a rotated token file counts at once."""
        if not self.token_file:
            return {}
        token = Path(self.token_file).read_text().strip()
        return {"Authorization": f"Bearer {token}"}


def build(sidecar: Sidecar, key: str, port: int) -> web.Application:
    hosts = {f"127.0.0.1:{port}", f"localhost:{port}"}

    @web.middleware
    async def guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.host not in hosts:
            raise web.HTTPMisdirectedRequest(text="this server answers for 127.0.0.1 alone")
        response = await handler(request)
        response.headers["Content-Security-Policy"] = POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    async def asset(request: web.Request) -> web.Response:
        name = ASSETS[request.path]
        body = resources.files(__package__).joinpath("static", name).read_bytes()
        return web.Response(body=body, content_type=TYPES[Path(name).suffix], charset="utf-8")

    async def read(request: web.Request) -> web.Response:
        if not hmac.compare_digest(request.headers.get(KEY_HEADER, ""), key):
            raise web.HTTPUnauthorized(text="open the address `convostore ui` printed")
        path = request.match_info["path"]
        if not READS.fullmatch(path):
            raise web.HTTPForbidden(text="the session browser only reads sessions")
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                f"{sidecar.url.rstrip('/')}/{path}",
                params=request.query,
                headers=sidecar.headers(),
            ) as resp,
        ):
            body = await resp.read()
            kept = {h: resp.headers[h] for h in FORWARDED_HEADERS if h in resp.headers}
            return web.Response(status=resp.status, body=body, headers=kept)

    async def refuse(request: web.Request) -> web.Response:
        raise web.HTTPMethodNotAllowed(request.method, ["GET"])

    app = web.Application(middlewares=[guarded])
    for path in ASSETS:
        app.router.add_get(path, asset)
    app.router.add_get("/api/{path:.+}", read)
    app.router.add_route("*", "/api/{path:.+}", refuse)
    return app


def new_key() -> str:
    return secrets.token_urlsafe(24)
