"""Config validation: every bad setting is refused at start-up, naming store and field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from convostore_sidecar.config import default_config, load_config, parse_config
from convostore_sidecar.drivers.sqlite import SqliteDriver
from convostore_sidecar.sections import ConfigError


def store(**fields: Any) -> dict[str, Any]:
    return {"stores": {"chat": {"backend": "sqlite", **fields}}}


def compacting(**fields: Any) -> dict[str, Any]:
    return store(compaction={"apiKeyFile": "/keys/openai", **fields})


def test_compaction_defaults_to_the_sdks_trigger_and_takes_a_token_trigger() -> None:
    defaults = parse_config(compacting()).stores["chat"].compaction
    assert defaults is not None
    assert (defaults.model, defaults.trigger_items, defaults.trigger_tokens) == (
        "gpt-4.1",
        10,
        None,
    )
    assert (defaults.keep_recent_turns, defaults.mode) == (0, "auto")
    tuned = (
        parse_config(
            compacting(
                model="ft:gpt-4.1-mini:org::abc",
                trigger={"tokens": 50_000},
                keepRecentTurns=3,
                mode="input",
                timeout="2m",
            )
        )
        .stores["chat"]
        .compaction
    )
    assert tuned is not None
    assert (tuned.trigger_items, tuned.trigger_tokens, tuned.timeout) == (None, 50_000, 120)
    assert (tuned.model, tuned.keep_recent_turns, tuned.mode) == (
        "ft:gpt-4.1-mini:org::abc",
        3,
        "input",
    )


def test_no_config_means_one_sqlite_store_in_the_working_directory() -> None:
    config = default_config()
    assert list(config.stores) == ["default"]
    assert config.stores["default"].backend == "sqlite"
    assert config.stores["default"].settings.path == "./convostore.db"
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 8790)


def test_a_full_config_is_read_with_durations_and_limits() -> None:
    config = parse_config(
        {
            "listen": {"port": 9000, "socket": "/tmp/x.sock"},
            "stores": {
                "chat": {
                    "backend": "redis",
                    "redis": {"url": "rediss://r:6380/1", "keyPrefix": "app"},
                    "ttl": "1h30m",
                    "maxItems": 200,
                    "limits": {"maxItemBytes": 2048},
                },
                "audit": {
                    "backend": "postgres",
                    "postgres": {"dsn": "postgresql://u@db/app", "poolMax": 6},
                    "ttl": 600,
                },
            },
        }
    )
    chat, audit = config.stores["chat"], config.stores["audit"]
    assert chat.retention.ttl_seconds == 5400
    assert chat.retention.max_items == 200
    assert chat.limits.max_item_bytes == 2048
    assert chat.limits.max_items_per_request == 1000
    assert chat.settings.key_prefix == "app"
    assert audit.settings.pool_max == 6
    assert audit.retention.ttl_seconds == 600
    assert config.listen.socket == "/tmp/x.sock"


def test_failover_forms_name_every_server() -> None:
    sentinel = {
        "hosts": ["sentinel-0.redis:26379", "10.0.0.7:26380", "[fd00::1]:26379"],
        "serviceName": "convo-primary",
        "database": 2,
        "username": "watcher",
        "passwordFile": "/secrets/sentinel",
    }
    dsn = "postgresql://u@pg-a:5432,pg-b:5433/app?target_session_attrs=read-write"
    config = parse_config(
        {
            "stores": {
                "chat": {"backend": "redis", "redis": {"sentinel": sentinel, "waitReplicas": 1}},
                "audit": {"backend": "postgres", "postgres": {"dsn": dsn}},
            }
        }
    )
    watched = config.stores["chat"].settings.sentinel
    assert watched.hosts == (("sentinel-0.redis", 26379), ("10.0.0.7", 26380), ("fd00::1", 26379))
    assert (watched.service_name, watched.database) == ("convo-primary", 2)
    assert (watched.username, watched.password_file) == ("watcher", "/secrets/sentinel")
    assert config.stores["chat"].settings.wait_replicas == 1
    assert config.stores["audit"].settings.dsn == dsn


def test_a_cluster_is_named_by_seed_nodes_with_tls_and_user_as_for_one_server() -> None:
    redis = {
        "cluster": {"nodes": ["redis-0.redis:6379", "[fd00::2]:7000"], "tls": True},
        "username": "agent",
        "passwordFile": "/secrets/redis",
        "tls": {"caFile": "/ca.pem"},
        "waitReplicas": 1,
    }
    config = parse_config({"stores": {"chat": {"backend": "redis", "redis": redis}}})
    settings = config.stores["chat"].settings
    assert settings.cluster.nodes == (("redis-0.redis", 6379), ("fd00::2", 7000))
    assert settings.tls
    assert settings.ca_file == "/ca.pem"
    assert (settings.username, settings.password_file) == ("agent", "/secrets/redis")
    assert settings.wait_replicas == 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"stores": {}}, "field 'stores': must name at least one store"),
        ({"stores": {"Chat": {"backend": "sqlite"}}}, "store name 'Chat' must be"),
        (
            {"stores": {"chat": {"backend": "mongo"}}},
            "store 'chat': field 'backend': must be one of",
        ),
        (store(ttl="soon"), "store 'chat': field 'ttl': must be a duration"),
        (store(ttl=-5), "store 'chat': field 'ttl': must be a duration"),
        (store(ttl=True), "store 'chat': field 'ttl'"),
        (store(maxItems=0), "store 'chat': field 'maxItems': must be an integer from 1"),
        (store(maxItems="10"), "store 'chat': field 'maxItems'"),
        (store(limits={"maxItemBytes": 1 << 40}), "field 'limits.maxItemBytes'"),
        (store(limits={"maxItemsPerRequest": 0}), "field 'limits.maxItemsPerRequest'"),
        (store(limits={"bogus": 1}), "field 'limits': unknown field(s) 'bogus'"),
        (store(tll=60), "store 'chat': unknown field(s) 'tll'"),
        (store(sqlite={"path": "a\x00b"}), "field 'sqlite.path': must not contain NUL"),
        (store(sqlite=["x"]), "field 'sqlite': must be a mapping"),
        (
            {"stores": {"c": {"backend": "redis", "redis": {"url": "http://x"}}}},
            "store 'c': field 'redis.url': must start with redis://",
        ),
        (
            {"stores": {"c": {"backend": "redis", "redis": {"keyPrefix": "a{b}"}}}},
            "field 'redis.keyPrefix': must not contain { or }",
        ),
        (
            {"stores": {"c": {"backend": "redis", "redis": {"tls": {"caFile": "/ca"}}}}},
            "field 'redis.tls': TLS files need a rediss:// url",
        ),
        (
            {"stores": {"c": {"backend": "redis", "redis": {"waitReplicas": 1, "waitTimeout": 5}}}},
            "field 'redis.waitTimeout': must be shorter than timeout (2s)",
        ),
        (
            {"stores": {"c": {"backend": "redis", "redis": {"waitReplicas": -1}}}},
            "field 'redis.waitReplicas': must be an integer from 0",
        ),
        *(
            (
                {"stores": {"c": {"backend": "redis", "redis": redis}}},
                message,
            )
            for redis, message in (
                (
                    {"sentinel": {"hosts": ["a:26379"], "serviceName": "m"}, "url": "redis://x"},
                    "field 'redis.sentinel': give either url or sentinel",
                ),
                ({"sentinel": {"serviceName": "m"}}, "field 'redis.sentinel.hosts': must list"),
                ({"sentinel": {"hosts": [], "serviceName": "m"}}, "'redis.sentinel.hosts'"),
                (
                    {"sentinel": {"hosts": ["a:1"] * 17, "serviceName": "m"}},
                    "'redis.sentinel.hosts': must list 1 to 16",
                ),
                *(
                    (
                        {"sentinel": {"hosts": [host], "serviceName": "m"}},
                        "'redis.sentinel.hosts': each must be host:port",
                    )
                    for host in ("a", "a:0", "a:70000", "a:b", ":1", "a b:1", "[zz]:1", 5, "")
                ),
                ({"sentinel": {"hosts": ["a:1"]}}, "'redis.sentinel.serviceName': is required"),
                (
                    {"sentinel": {"hosts": ["a:1"], "serviceName": "m\n"}},
                    "'redis.sentinel.serviceName': must match",
                ),
                (
                    {"sentinel": {"hosts": ["a:1"], "serviceName": "m", "db": 1}},
                    "field 'redis.sentinel': unknown field(s) 'db'",
                ),
                (
                    {"sentinel": {"hosts": ["a:1"], "serviceName": "m", "database": -1}},
                    "'redis.sentinel.database': must be an integer from 0",
                ),
                (
                    {"sentinel": {"hosts": ["a:1"], "serviceName": "m"}, "tls": {"caFile": "/c"}},
                    "field 'redis.tls': TLS to Sentinel-watched servers is not supported",
                ),
                ({"sentinel": ["a:1"]}, "field 'redis.sentinel': must be a mapping"),
                (
                    {"cluster": {"nodes": ["a:1"]}, "url": "redis://x"},
                    "field 'redis.cluster': give one of url, sentinel and cluster",
                ),
                (
                    {
                        "cluster": {"nodes": ["a:1"]},
                        "sentinel": {"hosts": ["a:1"], "serviceName": "m"},
                    },
                    "field 'redis.cluster': give one of url, sentinel and cluster",
                ),
                ({"cluster": {}}, "field 'redis.cluster.nodes': must list 1 to 16 seed nodes"),
                ({"cluster": {"nodes": "a:1"}}, "field 'redis.cluster.nodes': must list"),
                ({"cluster": {"nodes": ["a:1"] * 17}}, "'redis.cluster.nodes': must list 1 to 16"),
                *(
                    (
                        {"cluster": {"nodes": [node]}},
                        "'redis.cluster.nodes': each must be host:port",
                    )
                    for node in ("a", "a:0", "a:65536", "redis://a:1", "a;b:1", "[::1:1", None)
                ),
                ({"cluster": {"nodes": ["a:1"], "tls": "yes"}}, "field 'redis.cluster.tls'"),
                (
                    {"cluster": {"nodes": ["a:1"], "database": 1}},
                    "field 'redis.cluster': unknown field(s) 'database'",
                ),
                (
                    {"cluster": {"nodes": ["a:1"]}, "tls": {"caFile": "/c"}},
                    "field 'redis.tls': TLS files need a rediss:// url (or cluster.tls: true)",
                ),
            )
        ),
        *(
            (
                {"stores": {"c": {"backend": "postgres", "postgres": {"dsn": dsn}}}},
                "field 'postgres.dsn': names several hosts: add target_session_attrs=read-write",
            )
            for dsn in (
                "postgresql://u@a:5432,b:5432/db",
                "postgresql://u@a,b/db?target_session_attrs=any",
                "postgresql://u@/db?host=/run/a&host=/run/b",
                "postgresql://u@a,b/db?target_session_attrs=standby",
            )
        ),
        (
            {"stores": {"c": {"backend": "postgres"}}},
            "store 'c': field 'postgres.dsn': is required",
        ),
        *(
            (
                {
                    "stores": {
                        "c": {
                            "backend": "postgres",
                            "postgres": {"dsn": "postgresql://x", "synchronousCommit": value},
                        }
                    }
                },
                "field 'postgres.synchronousCommit': must be one of remote_apply, on,",
            )
            for value in ("ON", "true", True, "", "remote_apply; DROP", None)
        ),
        (
            {"stores": {"c": {"backend": "postgres", "postgres": {"dsn": "mysql://x"}}}},
            "field 'postgres.dsn': must start with postgresql://",
        ),
        (
            {
                "stores": {
                    "c": {
                        "backend": "postgres",
                        "postgres": {"dsn": "postgresql://x", "schema": "x; DROP"},
                    }
                }
            },
            "field 'postgres.schema': must match",
        ),
        (
            {
                "stores": {
                    "c": {
                        "backend": "postgres",
                        "postgres": {"dsn": "postgresql://x", "poolMin": 5, "poolMax": 2},
                    }
                }
            },
            "field 'postgres.poolMin': must not exceed poolMax",
        ),
        (
            {
                "stores": {
                    "c": {
                        "backend": "postgres",
                        "postgres": {"dsn": "postgresql://pooler/db", "transactionPooler": True},
                    }
                }
            },
            "field 'postgres.directDsn': is required with transactionPooler",
        ),
        (
            {
                "stores": {
                    "c": {
                        "backend": "postgres",
                        "postgres": {"dsn": "postgresql://x/db", "directDsn": "mysql://x/db"},
                    }
                }
            },
            "field 'postgres.directDsn': must start with postgresql://",
        ),
        ({"listen": {"port": 70000}, **store()}, "field 'listen.port': must be an integer"),
        ({"listen": {"healthPort": 0}, **store()}, "field 'listen.healthPort': must be an integer"),
        (
            {"listen": {"healthPort": "probe"}, **store()},
            "field 'listen.healthPort': must be an integer",
        ),
        (
            {"stores": {"c": {"backend": "redis", "redis": {"idleTimeout": "never"}}}},
            "field 'redis.idleTimeout'",
        ),
        ({"listen": {"hots": "x"}, **store()}, "field 'listen': unknown field(s) 'hots'"),
        (
            {"requests": {"maxBufferedBytes": 4 << 20}, **store()},
            "field 'requests.maxBufferedBytes': is 4194304, less than store 'chat'",
        ),
        ({"requests": {"maxBufferedBytes": 10}, **store()}, "'requests.maxBufferedBytes'"),
        (
            {
                "requests": {"maxBufferedReadBytes": 5 << 20},
                **store(limits={"maxReadBytes": 8 << 20}),
            },
            "field 'requests.maxBufferedReadBytes': is 5242880, less than store 'chat'",
        ),
        (
            {"requests": {"maxBufferedReadBytes": "lots"}, **store()},
            "'requests.maxBufferedReadBytes'",
        ),
        (
            store(limits={"maxReadBytes": 4096, "maxItemBytes": 8192}),
            "field 'limits.maxReadBytes': is 4096, less than maxItemBytes (8192)",
        ),
        (store(limits={"maxReadBytes": 10}), "field 'limits.maxReadBytes': must be an integer"),
        ({"stores": store()["stores"], "extra": 1}, "unknown field(s) 'extra'"),
        ("just text", "must be a mapping"),
        (store(compaction={}), "field 'compaction.apiKeyFile': is required"),
        (store(compaction=[]), "field 'compaction': must be a mapping"),
        (compacting(model="claude-3"), "field 'compaction.model': must be an OpenAI model"),
        (compacting(model="gpt 4"), "field 'compaction.model': must match"),
        (compacting(model="x" * 200), "field 'compaction.model': must match"),
        (compacting(trigger={"items": 5, "tokens": 9}), "'compaction.trigger': give either"),
        (compacting(trigger={"items": 0}), "'compaction.trigger.items': must be an integer"),
        (compacting(trigger={"turns": 3}), "'compaction.trigger': unknown field(s) 'turns'"),
        (compacting(keepRecentTurns=-1), "'compaction.keepRecentTurns': must be an integer"),
        (compacting(mode="chain"), "'compaction.mode': must be one of auto, input,"),
        (compacting(baseURL="http://api.example"), "'compaction.baseURL': must be https://"),
        (compacting(timeout="forever"), "'compaction.timeout': must be a duration"),
        (compacting(apiKey="sk-x"), "'compaction': unknown field(s) 'apiKey'"),
        (
            {"stores": {"c": {"backend": "dapr", "dapr": {"stateStore": "s"}, "compaction": {}}}},
            "store 'c': field 'compaction': the dapr backend cannot honour it",
        ),
        (
            {
                "stores": {
                    "c": {
                        "backend": "openai",
                        "openai": {"apiKeyFile": "/k"},
                        "compaction": {"apiKeyFile": "/k"},
                    }
                }
            },
            "field 'compaction': the openai backend cannot honour it: the OpenAI Conversations"
            " API manages its own history",
        ),
    ],
)
def test_bad_settings_name_the_store_and_the_field(data: Any, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(data)
    assert message in str(error.value)


def test_config_files_in_yaml_and_json(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("stores:\n  chat:\n    backend: sqlite\n    ttl: 2m\n")
    (tmp_path / "c.json").write_text('{"stores": {"chat": {"backend": "sqlite", "ttl": 120}}}')
    for name in ("c.yaml", "c.json"):
        assert load_config(tmp_path / name).stores["chat"].retention.ttl_seconds == 120
    (tmp_path / "bad.yaml").write_text("stores: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML or JSON"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(("given", "pragma"), [(None, 2), ("full", 2), ("normal", 1)])
async def test_sqlite_durability_is_full_unless_asked_otherwise(
    tmp_path: Path, given: str | None, pragma: int
) -> None:
    """FULL syncs the WAL at every commit: an acknowledged append survives a power loss."""
    section: dict[str, Any] = {"path": str(tmp_path / "d.db")}
    if given:
        section["synchronous"] = given
    store = parse_config({"stores": {"d": {"backend": "sqlite", "sqlite": section}}}).stores["d"]
    driver = SqliteDriver(store)
    await driver.open()
    try:
        assert (
            await driver._writer.run(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])
            == pragma
        )
    finally:
        await driver.close()
