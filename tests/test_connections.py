"""A sidecar's backend connections, as a fleet multiplies them: at most `poolMax` to
PostgreSQL in a burst, none once the store has been idle for `idleTimeout`, and a
server with no connection to spare answered as such (503, never 500), with `/readyz`
saying so. Connections are counted from the sidecar process's own sockets (`/proc`)."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from convostore import SidecarSession

from tests.servers import RedisServer
from tests.support import SidecarProcess, eventually, migrate, unique
from tests.test_refusals import readiness, refused

Start = Callable[[dict[str, Any]], SidecarProcess]
BURST = 16


def connections(pid: int, port: int) -> int:
    """The process's established TCP connections to `port` on any host."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            remote, state, inode = fields[2], fields[3], fields[9]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port and inode in inodes:
                count += 1
    return count


async def burst(url: str, store: str) -> None:
    sessions = [SidecarSession(unique(), store, url=url) for _ in range(BURST)]
    await asyncio.gather(*(s.add_items([{"n": n}]) for n, s in enumerate(sessions)))


async def test_an_idle_sidecar_holds_no_backend_connection(
    sidecar_process: Start, postgres_dsn: str, redis_url: str
) -> None:
    postgres = {"dsn": postgres_dsn, "schema": f"c_{uuid.uuid4().hex[:8]}", "idleTimeout": 1}
    redis = {"url": redis_url, "keyPrefix": unique("c"), "idleTimeout": 1}
    config = {
        "stores": {
            "pg": {"backend": "postgres", "postgres": postgres},
            "cache": {"backend": "redis", "redis": redis},
        }
    }
    migrate(config)
    proc = sidecar_process(config)
    proc.start()
    assert proc.process is not None
    pid = proc.process.pid
    pg_port, redis_port = urlsplit(postgres_dsn).port or 5432, urlsplit(redis_url).port or 6379
    for _ in range(3):  # a burst, then idle: and again, to see the store reconnect
        busiest = 0

        async def watch() -> None:
            nonlocal busiest
            while True:
                busiest = max(busiest, connections(pid, pg_port))
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        await asyncio.gather(burst(proc.url, "pg"), burst(proc.url, "cache"))
        watcher.cancel()
        assert 1 <= busiest <= 4, busiest  # postgres.poolMax, its default
        assert connections(pid, redis_port) >= 1
        await eventually(lambda: connections(pid, pg_port) + connections(pid, redis_port) == 0)


async def test_a_redis_with_no_client_to_spare_answers_that_it_has_none(
    sidecar_process: Start,
) -> None:
    server = RedisServer("--maxclients", "1")
    server.start()
    holder = await the_only_client(server.port)
    try:
        store = {"backend": "redis", "redis": {"url": server.url}}
        proc = sidecar_process({"stores": {"chat": store}})
        proc.start()
        failure = await refused(proc, {"n": 1})
        assert failure[:2] == (503, "backend_too_many_connections")
        assert "no connection to spare" in failure[2]
        status, ready = await readiness(proc)
        assert status == 503
        assert "max number of clients" in ready["details"]["chat"]
    finally:
        holder[1].close()
        server.destroy()


async def the_only_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection Redis has taken as its one client (one made while the server still
    counted an earlier one is refused, and is tried again)."""
    while True:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"PING\r\n")
        if await reader.readline() == b"+PONG\r\n":
            return reader, writer
        writer.close()
        await writer.wait_closed()


@pytest.fixture
async def limited_role(postgres_dsn: str) -> AsyncIterator[str]:
    """A role PostgreSQL lets open no connection at all (`CONNECTION LIMIT 0`)."""
    role = f"limited_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(postgres_dsn)
    await admin.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 0")
    parts = urlsplit(postgres_dsn)
    yield urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port or 5432}"))
    await admin.execute(f"DROP ROLE {role}")
    await admin.close()


async def test_a_postgres_with_no_connection_to_spare_answers_that_it_has_none(
    sidecar_process: Start, limited_role: str
) -> None:
    store = {"backend": "postgres", "postgres": {"dsn": limited_role}}
    proc = sidecar_process({"stores": {"chat": store}})
    proc.start()
    assert (await refused(proc, {"n": 1}))[:2] == (503, "backend_too_many_connections")
    status, ready = await readiness(proc)
    assert status == 503
    assert "too many connections" in ready["details"]["chat"]
