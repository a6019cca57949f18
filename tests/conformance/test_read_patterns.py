"""A long session's latest-20 read must not read the session whole.

Asserted on what each backend reports it did, never on time: SQLite's query plan and
the virtual-machine steps it executes, PostgreSQL's `EXPLAIN ANALYZE` row counts, the
commands Redis receives (`MONITOR`), the records the Dapr stand-in served, and the
items the Conversations API stand-in returned.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from convostore_sidecar.drivers.postgres import statements as pg_statements
from convostore_sidecar.drivers.sqlalchemy import tables as sa_tables
from convostore_sidecar.drivers.sqlite import schema as sqlite_schema
from sqlalchemy.ext.asyncio import create_async_engine

from tests.dapr_standin import DaprStandIn
from tests.openai_standin import OpenAIStandIn
from tests.support import (
    POSTGRES_POOLED,
    REDIS_CLUSTER,
    SQLALCHEMY_POSTGRES,
    SQLALCHEMY_SQLITE,
    Subject,
    unique,
)

LONG, SHORT, LIMIT = 10_000, 20, 20


async def fill(subject: Subject, session_id: str, count: int) -> None:
    session = subject.session(session_id)
    for start in range(0, count, 1000):
        batch = range(start, min(start + 1000, count))
        await session.add_items([subject.item(n=n) for n in batch])


async def test_latest_20_of_10000_reads_about_20_items(
    subject: Subject, request: pytest.FixtureRequest
) -> None:
    long_id, short_id = unique("long"), unique("short")
    await fill(subject, long_id, LONG)
    await fill(subject, short_id, SHORT)
    if subject.backend == "dapr":
        runtime = request.getfixturevalue("dapr_runtime")
        long_cost = await dapr_reads(subject, long_id, runtime)
        short_cost = await dapr_reads(subject, short_id, runtime)
    elif subject.backend == "openai":
        api = request.getfixturevalue("openai_api")
        long_cost = await openai_reads(subject, long_id, api)
        short_cost = await openai_reads(subject, short_id, api)
    else:
        inspect = {
            "sqlite": sqlite_reads,
            "postgres": postgres_reads,
            POSTGRES_POOLED: postgres_reads,
            "redis": redis_reads,
            REDIS_CLUSTER: redis_reads,
            "sqlalchemy": sqlalchemy_reads,
            SQLALCHEMY_POSTGRES: sqlalchemy_reads,
            SQLALCHEMY_SQLITE: sqlalchemy_reads,
        }
        long_cost = await inspect[subject.backend](subject, long_id)
        short_cost = await inspect[subject.backend](subject, short_id)
    assert long_cost <= 2 * short_cost, (long_cost, short_cost)
    items: list[Any] = subject.values(await subject.session(long_id).get_items(limit=LIMIT))
    assert [i["n"] for i in items] == list(range(LONG - LIMIT, LONG))


async def sqlite_reads(subject: Subject, session_id: str) -> int:
    """VM steps of the driver's own latest-N statement, after checking its plan."""
    conn = sqlite3.connect(subject.store_config["sqlite"]["path"])
    params = ("conf", session_id, "main", float("-inf"), LIMIT)
    plan = " | ".join(
        r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sqlite_schema.LATEST_SQL, params)
    )
    assert "SCAN" not in plan, plan
    assert "TEMP B-TREE" not in plan, plan
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    conn.set_progress_handler(count, 1)
    assert len(conn.execute(sqlite_schema.LATEST_SQL, params).fetchall()) == LIMIT
    conn.close()
    return steps


async def postgres_reads(subject: Subject, session_id: str) -> int:
    """Rows the driver's own latest-N statement touched, per `EXPLAIN ANALYZE`."""
    settings = subject.store_config["postgres"]
    conn = await asyncpg.connect(settings["dsn"])
    try:
        sql = pg_statements.LATEST_SQL.format(s=settings["schema"])
        plan = await conn.fetchval(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + sql,
            "conf",
            session_id,
            None,
            LIMIT,
            "main",
            1 << 20,
        )
    finally:
        await conn.close()
    nodes = list(_plan_nodes(json.loads(plan)[0]["Plan"]))
    assert not any(n["Node Type"] in ("Seq Scan", "Sort") for n in nodes), nodes
    return sum(int(n.get("Actual Rows", 0)) * int(n.get("Actual Loops", 1)) for n in nodes)


