"""The reconcile loop against the emulated API and real backends."""

from __future__ import annotations

import asyncio
import base64
import functools
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis.asyncio as aioredis
import yaml
from aiohttp import web
from convostore_operator.deletion import PURGE_ATTEMPTS
from convostore_operator.registration import OperatorConfig
from convostore_sidecar.config import load_config, parse_config
from convostore_sidecar.drivers.postgres.schema import SCHEMA_VERSION
from convostore_sidecar.stores import Store

from tests.openai_standin import OpenAIStandIn
from tests.operator.conftest import (
    NAMESPACE,
    Operator,
    condition,
    create,
    create_secret,
    create_store,
    create_workload,
    events_for,
    is_gone,
    lend_url,
    phase_is,
    reasons_of_events,
    secret_data,
    store_object,
)
from tests.operator.emulator import STORES, RealisticEmulator
from tests.servers import (
    MariaDbServer,
    RedisClusterNodes,
    RedisSentinel,
    RedisServer,
    free_port,
)
from tests.support import Lure, eventually, unique

pytestmark = pytest.mark.kmock(cls=RealisticEmulator)


def rendered(cluster: Any, name: str) -> dict[str, bytes]:
    data = secret_data(cluster, f"{name}-convostore")
    assert data is not None, f"no Secret {name}-convostore"
    return data


async def test_sqlite_store_renders_config_and_reports_ready(
    cluster: Any, operator: Operator, tmp_path: Path
) -> None:
    await operator()
    await create_store(cluster, "chat", {"backend": "sqlite", "retention": {"ttl": "24h"}})
    obj = await eventually(
        lambda: (o := store_object(cluster, "chat")) and o.get("status", {}).get("phase") and o
    )
    assert obj["status"]["phase"] == "Ready"
    assert condition(obj, "ConfigRendered")["status"] == "True"
    assert condition(obj, "BackendReachable")["reason"] == "CheckedBySidecar"
    assert condition(obj, "Ready")["status"] == "True"
    assert obj["status"]["observedGeneration"] == 1
    data = rendered(cluster, "chat")
    config = yaml.safe_load(data["config.yaml"])
    assert config == {
        "stores": {
            "chat": {
                "backend": "sqlite",
                "scope": NAMESPACE,
                "ttl": "24h",
                "sqlite": {"path": "/var/lib/convostore/convostore.db"},
            }
        }
    }
    (tmp_path / "config.yaml").write_bytes(data["config.yaml"])
    assert load_config(tmp_path / "config.yaml").stores["chat"].retention.ttl_seconds == 86400
    secret = cluster.objects["v1/secrets", NAMESPACE, "chat-convostore"]
    assert secret["metadata"]["ownerReferences"][0]["kind"] == "ConversationStore"
    assert (
        obj["status"]["configHash"]
        == secret["metadata"]["annotations"]["convostore.dev/config-hash"]
    )
    # Kopf posts Events in the background, after the status patch that ends the handler
    await eventually(lambda: {"Rendered", "Ready"} <= reasons_of_events(cluster, "chat"))


async def test_redis_store_with_a_password_secret_is_reachable(
    cluster: Any, operator: Operator, redis_url: str
) -> None:
    lent = {"convostore.dev/allowed-stores": "*", "convostore.dev/allowed-endpoints": redis_url}
    await create_secret(cluster, "redis-auth", {"password": ""}, lent)
    await operator()
    password = {"name": "redis-auth", "key": "password"}
    await create_store(
        cluster,
        "cache",
        {
            "backend": "redis",
            "redis": {"url": redis_url, "keyPrefix": "op-test", "passwordSecretRef": password},
        },
    )
    obj = await eventually(
        lambda: (o := store_object(cluster, "cache")) and condition(o, "BackendReachable") and o
    )
    assert condition(obj, "BackendReachable")["status"] == "True"
    assert obj["status"]["phase"] == "Ready"


@pytest.mark.parametrize("listed", [True, False], ids=["sentinels-listed", "sentinels-unlisted"])
async def test_a_store_found_through_sentinels_gets_a_password_only_they_are_lent(
    cluster: Any, operator: Operator, listed: bool
) -> None:
    """Whoever names the Sentinels names the primary they point at: the data nodes'
    password goes there only if its Secret lists the Sentinels as endpoints."""
    primary = RedisServer()
    primary.start()
    sentinel = RedisSentinel(primary, "convo")
    try:
        sentinel.start()
        lent = {"convostore.dev/allowed-stores": "watched"}
        if listed:
            lent["convostore.dev/allowed-endpoints"] = f"redis://{sentinel.address}"
        await create_secret(cluster, "redis-auth", {"password": ""}, lent)
        await operator()
        watched = {"hosts": [sentinel.address], "serviceName": "convo"}
        password = {"name": "redis-auth", "key": "password"}
        await create_store(
            cluster,
            "watched",
            {"backend": "redis", "redis": {"sentinel": watched, "passwordSecretRef": password}},
        )
        obj = await eventually(
            lambda: (
                (o := store_object(cluster, "watched")) and o.get("status", {}).get("phase") and o
            )
        )
        if not listed:
            assert obj["status"]["phase"] == "Failed"
            refusal = condition(obj, "ConfigRendered")
            assert refusal["reason"] == "SecretNotAllowed"
            assert "spec.redis.sentinel.hosts[0]" in refusal["message"]
            assert secret_data(cluster, "watched-convostore") is None
            return
        obj = await eventually(
            lambda: (
                (o := store_object(cluster, "watched")) and condition(o, "BackendReachable") and o
            )
        )
        assert condition(obj, "BackendReachable")["status"] == "True"
        config = yaml.safe_load(rendered(cluster, "watched")["config.yaml"])
        assert config["stores"]["watched"]["redis"]["sentinel"]["hosts"] == [sentinel.address]
    finally:
        sentinel.destroy()
        primary.destroy()


