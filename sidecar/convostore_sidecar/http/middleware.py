"""Cross-cutting request handling: admission (the bearer token, capacity, query
parameters), bodies within their budget, metrics; errors become JSON in `errors`."""

from __future__ import annotations

import asyncio
import hmac
import time
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

from .errors import ERROR_CODE, WRITES, ApiError, error_answer, labels, overloaded
from .state import BODY_BUDGET, IN_FLIGHT, METRICS, READINESS, REQUEST_LIMITS, TOKEN, TRACING

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v1/openapi.json"})


class InFlight:
    """Counts requests inside handlers, so shutdown can wait for them to finish."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """What every request passes through, in one layer (each aiohttp middleware costs a
    coroutine call per request): counted in flight, so shutdown can wait for it; let in
    (`admit`); its failures answered as JSON (`error_answer`); its body bytes given
    back; its metrics recorded; with tracing on, in a span of the caller's trace (but
    probes, scrapes and the OpenAPI document, which are no one's conversation)."""
    tracing = request.app[TRACING]
    route, store = labels(request)
    if tracing is None or request.path in OPEN_PATHS:
        return await _handled(request, handler, route, store)
    session_id = request.match_info.get("session_id", "")
    with tracing.request_span(request.headers, request.method, route, store, session_id) as span:
        response = await _handled(request, handler, route, store)
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 500:
            from opentelemetry.trace import StatusCode

            span.set_status(StatusCode.ERROR)
        return response


async def _handled(
    request: web.Request, handler: Handler, route: str, store: str
) -> web.StreamResponse:
    """The request let in, answered and counted under its `route` and `store`."""
    app = request.app
    in_flight = app[IN_FLIGHT]
    in_flight.enter()
    started = time.perf_counter()
    try:
        try:
            admit(request)
            response = await handler(request)
        except Exception as exc:
            response = error_answer(request, exc)
        finally:
            app[BODY_BUDGET].release(request)
    finally:
        in_flight.leave()
    metrics = app[METRICS]
    metrics.observe(route, store, request.method, response.status, started)
    code = response.get(ERROR_CODE)
    if code is not None:
        metrics.errors.labels(route, store, code).inc()
    done = store and request.method in WRITES and 200 <= response.status < 300
    if done and app[READINESS].write_done(store):  # the store's writes were failing
        app[METRICS].writes_failing.labels(store).set(0)
    return response


REPEATABLE = frozenset({"label"})
"""Query parameters given once per value: the labels a listing selects by."""


def admit(request: web.Request) -> None:
    """Raises unless the request may go on. Beyond the open paths (probes, metrics, the
    OpenAPI document) it needs a valid token, and past `requests.maxConcurrent` API
    calls at once more are turned away with 503 and `Retry-After` (the client retries
    them) instead of piling up in memory. On every path a query parameter given twice is
    refused, not read as its first value, unless it is one that repeats (`REPEATABLE`)."""
    if request.path not in OPEN_PATHS:
        if not authorized(request):
            raise ApiError(401, "unauthorized", "a valid bearer token is required")
        limits = request.app[REQUEST_LIMITS]
        if request.app[IN_FLIGHT].count > limits.max_concurrent:
            raise overloaded(f"{limits.max_concurrent} requests are in progress; retry shortly")
    query = request.query
    if len(query) != len(query.keys() & query.keys()):
        repeated = sorted(
            {key for key in query if key not in REPEATABLE and len(query.getall(key)) > 1}
        )
        if repeated:
            raise ApiError(
                400, "invalid_query", f"give each parameter once: {', '.join(map(repr, repeated))}"
            )


class TokenCheck:
    """Compares bearer tokens with the file's content, re-read when a token does not match
    so that a rotated Secret takes effect without a restart. The token it replaced stays
    valid for `grace` seconds: clients that read their copy of the Secret a little later
    (the kubelet updates each pod's volumes on its own schedule) are not refused meanwhile."""

    def __init__(self, path: str, grace: float = 120.0) -> None:
        self._path = Path(path)
        self._token = self._read()
        self._grace = grace
        self._previous: bytes | None = None
        self._previous_until = 0.0

    def _read(self) -> bytes:
        token = self._path.read_bytes().strip()
        if not token:
            raise ValueError(f"token file {str(self._path)!r} is empty")
        return token

    def accepts(self, presented: bytes) -> bool:
        if hmac.compare_digest(presented, self._token):
            return True
        if (
            self._previous is not None
            and time.monotonic() < self._previous_until
            and hmac.compare_digest(presented, self._previous)
        ):
            return True
        try:
            current = self._read()
        except (OSError, ValueError):
            return False
        if current != self._token:
            self._previous, self._previous_until = self._token, time.monotonic() + self._grace
            self._token = current
        return hmac.compare_digest(presented, self._token)


def authorized(request: web.Request) -> bool:
    """True when the sidecar needs no token, or the request carries a valid one."""
    check = request.app[TOKEN]
    if check is None:
        return True
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and check.accepts(presented.strip().encode())


RESERVED: web.RequestKey[int] = web.RequestKey("reserved_body_bytes", int)
POOL: web.RequestKey[str] = web.RequestKey("body_pool", str)
SMALL_BODY = 64 << 10
SMALL_POOL = 1 << 20


class BodyBudget:
    """The bytes of request bodies the sidecar holds at once, all requests together.

    A body is held while it is read, parsed and written, at about three times its size
    (the bytes read, the text parsed, the items written), so this bound, not the number
    of requests, is what keeps the sidecar within its container's memory limit. A body
    is reserved whole when it starts, so concurrent large bodies are admitted or turned
    away at once rather than all failing half-read.

    Large bodies, sent slowly or not, can take the whole budget; requests of at most
    `SMALL_BODY` bytes (an ordinary turn) then have a pool of their own (`SMALL_POOL`),
    so they are never starved by large ones."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = {"main": 0, "small": 0}

    def reserve(self, request: web.Request, size: int) -> None:
        total = request.get(RESERVED, 0) + size
        pool = request.get(POOL, "main")
        if pool == "main" and self.held["main"] + size > self.limit and POOL not in request:
            pool = "small"
        room = self.limit if pool == "main" else SMALL_POOL
        if self.held[pool] + size > room or (pool == "small" and total > SMALL_BODY):
            raise overloaded(
                f"{self.held['main']} bytes of request bodies are in progress; {size} more "
                f"would pass requests.maxBufferedBytes ({self.limit}); retry shortly"
            )
        self.held[pool] += size
        request[POOL] = pool
        request[RESERVED] = total

    def release(self, request: web.Request) -> None:
        if POOL in request:
            self.held[request[POOL]] -= request.get(RESERVED, 0)
        request[RESERVED] = 0
