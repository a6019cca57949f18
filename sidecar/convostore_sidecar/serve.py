"""Runs the sidecar: TCP on loopback unless turned off, and a unix socket if configured.

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
from aiohttp.http_exceptions import BadHttpMessage

from .app import build_app
from .config import SidecarConfig
from .state import IN_FLIGHT

log = logging.getLogger("convostore.sidecar")


# a request line or header up to this long gets the API's own JSON error (a session id
# or Idempotency-Key over its limit); aiohttp's default, 8190, answers in plain text
LONGEST_LINE = 64 << 10


class MalformedRequests(logging.Filter):
    """aiohttp logs a request it cannot parse (a line over LONGEST_LINE, bad HTTP) as an
    ERROR with a traceback; it answered 400 and the fault is the client's: one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], BadHttpMessage):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = f"refused a malformed request: {str(record.exc_info[1])[:200]}"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


async def serve(config: SidecarConfig) -> None:
    app = build_app(config)
    logging.getLogger("aiohttp.server").addFilter(MalformedRequests())
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=config.shutdown_timeout,
        max_line_size=LONGEST_LINE,
        max_field_size=LONGEST_LINE,
    )
    await runner.setup()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        listen = config.listen
        where = []
        if listen.tcp:
            tcp = web.TCPSite(runner, listen.host, listen.port)
            await tcp.start()
            where.append(tcp.name if listen.port else f"http://{_bound(runner)}")
        if listen.socket:
            _replace_stale_socket(Path(listen.socket))
            await web.UnixSite(runner, listen.socket).start()
            os.chmod(listen.socket, listen.socket_mode)
            where.append(f"unix://{listen.socket}")
        stores = ", ".join(f"{s.name} ({s.backend})" for s in config.stores.values())
        log.info("convostore sidecar serving %s on %s", stores, " and ".join(where))
        await stopping.wait()
        for site in list(runner.sites):
            await site.stop()
        in_flight = app[IN_FLIGHT]
        log.info("stopping: finishing %d request(s) in flight", in_flight.count)
        try:
            async with asyncio.timeout(config.shutdown_timeout):
                await in_flight.wait_idle()
        except TimeoutError:
            log.warning("stopping with %d request(s) unfinished", in_flight.count)
    finally:
        await runner.cleanup()


def _bound(runner: web.AppRunner) -> str:
    """The address a port-0 listener got from the kernel."""
    host, port = runner.addresses[0][:2]
    return f"{host}:{port}"


def _replace_stale_socket(path: Path) -> None:
    """A socket file left by a killed sidecar would make the new one fail to bind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
