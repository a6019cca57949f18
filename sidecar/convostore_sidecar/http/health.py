"""The health listener: what the kubelet probes, on a TCP port of its own.

A probe that execs a command starts a Python process in the container every period, in
every pod: about 0.3 s of CPU and 35 MB each time. The kubelet's own HTTP probe costs
the sidecar one small request instead, but it connects to the pod's IP, where the API
must not be: so the probes get a listener that serves `/healthz` and `/readyz` only,
answering whether the sidecar is alive and ready and nothing else (no store names, no
causes, no data), and that needs no token. With `healthMetrics` (the operator's
`--health-metrics`, when the chart scrapes sidecars) it serves `/metrics` too, for
Prometheus: counts and times by store and route, never a session.
"""

from __future__ import annotations

from aiohttp import web

from .state import METRICS, READINESS, STORES

HEALTH_ROUTES = web.RouteTableDef()


@HEALTH_ROUTES.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@HEALTH_ROUTES.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    app = request.app
    registry = app[STORES]
    stores = list(registry)
    is_ready = not any(any(state) for state in await app[READINESS].states(stores))
    return web.json_response({"ready": is_ready}, status=200 if is_ready else 503)


def health_app(api: web.Application, metrics: bool = False) -> web.Application:
    """An application that shares the API's stores and readiness, and serves only the
    two probes, and `/metrics` when asked (anything else is 404)."""
    app = web.Application(client_max_size=1024)
    app[STORES] = api[STORES]
    app[READINESS] = api[READINESS]
    app.add_routes(HEALTH_ROUTES)
    if metrics:
        app[METRICS] = api[METRICS]
        app.router.add_get("/metrics", exposition)
    return app


async def exposition(request: web.Request) -> web.Response:
    """The sidecar's Prometheus metrics, in the text format."""
    return web.Response(
        body=request.app[METRICS].exposition(), content_type="text/plain", charset="utf-8"
    )
