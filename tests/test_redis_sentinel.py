"""Redis Sentinel: a primary, two replicas and three Sentinels started here, a sidecar
that finds the primary through them (`redis.sentinel`), and agents appending while the
primary is killed and the Sentinels promote a replica.

With `waitReplicas: 1` an acknowledged append is on a replica before it is answered,
and the Sentinels promote the replica furthest along, so none may be lost; answered at
once, the figure is reported, not asserted. Retried appends carry their
Idempotency-Key, so nothing may be stored twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, cast

import aiohttp
import pytest
import redis.asyncio as aioredis
from convostore import SidecarSession, StoreUnavailableError

from tests.failover import judge, writing
from tests.servers import RedisSentinel, RedisServer
from tests.support import SidecarProcess
from tests.test_outages import wait_until
from tests.test_redis_replicated import wait_until_in_sync

SERVICE = "convo"


@pytest.fixture
def watched_primary() -> Iterator[tuple[RedisServer, list[RedisSentinel]]]:
    primary = RedisServer("--repl-diskless-sync-delay", "0")  # replicas sync at once
    replicas = [RedisServer("--replicaof", "127.0.0.1", str(primary.port)) for _ in range(2)]
    sentinels = [RedisSentinel(primary, SERVICE) for _ in range(3)]
    try:
        for server in (primary, *replicas):
            server.start()
        for sentinel in sentinels:
            sentinel.start()
        yield primary, sentinels
    finally:
        for sentinel in sentinels:
            sentinel.destroy()
        for server in (*replicas, primary):
            server.destroy()


async def sentinels_agree(sentinels: list[RedisSentinel]) -> bool:
    """Every Sentinel sees the primary, both replicas and the other two Sentinels, so a
    failover can be voted on and has replicas to promote."""
    for sentinel in sentinels:
        client = aioredis.Redis(host="127.0.0.1", port=sentinel.port, decode_responses=True)
        try:
            state = cast(dict[str, Any], await client.sentinel_master(SERVICE))
        finally:
            await client.aclose()
        if int(state["num-slaves"]) < 2 or int(state["num-other-sentinels"]) < 2:
            return False
    return True


@pytest.mark.parametrize("wait_replicas", [1, 0], ids=["replicated", "answered-at-once"])
async def test_appends_survive_the_primary_dying_and_a_replica_taking_over(
    wait_replicas: int,
    watched_primary: tuple[RedisServer, list[RedisSentinel]],
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:
    primary, sentinels = watched_primary
    await wait_until_in_sync(primary, replicas=2)
    await wait_until(lambda: sentinels_agree(sentinels))
    redis = {
        "sentinel": {"hosts": [s.address for s in sentinels], "serviceName": SERVICE},
        "waitReplicas": wait_replicas,
        "waitTimeout": 0.5,
    }
    writers = await writing(sidecar_process, {"backend": "redis", "redis": redis})
    primary.kill()
    after = writers.total
    await wait_until(lambda: writers.at_least(after + 40))
    judge(await writers.stop(), "redis sentinel failover", wait_replicas, capsys)


async def test_sentinels_that_know_no_such_primary_make_the_store_unavailable_not_broken(
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
) -> None:
    """A `serviceName` the Sentinels do not watch (a typo, a primary not yet set up):
    the sidecar starts, answers 503 `backend_unavailable` and says so on /readyz."""
    primary = RedisServer()
    primary.start()
    sentinel = RedisSentinel(primary, SERVICE)
    try:
        sentinel.start()
        redis = {"sentinel": {"hosts": [sentinel.address], "serviceName": "not-watched"}}
        proc = sidecar_process({"stores": {"chat": {"backend": "redis", "redis": redis}}})
        proc.start()
        session = SidecarSession("s", "chat", url=proc.url, retries=0)
        with pytest.raises(StoreUnavailableError) as refused:
            await session.add_items([{"n": 1}])
        assert refused.value.code == "backend_unavailable"
        async with (
            aiohttp.ClientSession() as http,
            http.get(proc.url + "/readyz") as resp,
        ):
            assert resp.status == 503
            assert (await resp.json())["stores"]["chat"] == "unavailable"
    finally:
        sentinel.destroy()
        primary.destroy()
