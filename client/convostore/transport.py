"""HTTP transport to the sidecar: URL handling, pooled connections, safe retries.

A pool of keep-alive connections lives as long as the event loop that created it.
Agent code runs sessions under `asyncio.run` and `Runner.run_sync`, which may start a
new loop per call; aiohttp sessions cannot cross loops. The only clean-up hook a loop
offers is the finalization of async generators (`loop.shutdown_asyncgens`, called by
both), so each pool is owned by a parked async generator that closes it on the way out.
`Runner.run_sync` keeps one loop and finalizes its generators after every run; a loop
that has done so would never finalize a new one, so there each call opens and closes
its own connection instead of pooling (see `Lease`).

Retries happen only where they cannot duplicate or lose an effect: a request whose
connection was never established, and any request that is idempotent (reads, clears,
and appends, which always carry an `Idempotency-Key`). They go on for up to
`retry_for` seconds (5 by default, longer than a sidecar's restart), with growing,
jittered pauses.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import os
import random
import time
import weakref
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from .errors import (
    ConvostoreError,
    NotFoundError,
    RequestRejectedError,
    SessionClosedError,
    StoreUnavailableError,
    UnauthorizedError,
)

inject_trace_context: Callable[[dict[str, str]], None] | None
try:  # the `tracing` extra: each call carries the agent's current trace context
    from opentelemetry.propagate import inject as inject_trace_context
except ImportError:
    inject_trace_context = None

DEFAULT_URL = "http://127.0.0.1:8790"
LARGE_BODY = 1 << 20
_RETRYABLE_STATUSES = frozenset({502, 503, 504})


@dataclass(frozen=True)
class Endpoint:
    """Where the sidecar listens: a base URL plus, for `unix://`, the socket path."""

    base_url: str
    socket_path: str | None

    @classmethod
    def parse(cls, url: str | None) -> Endpoint:
        raw = url or os.environ.get("CONVOSTORE_URL") or DEFAULT_URL
        parts = urlsplit(raw)
        if parts.scheme == "unix":
            path = parts.path or parts.netloc
            if not path:
                raise ValueError(f"CONVOSTORE_URL {raw!r} names no socket path")
            return cls("http://localhost", path)
        if parts.scheme in ("http", "https") and parts.netloc:
            return cls(raw.rstrip("/"), None)
        raise ValueError(f"sidecar URL {raw!r} must be http://host:port or unix:///path")


class BearerToken:
    """The token the client presents: given directly, or read from a file
    (`token_file`, else `CONVOSTORE_TOKEN_FILE`). A file is read again whenever it
    changes (one `stat` per request), so a rotated Secret reaches a running agent."""

    def __init__(self, token: str | None = None, token_file: str | None = None) -> None:
        self._fixed = token or None
        self.path = None if token else token_file or os.environ.get("CONVOSTORE_TOKEN_FILE")
        self._seen: tuple[int, int, int] | None = None
        self._value: str | None = None
        self.value()

    def value(self) -> str | None:
        if self.path is None:
            return self._fixed
        stat = os.stat(self.path)
        seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if seen != self._seen:
            with open(self.path, encoding="utf-8") as f:
                self._value = f.read().strip() or None
            self._seen = seen
        return self._value


_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Endpoint, _Pool]] = (
    weakref.WeakKeyDictionary()
)
_finalized: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
"""Loops that have run `shutdown_asyncgens`: their pools are gone for good."""


def _connect(endpoint: Endpoint) -> aiohttp.ClientSession:
    connector: aiohttp.BaseConnector
    if endpoint.socket_path:
        connector = aiohttp.UnixConnector(path=endpoint.socket_path, limit=64)
    else:
        connector = aiohttp.TCPConnector(limit=64, ttl_dns_cache=None)
    return aiohttp.ClientSession(connector=connector, json_serialize=json.dumps)


class _Pool:
    """One aiohttp session bound to one loop, closed when that loop finalizes."""

    def __init__(self, endpoint: Endpoint, loop: asyncio.AbstractEventLoop) -> None:
        self.http = _connect(endpoint)
        self._owner = self._hold(loop)

    async def park(self) -> None:
        await self._owner.__anext__()

    async def _hold(self, loop: asyncio.AbstractEventLoop) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            _finalized.add(loop)
            await self.http.close()


def _pools_last(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether a pool made now would be closed when the loop finalizes."""
    return loop not in _finalized and not getattr(loop, "_asyncgens_shutdown_called", False)


async def pool_for(endpoint: Endpoint) -> aiohttp.ClientSession:
    loop = asyncio.get_running_loop()
    pools = _pools.setdefault(loop, {})
    pool = pools.get(endpoint)
    if pool is None or pool.http.closed:
        pool = _Pool(endpoint, loop)
        await pool.park()
        pools[endpoint] = pool
    return pool.http


