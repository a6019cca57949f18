"""Read answers within the sidecar's memory limit, as request bodies are (`BodyBudget`).

A read holds its items about three times over: as the backend sends them, as the list of
items, as the JSON answer. So before it asks the backend, a read reserves the most its
answer can take (its store's `limits.maxReadBytes` and one item past it, see `latest`)
from `requests.maxBufferedReadBytes`, keeps what the answer takes once it has one, and
gives that back when the client has taken the answer. Reads wait for room rather than
fail, for up to `requests.bodyTimeout`: a read is short unless its client is slow, and a
client that has not taken its answer within `bodyTimeout` has its connection cut, which
also drops what the kernel still held for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from .errors import overloaded

log = logging.getLogger("convostore.sidecar")


class AnswerBudget:
    """The bytes of read answers the sidecar holds at once, all reads together."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._waiting: list[asyncio.Future[None]] = []

    @contextlib.asynccontextmanager
    async def hold(self, size: int, wait: float) -> AsyncIterator[Held]:
        """`size` bytes for the length of the block, once there is room within `wait`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while self.held + size > self.limit:
            room = loop.create_future()
            self._waiting.append(room)
            try:
                async with asyncio.timeout_at(deadline):
                    await room
            except TimeoutError:
                raise overloaded(
                    f"{self.held} bytes of read answers are in progress; {size} more would "
                    f"pass requests.maxBufferedReadBytes ({self.limit}); retry shortly"
                ) from None
            finally:
                self._waiting.remove(room)
        self.held += size
        held = Held(self, size)
        try:
            yield held
        finally:
            held.keep(0)

    def _give_back(self, size: int) -> None:
        self.held -= size
        for room in self._waiting:
            if not room.done():
                room.set_result(None)


class Held:
    """One read's share of the budget."""

    def __init__(self, budget: AnswerBudget, size: int) -> None:
        self._budget = budget
        self.size = size

    def keep(self, size: int) -> None:
        """Keep only `size` bytes of the share (at most what it is)."""
        freed = max(self.size - size, 0)
        self.size -= freed
        self._budget._give_back(freed)


async def send(request: web.Request, body: bytes, seconds: float) -> web.StreamResponse:
    """Answer `body` as JSON, waiting until the client has taken it; a client that has
    not within `seconds` has its connection cut. A prepared `Response`, unlike a
    `StreamResponse`, sends its headers and body in one write: one system call."""
    response = web.Response(body=body, content_type="application/json")
    try:
        async with asyncio.timeout(seconds):
            await response.prepare(request)
            await response.write_eof()
    except TimeoutError:
        log.info("client did not take its answer to %s within %g s", request.path, seconds)
        if request.transport is not None:
            request.transport.abort()
    return response
