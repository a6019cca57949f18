"""Redis driver: a list and a sequence counter per session, changed only by Lua scripts.

Keys of one session share a hash tag, `<prefix>:{<session id>}:...`, so they live in one
Redis Cluster slot and a script may touch them all atomically. An append pushes the
batch, bumps the sequence, trims to `maxItems`, refreshes the TTL and records the
idempotency key in one script; no other client can observe half of it. The latest N
items are `LRANGE -N -1`, which Redis serves from the list's tail without walking it.

Session ids are also kept in one sorted set per store (all scores 0, so ordered by
bytes) for paged listing. It lives outside the session's slot, so it is updated after
the script, and only when the script reports that the append started the session; an
id whose session has expired is pruned from it when a listing meets it.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError, WatchError
from redis.retry import Retry

from .base import AppendResult, BackendUnavailable, Check, Idempotency, Transform, replay_of

if TYPE_CHECKING:
    from ..config import Section, StoreConfig

T = TypeVar("T")

APPEND = """
local items, seq, idem = KEYS[1], KEYS[2], KEYS[3]
local use_idem, fingerprint = ARGV[1] == '1', ARGV[2]
local idem_ms, ttl_ms, max_items = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if use_idem then
  local seen = redis.call('GET', idem)
  if seen then return seen end
