"""Backend refusals reach the agent as 503s that name their cause, never as 500s.

Each refusal is provoked for real: a Redis at `maxmemory` with `noeviction`, a Redis
turned into a replica (`REPLICAOF`), a PostgreSQL database whose `lock_timeout` runs out
while another transaction holds the table, a SQLite file deleted or replaced under the
sidecar. The sidecar runs as a process, as in a pod.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from convostore import SidecarSession, StoreUnavailableError

from tests.servers import RedisServer
from tests.support import SidecarProcess, migrate, unique

Start = Callable[[dict[str, Any]], SidecarProcess]


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer("--maxmemory", "3mb", "--maxmemory-policy", "noeviction")
    server.start()
    yield server
    server.destroy()


def started(sidecar_process: Start, store: dict[str, Any]) -> SidecarProcess:
    process = sidecar_process({"stores": {"chat": store}})
    process.start()
    return process


async def refused(process: SidecarProcess, item: dict[str, Any]) -> tuple[int, str, str]:
    """The sidecar's own answer to one append (status, code, message), with no retry."""
    url = f"{process.url}/v1/stores/chat/sessions/{unique()}/items"
    async with aiohttp.ClientSession() as http, http.post(url, json={"items": [item]}) as resp:
        error = (await resp.json())["error"]
        assert resp.headers["Retry-After"] == "1"
        return resp.status, error["code"], error["message"]


async def test_a_redis_out_of_memory_answers_that_it_is(
    redis_server: RedisServer, sidecar_process: Start
) -> None:
    process = started(sidecar_process, {"backend": "redis", "redis": {"url": redis_server.url}})
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        for n in range(64):  # fill it to maxmemory with keys that are not the store's
            try:
                await client.set(f"filler:{n}", b"x" * (256 << 10))
            except aioredis.ResponseError:
                break
        failure = await refused(process, {"role": "user", "content": "x" * 4096})
        assert failure[:2] == (503, "backend_out_of_memory")
        assert "out of memory" in failure[2]
        assert "backend_out_of_memory" in process.log_path.read_text()
        status, ready = await readiness(process)
        assert (status, ready["stores"]["chat"]) == (503, "writes_failing")
        assert "backend_out_of_memory" in ready["details"]["chat"]
        assert 'convostore_store_writes_failing{store="chat"} 1.0' in await metrics(process)

        await client.flushall()
        await SidecarSession(unique(), "chat", url=process.url).add_items([{"n": 1}])
        assert (await readiness(process))[0] == 200, "ready again once a write is done"
        assert 'convostore_store_writes_failing{store="chat"} 0.0' in await metrics(process)
    finally:
        await client.aclose()


async def readiness(process: SidecarProcess) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(f"{process.url}/readyz") as resp:
        return resp.status, await resp.json()


async def metrics(process: SidecarProcess) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"{process.url}/metrics") as resp:
        return await resp.text()


async def test_a_redis_demoted_to_a_replica_answers_that_it_is_read_only(
    redis_server: RedisServer, sidecar_process: Start
) -> None:
    primary = RedisServer()
    primary.start()
    process = started(sidecar_process, {"backend": "redis", "redis": {"url": redis_server.url}})
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.replicaof("127.0.0.1", primary.port)
        failure = await refused(process, {"n": 1})
        session = SidecarSession(unique(), "chat", url=process.url, retries=1)
        others = []
        for call in (session.pop_item, session.clear_session):
            with pytest.raises(StoreUnavailableError) as raised:
                await call()
            others.append((raised.value.status, raised.value.code))
    finally:
        await client.replicaof("NO", "ONE")
        await client.aclose()
        primary.destroy()
    assert failure[:2] == (503, "backend_read_only")
    assert "read-only" in failure[2]
    assert others == [(503, "backend_read_only")] * 2


@pytest.fixture
async def locking_database(postgres_dsn: str) -> AsyncIterator[str]:
    """A database of its own whose sessions give up on a lock after 50 ms."""
    name = f"refusals_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(postgres_dsn)
    await admin.execute(f"CREATE DATABASE {name}")
    await admin.execute(f"ALTER DATABASE {name} SET lock_timeout = '50ms'")
    parts = urlsplit(postgres_dsn)
    yield urlunsplit(parts._replace(path=f"/{name}"))
    await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
    await admin.close()


async def test_a_postgres_lock_timeout_answers_that_it_is(
    locking_database: str, sidecar_process: Start
) -> None:
    store = {"backend": "postgres", "postgres": {"dsn": locking_database}}
    migrate({"stores": {"chat": store}})
    process = started(sidecar_process, store)
    holder = await asyncpg.connect(locking_database)
    try:
        async with holder.transaction():
            await holder.execute("LOCK TABLE convostore.items IN ACCESS EXCLUSIVE MODE")
            failure = await refused(process, {"n": 1})
    finally:
        await holder.close()
    assert failure[:2] == (503, "backend_lock_timeout")
    assert "lock" in failure[2]
    session = SidecarSession(unique(), "chat", url=process.url)
    await session.add_items([{"n": 2}])
    assert await session.get_items() == [{"n": 2}], "answers again once the lock is gone"


def take_away(path: Path, *, replace: bool) -> None:
    for file in path.parent.glob(path.name + "*"):
        file.unlink()
    if replace:
        sqlite3.connect(path).close()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
async def test_a_sqlite_file_taken_away_under_the_sidecar_refuses_every_later_write(
    how: str, sidecar_process: Start, tmp_path: Path
) -> None:
    """SQLite would go on writing to the unlinked file, acknowledging appends that the
    next start cannot find: the sidecar refuses them instead, and is not ready."""
    path = tmp_path / "chat.db"
    process = started(sidecar_process, {"backend": "sqlite", "sqlite": {"path": str(path)}})
    session = SidecarSession(unique(), "chat", url=process.url)
    await session.add_items([{"n": 1}])
    await asyncio.to_thread(take_away, path, replace=how == "replaced")
    failure = await refused(process, {"n": 2})
    assert failure[:2] == (503, "backend_storage_gone")
    assert "database file" in failure[2]
    status, ready = await readiness(process)
    assert (status, ready["stores"]["chat"]) == (503, "unavailable")
    assert "deleted or replaced" in ready["details"]["chat"]
