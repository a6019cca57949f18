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
import math
import os
import signal
import time
from pathlib import Path
from typing import cast

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from .app import build_app
from .config import SidecarConfig
from .errors import error_body
from .health import health_app
from .state import IN_FLIGHT

log = logging.getLogger("convostore.sidecar")


# a request line up to this long gets the API's own JSON error (a session id over its
# limit); aiohttp's default, 8190, answers in plain text
LONGEST_LINE = 64 << 10
# what a connection may make the sidecar hold before its token is checked: headers are
# parsed whole first, so their count and size bound it (24 of up to 4 KiB: a bearer
# token or an Idempotency-Key needs far less), and maxConnections bounds the connections
LONGEST_HEADER = 4096
MOST_HEADERS = 24
HEALTH_CONNECTIONS = 16
"""Connections the probe listener keeps open at once: the kubelet opens one per probe."""
HEALTH_KEEPALIVE = 5.0


class MalformedRequests(logging.Filter):
    """aiohttp logs a request it cannot parse (a line over LONGEST_LINE, bad HTTP) as an
    ERROR with a traceback; it answered 400 and the fault is the client's: one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], BadHttpMessage):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = f"refused a malformed request: {str(record.exc_info[1])[:200]}"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


REPORT_EVERY = 10.0
TOO_MANY_CONNECTIONS = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
)


class Refused(asyncio.Protocol):
    """A connection over `requests.maxConnections`: told why, then closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.WriteTransport, transport)
        body = error_body("overloaded", "too many open connections to the sidecar; retry shortly")
        transport.write(TOO_MANY_CONNECTIONS % (len(body), body))
        transport.close()


class StopsReadingAtABadRequest(RequestHandler):
    """aiohttp's handler, but a connection whose request could not be parsed is read no
    further: aiohttp would parse each later chunk again and queue up to 32 errors, each
    keeping its 256 KiB chunk alive (8 MiB per connection, before any token is seen);
    the first error is answered 400 and the connection closed all the same."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport is not None and any(
            isinstance(message, _ErrInfo) for message, _ in self._messages
        ):
            self.transport.pause_reading()


class ConnectionCap:
    """The listeners' protocol factory: aiohttp's handler while fewer than `limit`
    connections are open, so idle or slow clients cannot hold every file descriptor."""

    def __init__(self, server: web.Server, limit: int) -> None:
        self._server, self._limit = server, limit
        self._refused, self._reported = 0, -math.inf

    def __call__(self) -> asyncio.Protocol:
        if len(self._server.connections) < self._limit:
            return StopsReadingAtABadRequest(
                self._server,
                loop=asyncio.get_running_loop(),
                **self._server._kwargs,  # what AppRunner was given, as web.Server passes it
            )
        self._refused += 1
        if time.monotonic() - self._reported >= REPORT_EVERY:
            log.warning(
                "refused %d connection(s): %d are open (requests.maxConnections)",
                self._refused,
                self._limit,
            )
            self._refused, self._reported = 0, time.monotonic()
        return Refused()


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
            health = await _health_runner(app)
            assert health.server is not None
            probes = ConnectionCap(health.server, HEALTH_CONNECTIONS)
            listeners.append(
                await loop.create_server(probes, listen.health_host, listen.health_port)
            )
            where.append(f"probes only on {_tcp_url(listeners[-1])}")
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


async def _health_runner(app: web.Application) -> web.AppRunner:
    """The probes' own server (see `health`), bounded as the API's is."""
    runner = _bounded_runner(health_app(app), HEALTH_KEEPALIVE)
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