@pytest.mark.parametrize("listed", [True, False], ids=["seeds-listed", "seeds-unlisted"])
async def test_a_store_on_a_redis_cluster_gets_a_password_only_its_seed_nodes_are_lent(
    cluster: Any, operator: Operator, redis_cluster: RedisClusterNodes, listed: bool
) -> None:
    """The seed nodes name every other node of the cluster: the password goes there only
    if its Secret lists them as endpoints. Once lent, the store is rendered and found
    reachable through the cluster."""
    seeds = redis_cluster.addresses[:2]
    lent = {"convostore.dev/allowed-stores": "sharded"}
    if listed:
        lent["convostore.dev/allowed-endpoints"] = ",".join(f"redis://{s}" for s in seeds)
    await create_secret(cluster, "cluster-auth", {"password": ""}, lent)
    await operator()
    password = {"name": "cluster-auth", "key": "password"}
    redis = {"cluster": {"nodes": seeds}, "passwordSecretRef": password}
    await create_store(cluster, "sharded", {"backend": "redis", "redis": redis})
    obj = await eventually(
        lambda: (o := store_object(cluster, "sharded")) and o.get("status", {}).get("phase") and o
    )
    if not listed:
        assert obj["status"]["phase"] == "Failed"
        refusal = condition(obj, "ConfigRendered")
        assert refusal["reason"] == "SecretNotAllowed"
        assert "spec.redis.cluster.nodes[0]" in refusal["message"]
        assert secret_data(cluster, "sharded-convostore") is None
        return
    obj = await eventually(
        lambda: (o := store_object(cluster, "sharded")) and condition(o, "BackendReachable") and o
    )
    assert condition(obj, "BackendReachable")["status"] == "True"
    config = yaml.safe_load(rendered(cluster, "sharded")["config.yaml"])
    assert config["stores"]["sharded"]["redis"]["cluster"] == {"nodes": seeds}


def with_a_dead_host_first(dsn: str) -> str:
    """The DSN naming a host where nothing listens before its own: a failover DSN whose
    first primary is gone."""
    parts = urlsplit(dsn)
    user, _, host = parts.netloc.rpartition("@")
    query = "&".join(filter(None, (parts.query, "target_session_attrs=read-write")))
    dead = f"127.0.0.1:{free_port()}"
    return urlunsplit((parts.scheme, f"{user}@{dead},{host}", parts.path, query, ""))


@pytest.mark.parametrize("hosts", ["one-host", "dead-host-first"])
async def test_postgres_store_bootstraps_the_schema(
    cluster: Any, operator: Operator, postgres_dsn: str, hosts: str
) -> None:
    dsn = postgres_dsn if hosts == "one-host" else with_a_dead_host_first(postgres_dsn)
    await create_secret(cluster, "pg", {"dsn": dsn})
    await operator()
    await create_store(
        cluster,
        "audit",
        {
            "backend": "postgres",
            "postgres": {"dsnSecretRef": {"name": "pg", "key": "dsn"}, "schema": "op_audit"},
        },
    )
    obj = await eventually(
        lambda: (o := store_object(cluster, "audit")) and condition(o, "BackendReachable") and o
    )
    assert condition(obj, "BackendReachable")["status"] == "True"
    conn = await asyncpg.connect(postgres_dsn)
    try:
        version = await conn.fetchval("SELECT max(version) FROM op_audit.schema_version")
        assert version == SCHEMA_VERSION
    finally:
        await conn.close()
    config = yaml.safe_load(rendered(cluster, "audit")["config.yaml"])
    assert config["stores"]["audit"]["postgres"]["dsn"] == dsn


async def test_sqlalchemy_store_makes_its_tables_and_refuses_a_sqlite_url(
    cluster: Any, operator: Operator, mariadb: MariaDbServer
) -> None:
    """On MariaDB: the operator makes the tables (the same code as `convostore migrate`)
    and checks the store answers; a URL naming SQLite, which each pod would keep apart,
    is refused before anything is written."""
    url = mariadb.url().replace("root@", "root:@")
    await create_secret(cluster, "maria", {"url": url, "sqlite": "sqlite+aiosqlite:////tmp/x.db"})
    await operator()
    section = {"urlSecretRef": {"name": "maria", "key": "url"}, "tablePrefix": "op_chat_"}
    await create_store(cluster, "chat", {"backend": "sqlalchemy", "sqlalchemy": section})
    obj = await eventually(
        lambda: (o := store_object(cluster, "chat")) and condition(o, "BackendReachable") and o
    )
    assert condition(obj, "BackendReachable")["status"] == "True"
    assert mariadb.sql("SELECT version FROM convostore.op_chat_schema").split() == ["1"]
    config = yaml.safe_load(rendered(cluster, "chat")["config.yaml"])
    assert config["stores"]["chat"]["sqlalchemy"] == {"url": url, "tablePrefix": "op_chat_"}

    elsewhere = {"urlSecretRef": {"name": "maria", "key": "sqlite"}}
    await create_store(cluster, "local", {"backend": "sqlalchemy", "sqlalchemy": elsewhere})
    refused = await eventually(
        lambda: (o := store_object(cluster, "local")) and o.get("status", {}).get("phase") and o
    )
    assert refused["status"]["phase"] == "Failed"
    assert "use backend: sqlite" in condition(refused, "Ready")["message"]
    assert not await asyncio.to_thread(Path("/tmp/x.db").exists)