end
local count = #ARGV - 5
for first = 6, #ARGV, 1000 do
  redis.call('RPUSH', items, unpack(ARGV, first, math.min(first + 999, #ARGV)))
end
local total = redis.call('INCRBY', seq, count)
if max_items > 0 then redis.call('LTRIM', items, -max_items, -1) end
if ttl_ms > 0 then
  redis.call('PEXPIRE', items, ttl_ms)
  redis.call('PEXPIRE', seq, ttl_ms)
end
if use_idem then redis.call('SET', idem, fingerprint .. ' ' .. count, 'PX', idem_ms) end
if total == count then return 1 end
return false
"""

POP = """
local item = redis.call('RPOP', KEYS[1])
local ttl_ms = tonumber(ARGV[1])
if item and ttl_ms > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl_ms)
  redis.call('PEXPIRE', KEYS[2], ttl_ms)
end
return item
"""

_UNAVAILABLE = (ConnectionError, TimeoutError, BusyLoadingError, OSError)
OPTIMISTIC_ATTEMPTS = 50


@dataclass(frozen=True)
class Settings:
    url: str = "redis://127.0.0.1:6379/0"
    username: str | None = None
    password_file: str | None = None
    key_prefix: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    connect_timeout: float = 1.0
    timeout: float = 2.0
    max_connections: int = 64

    @classmethod
    def parse(cls, s: Section) -> Settings:
        url = s.string("url", cls.url)
        if not url.startswith(("redis://", "rediss://", "unix://")):
            s.fail("url", f"must start with redis://, rediss:// or unix://, got {url!r}")
        prefix = s.string("keyPrefix")
        if prefix is not None and ("{" in prefix or "}" in prefix):
            s.fail("keyPrefix", "must not contain { or }: they would break the hash tags")
        tls = s.section("tls")
        settings = cls(
            url=url,
            username=s.string("username"),
            password_file=s.string("passwordFile"),
            key_prefix=prefix,
            ca_file=tls.string("caFile"),
            cert_file=tls.string("certFile"),
            key_file=tls.string("keyFile"),
            connect_timeout=s.duration("connectTimeout", cls.connect_timeout, low=0.01, high=60),
            timeout=s.duration("timeout", cls.timeout, low=0.01, high=300),
            max_connections=s.integer("maxConnections", cls.max_connections, low=1, high=10_000),
        )
        tls.done()
        if (settings.ca_file or settings.cert_file) and not url.startswith("rediss://"):
            s.fail("tls", "TLS files need a rediss:// url")
        return settings


def open_driver(store: StoreConfig) -> RedisDriver:
    return RedisDriver(store)


class RedisDriver:
    def __init__(self, store: StoreConfig) -> None:
        settings: Settings = store.settings
        self.retention = store.retention
        self.prefix = settings.key_prefix or f"convostore:{store.name}"
        options: dict[str, Any] = {
            "username": settings.username,
            "socket_connect_timeout": settings.connect_timeout,
            "socket_timeout": settings.timeout,
            "retry": Retry(NoBackoff(), 0),
            "max_connections": settings.max_connections,
        }
        if settings.password_file:
            options["password"] = Path(settings.password_file).read_text("utf-8").strip()
        if settings.url.startswith("rediss://"):
            options.update(
                ssl_ca_certs=settings.ca_file,
                ssl_certfile=settings.cert_file,
                ssl_keyfile=settings.key_file,
            )
        self.client: aioredis.Redis = aioredis.Redis.from_url(settings.url, **options)
        self._append = self.client.register_script(APPEND)
        self._pop = self.client.register_script(POP)
        self._index = f"{self.prefix}:sessions"

    def keys(self, session_id: str) -> tuple[str, str]:
        base = f"{self.prefix}:{{{session_id}}}"
        return f"{base}:items", f"{base}:seq"

    def _ttl_ms(self) -> int:
        ttl = self.retention.ttl_seconds
        return int(ttl * 1000) if ttl else 0

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except _UNAVAILABLE as exc:
            raise BackendUnavailable(f"redis: {exc}") from exc

    async def open(self) -> None:
        """Nothing to prepare: the client connects on first use."""

    async def close(self) -> None:
        await self.client.aclose()

    async def ping(self) -> None:
        await self._call(self.client.ping)

    async def append(
        self, session_id: str, items: Sequence[bytes], idempotency: Idempotency | None
    ) -> AppendResult:
        items_key, seq_key = self.keys(session_id)
        idem_key = f"{self.prefix}:{{{session_id}}}:idem:" + (
            hashlib.sha256(idempotency.key.encode()).hexdigest()[:40] if idempotency else ""
        )
        args: list[Any] = [
            "1" if idempotency else "0",
            idempotency.fingerprint if idempotency else "",
            int(idempotency.ttl_seconds * 1000) if idempotency else 0,
            self._ttl_ms(),
            self.retention.max_items or 0,
            *items,
        ]

        async def run() -> Any:
            outcome = await self._append(keys=[items_key, seq_key, idem_key], args=args)
            if outcome == 1:
                await self.client.zadd(self._index, {session_id: 0})
            return outcome

        seen = await self._call(run)
        if seen is None or seen == 1:
            return AppendResult(appended=len(items), replayed=False)
        assert idempotency is not None
        fingerprint, _, count = seen.decode().partition(" ")
        return replay_of(idempotency, fingerprint, int(count))

    async def latest(self, session_id: str, limit: int | None) -> list[bytes]:
        items_key, _ = self.keys(session_id)
        start = 0 if limit is None else -limit
        items = await self._call(lambda: self.client.lrange(items_key, start, -1))
        return cast(list[bytes], items)

    async def pop(self, session_id: str, check: Check | None = None) -> bytes | None:
        if check is not None:
            return await self._call(functools.partial(self._checked_pop, session_id, check))
        item: bytes | None = await self._call(
            lambda: self._pop(keys=list(self.keys(session_id)), args=[self._ttl_ms()])
        )
        return item

    async def _checked_pop(self, session_id: str, check: Check) -> bytes | None:
        """Pop with a look at the item first: a WATCH transaction, retried on contention."""
        items_key, seq_key = self.keys(session_id)
        for _ in range(OPTIMISTIC_ATTEMPTS):
            async with self.client.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(items_key)
                    newest = await pipe.lindex(items_key, -1)
                    if newest is None:
                        return None
                    check(cast(bytes, newest))
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.rpop(items_key)
                    if ttl := self._ttl_ms():
                        pipe.pexpire(items_key, ttl)
                        pipe.pexpire(seq_key, ttl)
                    popped = (await pipe.execute())[0]
                    return cast(bytes, popped)
                except WatchError:
                    continue
        raise BackendUnavailable(f"redis: session {session_id!r} changed too often to pop")

    async def clear(self, session_id: str) -> None:
        async def run() -> None:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.delete(*self.keys(session_id))
                pipe.zrem(self._index, session_id)
                await pipe.execute()

        await self._call(run)

    async def list_sessions(self, prefix: str, after: str | None, limit: int) -> list[str]:
        low = f"({after}" if after and after >= prefix else f"[{prefix}"
        found: list[str] = []
        while len(found) < limit:
            ids, alive = await self._call(
                functools.partial(self._index_page, low, prefix, limit - len(found))
            )
            if not ids:
                break
            found.extend(alive)
            low = f"({ids[-1]}"
        return found

    async def _index_page(self, low: str, prefix: str, count: int) -> tuple[list[str], list[str]]:
        """Ids from the index, and those of them whose session still exists."""
        raw = await self.client.zrange(
            self._index, low, f"({prefix}\x7f", bylex=True, offset=0, num=count
        )
        ids = [r.decode() for r in cast(list[bytes], raw)]
        if not ids:
            return [], []
        async with self.client.pipeline(transaction=False) as pipe:
            for session_id in ids:
                pipe.exists(self.keys(session_id)[1])
            exists = await pipe.execute()
        gone = [sid for sid, ok in zip(ids, exists, strict=True) if not ok]
        if gone:
            await self.client.zrem(self._index, *gone)
        return ids, [sid for sid, ok in zip(ids, exists, strict=True) if ok]

    async def sweep(self) -> int:
        """Redis expires keys itself; listings prune the index as they go."""
        return 0

    async def rewrite(self, session_id: str, transform: Transform) -> int:
        return await self._call(functools.partial(self._rewrite, session_id, transform))

    async def _rewrite(self, session_id: str, transform: Transform) -> int:
        items_key, _ = self.keys(session_id)
        for _ in range(OPTIMISTIC_ATTEMPTS):
            async with self.client.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(items_key)
                    items = cast(list[bytes], await pipe.lrange(items_key, 0, -1))
                    changed = {
                        index: new
                        for index, item in enumerate(items)
                        if (new := transform(item)) is not None
                    }
                    pipe.multi()  # type: ignore[no-untyped-call]
                    for index, new in changed.items():
                        pipe.lset(items_key, index, cast(str, new))
                    await pipe.execute()
                    return len(changed)
                except WatchError:
                    continue
        raise BackendUnavailable(f"redis: session {session_id!r} changed too often to rewrite")
