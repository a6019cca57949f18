"""Rendering a store into what the sidecar reads: its config file and credential files.

The result goes into one Secret, `<name>-convostore`, mounted into the sidecar at
`/etc/convostore/stores/<name>/`; generated encryption keys live in their own Secret,
mounted at `/etc/convostore/keys/<name>/`. The config hash covers every byte the sidecar
will read (config, credentials and keys), so any change to them rolls the pods; it is
keyed by a random `hash-key` kept in the same Secret.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import yaml
from convostore_sidecar.sections import ConfigError

from .crd import DATA_DIR, OPENAI_CLIENT

STORES_ROOT = "/etc/convostore/stores"
KEYS_ROOT = "/etc/convostore/keys"
DEFAULT_SQLITE_PATH = f"{DATA_DIR}/convostore.db"


@dataclass(frozen=True)
class Rendered:
    config: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)

    def secret_data(self) -> dict[str, bytes]:
        return {"config.yaml": yaml.safe_dump(self.config, sort_keys=True).encode(), **self.files}

    def config_hash(self, hash_key: bytes, keys: dict[str, bytes] | None = None) -> str:
        """An HMAC under the store's own `hash_key` (kept in its config Secret): the hash
        is published in status and pod annotations, and an unkeyed hash of credential
        files could be checked against guessed passwords offline."""
        digest = hmac.new(hash_key, digestmod=hashlib.sha256)
        for name, value in sorted({**self.secret_data(), **_prefixed(keys or {})}.items()):
            digest.update(name.encode() + b"\x00" + value + b"\x00")
        return digest.hexdigest()[:16]


def _prefixed(keys: dict[str, bytes]) -> dict[str, bytes]:
    return {f"keys/{name}": value for name, value in keys.items()}


def render(
    name: str,
    spec: dict[str, Any],
    secrets: dict[str, str],
    *,
    stores_root: str = STORES_ROOT,
    keys_root: str = KEYS_ROOT,
    primary_key: str | None = None,
    data_root: str | None = None,
    scope: str | None = None,
) -> Rendered:
    """`secrets` holds the values of `spec.secret_refs(spec)`, by the same names;
    `data_root` moves every SQLite file there (the operator's own checks use it);
    `scope` (the store's namespace) becomes part of its identity in the backend."""
    backend = spec["backend"]
    section = spec.get(backend, {})
    here = f"{stores_root}/{name}"
    files: dict[str, bytes] = {}
    store: dict[str, Any] = {"backend": backend}
    if scope is not None:
        store["scope"] = scope
    if backend == "openai":
        store["openai"] = _openai(section, secrets, files, here, data_root)
    elif backend == "dapr":
        store["dapr"] = {"stateStore": section["stateStore"]}
    else:
        store[backend] = _database(backend, section, secrets, files, here, data_root)
    retention = spec.get("retention", {})
    if "ttl" in retention:
        store["ttl"] = retention["ttl"]
    if "maxItems" in retention:
        store["maxItems"] = retention["maxItems"]
    if spec.get("limits"):
        store["limits"] = dict(spec["limits"])
    if spec.get("labels"):
        store["labels"] = dict(spec["labels"])
    if spec.get("encryption", {}).get("enabled"):
        encryption: dict[str, Any] = {"keysDir": f"{keys_root}/{name}"}
        if primary_key:
            encryption["primary"] = primary_key
        if spec["encryption"].get("hideToolNames"):
            encryption["hideToolNames"] = True
        if spec["encryption"].get("subjectLabel"):
            encryption["subjectLabel"] = spec["encryption"]["subjectLabel"]
            encryption["requireSubject"] = bool(spec["encryption"].get("requireSubject"))
        store["encryption"] = encryption
    if "compaction" in spec:
        store["compaction"] = _compaction(spec["compaction"], secrets, files, here)
    return Rendered(config={"stores": {name: store}}, files=files)


def _compaction(
    section: dict[str, Any], secrets: dict[str, str], files: dict[str, bytes], here: str
) -> dict[str, Any]:
    files["compaction-api-key"] = secrets["compaction.apiKeySecretRef"].strip().encode()
    rendered: dict[str, Any] = {"apiKeyFile": f"{here}/compaction-api-key"}
    for key in ("model", *OPENAI_CLIENT, "keepRecentTurns", "mode"):
        if key in section:
            rendered[key] = section[key]
    if section.get("trigger"):
        rendered["trigger"] = dict(section["trigger"])
    return rendered


def _database(
    backend: str,
    section: dict[str, Any],
    secrets: dict[str, str],
    files: dict[str, bytes],
    here: str,
    data_root: str | None,
    prefix: str = "",
) -> dict[str, Any]:
    """A sqlite, redis, postgres or sqlalchemy section; `prefix` names the secrets and files of the
    openai backend's map store apart from the store's own."""
    if backend == "sqlite":
        path = section.get("path", DEFAULT_SQLITE_PATH)
        return {"path": path if data_root is None else f"{data_root}/{PurePosixPath(path).name}"}
    rendered: dict[str, Any] = {}
    if backend == "redis":
        if "sentinel" in section:
            rendered["sentinel"] = _sentinel(section["sentinel"], secrets, files, here, prefix)
        elif "cluster" in section:
            rendered["cluster"] = dict(section["cluster"])
        else:
            rendered["url"] = secrets.get(f"{prefix}urlSecretRef") or section["url"]
        if "username" in section:
            rendered["username"] = section["username"]
        for key in ("keyPrefix", "waitReplicas", "maxConnections", "idleTimeout"):
            if key in section:
                rendered[key] = section[key]
    elif backend == "sqlalchemy":
        rendered["url"] = secrets["urlSecretRef"].strip()
        if urlsplit(rendered["url"]).scheme.partition("+")[0] == "sqlite":
            raise ConfigError(
                "field 'sqlalchemy.urlSecretRef': names a SQLite file, which each pod would "
                "keep apart: use backend: sqlite"
            )
        for key in ("tablePrefix", "poolMax", "idleTimeout", "statementTimeout"):
            if key in section:
                rendered[key] = section[key]
    else:
        rendered["dsn"] = secrets[f"{prefix}dsnSecretRef"].strip()
        if f"{prefix}directDsnSecretRef" in secrets:
            rendered["directDsn"] = secrets[f"{prefix}directDsnSecretRef"].strip()
        for key in (
            "schema",
            "poolMin",
            "poolMax",
            "idleTimeout",
            "synchronousCommit",
            "transactionPooler",
        ):
            if key in section:
                rendered[key] = section[key]
    if f"{prefix}passwordSecretRef" in secrets:
        file = f"{prefix.replace('.', '-')}{backend}-password"
        files[file] = secrets[f"{prefix}passwordSecretRef"].encode()
        rendered["passwordFile"] = f"{here}/{file}"
    if f"{prefix}caSecretRef" in secrets:
        file = f"{prefix.replace('.', '-')}{backend}-ca.crt"
        files[file] = secrets[f"{prefix}caSecretRef"].encode()
        rendered["tls"] = {"caFile": f"{here}/{file}"}
    return rendered


def _sentinel(
    section: dict[str, Any],
    secrets: dict[str, str],
    files: dict[str, bytes],
    here: str,
    prefix: str,
) -> dict[str, Any]:
    rendered: dict[str, Any] = {
        key: section[key]
        for key in ("hosts", "serviceName", "database", "username")
        if key in section
    }
    if f"{prefix}sentinel.passwordSecretRef" in secrets:
        file = f"{prefix.replace('.', '-')}redis-sentinel-password"
        files[file] = secrets[f"{prefix}sentinel.passwordSecretRef"].encode()
        rendered["passwordFile"] = f"{here}/{file}"
    return rendered


def _openai(
    section: dict[str, Any],
    secrets: dict[str, str],
    files: dict[str, bytes],
    here: str,
    data_root: str | None,
) -> dict[str, Any]:
    files["openai-api-key"] = secrets["apiKeySecretRef"].strip().encode()
    rendered: dict[str, Any] = {"apiKeyFile": f"{here}/openai-api-key"}
    for key in (
        "baseURL",
        "organization",
        "project",
        "timeout",
        "maxRetries",
        "adoptConversations",
    ):
        if key in section:
            rendered[key] = section[key]
    mapping = section.get("mapping", {"backend": "sqlite"})
    backend = mapping["backend"]
    rendered["mapping"] = {
        "backend": backend,
        backend: _database(
            backend, mapping.get(backend, {}), secrets, files, here, data_root, "mapping."
        ),
    }
    return rendered


def dapr_component(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The Dapr Component a `dapr` store declares, named after its state store."""
    section = spec["dapr"]
    component = section["component"]
    metadata = []
    for item in component.get("metadata", []):
        entry: dict[str, Any] = {"name": item["name"]}
        if "value" in item:
            entry["value"] = item["value"]
        else:
            entry["secretKeyRef"] = dict(item["secretKeyRef"])
        metadata.append(entry)
    return {
        "apiVersion": "dapr.io/v1alpha1",
        "kind": "Component",
        "metadata": {"name": section["stateStore"], "namespace": namespace},
        "spec": {
            "type": component["type"],
            "version": component.get("version", "v1"),
            "metadata": metadata,
        },
    }
