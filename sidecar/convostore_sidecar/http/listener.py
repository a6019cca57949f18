"""What every listener of the sidecar's (and the operator's webhook) is built with:
bounded request lines and headers, a cap on open connections, and no reading past a
request that could not be parsed. The operator imports this module alone of the HTTP
layer (the import contracts in `pyproject.toml` allow it by name).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import cast

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from .errors import error_body

log = logging.getLogger("convostore.sidecar")


# a request line up to this long gets the API's own JSON error (a session id over its
# limit); aiohttp's default, 8190, answers in plain text
LONGEST_LINE = 64 << 10
# what a connection may make the sidecar hold before its token is checked: headers are
# parsed whole first, so their count and size bound it (24 of up to 4 KiB: a bearer
# token or an Idempotency-Key needs far less), and maxConnections bounds the connections
LONGEST_HEADER = 4096
MOST_HEADERS = 24


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


class TurnedAway(asyncio.Protocol):
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
        return TurnedAway()
