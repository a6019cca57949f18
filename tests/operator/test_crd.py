"""The CRD: generated files match the code, the schema is structural, and examples and
hostile specs are accepted or refused as an API server would (schema, then CEL rules)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from convostore_operator.crd import GROUP, KIND, MAX_STORE_NAME, PLURAL, SHORT, VERSION, crd
from convostore_operator.manifests import crd_yaml
from convostore_operator.spec import InvalidSpec, cel_failures, validate, validate_name
from convostore_sidecar.config import STORE_NAME

ROOT = Path(__file__).resolve().parents[2]
KEY = {"name": "openai", "key": "api-key"}
COMPACT = {"apiKeySecretRef": KEY}
EXAMPLES = sorted((ROOT / "manifests" / "examples").glob("store-*.yaml"))


def test_generated_crd_file_is_current() -> None:
    assert (ROOT / "manifests" / "crd.yaml").read_text() == crd_yaml(), (
        "regenerate with: convostore operator crd > manifests/crd.yaml"
    )
    assert yaml.safe_load(crd_yaml()) == crd()


def test_names_columns_and_status_subresource() -> None:
    definition = crd()
    assert definition["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    assert definition["spec"]["names"]["shortNames"] == [SHORT]
    [version] = definition["spec"]["versions"]
    assert version["name"] == VERSION
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert {"Backend", "Ready", "Age"} <= set(columns)


def non_structural(schema: dict[str, Any], path: str = "") -> list[str]:
    """Nodes without a `type` (what a structural schema forbids), besides those that
    preserve unknown fields."""
    problems = [] if "type" in schema else [path or "<root>"]
    for name, child in schema.get("properties", {}).items():
        problems += non_structural(child, f"{path}.{name}")
    if "items" in schema:
        problems += non_structural(schema["items"], f"{path}[]")
    return problems


def test_schema_is_structural() -> None:
    [version] = crd()["spec"]["versions"]
    assert non_structural(version["schema"]["openAPIV3Schema"]) == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_store_is_valid(path: Path) -> None:
    document = yaml.safe_load(path.read_text())
    assert document["kind"] == KIND
    assert document["apiVersion"] == f"{GROUP}/{VERSION}"
    assert validate(document["spec"]) == document["spec"]


def test_there_is_an_example_per_backend_and_one_encrypted() -> None:
    specs = [yaml.safe_load(p.read_text())["spec"] for p in EXAMPLES]
    assert {s["backend"] for s in specs} == {
        "sqlite",
        "redis",
        "postgres",
        "sqlalchemy",
        "dapr",
        "openai",
    }
    assert any(s.get("encryption", {}).get("enabled") for s in specs)
    assert any("compaction" in s for s in specs)


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ({}, "spec", "'backend' is a required property"),
        ({"backend": "mongo"}, "spec.backend", "must be one of"),
        ({"backend": 7}, "spec.backend", "7 is not of type 'string'"),
        ({"backend": "postgres"}, "spec.postgres.dsnSecretRef", "needs postgres.dsnSecretRef"),
        ({"backend": "postgres", "postgres": {}}, "spec.postgres.dsnSecretRef", "dsnSecretRef"),
        (
            {"backend": "redis"},
            "spec.redis.url",
            "needs redis.url, redis.urlSecretRef, redis.sentinel or",
        ),
        (
            {"backend": "postgres", "postgres": {"dsnSecretRef": KEY, "transactionPooler": True}},
            "spec.postgres.directDsnSecretRef",
            "transactionPooler needs directDsnSecretRef",
        ),
        (
            {"backend": "postgres", "postgres": {"dsnSecretRef": KEY, "transactionPooler": "yes"}},
            "spec.postgres.transactionPooler",
            "is not of type 'boolean'",
        ),
        (
            {"backend": "postgres", "postgres": {"dsnSecretRef": KEY, "synchronousCommit": "ON"}},
            "spec.postgres.synchronousCommit",
            "must be one of remote_apply, on, remote_write, local, off",
        ),
        (
            {"backend": "postgres", "postgres": {"dsnSecretRef": KEY, "poolMin": 5}},
            "spec.postgres.poolMin",
            "poolMin must not exceed poolMax (4 unset)",
        ),
        (
            {"backend": "postgres", "postgres": {"dsnSecretRef": KEY, "poolMin": 3, "poolMax": 2}},
            "spec.postgres.poolMin",
            "poolMin must not exceed poolMax",
        ),
        (
            {"backend": "postgres", "postgres": {"dsnSecretRef": KEY, "idleTimeout": "30 s"}},
            "spec.postgres.idleTimeout",
            "does not match",
        ),
        ({"backend": "sqlalchemy"}, "spec.sqlalchemy.urlSecretRef", "needs sqlalchemy.urlSecret"),
        (
            {"backend": "sqlalchemy", "sqlalchemy": {"urlSecretRef": KEY, "tablePrefix": "A-b"}},
            "spec.sqlalchemy.tablePrefix",
            "does not match",
        ),
        (
            {"backend": "sqlalchemy", "sqlalchemy": {"urlSecretRef": KEY, "poolMax": 0}},
            "spec.sqlalchemy.poolMax",
            "less than the minimum of 1",
        ),
        (
            {"backend": "sqlite", "sqlalchemy": {"urlSecretRef": KEY}},
            "spec.sqlalchemy",
            "sqlalchemy settings need backend: sqlalchemy",
        ),
        (
            {"backend": "redis", "redis": {"url": "redis://r:6379", "idleTimeout": "9" * 40 + "s"}},
            "spec.redis.idleTimeout",
            "is too long",
        ),
        (
            {"backend": "redis", "redis": {"url": "redis://r:6379", "maxConnections": 0}},
            "spec.redis.maxConnections",
            "less than the minimum of 1",
        ),
        *(
            ({"backend": "redis", "redis": {"sentinel": sentinel}}, field, message)
            for sentinel, field, message in (
                ({"serviceName": "m"}, "spec.redis.sentinel", "'hosts' is a required property"),
                ({"hosts": ["a:1"]}, "spec.redis.sentinel", "'serviceName' is a required"),
                (
                    {"hosts": [], "serviceName": "m"},
                    "spec.redis.sentinel.hosts",
                    "should be non-empty",
                ),
                (
                    {"hosts": ["a:1"] * 17, "serviceName": "m"},
                    "spec.redis.sentinel.hosts",
                    "is too long",
                ),
                (
                    {"hosts": ["a"], "serviceName": "m"},
                    "spec.redis.sentinel.hosts.0",
                    "does not match",
                ),
                (
                    {"hosts": ["a:1", "b c:2"], "serviceName": "m"},
                    "spec.redis.sentinel.hosts.1",
                    "does not match",
                ),
                (
                    {"hosts": ["a:1"], "serviceName": "m;x"},
                    "spec.redis.sentinel.serviceName",
                    "does not match",
                ),
                (
                    {"hosts": ["a:1"], "serviceName": "m", "database": -1},
                    "spec.redis.sentinel.database",
                    "less than the minimum",
                ),
                (
                    {"hosts": ["a:1"], "serviceName": "m", "passwordSecretRef": {"name": "s"}},
                    "spec.redis.sentinel.passwordSecretRef",
                    "'key' is a required property",
                ),
                (
                    {"hosts": ["a:1\nb:2"], "serviceName": "m"},
                    "spec.redis.sentinel.hosts.0",
                    "does not match",
                ),
                (
                    {"hosts": ["a" * 300 + ":1"], "serviceName": "m"},
                    "spec.redis.sentinel.hosts.0",
                    "is too long",
                ),
                (
                    {"hosts": ["a:1"], "serviceName": "m" * 129},
                    "spec.redis.sentinel.serviceName",
                    "does not match",
                ),
                (
                    {"hosts": ["a:1"], "serviceName": "m", "username": "u" * 257},
                    "spec.redis.sentinel.username",
                    "is too long",
                ),
                (
                    {"hosts": "a:1", "serviceName": "m"},
                    "spec.redis.sentinel.hosts",
                    "is not of type 'array'",
                ),
            )
        ),
        (
            {
                "backend": "redis",
                "redis": {"url": "redis://x", "sentinel": {"hosts": ["a:1"], "serviceName": "m"}},
            },
            "spec.redis.sentinel",
            "redis.sentinel names the primary itself",
        ),
        *(
            ({"backend": "redis", "redis": redis}, field, message)
            for redis, field, message in (
                ({"cluster": {}}, "spec.redis.cluster", "'nodes' is a required property"),
                ({"cluster": {"nodes": []}}, "spec.redis.cluster.nodes", "should be non-empty"),
                ({"cluster": {"nodes": ["a:1"] * 17}}, "spec.redis.cluster.nodes", "is too long"),
                *(
                    ({"cluster": {"nodes": [node]}}, "spec.redis.cluster.nodes.0", "does not match")
                    for node in ("a", "redis://a:1", "a:1\nb:2", "a;rm:1", "[zz]:1", "a:123456")
                ),
                (
                    {"cluster": {"nodes": ["a" * 300 + ":1"]}},
                    "spec.redis.cluster.nodes.0",
                    "is too long",
                ),
                ({"cluster": {"nodes": "a:1"}}, "spec.redis.cluster.nodes", "is not of type"),
                (
                    {"cluster": {"nodes": ["a:1"], "tls": "yes"}},
                    "spec.redis.cluster.tls",
                    "is not of type 'boolean'",
                ),
                (
                    {"cluster": {"nodes": ["a:1"]}, "url": "redis://x"},
                    "spec.redis.cluster",
                    "redis.cluster names the nodes itself",
                ),
                (
                    {"cluster": {"nodes": ["a:1"]}, "urlSecretRef": KEY},
                    "spec.redis.cluster",
                    "redis.cluster names the nodes itself",
                ),
                (
                    {
                        "cluster": {"nodes": ["a:1"]},
                        "sentinel": {"hosts": ["a:1"], "serviceName": "m"},
                    },
                    "spec.redis.cluster",
                    "redis.cluster names the nodes itself",
                ),
                (
                    {"cluster": {"nodes": ["a:1"]}, "caSecretRef": KEY},
                    "spec.redis.caSecretRef",
                    "a CA is for TLS: set redis.cluster.tls: true",
                ),
            )
        ),
        ({"backend": "redis", "redis": {"url": "http://x"}}, "spec.redis.url", "does not match"),
        (
            {"backend": "redis", "redis": {"url": "redis://x", "keyPrefix": "{a}"}},
            "spec.redis.keyPrefix",
            "does not match",
        ),
        (
            {"backend": "redis", "redis": {"url": "redis://x", "waitReplicas": -1}},
            "spec.redis.waitReplicas",
            "less than the minimum",
        ),
        (
            {"backend": "redis", "redis": {"url": "redis://x", "waitReplicas": "1"}},
            "spec.redis.waitReplicas",
            "is not of type 'integer'",
        ),
        (
            {"backend": "redis", "redis": {"url": "redis://x", "waitReplicas": 10**6}},
            "spec.redis.waitReplicas",
            "greater than the maximum",
        ),
        (
            {"backend": "sqlite", "limits": {"maxItemBytes": 4 << 20}},
            "spec.limits.maxItemBytes",
            "greater than the maximum",
        ),
        (
            {"backend": "sqlite", "limits": {"maxRequestBytes": 32 << 20}},
            "spec.limits.maxRequestBytes",
            "greater than the maximum",
        ),
        (
            {"backend": "sqlite", "limits": {"maxReadItems": 0}},
            "spec.limits.maxReadItems",
            "less than the minimum",
        ),
        (
            {"backend": "sqlite", "limits": {"maxReadBytes": 64 << 20}},
            "spec.limits.maxReadBytes",
            "greater than the maximum",
        ),
        (
            {"backend": "sqlite", "limits": {"maxBranches": "many"}},
            "spec.limits.maxBranches",
            "is not of type 'integer'",
        ),
        (
            {"backend": "sqlite", "labels": {"allowed": ["user id"]}},
            "spec.labels.allowed.0",
            "does not match",
        ),
        (
            {"backend": "sqlite", "labels": {"retention": {"label": "plan", "classes": {}}}},
            "spec.labels.retention.classes",
            "should be non-empty",
        ),
        (
            {
                "backend": "sqlite",
                "labels": {"retention": {"label": "plan", "classes": {"free": "soon"}}},
            },
            "spec.labels.retention.classes.free",
            "does not match",
        ),
        (
            {"backend": "sqlite", "labels": {"maxPerSession": 65}},
            "spec.labels.maxPerSession",
            "greater than the maximum",
        ),
        (
            {"backend": "dapr", "dapr": {"stateStore": "x"}, "labels": {"maxPerSession": 2}},
            "spec.labels",
            "the dapr backend cannot keep labels on sessions",
        ),
        (
            {"backend": "dapr", "dapr": {"stateStore": "x"}, "encryption": {"subjectLabel": "u"}},
            "spec.encryption.subjectLabel",
            "the dapr backend cannot seal sessions for their subjects",
        ),
        (
            {"backend": "sqlite", "encryption": {"enabled": True, "subjectLabel": "user id"}},
            "spec.encryption.subjectLabel",
            "does not match",
        ),
        (
            {"backend": "sqlite", "encryption": {"enabled": True, "requireSubject": True}},
            "spec.encryption.requireSubject",
            "requireSubject needs subjectLabel",
        ),
        ({"backend": "dapr"}, "spec.dapr.stateStore", "needs dapr.stateStore"),
        ({"backend": "sqlite", "dapr": {"stateStore": "x"}}, "spec.dapr", "need backend: dapr"),
        (
            {"backend": "sqlite", "sqlite": {"path": "relative.db"}},
            "spec.sqlite.path",
            "does not match",
        ),
        (
            {"backend": "sqlite", "sqlite": {"path": "/tmp/chat.db"}},
            "spec.sqlite.path",
            "does not match",
        ),
        (
            {"backend": "sqlite", "sqlite": {"path": "/var/lib/convostore/../../etc/x.db"}},
            "spec.sqlite.path",
            "does not match",
        ),
        (
            {
                "backend": "openai",
                "openai": {
                    "apiKeySecretRef": KEY,
                    "mapping": {"backend": "sqlite", "sqlite": {"path": "/data/map.db"}},
                },
            },
            "spec.openai.mapping.sqlite.path",
            "does not match",
        ),
        (
            {"backend": "sqlite", "sqlite": {"path": "/a\x00b"}},
            "spec.sqlite.path",
            "does not match",
        ),
        (
            {"backend": "sqlite", "retention": {"ttl": "1 day"}},
            "spec.retention.ttl",
            "does not match",
        ),
        (
            {"backend": "sqlite", "retention": {"ttl": "9" * 40 + "s"}},
            "spec.retention.ttl",
            "too long",
        ),
        (
            {"backend": "sqlite", "retention": {"maxItems": -1}},
            "spec.retention.maxItems",
            "minimum",
        ),
        (
            {"backend": "sqlite", "retention": {"maxItems": 10**12}},
            "spec.retention.maxItems",
            "maximum",
        ),
        (
            {"backend": "sqlite", "limits": {"maxItemBytes": "1Mi"}},
            "spec.limits.maxItemBytes",
            "not of type 'integer'",
        ),
        (
            {"backend": "sqlite", "encryption": {"enabled": "yes"}},
            "spec.encryption.enabled",
            "not of type 'boolean'",
        ),
        (
            {"backend": "sqlite", "encryption": {"keySecretRef": {"name": "UPPER"}}},
            "spec.encryption.keySecretRef.name",
            "does not match",
        ),
        ({"backend": "sqlite", "deletionPolicy": "Purge"}, "spec.deletionPolicy", "must be one of"),
        (
            {"backend": "postgres", "postgres": {"dsnSecretRef": {"name": "../x", "key": "dsn"}}},
            "spec.postgres.dsnSecretRef.name",
            "does not match",
        ),
        (
            {
                "backend": "dapr",
                "dapr": {
                    "stateStore": "s",
                    "component": {"type": "state.redis", "metadata": [{"name": "a"}]},
                },
            },
            "spec.dapr.component.metadata[0]",
            "give either value or secretKeyRef",
        ),
        (
            {
                "backend": "dapr",
                "dapr": {"stateStore": "s", "component": {"type": "bindings.kafka"}},
            },
            "spec.dapr.component.type",
            "does not match",
        ),
        (
            {"backend": "openai", "openai": {"apiKeySecretRef": KEY}, "compaction": COMPACT},
            "spec.compaction",
            "the openai backend cannot compact",
        ),
        (
            {"backend": "dapr", "dapr": {"stateStore": "s"}, "compaction": COMPACT},
            "spec.compaction",
            "the dapr backend cannot compact",
        ),
        ({"backend": "sqlite", "compaction": {}}, "spec.compaction", "'apiKeySecretRef' is a"),
        (
            {"backend": "sqlite", "compaction": {**COMPACT, "trigger": {"items": 5, "tokens": 5}}},
            "spec.compaction.trigger",
            "give either items or tokens",
        ),
        (
            {"backend": "sqlite", "compaction": {**COMPACT, "model": "claude-3-opus"}},
            "spec.compaction.model",
            "does not match",
        ),
        (
            {"backend": "sqlite", "compaction": {**COMPACT, "keepRecentTurns": -1}},
            "spec.compaction.keepRecentTurns",
            "minimum",
        ),
        (
            {"backend": "sqlite", "compaction": {**COMPACT, "model": "gpt-" + "4" * 200}},
            "spec.compaction.model",
            "too long",
        ),
        (
            {"backend": "sqlite", "compaction": {**COMPACT, "trigger": {"items": 0}}},
            "spec.compaction.trigger.items",
            "minimum",
        ),
        (
            {"backend": "sqlite", "compaction": {**COMPACT, "timeout": "forever"}},
            "spec.compaction.timeout",
            "does not match",
        ),
        (
            {"backend": "sqlite", "compaction": {"apiKeySecretRef": {"name": "../x", "key": "k"}}},
            "spec.compaction.apiKeySecretRef.name",
            "does not match",
        ),
        (
            {"backend": "sqlite", "compaction": {**COMPACT, "mode": "chain"}},
            "spec.compaction.mode",
            "must be one of",
        ),
        (
            {"backend": "sqlite", "compaction": {**COMPACT, "baseURL": "http://evil.example/v1"}},
            "spec.compaction.baseURL",
            "does not match",
        ),
        ({"backend": "openai"}, "spec.openai.apiKeySecretRef", "needs openai.apiKeySecretRef"),
        ({"backend": "openai", "openai": {}}, "spec.openai", "'apiKeySecretRef' is a required"),
        (
            {"backend": "sqlite", "openai": {"apiKeySecretRef": KEY}},
            "spec.openai",
            "openai settings need backend: openai",
        ),
        (
            {"backend": "openai", "openai": {"apiKeySecretRef": KEY, "baseURL": "ftp://x"}},
            "spec.openai.baseURL",
            "does not match",
        ),
        (
            {
                "backend": "openai",
                "openai": {"apiKeySecretRef": KEY, "baseURL": "http://collector.evil:80/v1"},
            },
            "spec.openai.baseURL",
            "does not match",
        ),
        (
            {"backend": "openai", "openai": {"apiKeySecretRef": KEY, "project": "p\nx"}},
            "spec.openai.project",
            "does not match",
        ),
        (
            {"backend": "openai", "openai": {"apiKeySecretRef": KEY, "maxRetries": 11}},
            "spec.openai.maxRetries",
            "maximum",
        ),
        (
            {"backend": "openai", "openai": {"apiKeySecretRef": KEY, "adoptConversations": "yes"}},
            "spec.openai.adoptConversations",
            "is not of type 'boolean'",
        ),
        (
            {"backend": "openai", "openai": {"apiKeySecretRef": KEY}, "retention": {"ttl": "1h"}},
            "spec.retention",
            "cannot honour retention",
        ),
        (
            {
                "backend": "openai",
                "openai": {"apiKeySecretRef": KEY},
                "encryption": {"enabled": True},
            },
            "spec.encryption.enabled",
            "cannot encrypt at rest",
        ),
        (
            {"backend": "openai", "openai": {"apiKeySecretRef": KEY, "mapping": {}}},
            "spec.openai.mapping",
            "'backend' is a required property",
        ),
        (
            {
                "backend": "openai",
                "openai": {"apiKeySecretRef": KEY, "mapping": {"backend": "dapr"}},
            },
            "spec.openai.mapping.backend",
            "must be one of",
        ),
        (
            {
                "backend": "openai",
                "openai": {"apiKeySecretRef": KEY, "mapping": {"backend": "redis"}},
            },
            "spec.openai.mapping.redis.url",
            "needs mapping.redis.url, mapping.redis.urlSecretRef, mapping.redis.sentinel or "
            "mapping.redis.cluster",
        ),
        (
            {
                "backend": "openai",
                "openai": {
                    "apiKeySecretRef": KEY,
                    "mapping": {"backend": "sqlite", "postgres": {"schema": "x"}},
                },
            },
            "spec.openai.mapping.postgres",
            "mapping.postgres settings need mapping.backend: postgres",
        ),
    ],
)
def test_invalid_specs_are_refused_naming_the_field(
    spec: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(InvalidSpec) as refused:
        validate(spec)
    assert refused.value.field == field
    assert message in refused.value.message


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("chat", True),
        ("a" * MAX_STORE_NAME, True),
        ("team-7-chat", True),
        ("a" * (MAX_STORE_NAME + 1), False),
        ("chat.v2", False),
        ("Chat", False),
        ("-chat", False),
        ("chat-", False),
    ],
)
def test_store_names_must_fit_pod_volume_names(name: str, valid: bool) -> None:
    """`convostore-store-<name>` must be a volume name (a DNS label, 63 at most), and
    the sidecar refuses a dot in a store name: the CRD's rule and the operator agree."""
    [version] = crd()["spec"]["versions"]
    root = version["schema"]["openAPIV3Schema"]
    obj = {"metadata": {"name": name}, "spec": {"backend": "sqlite"}}
    failures = list(cel_failures(root, obj, ""))
    assert (failures == []) is valid
    if valid:
        validate_name(name)
        assert STORE_NAME.fullmatch(name)
    else:
        with pytest.raises(InvalidSpec) as refused:
            validate_name(name)
        assert refused.value.field == "metadata.name"


def test_a_huge_spec_is_refused_quickly_not_walked_forever() -> None:
    items = [{"name": f"k{i}", "value": "v"} for i in range(1000)]
    spec = {
        "backend": "dapr",
        "dapr": {"stateStore": "s", "component": {"type": "state.redis", "metadata": items}},
    }
    with pytest.raises(InvalidSpec) as refused:
        validate(spec)
    assert refused.value.field == "spec.dapr.component.metadata"