async def test_openai_store_renders_its_key_and_checks_the_api_with_it(
    cluster: Any, operator: Operator, openai_api: OpenAIStandIn, redis_url: str
) -> None:
    lent = {
        "convostore.dev/allowed-stores": "*",
        "convostore.dev/allowed-endpoints": f"{openai_api.base_url},{redis_url}",
    }
    await create_secret(cluster, "openai", {"api-key": openai_api.api_key}, lent)
    await create_secret(cluster, "openai-old", {"api-key": "sk-revoked-key-4321"}, lent)
    await operator()

    def spec(secret: str) -> dict[str, Any]:
        mapping = {"backend": "redis", "redis": {"url": redis_url, "keyPrefix": unique()}}
        return {
            "backend": "openai",
            "openai": {
                "apiKeySecretRef": {"name": secret, "key": "api-key"},
                "baseURL": openai_api.base_url,
                "mapping": mapping,
            },
        }

    await create_store(cluster, "assistant", spec("openai"))
    await create_store(cluster, "revoked", spec("openai-old"))
    obj = await eventually(
        lambda: (o := store_object(cluster, "assistant")) and condition(o, "BackendReachable") and o
    )
    assert condition(obj, "BackendReachable")["status"] == "True"
    assert obj["status"]["phase"] == "Ready"
    data = rendered(cluster, "assistant")
    assert data["openai-api-key"] == openai_api.api_key.encode()
    store = parse_config(yaml.safe_load(data["config.yaml"])).stores["assistant"]
    assert store.settings.api_key_file == "/etc/convostore/stores/assistant/openai-api-key"
    assert store.settings.mapping.backend == "redis"
    pings = [r for r in openai_api.requests if r.path.endswith("/conv_convostore_ping")]
    keys = {r.headers["Authorization"] for r in pings}
    assert keys == {f"Bearer {openai_api.api_key}", "Bearer sk-revoked-key-4321"}
    bad = await eventually(
        lambda: (o := store_object(cluster, "revoked")) and condition(o, "BackendReachable") and o
    )
    reachable = condition(bad, "BackendReachable")
    assert (reachable["status"], bad["status"]["phase"]) == ("False", "Degraded")
    assert "refused the sidecar's API key" in reachable["message"]
    assert "4321" not in reachable["message"]


async def test_unreachable_backend_is_degraded_with_the_reason(
    cluster: Any, operator: Operator
) -> None:
    await operator()
    url = await lend_url(cluster, "redis://127.0.0.1:1/0")
    await create_store(cluster, "down", {"backend": "redis", "redis": {"urlSecretRef": url}})
    obj = await eventually(
        lambda: (o := store_object(cluster, "down")) and condition(o, "BackendReachable") and o
    )
    assert obj["status"]["phase"] == "Degraded"
    reachable = condition(obj, "BackendReachable")
    assert (reachable["status"], reachable["reason"]) == ("False", "Unreachable")
    await eventually(
        lambda: any(
            e["type"] == "Warning" and e["reason"] == "Unreachable"
            for e in events_for(cluster, "down")
        )
    )


async def test_a_store_name_that_cannot_name_a_pod_volume_fails_and_creates_nothing(
    cluster: Any, operator: Operator
) -> None:
    """The CRD refuses such names; a cluster that skips CEL rules gets the same answer."""
    await operator()
    await create_store(cluster, "chat.v2", {"backend": "sqlite"})
    obj = await eventually(
        lambda: (o := store_object(cluster, "chat.v2")) and o.get("status", {}).get("phase") and o
    )
    assert obj["status"]["phase"] == "Failed"
    assert condition(obj, "ConfigRendered")["message"].startswith("metadata.name")
    assert secret_data(cluster, "chat.v2-convostore") is None


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"backend": "mongo"}, "spec.backend"),
        ({"backend": "postgres"}, "spec.postgres.dsnSecretRef"),
        ({"backend": "redis", "redis": {"url": "http://x"}}, "spec.redis.url"),
        ({"backend": "sqlite", "redis": {"url": "redis://x"}}, "spec.redis"),
        ({"backend": "sqlite", "retention": {"ttl": "soon"}}, "spec.retention.ttl"),
        ({"backend": "sqlite", "retention": {"maxItems": 0}}, "spec.retention.maxItems"),
        ({"backend": "sqlite", "deletionPolicy": "Maybe"}, "spec.deletionPolicy"),
    ],
)
async def test_invalid_spec_fails_naming_the_field_and_creates_nothing(
    cluster: Any, operator: Operator, spec: dict[str, Any], field: str
) -> None:
    await operator()
    await create_store(cluster, "bad", spec)
    obj = await eventually(
        lambda: (o := store_object(cluster, "bad")) and o.get("status", {}).get("phase") and o
    )
    assert obj["status"]["phase"] == "Failed"
    rendered_condition = condition(obj, "ConfigRendered")
    assert rendered_condition["reason"] == "InvalidSpec"
    assert rendered_condition["message"].startswith(field)
    await eventually(
        lambda: any(
            e["type"] == "Warning" and field in e["message"] for e in events_for(cluster, "bad")
        )
    )
    assert secret_data(cluster, "bad-convostore") is None


async def test_missing_secret_is_reported_then_picked_up(
    cluster: Any, operator: Operator, postgres_dsn: str
) -> None:
    await operator(OperatorConfig(sidecar_image="convostore:test", retry_delay=1.0))
    await create_store(
        cluster,
        "late",
        {
            "backend": "postgres",
            "postgres": {"dsnSecretRef": {"name": "late-pg", "key": "dsn"}},
        },
    )
    obj = await eventually(
        lambda: (o := store_object(cluster, "late")) and o.get("status", {}).get("phase") and o
    )
    assert obj["status"]["phase"] == "Failed"
    assert condition(obj, "ConfigRendered")["reason"] == "SecretNotFound"
    assert "'late-pg'" in condition(obj, "ConfigRendered")["message"]
    assert secret_data(cluster, "late-convostore") is None
    await create_secret(cluster, "late-pg", {"dsn": postgres_dsn})
    obj = await eventually(
        lambda: (o := store_object(cluster, "late")) and o["status"]["phase"] == "Ready" and o
    )
    assert secret_data(cluster, "late-convostore") is not None


