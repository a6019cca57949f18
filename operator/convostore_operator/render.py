"""Rendering a store into what the sidecar reads: its config file and credential files.

The result goes into one Secret, `<name>-convostore`, mounted into the sidecar at
`/etc/convostore/stores/<name>/`; generated encryption keys live in their own Secret,
mounted at `/etc/convostore/keys/<name>/`. The config hash covers every byte the sidecar
will read (config, credentials and keys), so any change to them rolls the pods.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import yaml

STORES_ROOT = "/etc/convostore/stores"
KEYS_ROOT = "/etc/convostore/keys"


@dataclass(frozen=True)
class Rendered:
    config: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)

    def secret_data(self) -> dict[str, bytes]:
        return {"config.yaml": yaml.safe_dump(self.config, sort_keys=True).encode(), **self.files}

    def config_hash(self, keys: dict[str, bytes] | None = None) -> str:
        digest = hashlib.sha256()
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
) -> Rendered:
    """`secrets` holds the values of `spec.secret_refs(spec)`, by the same names."""
    backend = spec["backend"]
    section = spec.get(backend, {})
    here = f"{stores_root}/{name}"
    files: dict[str, bytes] = {}
    store: dict[str, Any] = {"backend": backend}
    if backend == "sqlite":
        store["sqlite"] = {"path": section.get("path", "/var/lib/convostore/convostore.db")}
    elif backend == "redis":
        redis: dict[str, Any] = {"url": secrets.get("urlSecretRef") or section["url"]}
        if "username" in section:
            redis["username"] = section["username"]
        if "passwordSecretRef" in secrets:
            files["redis-password"] = secrets["passwordSecretRef"].encode()
            redis["passwordFile"] = f"{here}/redis-password"
        if "keyPrefix" in section:
            redis["keyPrefix"] = section["keyPrefix"]
        store["redis"] = redis
    elif backend == "postgres":
        postgres: dict[str, Any] = {"dsn": secrets["dsnSecretRef"].strip()}
        if "passwordSecretRef" in secrets:
            files["postgres-password"] = secrets["passwordSecretRef"].encode()
            postgres["passwordFile"] = f"{here}/postgres-password"
        for key in ("schema", "poolMax"):
            if key in section:
                postgres[key] = section[key]
        store["postgres"] = postgres
    else:
        store["dapr"] = {"stateStore": section["stateStore"]}
    retention = spec.get("retention", {})
    if "ttl" in retention:
        store["ttl"] = retention["ttl"]
    if "maxItems" in retention:
        store["maxItems"] = retention["maxItems"]
    if spec.get("limits"):
        store["limits"] = dict(spec["limits"])
    if spec.get("encryption", {}).get("enabled"):
        encryption: dict[str, Any] = {"keysDir": f"{keys_root}/{name}"}
        if primary_key:
            encryption["primary"] = primary_key
        store["encryption"] = encryption
    return Rendered(config={"stores": {name: store}}, files=files)


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