class Lease:
    """The aiohttp session for one call: the loop's pool where the loop will close it,
    else a session of the call's own, closed when the call ends."""

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self._own: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> aiohttp.ClientSession:
        if _pools_last(asyncio.get_running_loop()):
            return await pool_for(self._endpoint)
        self._own = _connect(self._endpoint)
        return self._own

    async def __aexit__(self, *exc: object) -> None:
        if self._own is not None:
            await self._own.close()


async def close_pools() -> None:
    """Close this loop's pools now (optional: they also close when the loop finalizes)."""
    pools = _pools.pop(asyncio.get_running_loop(), {})
    for pool in pools.values():
        await pool.http.close()


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class Transport:
    """Sends one API call, retrying only what is safe, and maps errors to exceptions."""

    endpoint: Endpoint
    token: BearerToken
    timeout: float = 10.0
    retries: int = 10
    backoff: float = 0.05
    retry_for: float = 5.0
    """How long retries may go on: longer than a sidecar restart (1 to 3 s)."""

    def __post_init__(self) -> None:
        self._timeout = aiohttp.ClientTimeout(total=self.timeout)
        self.closed = False
        parts = urlsplit(self.endpoint.base_url)
        exposed = self.endpoint.socket_path is None and parts.scheme == "http"
        if exposed and self.token.value() and not is_loopback_host(parts.hostname or ""):
            raise ValueError(
                f"refusing to send the bearer token over plain HTTP to {parts.hostname}: "
                "use https:// or the sidecar's unix socket"
            )

    async def ping(self) -> bool:
        """Whether the sidecar answers its liveness probe."""
        if self.closed:
            raise SessionClosedError("session_closed", "this session was closed")
        try:
            url = self.endpoint.base_url + "/healthz"
            async with (
                Lease(self.endpoint) as http,
                http.get(url, timeout=self._timeout) as resp,
            ):
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    def _base_headers(self) -> dict[str, str]:
        token = self.token.value()
        if token:
            return {"Accept": "application/json", "Authorization": f"Bearer {token}"}
        return {"Accept": "application/json"}

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool,
        answer_within: float | None = None,
    ) -> Any:
        """`answer_within` (seconds) replaces the transport's own timeout for a call known
        to take longer."""
        if self.closed:
            raise SessionClosedError("session_closed", "this session was closed")
        url = URL(self.endpoint.base_url + path, encoded=True)
        if params:
            url = url.with_query(params)
        attempt, started = 0, time.monotonic()
        while True:
            # exponential backoff with jitter, so clients of a restarting sidecar spread out
            delay = random.uniform(self.backoff, min(1.0, self.backoff * 2 ** (attempt + 1)))
            spent = time.monotonic() - started
            last = attempt >= self.retries or spent + delay > self.retry_for
            all_headers = {**self._base_headers(), **(headers or {})}
            if body is not None:
                all_headers["Content-Type"] = "application/json"
            if inject_trace_context is not None:
                inject_trace_context(all_headers)  # `traceparent`, when a span is current
            try:
                async with (
                    Lease(self.endpoint) as http,
                    http.request(
                        method,
                        url,
                        data=_payload(body),
                        headers=all_headers,
                        timeout=self._timeout
                        if answer_within is None
                        else aiohttp.ClientTimeout(total=answer_within),
                    ) as resp,
                ):
                    raw = await resp.read()
                    if resp.status < 400:
                        return json.loads(raw) if raw else None
                    error = _error_from(resp.status, raw)
                    if not idempotent or resp.status not in _RETRYABLE_STATUSES or last:
                        raise error
                    delay = max(delay, min(_retry_after(resp.headers), 2.0))
            except aiohttp.ClientConnectorError as exc:
                if last:
                    raise StoreUnavailableError(
                        "sidecar_unreachable", f"cannot connect to the sidecar: {exc}"
                    ) from exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                if not idempotent or last:
                    raise StoreUnavailableError(
                        "sidecar_unreachable",
                        f"request to the sidecar failed: {exc!r}; its outcome is unknown",
                    ) from exc
            attempt += 1
            await asyncio.sleep(delay)


def _payload(body: bytes | None) -> bytes | io.BytesIO | None:
    """aiohttp warns (ResourceWarning) about sending more than 1 MiB as plain bytes, which
    it copies in one go; a buffer is streamed. A new one per attempt: sending consumes it."""
    if body is not None and len(body) > LARGE_BODY:
        return io.BytesIO(body)
    return body


def _retry_after(headers: Mapping[str, str]) -> float:
    try:
        return float(headers.get("Retry-After", "0"))
    except ValueError:
        return 0.0


def _error_from(status: int, raw: bytes) -> ConvostoreError:
    code, message = "http_error", raw.decode("utf-8", "replace")[:500]
    try:
        error = json.loads(raw)["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        pass
    if status == 401:
        return UnauthorizedError(code, message, status)
    if status == 404:
        return NotFoundError(code, message, status)
    if status == 501:  # the store's backend cannot do this: retrying never helps
        return RequestRejectedError(code, message, status)
    if status >= 500:
        return StoreUnavailableError(code, message, status)
    return RequestRejectedError(code, message, status)