async def test_encryption_key_is_generated_once_and_kept(
    cluster: Any, operator: Operator, tmp_path: Path
) -> None:
    await operator()
    await create_store(cluster, "vault", {"backend": "sqlite", "encryption": {"enabled": True}})
    keys = await eventually(lambda: secret_data(cluster, "vault-convostore-keys"))
    assert list(keys) == ["k1"]
    obj = await eventually(
        lambda: (
            (o := store_object(cluster, "vault"))
            and o.get("status", {}).get("phase") == "Ready"
            and o
        )
    )
    first_hash = obj["status"]["configHash"]
    await cluster.patch(
        f"/apis/convostore.dev/v1alpha1/namespaces/{NAMESPACE}/conversationstores/vault",
        json={"spec": {"retention": {"maxItems": 50}}},
    )
    await eventually(lambda: store_object(cluster, "vault")["status"]["observedGeneration"] == 2)
    assert secret_data(cluster, "vault-convostore-keys") == keys
    assert store_object(cluster, "vault")["status"]["configHash"] != first_hash
    keys_object = cluster.objects["v1/secrets", NAMESPACE, "vault-convostore-keys"]
    assert not keys_object["metadata"].get("ownerReferences"), "Retain keeps keys with the data"
    config = yaml.safe_load(rendered(cluster, "vault")["config.yaml"])
    assert config["stores"]["vault"]["encryption"] == {"keysDir": "/etc/convostore/keys/vault"}


async def test_dapr_store_creates_and_owns_its_component(cluster: Any, operator: Operator) -> None:
    lent = {
        "convostore.dev/allowed-stores": "*",
        "convostore.dev/allowed-endpoints": "redis://redis:6379",
    }
    await create_secret(cluster, "redis-auth", {"password": "pw"}, lent)
    await operator()
    await create_store(
        cluster,
        "portable",
        {
            "backend": "dapr",
            "dapr": {
                "stateStore": "chat-state",
                "component": {
                    "type": "state.redis",
                    "metadata": [
                        {"name": "redisHost", "value": "redis:6379"},
                        {
                            "name": "redisPassword",
                            "secretKeyRef": {"name": "redis-auth", "key": "password"},
                        },
                    ],
                },
            },
        },
    )
    component = await eventually(
        lambda: cluster.objects["dapr.io/v1alpha1/components", NAMESPACE, "chat-state"]
    )
    assert component["spec"]["type"] == "state.redis"
    assert component["spec"]["metadata"][1] == {
        "name": "redisPassword",
        "secretKeyRef": {"name": "redis-auth", "key": "password"},
    }
    assert component["metadata"]["ownerReferences"][0]["name"] == "portable"


async def test_config_change_rolls_workloads_that_use_the_store(
    cluster: Any, operator: Operator
) -> None:
    for name, stores in (("agent", "chat,other"), ("unrelated", "other")):
        await create_workload(cluster, "Deployment", name, stores)
    await operator()
    await create_store(cluster, "chat", {"backend": "sqlite"})
    await eventually(lambda: store_object(cluster, "chat")["status"]["phase"] == "Ready")
    await cluster.patch(
        f"/apis/convostore.dev/v1alpha1/namespaces/{NAMESPACE}/conversationstores/chat",
        json={"spec": {"retention": {"ttl": "1h"}}},
    )
    new_hash = await eventually(
        lambda: (
            store_object(cluster, "chat")["status"]["observedGeneration"] == 2
            and store_object(cluster, "chat")["status"]["configHash"]
        )
    )

    def template_annotations(name: str) -> dict[str, str]:
        deployment = cluster.objects["apps/v1/deployments", NAMESPACE, name]
        return dict(deployment["spec"]["template"]["metadata"]["annotations"])

    await eventually(
        lambda: template_annotations("agent").get("convostore.dev/config-hash-chat") == new_hash
    )
    assert "convostore.dev/config-hash-chat" not in template_annotations("unrelated")
    await eventually(lambda: "Rolled" in reasons_of_events(cluster, "chat"))


