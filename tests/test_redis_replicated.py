"""`redis.waitReplicas`: an append is answered only once replicas hold it."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from convostore import SidecarSession, StoreUnavailableError

from tests.servers import RedisServer
from tests.support import SidecarProcess
from tests.test_outages import wait_until


@pytest.fixture
def primary_and_replica() -> Iterator[tuple[RedisServer, RedisServer]]:
    primary = RedisServer()
    primary.start()
    replica = RedisServer("--replicaof", "127.0.0.1", str(primary.port))
    replica.start()
    try:
        yield primary, replica
    finally:
        replica.destroy()
        primary.destroy()


async def wait_until_in_sync(primary: RedisServer, replicas: int = 1) -> None:
    """Until that many replicas hold the primary's data and follow its stream (before
    this, a replica that is promoted starts empty: nothing it would keep was copied)."""
    client = aioredis.Redis.from_url(primary.url)

    async def replicas_online() -> bool:
        info = await client.info("replication")
        states = [info.get(f"slave{n}", {}).get("state") for n in range(replicas)]
        return states == ["online"] * replicas

    try:
        await wait_until(replicas_online)
    finally:
        await client.aclose()


async def test_appends_wait_for_the_replica_and_fail_honestly_without_it(
    primary_and_replica: tuple[RedisServer, RedisServer],
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
    tmp_path: Path,
) -> None:
    primary, replica = primary_and_replica
    await wait_until_in_sync(primary)
    redis_settings = {"url": primary.url, "waitReplicas": 1, "waitTimeout": 0.3}
    proc = sidecar_process({"stores": {"chat": {"backend": "redis", "redis": redis_settings}}})
    proc.start()
    session = SidecarSession("durable", "chat", url=proc.url, retries=1)
    replica_client = aioredis.Redis.from_url(replica.url)
    try:
        for n in range(20):
            await session.add_items([{"n": n}])
            # answered, so already on the replica: no waiting for it here
            stored = await replica_client.lrange("convostore:chat:{durable}:items", 0, -1)
            assert len(stored) == n + 1
        assert replica.process is not None
        replica.process.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(StoreUnavailableError) as error:
                await session.add_items([{"n": "unreplicated"}])
            assert error.value.code == "outcome_unknown"
        finally:
            replica.process.send_signal(signal.SIGCONT)
        await wait_until_in_sync(primary)
        history = [item["n"] for item in await session.get_items()]
        assert history == [*range(20), "unreplicated"], "stored once, never doubled"
    finally:
        await replica_client.aclose()


async def test_a_replayed_append_waits_for_the_replica_like_the_original(
    primary_and_replica: tuple[RedisServer, RedisServer],
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
) -> None:
    """An append that reached the primary alone was refused; its retry, by a sidecar that
    has not written anything since (restarted here), finds it stored and replays it. The
    replay must wait for the replica just the same: the item is still on the primary
    alone, and acknowledging it would let a failover lose an acknowledged append."""
    primary, replica = primary_and_replica
    await wait_until_in_sync(primary)
    redis_settings = {"url": primary.url, "waitReplicas": 1, "waitTimeout": 0.3}
    proc = sidecar_process({"stores": {"chat": {"backend": "redis", "redis": redis_settings}}})
    proc.start()
    assert replica.process is not None
    replica.process.send_signal(signal.SIGSTOP)
    try:
        for attempt in ("original", "replay by a fresh sidecar"):
            session = SidecarSession("replayed", "chat", url=proc.url, retries=1)
            with pytest.raises(StoreUnavailableError) as error:
                await session.add_items([{"n": 1}], idempotency_key="turn-1")
            assert error.value.code == "outcome_unknown", attempt
            proc.stop()
            proc.start()
    finally:
        replica.process.send_signal(signal.SIGCONT)
    await wait_until_in_sync(primary)
    session = SidecarSession("replayed", "chat", url=proc.url, retries=0)
    await session.add_items([{"n": 1}], idempotency_key="turn-1")
    assert await session.get_items() == [{"n": 1}], "stored once, then replayed"
