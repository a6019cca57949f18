"""Rendering an `openai` store: its key and its map store's credentials become files that
the sidecar's own config parser accepts, under names that cannot collide."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from convostore_operator.render import render
from convostore_operator.spec import SecretRef, secret_refs, validate
from convostore_operator.trust import OPENAI_API, Endpoint, Flow, flows
from convostore_sidecar.config import load_config, parse_config
from convostore_sidecar.keyring import generate_key
from convostore_sidecar.sections import ConfigError

ROOT = Path(__file__).resolve().parents[2]
KEY = {"name": "redis-auth", "key": "password"}


def test_openai_store_renders_its_key_and_its_map_stores_password(tmp_path: Path) -> None:
    document = yaml.safe_load((ROOT / "manifests/examples/store-openai.yaml").read_text())
    document["spec"]["openai"]["adoptConversations"] = True
    spec = validate(document["spec"])
    refs = secret_refs(spec)
    assert refs == {
        "apiKeySecretRef": SecretRef("openai", "api-key"),
        "mapping.passwordSecretRef": SecretRef("redis-auth", "password"),
    }
    secrets = {"apiKeySecretRef": "sk-example\n", "mapping.passwordSecretRef": "hunter2"}
    rendered = render("assistant", spec, secrets, stores_root=str(tmp_path))
    assert rendered.files == {"openai-api-key": b"sk-example", "mapping-redis-password": b"hunter2"}
    for name, data in rendered.secret_data().items():
        (tmp_path / "assistant").mkdir(exist_ok=True)
        (tmp_path / "assistant" / name).write_bytes(data)
    store = load_config(tmp_path / "assistant" / "config.yaml").stores["assistant"]
    settings = store.settings
    assert (store.backend, settings.project, settings.max_retries) == ("openai", "proj_agents", 3)
    assert Path(settings.api_key_file).read_text() == "sk-example"
    mapping = settings.mapping
    assert (mapping.backend, mapping.settings.key_prefix) == ("redis", "assistant-map")
    assert Path(mapping.settings.password_file).read_text() == "hunter2"
    assert settings.timeout == 30.0
    assert settings.adopt_conversations is True


def test_compaction_renders_its_key_as_a_file_and_its_settings_as_the_sidecar_reads_them(
    tmp_path: Path,
) -> None:
    document = yaml.safe_load((ROOT / "manifests/examples/store-compacting.yaml").read_text())
    spec = validate(document["spec"])
    assert secret_refs(spec) == {"compaction.apiKeySecretRef": SecretRef("openai", "api-key")}
    assert flows(spec, {})[-1] == Flow(
        "compaction.apiKeySecretRef", (Endpoint("OpenAI's API", OPENAI_API + ":443"),), True
    )
    rendered = render(
        "long-chat", spec, {"compaction.apiKeySecretRef": "sk-c\n"}, stores_root=str(tmp_path)
    )
    assert rendered.files == {"compaction-api-key": b"sk-c"}
    folder = tmp_path / "long-chat"
    folder.mkdir()
    for name, data in rendered.secret_data().items():
        (folder / name).write_bytes(data)
    compaction = load_config(folder / "config.yaml").stores["long-chat"].compaction
    assert compaction is not None
    assert Path(compaction.api_key_file).read_text() == "sk-c"
    assert (compaction.model, compaction.trigger_items, compaction.keep_recent_turns) == (
        "gpt-4.1-mini",
        10,
        2,
    )
    elsewhere = validate(
        {**spec, "compaction": {**spec["compaction"], "baseURL": "https://llm.corp:8443/v1"}}
    )
    assert flows(elsewhere, {})[-1] == Flow(
        "compaction.apiKeySecretRef",
        (Endpoint("spec.compaction.baseURL", "https://llm.corp:8443"),),
        openai_key=True,
    )


def test_a_ca_named_by_the_spec_is_rendered_as_a_file_the_sidecar_verifies_with(
    tmp_path: Path,
) -> None:
    ref = {"name": "db", "key": "ca.crt"}
    for backend, section in (
        ("postgres", {"dsnSecretRef": {"name": "db", "key": "dsn"}, "caSecretRef": ref}),
        ("redis", {"url": "rediss://cache.data.svc:6380", "caSecretRef": ref}),
    ):
        spec = validate({"backend": backend, backend: section})
        secrets = {
            "dsnSecretRef": "postgresql://app@db.data.svc/chat",
            "caSecretRef": "-----BEGIN CERTIFICATE-----\n",
        }
        rendered = render("chat", spec, secrets, stores_root=str(tmp_path))
        folder = tmp_path / backend / "chat"
        folder.mkdir(parents=True)
        for name, data in rendered.secret_data().items():
            (folder / name).write_bytes(data)
        settings = load_config(folder / "config.yaml").stores["chat"].settings
        assert settings.ca_file == f"{tmp_path}/chat/{backend}-ca.crt"
        assert rendered.files[f"{backend}-ca.crt"].startswith(b"-----BEGIN CERTIFICATE")


def test_the_config_hash_cannot_be_checked_against_guessed_passwords() -> None:
    """The hash is published (status, pod annotations); without the store's own key,
    trying candidate passwords against it tells nothing."""
    spec = validate(
        {"backend": "redis", "redis": {"url": "redis://cache:6379", "passwordSecretRef": KEY}}
    )
    rendered = render("chat", spec, {"passwordSecretRef": "hunter2"})
    published = rendered.config_hash(b"k" * 32)
    assert rendered.config_hash(b"k" * 32) == published, "stable for one key"
    assert rendered.config_hash(b"j" * 32) != published
    unkeyed = hashlib.sha256()
    for name, value in sorted(rendered.secret_data().items()):
        unkeyed.update(name.encode() + b"\x00" + value + b"\x00")
    assert unkeyed.hexdigest()[:16] != published


def test_wait_replicas_reaches_the_sidecars_redis_settings(tmp_path: Path) -> None:
    spec = validate({"backend": "redis", "redis": {"url": "redis://cache:6379", "waitReplicas": 2}})
    rendered = render("chat", spec, {}, stores_root=str(tmp_path))
    folder = tmp_path / "chat"
    folder.mkdir()
    for name, data in rendered.secret_data().items():
        (folder / name).write_bytes(data)
    settings = load_config(folder / "config.yaml").stores["chat"].settings
    assert (settings.wait_replicas, settings.wait_timeout) == (2, 1.0)


def test_synchronous_commit_reaches_the_sidecars_postgres_settings(tmp_path: Path) -> None:
    ref = {"name": "db", "key": "dsn"}
    spec = validate(
        {"backend": "postgres", "postgres": {"dsnSecretRef": ref, "synchronousCommit": "local"}}
    )
    rendered = render(
        "chat", spec, {"dsnSecretRef": "postgresql://app@db/chat"}, stores_root=str(tmp_path)
    )
    folder = tmp_path / "chat"
    folder.mkdir()
    for name, data in rendered.secret_data().items():
        (folder / name).write_bytes(data)
    assert load_config(folder / "config.yaml").stores["chat"].settings.synchronous_commit == "local"


def test_a_sentinel_watched_primary_reaches_the_sidecar_with_its_own_password(
    tmp_path: Path,
) -> None:
    sentinel = {
        "hosts": ["sentinel-0.data:26379", "sentinel-1.data:26379"],
        "serviceName": "convo",
        "database": 3,
        "username": "watcher",
        "passwordSecretRef": {"name": "sentinel-auth", "key": "password"},
    }
    spec = validate({"backend": "redis", "redis": {"sentinel": sentinel, "passwordSecretRef": KEY}})
    assert secret_refs(spec) == {
        "sentinel.passwordSecretRef": SecretRef("sentinel-auth", "password"),
        "passwordSecretRef": SecretRef("redis-auth", "password"),
    }
    secrets = {"sentinel.passwordSecretRef": "s3cret", "passwordSecretRef": "hunter2"}
    rendered = render("chat", spec, secrets, stores_root=str(tmp_path))
    assert rendered.files["redis-sentinel-password"] == b"s3cret"
    assert "s3cret" not in str(rendered.config)
    folder = tmp_path / "chat"
    folder.mkdir()
    for name, data in rendered.secret_data().items():
        (folder / name).write_bytes(data)
    settings = load_config(folder / "config.yaml").stores["chat"].settings
    watched = settings.sentinel
    assert watched.hosts == (("sentinel-0.data", 26379), ("sentinel-1.data", 26379))
    assert (watched.service_name, watched.database, watched.username) == ("convo", 3, "watcher")
    assert watched.password_file == f"{tmp_path}/chat/redis-sentinel-password"
    assert settings.password_file == f"{tmp_path}/chat/redis-password"


def test_a_cluster_over_tls_reaches_the_sidecar_with_its_ca_and_password(tmp_path: Path) -> None:
    cluster = {"nodes": ["redis-0.data:6379", "[fd00::3]:6379"], "tls": True}
    ca = {"name": "redis-auth", "key": "ca.crt"}
    section = {"cluster": cluster, "passwordSecretRef": KEY, "caSecretRef": ca, "username": "a"}
    spec = validate({"backend": "redis", "redis": section})
    secrets = {"passwordSecretRef": "hunter2", "caSecretRef": "-----BEGIN CERTIFICATE-----\n"}
    rendered = render("chat", spec, secrets, stores_root=str(tmp_path))
    assert "hunter2" not in str(rendered.config)
    folder = tmp_path / "chat"
    folder.mkdir()
    for name, data in rendered.secret_data().items():
        (folder / name).write_bytes(data)
    settings = load_config(folder / "config.yaml").stores["chat"].settings
    assert settings.cluster is not None
    assert settings.cluster.nodes == (("redis-0.data", 6379), ("fd00::3", 6379))
    assert settings.tls
    assert settings.ca_file == f"{tmp_path}/chat/redis-ca.crt"
    assert settings.password_file == f"{tmp_path}/chat/redis-password"
    assert settings.username == "a"


@pytest.mark.parametrize(("tls", "scheme"), [(True, "rediss"), (False, "redis")])
def test_a_clusters_seed_nodes_are_endpoints_its_secrets_must_name(tls: bool, scheme: str) -> None:
    """They name every other node, so the password and the CA go wherever they say."""
    cluster = {"nodes": ["redis-0.data:6379", "10.1.2.3:7000"], "tls": tls}
    spec = validate({"backend": "redis", "redis": {"cluster": cluster, "passwordSecretRef": KEY}})
    nodes = (
        Endpoint("spec.redis.cluster.nodes[0]", f"{scheme}://redis-0.data:6379"),
        Endpoint("spec.redis.cluster.nodes[1]", f"{scheme}://10.1.2.3:7000"),
    )
    found = {flow.ref: flow.endpoints for flow in flows(spec, {})}
    assert found["passwordSecretRef"] == found["caSecretRef"] == nodes


def test_hidden_tool_names_reach_the_sidecars_keyring(tmp_path: Path) -> None:
    spec = validate({"backend": "sqlite", "encryption": {"enabled": True, "hideToolNames": True}})
    keys_root = tmp_path / "keys"
    (keys_root / "chat").mkdir(parents=True)
    (keys_root / "chat" / "k1").write_text(generate_key())
    rendered = render("chat", spec, {}, stores_root=str(tmp_path), keys_root=str(keys_root))
    assert rendered.config["stores"]["chat"]["encryption"]["hideToolNames"] is True
    keyring = parse_config(rendered.config).stores["chat"].encryption
    assert keyring is not None
    assert keyring.hide_tool_names


def test_a_pooled_postgres_store_reaches_the_sidecar_with_its_direct_dsn(tmp_path: Path) -> None:
    section = {
        "dsnSecretRef": {"name": "db", "key": "pooled"},
        "directDsnSecretRef": {"name": "db", "key": "direct"},
        "transactionPooler": True,
    }
    spec = validate({"backend": "postgres", "postgres": section})
    secrets = {
        "dsnSecretRef": "postgresql://app@chat-pooler-rw.data/chat\n",
        "directDsnSecretRef": "postgresql://app@chat-rw.data/chat\n",
    }
    rendered = render("chat", spec, secrets, stores_root=str(tmp_path))
    folder = tmp_path / "chat"
    folder.mkdir()
    for name, data in rendered.secret_data().items():
        (folder / name).write_bytes(data)
    settings = load_config(folder / "config.yaml").stores["chat"].settings
    assert settings.transaction_pooler is True
    assert settings.dsn == "postgresql://app@chat-pooler-rw.data/chat"
    assert settings.direct_dsn == "postgresql://app@chat-rw.data/chat"


def test_connection_budgets_reach_the_sidecar_as_it_reads_them(tmp_path: Path) -> None:
    """`poolMin`, `poolMax`, `maxConnections` and `idleTimeout` are rendered and read by
    the sidecar's own parser; a duration the CRD's pattern lets through but the sidecar
    refuses (under 0.1 s) is refused by that parser, which the operator runs first."""
    specs: dict[str, dict[str, Any]] = {
        "pg": {
            "backend": "postgres",
            "postgres": {
                "dsnSecretRef": KEY,
                "poolMin": 1,
                "poolMax": 8,
                "idleTimeout": "2m30s",
            },
        },
        "kv": {
            "backend": "redis",
            "redis": {"url": "redis://r:6379", "maxConnections": 16, "idleTimeout": "5s"},
        },
    }
    secrets = {"dsnSecretRef": "postgresql://agent@db:5432/chat"}
    pg = parse_config(render("pg", validate(specs["pg"]), secrets).config).stores["pg"]
    assert (pg.settings.pool_min, pg.settings.pool_max, pg.settings.idle_timeout) == (1, 8, 150.0)
    kv = parse_config(render("kv", validate(specs["kv"]), {}).config).stores["kv"]
    assert (kv.settings.max_connections, kv.settings.idle_timeout) == (16, 5.0)
    specs["kv"]["redis"]["idleTimeout"] = "0s"
    with pytest.raises(ConfigError, match=r"idleTimeout.*must be a duration from 0\.1s"):
        parse_config(render("kv", validate(specs["kv"]), {}).config)


def test_a_subject_label_reaches_the_sidecars_keyring(tmp_path: Path) -> None:
    sealing = {"enabled": True, "subjectLabel": "user_id", "requireSubject": True}
    spec = validate({"backend": "sqlite", "encryption": sealing})
    keys_root = tmp_path / "keys"
    (keys_root / "chat").mkdir(parents=True)
    (keys_root / "chat" / "k1").write_text(generate_key())
    rendered = render("chat", spec, {}, stores_root=str(tmp_path), keys_root=str(keys_root))
    keyring = parse_config(rendered.config).stores["chat"].encryption
    assert keyring is not None
    assert (keyring.subject_label, keyring.require_subject) == ("user_id", True)


def test_labels_render_as_the_sidecar_reads_them(tmp_path: Path) -> None:
    retention = {"label": "plan", "classes": {"free": "7d", "paid": "90d"}}
    labels = {"allowed": ["user_id", "plan"], "maxPerSession": 4, "retention": retention}
    spec = validate({"backend": "sqlite", "labels": labels})
    rendered = render("chat", spec, {}, stores_root=str(tmp_path))
    folder = tmp_path / "chat"
    folder.mkdir()
    for name, data in rendered.secret_data().items():
        (folder / name).write_bytes(data)
    rules = load_config(folder / "config.yaml").stores["chat"].labels
    assert rules.allowed == frozenset({"user_id", "plan"})
    assert rules.most == 4
    assert rules.retention is not None
    assert rules.retention.label == "plan"
    assert rules.retention.classes == {"free": 7 * 86400.0, "paid": 90 * 86400.0}