async def test_retain_keeps_data_and_delete_purges_it(
    cluster: Any, operator: Operator, redis_url: str
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    await operator()
    url = await lend_url(cluster, redis_url)
    sealing = {"enabled": True, "subjectLabel": "user_id"}
    for name, policy in (("keep", "Retain"), ("purge", "Delete")):
        await create_store(
            cluster,
            name,
            {
                "backend": "redis",
                "deletionPolicy": policy,
                "redis": {"urlSecretRef": url, "keyPrefix": f"op-{name}"},
                "encryption": sealing,
            },
        )
        await eventually(functools.partial(phase_is, cluster, name, "Ready"))
        keys = f"op-{name}:{NAMESPACE}"  # the store's keyPrefix, then its namespace
        await client.rpush(f"{keys}:{{s1}}:items", b'{"n":1}')
        await client.set(f"{keys}:{{s1}}:seq", 1)
        await client.zadd(f"{keys}:sessions", {"s1": 0})
        await client.hset(f"{keys}:{{!subjects}}:keys", "a1b2", b"a wrapped key")
        obj = store_object(cluster, name)
        assert "convostore.dev/finalizer" in obj["metadata"]["finalizers"]
        await cluster.delete(
            f"/apis/convostore.dev/v1alpha1/namespaces/{NAMESPACE}/conversationstores/{name}"
        )
        await eventually(functools.partial(is_gone, cluster, name))
    assert await client.exists(f"op-keep:{NAMESPACE}:{{s1}}:items") == 1
    assert await client.exists(f"op-purge:{NAMESPACE}:{{s1}}:items") == 0
    assert await client.exists(f"op-keep:{NAMESPACE}:{{!subjects}}:keys") == 1
    assert await client.exists(f"op-purge:{NAMESPACE}:{{!subjects}}:keys") == 0, "keys kept"
    await eventually(lambda: "Purged" in reasons_of_events(cluster, "purge"))
    await eventually(lambda: "Retained" in reasons_of_events(cluster, "keep"))
    await client.aclose()


async def test_a_store_whose_secret_is_gone_is_deleted_after_its_purge_attempts(
    cluster: Any, operator: Operator
) -> None:
    """deletionPolicy Delete, and the Secret it needs to reach its data deleted first: the
    operator tries a bounded number of times, then lets the store go and says so."""
    await create_secret(cluster, "dsn", {"dsn": "postgresql://app@127.0.0.1:1/chat"})
    await operator(OperatorConfig(sidecar_image="convostore:test", retry_delay=0.1))
    ref = {"name": "dsn", "key": "dsn"}
    spec = {"backend": "postgres", "deletionPolicy": "Delete", "postgres": {"dsnSecretRef": ref}}
    await create_store(cluster, "orphan", spec)
    await eventually(lambda: store_object(cluster, "orphan")["status"].get("phase"))
    await cluster.delete(f"/api/v1/namespaces/{NAMESPACE}/secrets/dsn")
    await cluster.delete(
        f"/apis/convostore.dev/v1alpha1/namespaces/{NAMESPACE}/conversationstores/orphan"
    )
    await eventually(functools.partial(is_gone, cluster, "orphan"), within=30)
    warnings = [e for e in events_for(cluster, "orphan") if e["reason"] == "NotPurged"]
    assert any(f"after {PURGE_ATTEMPTS} attempts" in e["message"] for e in warnings)


async def test_reconcile_twice_changes_nothing(cluster: Any, operator: Operator) -> None:
    await operator()
    await create_store(cluster, "twice", {"backend": "sqlite", "encryption": {"enabled": True}})
    await eventually(lambda: store_object(cluster, "twice")["status"]["phase"] == "Ready")
    before = (
        secret_data(cluster, "twice-convostore"),
        secret_data(cluster, "twice-convostore-keys"),
    )
    await operator()  # a second operator resumes the same object
    await asyncio.sleep(2)
    after = (
        secret_data(cluster, "twice-convostore"),
        secret_data(cluster, "twice-convostore-keys"),
    )
    assert before == after


async def test_the_timer_follows_the_backend_going_and_coming_back(
    cluster: Any, operator: Operator
) -> None:
    server = RedisServer()
    server.start()
    try:
        await operator(OperatorConfig(sidecar_image="convostore:test", check_interval=1.0))
        url = await lend_url(cluster, server.url)
        await create_store(cluster, "flaky", {"backend": "redis", "redis": {"urlSecretRef": url}})
        await eventually(functools.partial(phase_is, cluster, "flaky", "Ready"))
        await asyncio.to_thread(server.stop)
        await eventually(functools.partial(phase_is, cluster, "flaky", "Degraded"))
        assert condition(store_object(cluster, "flaky"), "BackendReachable")["status"] == "False"
        await asyncio.to_thread(server.start)
        await eventually(functools.partial(phase_is, cluster, "flaky", "Ready"))
    finally:
        server.destroy()


async def test_a_rotated_secret_is_rendered_again_and_rolls_the_pods_that_use_it(
    cluster: Any, operator: Operator, redis_url: str
) -> None:
    await create_secret(cluster, "redis-conn", {"url": f"{redis_url}/1"})
    await create_workload(cluster, "Deployment", "agent", "cache")
    await operator(OperatorConfig(sidecar_image="convostore:test", check_interval=0.5))
    await create_store(
        cluster,
        "cache",
        {"backend": "redis", "redis": {"urlSecretRef": {"name": "redis-conn", "key": "url"}}},
    )
    await eventually(functools.partial(phase_is, cluster, "cache", "Ready"))
    first_hash = store_object(cluster, "cache")["status"]["configHash"]

    rotated = base64.b64encode(f"{redis_url}/2".encode()).decode()
    await cluster.patch(
        f"/api/v1/namespaces/{NAMESPACE}/secrets/redis-conn", json={"data": {"url": rotated}}
    )

    def rendered_url() -> str:
        config = yaml.safe_load((secret_data(cluster, "cache-convostore") or {})["config.yaml"])
        return str(config["stores"]["cache"]["redis"]["url"])

    await eventually(lambda: rendered_url().endswith("/2"))
    new_hash = await eventually(
        lambda: (h := store_object(cluster, "cache")["status"]["configHash"]) != first_hash and h
    )
    template = cluster.objects["apps/v1/deployments", NAMESPACE, "agent"]["spec"]["template"]
    assert template["metadata"]["annotations"]["convostore.dev/config-hash-cache"] == new_hash
    await eventually(lambda: "Rolled" in reasons_of_events(cluster, "cache"))


async def test_a_credential_dropped_from_the_spec_leaves_the_config_secret(
    cluster: Any, operator: Operator, redis_url: str
) -> None:
    lent = {
        "convostore.dev/allowed-stores": "cache",
        "convostore.dev/allowed-endpoints": redis_url,
    }
    await create_secret(cluster, "redis-auth", {"password": ""}, lent)
    await operator()
    spec = {
        "backend": "redis",
        "redis": {"url": redis_url, "passwordSecretRef": {"name": "redis-auth", "key": "password"}},
    }
    await create_store(cluster, "cache", spec)
    await eventually(lambda: "redis-password" in (secret_data(cluster, "cache-convostore") or {}))
    await cluster.patch(
        f"/apis/convostore.dev/v1alpha1/namespaces/{NAMESPACE}/conversationstores/cache",
        json={"spec": {"redis": {"passwordSecretRef": None}}},
    )
    await eventually(lambda: store_object(cluster, "cache")["status"]["observedGeneration"] == 2)
    assert set(secret_data(cluster, "cache-convostore") or {}) == {"config.yaml", "hash-key"}


@pytest.mark.parametrize(
    ("spec", "kind", "taken"),
    [
        ({"backend": "sqlite"}, "v1/secrets", "chat-convostore"),
        (
            {"backend": "sqlite", "encryption": {"enabled": True}},
            "v1/secrets",
            "chat-convostore-keys",
        ),
        (
            {
                "backend": "dapr",
                "dapr": {"stateStore": "shared", "component": {"type": "state.redis"}},
            },
            "dapr.io/v1alpha1/components",
            "shared",
        ),
    ],
    ids=["config-secret", "key-secret", "dapr-component"],
)
async def test_an_object_made_by_someone_else_is_never_taken_over(
    cluster: Any, operator: Operator, spec: dict[str, Any], kind: str, taken: str
) -> None:
    """Another team's object of the name the store would use: reported, left as it was,
    and still there after the store is deleted."""
    if kind == "v1/secrets":
        await create_secret(cluster, taken, {"theirs": "keep me"})
    else:
        await create(cluster, "dapr.io/v1alpha1", "Component", taken, spec={"type": "state.mongo"})
    before = dict(cluster.objects[kind, NAMESPACE, taken].raw)
    await operator()
    await create_store(cluster, "chat", {**spec, "deletionPolicy": "Delete"})
    obj = await eventually(
        lambda: (o := store_object(cluster, "chat")) and o.get("status", {}).get("phase") and o
    )
    assert obj["status"]["phase"] == "Failed"
    conflict = condition(obj, "ConfigRendered")
    assert conflict["reason"] == "ObjectConflict"
    assert repr(taken) in conflict["message"]
    await cluster.delete(
        f"/apis/convostore.dev/v1alpha1/namespaces/{NAMESPACE}/conversationstores/chat"
    )
    await eventually(functools.partial(is_gone, cluster, "chat"))
    after = cluster.objects[kind, NAMESPACE, taken]
    assert not after.deleted
    assert dict(after.raw) == before


async def test_a_key_secret_planted_with_the_operators_label_is_not_adopted(
    cluster: Any, operator: Operator
) -> None:
    """A Secret that merely says it is managed by convostore, planted under the name a
    store's generated keys would take, does not become that store's keys."""
    managed = {"app.kubernetes.io/managed-by": "convostore"}
    planted = base64.b64encode(bytes(32)).decode()
    await create_secret(cluster, "chat-convostore-keys", {"k1": planted}, {}, labels=managed)
    await operator()
    await create_store(cluster, "chat", {"backend": "sqlite", "encryption": {"enabled": True}})
    obj = await eventually(
        lambda: (o := store_object(cluster, "chat")) and o.get("status", {}).get("phase") and o
    )
    assert obj["status"]["phase"] == "Failed"
    assert condition(obj, "ConfigRendered")["reason"] == "ObjectConflict"
    assert secret_data(cluster, "chat-convostore") is None


@pytest.mark.parametrize(
    ("annotations", "allowed"),
    [
        ({}, False),
        ({"convostore.dev/allowed-stores": "audit, other"}, False),
        ({"convostore.dev/allowed-stores": "audit, cache"}, True),
        ({"convostore.dev/allowed-stores": "*"}, True),
    ],
    ids=["silent", "other-stores", "named", "any-store"],
)
async def test_a_secret_lends_itself_only_to_the_stores_it_names(
    cluster: Any, operator: Operator, redis_url: str, annotations: dict[str, str], allowed: bool
) -> None:
    await create_secret(cluster, "conn", {"url": redis_url}, annotations)
    await operator()
    spec = {"backend": "redis", "redis": {"urlSecretRef": {"name": "conn", "key": "url"}}}
    await create_store(cluster, "cache", spec)
    obj = await eventually(
        lambda: (o := store_object(cluster, "cache")) and o.get("status", {}).get("phase") and o
    )
    if allowed:
        assert obj["status"]["phase"] == "Ready"
        return
    assert obj["status"]["phase"] == "Failed"
    refusal = condition(obj, "ConfigRendered")
    assert refusal["reason"] == "SecretNotAllowed"
    assert "convostore.dev/allowed-stores: cache" in refusal["message"]
    assert secret_data(cluster, "cache-convostore") is None


async def test_credentials_go_only_to_endpoints_their_secret_names(
    cluster: Any, operator: Operator, openai_api: OpenAIStandIn
) -> None:
    """A store author pointing openai.baseURL at a listener of theirs gets no key: the
    listener sees no request, and the store says which Secret refused."""
    caught: list[str] = []

    async def listen(request: web.Request) -> web.Response:
        caught.append(request.headers.get("Authorization", ""))
        return web.json_response({}, status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", listen)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await create_secret(
            cluster,
            "openai",
            {"api-key": openai_api.api_key},
            {
                "convostore.dev/allowed-stores": "*",
                "convostore.dev/allowed-endpoints": openai_api.base_url,
            },
        )
        await operator()
        key = {"name": "openai", "key": "api-key"}
        for name, base in (("lure", f"http://127.0.0.1:{port}/v1"), ("legit", openai_api.base_url)):
            await create_store(
                cluster,
                name,
                {"backend": "openai", "openai": {"apiKeySecretRef": key, "baseURL": base}},
            )
        await eventually(functools.partial(phase_is, cluster, "legit", "Ready"))
        lure = await eventually(
            lambda: (o := store_object(cluster, "lure")) and o.get("status", {}).get("phase") and o
        )
        assert lure["status"]["phase"] == "Failed"
        refusal = condition(lure, "ConfigRendered")
        assert refusal["reason"] == "SecretNotAllowed"
        assert f"127.0.0.1:{port}" in refusal["message"]
        assert "spec.openai.baseURL" in refusal["message"]
        assert caught == [], "the listener received a request"
        assert secret_data(cluster, "lure-convostore") is None
    finally:
        await runner.cleanup()


VICTIM_PASSWORD = "victim-password-0451"


def mixed_spec(backend: str, lure_port: int, victim: str) -> dict[str, Any]:
    """A store that takes its endpoint from the author's own Secret (`planted`) and its
    password from someone else's (`victim`)."""
    password = {"name": victim, "key": "password"}
    if backend == "redis":
        planted = {"urlSecretRef": {"name": "planted", "key": "endpoint"}}
        return {"backend": "redis", "redis": {**planted, "passwordSecretRef": password}}
    if backend == "postgres":
        planted = {"dsnSecretRef": {"name": "planted", "key": "endpoint"}}
        return {"backend": "postgres", "postgres": {**planted, "passwordSecretRef": password}}
    metadata = [
        {"name": "redisHost", "value": f"127.0.0.1:{lure_port}"},
        {"name": "redisPassword", "secretKeyRef": password},
    ]
    component = {"type": "state.redis", "metadata": metadata}
    return {"backend": "dapr", "dapr": {"stateStore": "lured", "component": component}}


@pytest.mark.parametrize("backend", ["redis", "postgres", "dapr"])
async def test_a_password_never_goes_where_another_secret_points_it(
    cluster: Any, operator: Operator, backend: str
) -> None:
    """The author lends an endpoint to themselves (a Secret of their own, or one lent to
    every store) and takes the password from a Secret that lends itself only to its own
    server: the operator neither connects to the author's server nor writes the password
    anywhere, and says which Secret refused."""
    async with Lure() as lure:
        endpoint = {
            "redis": f"redis://127.0.0.1:{lure.port}",
            "postgres": f"postgresql://app@127.0.0.1:{lure.port}/chat",
            "dapr": "",
        }[backend]
        await create_secret(cluster, "planted", {"endpoint": endpoint})
        victim_rules = {
            "convostore.dev/allowed-stores": "*",
            "convostore.dev/allowed-endpoints": "redis://10.20.30.40:6379,"
            "postgresql://10.20.30.40:5432",
        }
        await create_secret(cluster, "victim", {"password": VICTIM_PASSWORD}, victim_rules)
        await operator()
        await create_store(cluster, "lure", mixed_spec(backend, lure.port, "victim"))
        obj = await eventually(
            lambda: (o := store_object(cluster, "lure")) and o.get("status", {}).get("phase") and o
        )
        assert obj["status"]["phase"] == "Failed"
        refusal = condition(obj, "ConfigRendered")
        assert refusal["reason"] == "SecretNotAllowed"
        assert "Secret 'victim' does not let its values go to" in refusal["message"]
        assert str(lure.port) not in refusal["message"] or backend == "dapr"
        assert lure.connections == 0
        assert secret_data(cluster, "lure-convostore") is None
        assert ("dapr.io/v1alpha1/components", NAMESPACE, "lured") not in cluster.objects


@pytest.mark.parametrize("backend", ["redis", "postgres"])
async def test_a_password_goes_where_its_own_secret_lists(
    cluster: Any, operator: Operator, backend: str, request: pytest.FixtureRequest
) -> None:
    """The same mix is fine once the password's Secret lists the endpoint."""
    endpoint = request.getfixturevalue("redis_url" if backend == "redis" else "postgres_dsn")
    listed = endpoint.replace("postgresql://postgres@", "postgresql://")
    await create_secret(cluster, "planted", {"endpoint": endpoint})
    rules = {"convostore.dev/allowed-stores": "*", "convostore.dev/allowed-endpoints": listed}
    await create_secret(cluster, "victim", {"password": ""}, rules)
    await operator()
    await create_store(cluster, "mixed", mixed_spec(backend, 0, "victim"))
    await eventually(functools.partial(phase_is, cluster, "mixed", "Ready"))


async def test_what_a_pointed_at_service_answers_never_reaches_the_store_object(
    cluster: Any, operator: Operator
) -> None:
    """An author points a store at an internal service that answers in a way the client
    does not expect: the store says only that, not what the service said, in its status,
    its annotations (where Kopf keeps a failed handler's message) or its Events."""
    marker = "internal-reply-7781"
    async with Lure(f"-ERR {marker}\r\n".encode()) as lure:
        await operator()
        url = await lend_url(cluster, f"redis://127.0.0.1:{lure.port}")
        await create_store(cluster, "probe", {"backend": "redis", "redis": {"urlSecretRef": url}})
        obj = await eventually(
            lambda: (o := store_object(cluster, "probe")) and condition(o, "BackendReachable") and o
        )
        assert lure.connections > 0, "the check never ran"
        reachable = condition(obj, "BackendReachable")
        assert (reachable["status"], reachable["reason"]) == ("False", "CheckFailed")
        await eventually(lambda: "CheckFailed" in reasons_of_events(cluster, "probe"))
        seen = repr(dict(store_object(cluster, "probe"))) + repr(events_for(cluster, "probe"))
        assert marker not in seen


async def test_an_endpoint_written_in_the_spec_alone_is_never_connected_to(
    cluster: Any, operator: Operator
) -> None:
    """A spec cannot aim the operator at a service: with no Secret that names or lists
    the endpoint, the operator neither checks nor purges there, and says so."""
    async with Lure(b"-ERR nothing here\r\n") as lure:
        await operator()
        url = f"redis://127.0.0.1:{lure.port}"
        spec = {"backend": "redis", "deletionPolicy": "Delete", "redis": {"url": url}}
        await create_store(cluster, "aimed", spec)
        obj = await eventually(
            lambda: (o := store_object(cluster, "aimed")) and condition(o, "BackendReachable") and o
        )
        reachable = condition(obj, "BackendReachable")
        assert (reachable["status"], reachable["reason"]) == ("Unknown", "NotChecked")
        assert "spec.redis.url" in reachable["message"]
        await cluster.delete(
            f"/apis/convostore.dev/v1alpha1/namespaces/{NAMESPACE}/conversationstores/aimed"
        )
        await eventually(functools.partial(is_gone, cluster, "aimed"))
        await eventually(lambda: "NotPurged" in reasons_of_events(cluster, "aimed"))
        assert lure.connections == 0


async def create_store_in(cluster: Any, namespace: str, name: str, spec: dict[str, Any]) -> None:
    await cluster.post(
        f"/apis/convostore.dev/v1alpha1/namespaces/{namespace}/conversationstores",
        json={
            "apiVersion": "convostore.dev/v1alpha1",
            "kind": "ConversationStore",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        },
    )


async def test_one_store_name_in_two_namespaces_is_two_stores(
    cluster: Any, operator: Operator, redis_url: str
) -> None:
    """Same name, same Redis, same keyPrefix, two namespaces: deleting one (with
    deletionPolicy Delete) purges its own sessions and not the other's."""
    prefix = unique("shared")
    await operator(clusterwide=True)
    for namespace in (NAMESPACE, "others"):
        url = await lend_url(cluster, redis_url, namespace=namespace)
        spec = {
            "backend": "redis",
            "deletionPolicy": "Delete",
            "redis": {"urlSecretRef": url, "keyPrefix": prefix},
        }
        await create_store_in(cluster, namespace, "chat", spec)

    def ready_in(namespace: str) -> bool:
        return bool(cluster.objects[STORES, namespace, "chat"]["status"]["phase"] == "Ready")

    for namespace in (NAMESPACE, "others"):
        await eventually(functools.partial(ready_in, namespace))
    identities = {
        ns: cluster.objects[STORES, ns, "chat"]["status"]["backendIdentity"]
        for ns in (NAMESPACE, "others")
    }
    assert identities == {NAMESPACE: f"{NAMESPACE}/chat", "others": "others/chat"}
    client = aioredis.Redis.from_url(redis_url)
    try:
        for namespace in (NAMESPACE, "others"):
            rendered = yaml.safe_load(
                base64.b64decode(
                    cluster.objects["v1/secrets", namespace, "chat-convostore"]["data"][
                        "config.yaml"
                    ]
                )
            )
            config = parse_config(rendered).stores["chat"]
            driver = Store.open(config).driver
            await driver.open()
            await driver.append("s1", [f'{{"ns":"{namespace}"}}'.encode()], None)
            await driver.close()
        await cluster.delete(
            "/apis/convostore.dev/v1alpha1/namespaces/others/conversationstores/chat"
        )
        await eventually(lambda: cluster.objects[STORES, "others", "chat"].deleted)
        assert await client.exists(f"{prefix}:{NAMESPACE}:{{s1}}:items") == 1
        assert await client.exists(f"{prefix}:others:{{s1}}:items") == 0
    finally:
        await client.aclose()


async def create_rendered_config(cluster: Any, name: str, config: dict[str, Any]) -> None:
    """The store's config Secret as an operator rendered it: labelled and owned."""
    uid = store_object(cluster, name)["metadata"]["uid"]
    owner: dict[str, Any] = {"apiVersion": "convostore.dev/v1alpha1", "kind": "ConversationStore"}
    owner |= {"name": name, "uid": uid, "controller": True}
    labels = {"app.kubernetes.io/managed-by": "convostore", "convostore.dev/store": name}
    data = {"config.yaml": base64.b64encode(yaml.safe_dump(config).encode()).decode()}
    await cluster.post(
        f"/api/v1/namespaces/{NAMESPACE}/secrets",
        json={
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": f"{name}-convostore",
                "namespace": NAMESPACE,
                "labels": labels,
                "ownerReferences": [owner],
            },
            "data": data,
        },
    )


