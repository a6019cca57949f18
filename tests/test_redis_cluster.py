"""Redis Cluster: three primaries and their replicas started here, a sidecar process that
knows two seed nodes (`redis.cluster`), and agents appending while the cluster changes
under them: the slots of their sessions move to other primaries, a replica takes over
on request, a primary is killed and its replica promoted.

Retried appends carry their Idempotency-Key, so nothing may be stored twice. A slot
migration loses nothing, and the agents see no error: the sidecar follows MOVED and
ASK, and waits out TRYAGAIN while a session's keys are split between two nodes. A
requested failover loses nothing either (the replica takes over once it has caught
up). A killed primary takes with it what its replica had not received yet: with
`waitReplicas: 1` nothing acknowledged, which is asserted; answered at once, the figure
is reported.

Besides: a TLS-only cluster reached as an ACL user, and seed nodes that do not answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
import redis.asyncio as aioredis
from convostore import SidecarSession, StoreUnavailableError
from redis.crc import key_slot

from tests.failover import Writers, judge, writing
from tests.servers import RedisClusterNodes, TlsFiles, free_port
from tests.support import SidecarProcess
from tests.test_outages import wait_until


@pytest.fixture
def cluster() -> Iterator[RedisClusterNodes]:
    nodes = RedisClusterNodes()
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.destroy()


def node(port: int) -> aioredis.Redis:
    return aioredis.Redis(host="127.0.0.1", port=port, decode_responses=True)


async def command(port: int, *args: Any) -> Any:
    """One command to one node, as `redis-cli -p <port>` would send it."""
    async with node(port) as client:
        return await client.execute_command(*args)  # type: ignore[no-untyped-call]


async def primary_of(cluster: RedisClusterNodes, slot: int) -> int:
    """The port of the primary serving `slot`, as the first live node sees it."""
    for candidate in cluster.nodes:
        if candidate.process is None:
            continue
        for start, end, primary, *_ in await command(candidate.port, "CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(primary[1])
    raise AssertionError(f"no node serves slot {slot}")


async def node_id(port: int) -> str:
    return cast(str, await command(port, "CLUSTER", "MYID"))


async def replica_of(cluster: RedisClusterNodes, primary: int) -> int:
    primary_id = await node_id(primary)
    for candidate in cluster.nodes:
        if candidate.port != primary and await following(candidate.port) == primary_id:
            return candidate.port
    raise AssertionError(f"no replica follows {primary}")


async def following(port: int) -> str | None:
    """The id of the primary the node at `port` replicates, if it is a replica."""
    for line in cast(str, await command(port, "CLUSTER", "NODES")).splitlines():
        fields = line.split()
        if "myself" in fields[2]:
            return None if fields[3] == "-" else fields[3]
    return None


async def replicates(port: int, primary: int) -> bool:
    """The node at `port` follows `primary` and holds its data."""
    if await following(port) != await node_id(primary):
        return False
    async with node(port) as client:
        return (await client.info("replication")).get("master_link_status") == "up"


async def errors_answered(port: int, *kinds: str) -> int:
    """How many of these redirections (ASK, TRYAGAIN, MOVED) the node has answered."""
    async with node(port) as client:
        stats = await client.info("errorstats")
    return sum(int(stats.get(f"errorstat_{kind}", {}).get("count", 0)) for kind in kinds)


async def migrate_slot(slot: int, source: int, target: int, primaries: list[int]) -> None:
    """Moves `slot` the way `redis-cli --cluster reshard` does (IMPORTING, MIGRATING,
    MIGRATE in batches, then NODE: the target first, the source next, then the other
    primaries), with a pause between batches, so that appends meet the session's keys
    split between the two nodes."""
    source_id, target_id = await node_id(source), await node_id(target)
    await command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    await command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    while keys := await command(source, "CLUSTER", "GETKEYSINSLOT", slot, 50):
        await command(source, "MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        await asyncio.sleep(0.02)  # a pause between batches, as appends go on
    for port in sorted(primaries, key=lambda p: (p != target, p != source)):
        await command(port, "CLUSTER", "SETSLOT", slot, "NODE", target_id)


def cluster_store(cluster: RedisClusterNodes, wait_replicas: int = 0) -> dict[str, Any]:
    """A store on the cluster, known to the sidecar by two seed nodes."""
    redis = {
        "cluster": {"nodes": cluster.addresses[:2]},
        "waitReplicas": wait_replicas,
        "waitTimeout": 0.5,
    }
    return {"backend": "redis", "redis": redis}


def slot_of(session_id: str) -> int:
    return key_slot(f"{{{session_id}}}".encode())


async def test_sessions_move_between_primaries_under_load_without_an_error_or_a_loss(
    cluster: RedisClusterNodes,
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:
    writers = await writing(sidecar_process, cluster_store(cluster))
    everyone = sorted({await primary_of(cluster, slot) for slot in (0, 8000, 16383)})
    redirected_before = sum([await errors_answered(p, "ASK", "TRYAGAIN") for p in everyone])
    for session_id in writers.acknowledged:
        slot = slot_of(session_id)
        source = await primary_of(cluster, slot)
        target = next(p for p in everyone if p != source)
        await migrate_slot(slot, source, target, everyone)
        assert await primary_of(cluster, slot) == target
    moved = writers.total
    await wait_until(lambda: writers.at_least(moved + 20))
    redirected = sum([await errors_answered(p, "ASK", "TRYAGAIN") for p in everyone])
    tally = await writers.stop()

    with capsys.disabled():
        print(f"\nredis cluster, slots of {len(writers.acknowledged)} sessions moved: {tally}")
    assert redirected > redirected_before, "no append met a slot in migration"
    assert (tally.lost, tally.doubled, tally.refused) == (0, 0, 0)


async def test_a_replica_taking_over_on_request_loses_nothing(
    cluster: RedisClusterNodes,
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:
    writers = await writing(sidecar_process, cluster_store(cluster))
    primary = await primary_of(cluster, slot_of(next(iter(writers.acknowledged))))
    replica = await replica_of(cluster, primary)
    await command(replica, "CLUSTER", "FAILOVER")
    await wait_until(lambda: serves(cluster, replica, writers))
    after = writers.total
    await wait_until(lambda: writers.at_least(after + 40))
    tally = await writers.stop()

    with capsys.disabled():
        print(f"\nredis cluster, CLUSTER FAILOVER: {tally}")
    assert (tally.lost, tally.doubled) == (0, 0)


async def serves(cluster: RedisClusterNodes, port: int, writers: Writers) -> bool:
    """The node at `port` now serves the first writer's session (and no writer failed)."""
    await writers.at_least(0)
    return await primary_of(cluster, slot_of(next(iter(writers.acknowledged)))) == port


