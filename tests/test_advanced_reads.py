"""Listing turns, a branch's latest 20 items and usage must not read a session whole.

A long session (10,000 items in 20 user turns) and a short one (40 items in the same 20
turns) get the same branch and usage; each read is measured by what the backend reports
it did, never by time: SQLite's query plan and virtual-machine steps, PostgreSQL's
`EXPLAIN ANALYZE` rows, and the commands Redis receives (`MONITOR`).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from convostore import AdvancedSidecarSession
from convostore_sidecar.drivers.postgres import statements as pg_statements
from convostore_sidecar.drivers.sqlite import schema as sqlite_schema

from tests.servers import MariaDbServer
from tests.support import RunningSidecar, StartSidecar, unique

TURNS, LONG_TURN, SHORT_TURN = 20, 500, 2
StoreConfig = Callable[..., dict[str, Any]]


async def build(sidecar: RunningSidecar, per_turn: int) -> str:
    """A session of TURNS user turns of `per_turn` items each, usage on every turn, and
    a branch `alt` holding all but the last turn."""
    session = AdvancedSidecarSession(unique(), "chat", url=sidecar.url)
    usage = {"requests": 1, "input_tokens": 5, "output_tokens": 5, "total_tokens": 10}
    for turn in range(TURNS):
        answers = [{"role": "assistant", "content": f"{turn}.{n}"} for n in range(per_turn - 1)]
        await session.add_items([{"role": "user", "content": f"question {turn}"}, *answers])
        await session._call("POST", session._branch_path("main") + "/usage", body=usage)
    await session.create_branch_from_turn(TURNS)
    branch = session._current_branch_id
    await session._call("POST", session._branch_path(branch) + "/usage", body=usage)
    return f"{session.session_id}\n{branch}"


async def reads(sidecar: RunningSidecar, target: str) -> None:
    session_id, branch = target.split("\n")
    session = AdvancedSidecarSession(session_id, "chat", url=sidecar.url)
    await session.switch_to_branch(branch)
    assert len(await session.get_conversation_turns()) == TURNS - 1
    assert len(await session.get_items(20)) == 20
    assert (await session.get_session_usage() or {})["total_turns"] == TURNS + 1
    assert len(await session.get_turn_usage()) == 1


def sqlite_cost(path: str, session_id: str, branch: str) -> int:
    """VM steps of the driver's statements for the three reads, after checking plans."""
    conn = sqlite3.connect(path)
    statements = [
        (sqlite_schema.USER_TURNS_SQL, ("chat", session_id, branch)),
        (sqlite_schema.LATEST_SQL, ("chat", session_id, branch, float("-inf"), 20)),
        (sqlite_schema.USAGE_SQL, ("chat", session_id, None, None)),
        (sqlite_schema.USAGE_SQL, ("chat", session_id, branch, branch)),
    ]
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    for sql, params in statements:
        plan = " | ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params))
        assert "SCAN" not in plan, plan
        assert "TEMP B-TREE" not in plan, plan
    conn.set_progress_handler(count, 1)
    for sql, params in statements:
        conn.execute(sql, params).fetchall()
    conn.close()
    return steps


async def postgres_cost(dsn: str, schema: str, session_id: str, branch: str) -> int:
    """Rows the driver's statements touched, per `EXPLAIN ANALYZE`."""
    conn = await asyncpg.connect(dsn)
    statements = [
        (pg_statements.USER_TURNS_SQL, ("chat", session_id, branch)),
        (pg_statements.LATEST_SQL, ("chat", session_id, None, 20, branch, 1 << 20)),
        (pg_statements.USAGE_SQL, ("chat", session_id, None)),
        (pg_statements.USAGE_SQL, ("chat", session_id, branch)),
    ]
    rows = 0
    try:
        for sql, params in statements:
            plan = await conn.fetchval(
                "EXPLAIN (ANALYZE, FORMAT JSON) " + sql.format(s=schema), *params
            )
            nodes = list(_nodes(json.loads(plan)[0]["Plan"]))
            assert not any(n["Node Type"] == "Seq Scan" for n in nodes), nodes
            rows += sum(int(n.get("Actual Rows", 0)) * int(n.get("Actual Loops", 1)) for n in nodes)
    finally:
        await conn.close()
    return rows


async def mariadb_rows_read(server: MariaDbServer, sidecar: RunningSidecar, target: str) -> int:
    """Rows the server read (`Rows_read`, by its own count) while the sidecar did the
    reads: the server is this test worker's alone, and nothing else runs meanwhile."""

    def rows_read() -> int:
        return int(server.sql("SHOW GLOBAL STATUS LIKE 'Rows_read'").split()[1])

    before = rows_read()
    await reads(sidecar, target)
    return rows_read() - before


def _nodes(node: dict[str, Any]) -> Any:
    yield node
    for child in node.get("Plans", []):
        yield from _nodes(child)


async def redis_commands(url: str, sidecar: RunningSidecar, target: str) -> list[list[str]]:
    """The commands Redis received for the reads, each split into its words."""
    monitor_client = aioredis.Redis.from_url(url)
    seen: list[str] = []

    async def collect(monitor: Any) -> None:
        while True:
            seen.append(str((await monitor.next_command())["command"]))

    async with monitor_client.monitor() as monitor:
        listener = asyncio.create_task(collect(monitor))
        await asyncio.sleep(0.1)
        await reads(sidecar, target)
        await asyncio.sleep(0.2)
        listener.cancel()
    await monitor_client.aclose()
    return [c.split() for c in seen if target.split("\n")[0] in c]


@pytest.mark.parametrize("backend", ["sqlite", "postgres", "redis", "sqlalchemy"])
async def test_turns_latest_20_and_usage_do_not_read_the_session_whole(
    backend: str,
    request: pytest.FixtureRequest,
    start_sidecar: StartSidecar,
    store_config: StoreConfig,
) -> None:
    config = store_config(backend)
    sidecar = await start_sidecar({"stores": {"chat": config}})
    long, short = await build(sidecar, LONG_TURN), await build(sidecar, SHORT_TURN)
    for target in (long, short):
        await reads(sidecar, target)
    if backend == "redis":
        for target in (long, short):
            commands = await redis_commands(config["redis"]["url"], sidecar, target)
            assert commands
            for words in commands:
                name = words[0].upper()
                assert name in (
                    "HGET",
                    "HGETALL",
                    "ZRANGE",
                    "HMGET",
                    "LRANGE",
                    "LLEN",
                    "ZCARD",
                    "LINDEX",
                    "MULTI",
                    "EXEC",
                    "EVALSHA",  # reads within a byte cap: LRANGEs from the tail, in a script
                ), words
                if name == "LRANGE":  # the latest 20 items at most, from the tail
                    assert -20 <= int(words[-2]) <= int(words[-1]) < 0, words
        return
    session_ids = [t.split("\n") for t in (long, short)]
    if backend == "sqlalchemy":
        costs = [
            await mariadb_rows_read(request.getfixturevalue("mariadb"), sidecar, t)
            for t in (long, short)
        ]
    elif backend == "sqlite":
        path = config["sqlite"]["path"]
        costs = [sqlite_cost(path, *ids) for ids in session_ids]
    else:
        dsn, schema = config["postgres"]["dsn"], config["postgres"]["schema"]
        costs = [await postgres_cost(dsn, schema, *ids) for ids in session_ids]
    assert costs[0] <= 2 * costs[1], costs