async def test_whoever_patches_status_cannot_drop_a_stores_namespace(
    cluster: Any, operator: Operator
) -> None:
    """Status is a report: claiming an older operator's identity there changes nothing."""
    await operator()
    await create_store(cluster, "chat", {"backend": "sqlite"})
    await eventually(functools.partial(phase_is, cluster, "chat", "Ready"))
    await cluster.patch(
        f"/apis/convostore.dev/v1alpha1/namespaces/{NAMESPACE}/conversationstores/chat/status",
        json={"status": {"backendIdentity": "chat"}},
    )
    await cluster.patch(
        f"/apis/convostore.dev/v1alpha1/namespaces/{NAMESPACE}/conversationstores/chat",
        json={"spec": {"retention": {"ttl": "1h"}}},
    )
    await eventually(lambda: store_object(cluster, "chat")["status"]["observedGeneration"] == 2)
    obj = store_object(cluster, "chat")
    assert obj["status"]["backendIdentity"] == f"{NAMESPACE}/chat"
    assert condition(obj, "NamespaceIsolated")["status"] == "True"
    config = yaml.safe_load((secret_data(cluster, "chat-convostore") or {})["config.yaml"])
    assert config["stores"]["chat"]["scope"] == NAMESPACE


async def test_a_store_from_an_older_operator_keeps_its_sessions_where_they_are(
    cluster: Any, operator: Operator, redis_url: str
) -> None:
    """Compatibility: a store an older operator rendered (its config Secret names no
    scope) stays keyed by its name, says so, and is never purged."""
    prefix = unique("legacy")
    url = await lend_url(cluster, redis_url)
    await create_store(
        cluster,
        "old",
        {
            "backend": "redis",
            "deletionPolicy": "Delete",
            "redis": {"urlSecretRef": url, "keyPrefix": prefix},
        },
    )
    older = {"stores": {"old": {"backend": "redis", "redis": {"url": redis_url}}}}
    await create_rendered_config(cluster, "old", older)
    await cluster.patch(
        f"/apis/convostore.dev/v1alpha1/namespaces/{NAMESPACE}/conversationstores/old/status",
        json={"status": {"phase": "Ready", "configHash": "0123456789abcdef"}},
    )
    client = aioredis.Redis.from_url(redis_url)
    await client.rpush(f"{prefix}:{{s1}}:items", b'{"n":1}')
    await client.zadd(f"{prefix}:sessions", {"s1": 0})
    try:
        await operator()
        obj = await eventually(
            lambda: (o := store_object(cluster, "old")) and o["status"].get("backendIdentity") and o
        )
        assert obj["status"]["backendIdentity"] == "old"
        isolated = condition(obj, "NamespaceIsolated")
        assert (isolated["status"], isolated["reason"]) == ("False", "KeyedByNameAlone")
        config = yaml.safe_load((secret_data(cluster, "old-convostore") or {})["config.yaml"])
        store = parse_config(config).stores["old"]
        assert store.identity == "old"
        driver = Store.open(store).driver
        await driver.open()
        assert await driver.latest("s1", None) == [b'{"n":1}'], "the old sessions are found"
        await driver.close()
        await cluster.delete(
            f"/apis/convostore.dev/v1alpha1/namespaces/{NAMESPACE}/conversationstores/old"
        )
        await eventually(functools.partial(is_gone, cluster, "old"))
        assert await client.exists(f"{prefix}:{{s1}}:items") == 1, "not purged"
        await eventually(lambda: "NotPurged" in reasons_of_events(cluster, "old"))
    finally:
        await client.aclose()