@pytest.mark.parametrize("wait_replicas", [1, 0], ids=["replicated", "answered-at-once"])
async def test_appends_go_on_after_a_primary_dies_and_its_replica_is_promoted(
    wait_replicas: int,
    cluster: RedisClusterNodes,
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:
    writers = await writing(sidecar_process, cluster_store(cluster, wait_replicas))
    primary = await primary_of(cluster, slot_of(next(iter(writers.acknowledged))))
    replica = await replica_of(cluster, primary)
    cluster.node(primary).kill()
    await wait_until(lambda: serves(cluster, replica, writers))
    # back as the replica of the one that took over: until then that shard has none, and
    # with waitReplicas: 1 its sessions' appends are refused
    cluster.node(primary).start()
    await wait_until(lambda: replicates(primary, replica))
    after = writers.total
    await wait_until(lambda: writers.at_least(after + 40))
    judge(await writers.stop(), "redis cluster, primary killed", wait_replicas, capsys)


async def test_a_cluster_over_tls_with_an_acl_user_serves_sessions_on_every_shard(
    tmp_path: Path, sidecar_process: Callable[[dict[str, Any]], SidecarProcess]
) -> None:
    """TLS and the ACL user reach every node the client learns of, not only the seed:
    sessions land on all three shards, each through its own primary."""
    tls_files = TlsFiles.issue(tmp_path)
    user = ("--user", "agent", "on", ">s3cret", "~*", "&*", "+@all")
    cluster = RedisClusterNodes(tls=tls_files, extra=user)
    try:
        cluster.start()
        password = tmp_path / "redis-password"
        password.write_text("s3cret\n")
        redis = {
            "cluster": {"nodes": cluster.addresses[:1], "tls": True},
            "username": "agent",
            "passwordFile": str(password),
            "tls": {"caFile": str(tls_files.ca)},
        }
        proc = sidecar_process({"stores": {"chat": {"backend": "redis", "redis": redis}}})
        proc.start()
        ids = [f"tls-{n}" for n in range(12)]
        for session_id in ids:
            await SidecarSession(session_id, "chat", url=proc.url).add_items([{"s": session_id}])

        host, port = cluster.addresses[0].split(":")
        direct = aioredis.RedisCluster(
            host=host,
            port=int(port),
            ssl=True,
            ssl_ca_certs=str(tls_files.ca),
            username="agent",
            password="s3cret",
        )
        try:
            await direct.initialize()
            shards = set()
            for session_id in ids:
                key = f"convostore:chat:{{{session_id}}}:items"
                assert await direct.lrange(key, 0, -1) == [f'{{"s":"{session_id}"}}'.encode()]
                shard = direct.get_node_from_key(key)
                assert shard is not None
                shards.add(shard.name)
        finally:
            await direct.aclose()
        assert len(shards) == 3

        password.write_text("wrong\n")
        refused = sidecar_process({"stores": {"chat": {"backend": "redis", "redis": redis}}})
        refused.start()
        with pytest.raises(StoreUnavailableError) as error:
            await SidecarSession("tls-0", "chat", url=refused.url, retries=0).get_items()
        assert error.value.code == "backend_unavailable"
    finally:
        cluster.destroy()


async def test_seed_nodes_that_do_not_answer_make_the_store_unavailable_not_broken(
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
) -> None:
    """No seed node reachable (the cluster down, a wrong port): the sidecar starts,
    answers 503 `backend_unavailable` and says so on /readyz."""
    redis = {"cluster": {"nodes": [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]}}
    proc = sidecar_process({"stores": {"chat": {"backend": "redis", "redis": redis}}})
    proc.start()
    session = SidecarSession("s", "chat", url=proc.url, retries=0)
    for call in (session.add_items([{"n": 1}]), session.get_items(), session.pop_item()):
        with pytest.raises(StoreUnavailableError) as refused:
            await call
        assert refused.value.code == "backend_unavailable"
    async with aiohttp.ClientSession() as http, http.get(proc.url + "/readyz") as resp:
        assert resp.status == 503
        assert (await resp.json())["stores"]["chat"] == "unavailable"
