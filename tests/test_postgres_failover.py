"""PostgreSQL failover: a primary and a streaming standby made here (initdb,
pg_basebackup -R), a sidecar given both hosts (`target_session_attrs=read-write`), and
agents appending while the primary dies and the standby is promoted.

With synchronous replication an acknowledged append is on the standby before it is
answered, so none may be lost; with the default (asynchronous) one the figure is
reported, not asserted. In both, retried appends carry their Idempotency-Key, so
nothing may be stored twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import pytest
from convostore import SidecarSession, StoreUnavailableError

from tests.failover import writing
from tests.servers import PgBouncer, PostgresServer
from tests.support import SidecarProcess, migrate
from tests.test_outages import wait_until


@pytest.fixture
def primary_and_standby() -> Iterator[tuple[PostgresServer, PostgresServer]]:
    primary = PostgresServer()
    primary.start()
    try:
        standby = PostgresServer(standby_of=primary)
        try:
            standby.start()
            yield primary, standby
        finally:
            standby.destroy()
    finally:
        primary.destroy()


async def replication_state(primary: PostgresServer) -> str | None:
    conn = await asyncpg.connect(primary.dsn)
    try:
        state: str | None = await conn.fetchval(
            "SELECT state || '/' || sync_state FROM pg_stat_replication"
        )
        return state
    finally:
        await conn.close()


async def alter_system(server: PostgresServer, setting: str) -> None:
    """`ALTER SYSTEM SET <setting>` and a reload, which sessions take up as they go."""
    conn = await asyncpg.connect(server.dsn)
    try:
        await conn.execute(f"ALTER SYSTEM SET {setting}")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()


async def streaming(primary: PostgresServer, *, synchronous: bool) -> None:
    """Wait until the standby streams from the primary, its commits waiting for the
    standby when `synchronous` (the primary is told so first)."""
    if synchronous:
        await alter_system(primary, "synchronous_standby_names = '*'")
    expected = "streaming/sync" if synchronous else "streaming/async"

    async def streaming_as_expected() -> bool:
        return await replication_state(primary) == expected

    await wait_until(streaming_as_expected)


@pytest.mark.parametrize("route", ["direct", "pgbouncer"])
@pytest.mark.parametrize("replication", ["synchronous", "asynchronous"])
async def test_appends_survive_the_primary_dying_and_the_standby_taking_over(
    replication: str,
    route: str,
    primary_and_standby: tuple[PostgresServer, PostgresServer],
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`direct`: the sidecar is given both hosts. `pgbouncer`: it reaches the primary
    through PgBouncer in transaction mode, which is pointed at the new primary once
    it is promoted, as CloudNativePG's Pooler follows its `-rw` Service."""
    primary, standby = primary_and_standby

    await streaming(primary, synchronous=replication == "synchronous")
    both = (
        f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/postgres"
        "?target_session_attrs=read-write"
    )
    postgres: dict[str, Any] = {"dsn": both}
    with contextlib.ExitStack() as cleanup:
        if route == "pgbouncer":
            pooler = PgBouncer(("127.0.0.1", primary.port))
            pooler.start()
            cleanup.callback(pooler.destroy)
            postgres = {"dsn": pooler.dsn, "transactionPooler": True, "directDsn": both}
        config = {"stores": {"chat": {"backend": "postgres", "postgres": postgres}}}
        migrate(config)
        writers = await writing(sidecar_process, config["stores"]["chat"])
        await asyncio.to_thread(primary.stop, "immediate")
        await asyncio.to_thread(standby.promote)
        if route == "pgbouncer":
            pooler.point_at(("127.0.0.1", standby.port))
        after = writers.total
        await wait_until(lambda: writers.at_least(after + 40))
        tally = await writers.stop()

    with capsys.disabled():
        print(f"\npostgres failover ({route}), {replication} replication: {tally}")
    assert tally.doubled == 0
    if replication == "synchronous":
        assert tally.lost == 0
    assert tally.acknowledged >= after + 40


