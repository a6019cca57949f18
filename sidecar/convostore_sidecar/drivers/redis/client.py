"""The redis-py clients a store talks through: one server by URL, the primary the
Sentinels name, or a Redis Cluster, with the same options for each."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from .settings import ClusterSettings, SentinelSettings, Settings


@dataclass(frozen=True)
class Clients:
    data: aioredis.Redis
    """What every call goes through (on a cluster, the cluster client: it speaks the
    same commands as a plain one to the driver)."""
    cluster: RedisCluster | None
    sentinels: list[aioredis.Redis]
    """The Sentinels' own clients, closed with the driver."""


def connect(settings: Settings) -> Clients:
    """The clients of a store's settings; none connects before its first call."""
    options: dict[str, Any] = {
        "username": settings.username,
        "socket_connect_timeout": settings.connect_timeout,
        "socket_timeout": settings.timeout,
        "retry": Retry(NoBackoff(), 0),
        "max_connections": settings.max_connections,
    }
    if settings.password_file:
        options["password"] = Path(settings.password_file).read_text("utf-8").strip()
    if settings.tls:
        options.update(
            ssl_ca_certs=settings.ca_file,
            ssl_certfile=settings.cert_file,
            ssl_keyfile=settings.key_file,
        )
    if settings.cluster is not None:
        cluster = _cluster(settings.cluster, options)
        return Clients(cast(aioredis.Redis, cluster), cluster, [])
    if settings.sentinel is not None:
        primary, sentinels = _watched_primary(settings.sentinel, options)
        return Clients(primary, None, sentinels)
    return Clients(aioredis.Redis.from_url(settings.url, **options), None, [])


def _watched_primary(
    sentinel: SentinelSettings, options: dict[str, Any]
) -> tuple[aioredis.Redis, list[aioredis.Redis]]:
    """A client of whichever server the Sentinels name primary: each new connection
    asks them, and connections to a primary that was demoted are dropped (redis-py's
    Sentinel pool), so after a failover retried calls reach the new one."""
    own = {key: options[key] for key in ("socket_connect_timeout", "socket_timeout", "retry")}
    if sentinel.username:
        own["username"] = sentinel.username
    if sentinel.password_file:
        own["password"] = Path(sentinel.password_file).read_text("utf-8").strip()
    manager = Sentinel(  # type: ignore[no-untyped-call,unused-ignore]  # typed from redis 8.2
        list(sentinel.hosts), sentinel_kwargs=own, **options
    )
    primary = manager.master_for(sentinel.service_name, db=sentinel.database)
    return cast(aioredis.Redis, primary), manager.sentinels


def _cluster(cluster: ClusterSettings, options: dict[str, Any]) -> RedisCluster:
    """redis-py's cluster client: it follows MOVED and ASK, waits out TRYAGAIN, and after
    a node fails asks the others for the layout again. A MOVED only moves its slot
    (`reinitialize_steps=0`): the default relearns the whole layout every fifth MOVED by
    closing every connection, those of calls still in flight included, and concurrent
    writers then fail with broken connections (seen with 16 of them)."""
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in cluster.nodes],
        ssl=cluster.tls,
        reinitialize_steps=0,
        **{**options, "retry": Retry(NoBackoff(), 1)},
    )
