"""Runs the sidecar: TCP on loopback unless turned off, a unix socket if configured, and
a listener for the kubelet's probes alone if `listen.healthPort` is set (see `health`).

On SIGTERM (the kubelet stopping the pod) or SIGINT the listeners close first, requests
in flight are allowed to finish within `shutdownTimeout`, the drivers close, and the
process exits 0. The wait for requests happens here, before aiohttp's own shutdown,
because that shutdown stops reading from open connections: a request whose body was
still arriving would never complete.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

from aiohttp import web

from ..config import SidecarConfig
from .app import build_app
from .health import health_app
from .listener import (
    LONGEST_HEADER,
    LONGEST_LINE,
    MOST_HEADERS,
    ConnectionCap,
    MalformedRequests,
)
from .state import IN_FLIGHT

log = logging.getLogger("convostore.sidecar")


HEALTH_CONNECTIONS = 16
"""Connections the probe listener keeps open at once: the kubelet opens one per probe."""
HEALTH_KEEPALIVE = 5.0


async def serve(config: SidecarConfig) -> None:
    app = build_app(config)
    logging.getLogger("aiohttp.server").addFilter(MalformedRequests())
    runner = _bounded_runner(app, config.requests.idle_timeout, config.shutdown_timeout)
    await runner.setup()
    assert runner.server is not None
    accept = ConnectionCap(runner.server, config.requests.max_connections)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    listeners: list[asyncio.Server] = []
    health: web.AppRunner | None = None
    try:
        listen = config.listen
        where = []
        if listen.tcp:
            listeners.append(await loop.create_server(accept, listen.host, listen.port))
            where.append(_tcp_url(listeners[-1]))
        if listen.socket:
            _replace_stale_socket(Path(listen.socket))
            listeners.append(await loop.create_unix_server(accept, listen.socket))
            os.chmod(listen.socket, listen.socket_mode)
            where.append(f"unix://{listen.socket}")
        if listen.health_port is not None:
            health = await _health_runner(app, listen.health_metrics)
            assert health.server is not None
            probes = ConnectionCap(health.server, HEALTH_CONNECTIONS)
            listeners.append(
                await loop.create_server(probes, listen.health_host, listen.health_port)
            )
            served = "probes and metrics" if listen.health_metrics else "probes only"
            where.append(f"{served} on {_tcp_url(listeners[-1])}")
        stores = ", ".join(f"{s.name} ({s.backend})" for s in config.stores.values())
        log.info("convostore sidecar serving %s on %s", stores, " and ".join(where))
        await stopping.wait()
        for listener in listeners:
            listener.close()
        in_flight = app[IN_FLIGHT]
        log.info("stopping: finishing %d request(s) in flight", in_flight.count)
        try:
            async with asyncio.timeout(config.shutdown_timeout):
                await in_flight.wait_idle()
        except TimeoutError:
            log.warning("stopping with %d request(s) unfinished", in_flight.count)
    finally:
        if health is not None:
            await health.cleanup()
        await runner.cleanup()


async def _health_runner(app: web.Application, metrics: bool) -> web.AppRunner:
    """The probes' own server (see `health`), bounded as the API's is."""
    runner = _bounded_runner(health_app(app, metrics), HEALTH_KEEPALIVE)
    await runner.setup()
    return runner


def _bounded_runner(
    app: web.Application, keepalive: float, shutdown: float = 60.0
) -> web.AppRunner:
    """A runner whose requests are held to the header bounds above, signals left to us
    (aiohttp's own `shutdown_timeout` default, 60 s, unless given)."""
    return web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=shutdown,
        max_line_size=LONGEST_LINE,
        max_field_size=LONGEST_HEADER,
        max_headers=MOST_HEADERS,
        keepalive_timeout=keepalive,
    )


def _tcp_url(listener: asyncio.Server) -> str:
    """Where the listener is bound, with the port the kernel chose for port 0."""
    host, port = listener.sockets[0].getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _replace_stale_socket(path: Path) -> None:
    """A socket file left by a killed sidecar would make the new one fail to bind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
