"""Sidecar injection: what a pod that asks for convostore gets.

A pod annotated `convostore.dev/inject: "true"` and `convostore.dev/stores: "chat,audit"`
receives the sidecar as a native sidecar (an init container with `restartPolicy:
Always`, so it starts before the app and stops after it), each store's rendered config
Secret (and key Secret) as read-only volumes, a pod-private socket directory, and
`CONVOSTORE_URL` in every app container. The change is computed on the pod manifest
alone, so it is easy to test and idempotent: a pod that has the sidecar is left alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from .crd import DATA_DIR, GROUP
from .render import KEYS_ROOT, STORES_ROOT
from .spec import keys_secret_name, uses_embedded_sqlite

INJECT, STORES = f"{GROUP}/inject", f"{GROUP}/stores"
CONFIG_HASH = f"{GROUP}/config-hash"
SIDECAR = "convostore"
SOCKET_DIR = "/var/run/convostore"
SOCKET_URL = f"unix://{SOCKET_DIR}/sidecar.sock"
SIDECAR_UID = 65532

RESTRICTED = {
    "runAsNonRoot": True,
    "runAsUser": SIDECAR_UID,
    "runAsGroup": SIDECAR_UID,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


@dataclass(frozen=True)
class StoreMount:
    """What injection needs to know of one ConversationStore."""

    name: str
    config_hash: str
    keys_secret: str | None = None
    embedded: bool = False


def store_mount(store: dict[str, Any]) -> StoreMount:
    """What injection needs of a ConversationStore object as the API server returns it."""
    name = str(store["metadata"]["name"])
    spec = store.get("spec") or {}
    return StoreMount(
        name=name,
        config_hash=str((store.get("status") or {}).get("configHash", "")),
        keys_secret=keys_secret_name(name, spec),
        embedded=uses_embedded_sqlite(spec),
    )


def requested_stores(pod: dict[str, Any]) -> list[str] | None:
    """The store names a pod asks for, or None when it does not ask for injection."""
    annotations = pod.get("metadata", {}).get("annotations") or {}
    if annotations.get(INJECT) != "true":
        return None
    names = [n.strip() for n in annotations.get(STORES, "default").split(",") if n.strip()]
    return list(dict.fromkeys(names))


def already_injected(pod: dict[str, Any]) -> bool:
    return any(c.get("name") == SIDECAR for c in pod.get("spec", {}).get("initContainers") or [])


def inject(pod: dict[str, Any], stores: list[StoreMount], image: str) -> None:
    """Add the sidecar to `pod` (a manifest dict), in place."""
    if already_injected(pod):
        return
    spec = pod.setdefault("spec", {})
    volumes = spec.setdefault("volumes", [])
    mounts: list[dict[str, Any]] = [{"name": "convostore-socket", "mountPath": SOCKET_DIR}]
    volumes.append({"name": "convostore-socket", "emptyDir": {}})
    args = ["sidecar", "--socket", f"{SOCKET_DIR}/sidecar.sock", "--socket-mode", "0666"]
    for store in stores:
        volume = f"convostore-store-{store.name}"
        volumes.append({"name": volume, "secret": {"secretName": f"{store.name}-convostore"}})
        mounts.append(
            {"name": volume, "mountPath": f"{STORES_ROOT}/{store.name}", "readOnly": True}
        )
        args += ["--config", f"{STORES_ROOT}/{store.name}/config.yaml"]
        if store.keys_secret:
            keys = f"convostore-keys-{store.name}"
            volumes.append({"name": keys, "secret": {"secretName": store.keys_secret}})
            mounts.append(
                {"name": keys, "mountPath": f"{KEYS_ROOT}/{store.name}", "readOnly": True}
            )
    if any(store.embedded for store in stores):
        volumes.append({"name": "convostore-data", "emptyDir": {}})
        mounts.append({"name": "convostore-data", "mountPath": DATA_DIR})
    sidecar = {
        "name": SIDECAR,
        "image": image,
        "restartPolicy": "Always",
        "args": args,
        "volumeMounts": mounts,
        "securityContext": RESTRICTED,
        "startupProbe": {
            "exec": {"command": ["convostore", "probe", "--url", SOCKET_URL]},
            "periodSeconds": 1,
            "failureThreshold": 60,
        },
        "livenessProbe": {
            "exec": {"command": ["convostore", "probe", "--url", SOCKET_URL]},
            "periodSeconds": 20,
            "timeoutSeconds": 5,
        },
        "resources": {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"memory": "256Mi"},
        },
    }
    spec.setdefault("initContainers", []).append(sidecar)
    for container in spec.get("containers") or []:
        env = container.setdefault("env", [])
        if not any(e.get("name") == "CONVOSTORE_URL" for e in env):
            env.append({"name": "CONVOSTORE_URL", "value": SOCKET_URL})
        container.setdefault("volumeMounts", []).append(
            {"name": "convostore-socket", "mountPath": SOCKET_DIR}
        )
    annotations = pod.setdefault("metadata", {}).setdefault("annotations", {})
    annotations[CONFIG_HASH] = combined_hash(stores)


def combined_hash(stores: list[StoreMount]) -> str:
    joined = ",".join(f"{s.name}={s.config_hash}" for s in sorted(stores, key=lambda s: s.name))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]