async def test_an_append_is_never_acknowledged_before_the_synchronous_standby_has_it(
    primary_and_standby: tuple[PostgresServer, PostgresServer],
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
) -> None:
    """With the standby away, an append commits on the primary and then waits for the
    standby; the sidecar gives up (503) and the client's retry with the same key must
    wait again rather than be answered from the primary's copy as a replay."""
    primary, standby = primary_and_standby

    await streaming(primary, synchronous=True)
    postgres = {"dsn": primary.dsn, "statementTimeout": 0.5}
    config = {"stores": {"chat": {"backend": "postgres", "postgres": postgres}}}
    migrate(config)
    proc = sidecar_process(config)
    proc.start()
    session = SidecarSession("durable", "chat", url=proc.url, retries=0, timeout=10)
    await session.add_items([{"n": 0}])

    await asyncio.to_thread(standby.stop)
    for _ in range(2):  # the first attempt, then the retry an agent would make
        with pytest.raises(StoreUnavailableError):
            await session.add_items([{"n": 1}], idempotency_key="kept")
    conn = await asyncpg.connect(primary.dsn)
    try:  # the primary holds the append: the retry was a replay, and still waited
        held = await conn.fetchval(
            "SELECT count(*) FROM convostore.items WHERE session_id = 'durable'"
        )
    finally:
        await conn.close()
    assert held == 2
    await asyncio.to_thread(standby.start)
    await streaming(primary, synchronous=True)
    await session.add_items([{"n": 1}], idempotency_key="kept")
    assert [item["n"] for item in await session.get_items()] == [0, 1]


async def test_connections_to_a_primary_that_stops_taking_writes_are_replaced(
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
) -> None:
    """The pool's connections outlive a primary's demotion: the first write refused as
    read-only replaces them all, and the new ones go to the host that takes writes.
    (Demotion is played by `default_transaction_read_only`, which the server reports to
    clients as a standby's state is.)"""
    old, new = PostgresServer(), PostgresServer()
    try:
        old.start()
        new.start()
        dsn = (
            f"postgresql://postgres@127.0.0.1:{old.port},127.0.0.1:{new.port}/postgres"
            "?target_session_attrs=read-write"
        )
        for server in (old, new):
            migrate({"stores": {"chat": {"backend": "postgres", "postgres": {"dsn": server.dsn}}}})
        proc = sidecar_process(
            {"stores": {"chat": {"backend": "postgres", "postgres": {"dsn": dsn, "poolMin": 4}}}}
        )
        proc.start()
        session = SidecarSession("moved", "chat", url=proc.url)
        await session.add_items([{"n": 0}])

        await alter_system(old, "default_transaction_read_only = on")
        await session.add_items([{"n": 1}])  # refused once as read-only, then retried

        counts = []
        for server in (old, new):
            conn = await asyncpg.connect(server.dsn)
            try:
                counts.append(await conn.fetchval("SELECT count(*) FROM convostore.items"))
            finally:
                await conn.close()
        assert counts == [1, 1]
        assert [item["n"] for item in await session.get_items()] == [1]
    finally:
        new.destroy()
        old.destroy()


async def test_a_store_may_choose_not_to_wait_for_the_synchronous_standby(
    primary_and_standby: tuple[PostgresServer, PostgresServer],
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
) -> None:
    """`synchronousCommit: local` answers once the primary has the append, standby or
    not; a store left at the server's setting waits for the standby."""
    primary, standby = primary_and_standby

    await streaming(primary, synchronous=True)
    waits = {"dsn": primary.dsn, "statementTimeout": 0.5, "schema": "waits"}
    local = {"dsn": primary.dsn, "schema": "local_only", "synchronousCommit": "local"}
    config = {
        "stores": {
            "waits": {"backend": "postgres", "postgres": waits},
            "local": {"backend": "postgres", "postgres": local},
        }
    }
    migrate(config)
    proc = sidecar_process(config)
    proc.start()
    await asyncio.to_thread(standby.stop)

    fast = SidecarSession("s", "local", url=proc.url, retries=0)
    await fast.add_items([{"n": 1}])
    assert await fast.get_items() == [{"n": 1}]
    with pytest.raises(StoreUnavailableError):
        await SidecarSession("s", "waits", url=proc.url, retries=0).add_items([{"n": 1}])