async def sqlalchemy_reads(subject: Subject, session_id: str) -> int:
    """Rows the `sqlalchemy` driver's latest-N statement read, by the database's own
    account: MariaDB's `ANALYZE` (`r_rows`), PostgreSQL's `EXPLAIN ANALYZE`, SQLite's
    virtual-machine steps, each after checking the plan uses the index."""
    settings = subject.store_config["sqlalchemy"]
    items = sa_tables.tables(settings["tablePrefix"]).items
    where = sa_tables.on_branch(items, "conf", session_id, "main")
    engine = create_async_engine(settings["url"])
    sql = str(
        sa_tables.newest_first(items, where, LIMIT, 1 << 20).compile(
            dialect=engine.dialect, compile_kwargs={"literal_binds": True}
        )
    )
    try:
        async with engine.connect() as conn:
            if engine.dialect.name == "mysql":
                report = (await conn.exec_driver_sql("ANALYZE FORMAT=JSON " + sql)).scalar()
                reads = [
                    t for t in _tables(json.loads(str(report))) if t["table_name"] == items.name
                ]
                assert reads, report
                assert all(t["access_type"] != "ALL" for t in reads), reads
                return sum(int(t["r_rows"] * t["r_loops"]) for t in reads)
            if engine.dialect.name == "postgresql":
                plan = (
                    await conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + sql)
                ).scalar()
                explained: Any = json.loads(plan) if isinstance(plan, str) else plan
                nodes = list(_plan_nodes(explained[0]["Plan"]))
                assert not any(n["Node Type"] in ("Seq Scan", "Sort") for n in nodes), nodes
                return sum(
                    int(n.get("Actual Rows", 0)) * int(n.get("Actual Loops", 1)) for n in nodes
                )
    finally:
        await engine.dispose()
    db = sqlite3.connect(str(engine.url.database))
    plan = [r[3] for r in db.execute("EXPLAIN QUERY PLAN " + sql)]
    assert not [step for step in plan if step.startswith(f"SCAN {items.name}")], plan
    assert [step for step in plan if step.startswith(f"SEARCH {items.name} USING INDEX")], plan
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    db.set_progress_handler(count, 1)
    assert len(db.execute(sql).fetchall()) == LIMIT
    db.close()
    return steps


def _tables(report: Any) -> Any:
    """Every table access in a MariaDB `ANALYZE FORMAT=JSON` report, however nested."""
    if isinstance(report, dict):
        if "table_name" in report:
            yield report
        for value in report.values():
            yield from _tables(value)
    elif isinstance(report, list):
        for value in report:
            yield from _tables(value)


def _plan_nodes(node: dict[str, Any]) -> Any:
    yield node
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)


async def _server_of(subject: Subject, session_id: str) -> aioredis.Redis:
    """A client of the Redis server holding the session: on a cluster, its slot's."""
    settings = subject.store_config["redis"]
    if "url" in settings:
        return aioredis.Redis.from_url(settings["url"])
    host, port = settings["cluster"]["nodes"][0].split(":")
    cluster = aioredis.RedisCluster(host=host, port=int(port))
    try:
        await cluster.initialize()
        node = cluster.get_node_from_key(f"{{{session_id}}}")
    finally:
        await cluster.aclose()
    assert node is not None, f"no node serves session {session_id!r}"
    return aioredis.Redis(host=node.host, port=int(node.port))


async def redis_reads(subject: Subject, session_id: str) -> int:
    """Elements the LRANGE commands Redis ran for one read (in its script) could return."""
    monitor_client = await _server_of(subject, session_id)
    seen: list[str] = []
    async with monitor_client.monitor() as monitor:
        listener = asyncio.create_task(_collect(monitor, seen))
        await asyncio.sleep(0.1)
        await subject.session(session_id).get_items(limit=LIMIT)
        await asyncio.sleep(0.2)
        listener.cancel()
    await monitor_client.aclose()
    ranges = [c.split() for c in seen if session_id in c and c.split()[0].upper() == "LRANGE"]
    assert ranges, seen
    assert all(int(stop) < 0 for *_, stop in ranges), ranges  # from the tail
    return sum(int(stop) - int(start) + 1 for *_, start, stop in ranges)


async def dapr_reads(subject: Subject, session_id: str, runtime: DaprStandIn) -> int:
    """Records the Dapr state API was asked for during one read."""
    before_bulk, before_calls = runtime.bulk_keys_read, sum(runtime.calls.values())
    await subject.session(session_id).get_items(limit=LIMIT)
    calls = sum(runtime.calls.values()) - before_calls
    assert calls <= 3, runtime.calls
    return runtime.bulk_keys_read - before_bulk + calls


async def openai_reads(subject: Subject, session_id: str, api: OpenAIStandIn) -> int:
    """Items the Conversations API returned for one read, newest first in one page."""
    before = len(api.requests)
    await subject.session(session_id).get_items(limit=LIMIT)
    lists = [r for r in api.requests[before:] if r.method == "GET"]
    assert [(r.query.get("order"), r.query.get("limit")) for r in lists] == [("desc", "20")]
    return sum(r.returned_items for r in lists)


async def _collect(monitor: Any, seen: list[str]) -> None:
    while True:
        info = await monitor.next_command()
        seen.append(str(info["command"]))
