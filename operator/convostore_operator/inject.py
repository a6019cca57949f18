"""Sidecar injection: what a pod that asks for convostore gets.

A pod annotated `convostore.dev/inject: "true"` and `convostore.dev/stores: "chat,audit"`
receives the sidecar as a native sidecar (an init container with `restartPolicy:
Always`, so it starts before the app and stops after it) and each store's rendered
config Secret (and key Secret) as read-only volumes.

Only the containers allowed to call the sidecar can: those named in
`convostore.dev/containers` (else the pod's `kubectl.kubernetes.io/default-container`,
else its first container). They alone mount the socket directory, read-only (they can
connect, but not remove the socket or listen in its place), and the directory where the
sidecar writes the token it makes at every start; they get `CONVOSTORE_URL` and
`CONVOSTORE_TOKEN_FILE`. The sidecar serves no TCP port unless the pod asks with
`convostore.dev/tcp: "true"` (the token still guards it). Pods on the host's network
are refused: the sidecar's loopback would be the node's; so are pods that share their
process namespace: any container could read the sidecar's token through /proc.

The change is computed on the pod manifest alone, so it is easy to test and
idempotent: a pod that has the sidecar is left alone.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .crd import DATA_DIR, GROUP
from .render import KEYS_ROOT, STORES_ROOT
from .spec import keys_secret_name, uses_embedded_sqlite

INJECT, STORES = f"{GROUP}/inject", f"{GROUP}/stores"
CONTAINERS, TCP = f"{GROUP}/containers", f"{GROUP}/tcp"
DATA_SIZE = f"{GROUP}/data-size-limit"
DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"
CONFIG_HASH = f"{GROUP}/config-hash"
SIDECAR = "convostore"
SOCKET_DIR = "/var/run/convostore"
SOCKET_URL = f"unix://{SOCKET_DIR}/sidecar.sock"
TOKEN_DIR = "/var/run/convostore-token"
TOKEN_FILE = f"{TOKEN_DIR}/token"
SIDECAR_UID = 65532
HEALTH_PORT = 8791
"""Where the kubelet probes the sidecar: a listener that serves `/healthz` and `/readyz`
only (see the sidecar's `health` module), so no probe starts a process."""
DATA_SIZE_LIMIT = "1Gi"
"""The embedded SQLite file's volume, unless the pod's `convostore.dev/data-size-limit`
says otherwise: an item of 1 KiB takes about 1.3 KiB with its row and indexes, so 1 GiB
holds some 700,000 items, with room for the WAL (a few MiB between checkpoints). Past
it the kubelet evicts the pod, as for any emptyDir over its limit."""
QUANTITY = re.compile(r"[1-9][0-9]{0,5}(Ki|Mi|Gi|Ti)")
SIDECAR_MEMORY_LIMIT = "256Mi"
"""What the sidecar's request limits are sized for: see "Limits" in the README."""

RESTRICTED = {
    "runAsNonRoot": True,
    "runAsUser": SIDECAR_UID,
    "runAsGroup": SIDECAR_UID,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


class InjectionRefused(ValueError):
    """A pod that asks for the sidecar but cannot have it safely; the message says why."""


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


def allowed_containers(pod: dict[str, Any]) -> list[str]:
    """The app containers that may call the sidecar; raises InjectionRefused."""
    annotations = pod.get("metadata", {}).get("annotations") or {}
    present = [str(c.get("name")) for c in pod.get("spec", {}).get("containers") or []]
    if CONTAINERS in annotations:
        named = [n.strip() for n in str(annotations[CONTAINERS]).split(",") if n.strip()]
    elif annotations.get(DEFAULT_CONTAINER):
        named = [str(annotations[DEFAULT_CONTAINER])]
    else:
        named = present[:1]
    unknown = [n for n in named if n not in present]
    if unknown or not named:
        raise InjectionRefused(
            f"convostore: {CONTAINERS} names {', '.join(map(repr, unknown)) or 'no container'}; "
            f"the pod's containers are {', '.join(map(repr, present)) or 'none'}"
        )
    return list(dict.fromkeys(named))


@dataclass(frozen=True)
class SidecarTelemetry:
    """What injected sidecars report, as the chart configures the operator: an OTLP
    endpoint for their traces, and whether Prometheus scrapes their metrics (served then
    on the health port, which a PodMonitor finds by its name)."""

    otlp_endpoint: str | None = None
    metrics: bool = False

    @classmethod
    def from_environment(cls, env: Mapping[str, str] = os.environ) -> SidecarTelemetry:
        endpoint = env.get("CONVOSTORE_SIDECAR_OTLP_ENDPOINT") or None
        return cls(endpoint, env.get("CONVOSTORE_SIDECAR_METRICS", "").lower() == "true")

    def apply(self, container: dict[str, Any]) -> None:
        if self.metrics:
            container["args"].append("--health-metrics")
            container["ports"] = [{"name": METRICS_PORT, "containerPort": HEALTH_PORT}]
        if self.otlp_endpoint:
            container["env"] = [
                {"name": "CONVOSTORE_POD", "valueFrom": {"fieldRef": FIELD_POD}},
                {"name": "CONVOSTORE_POD_NAMESPACE", "valueFrom": {"fieldRef": FIELD_NS}},
                {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": self.otlp_endpoint},
                {"name": "OTEL_SERVICE_NAME", "value": "convostore-sidecar"},
                {
                    "name": "OTEL_RESOURCE_ATTRIBUTES",
                    "value": "k8s.pod.name=$(CONVOSTORE_POD),"
                    "k8s.namespace.name=$(CONVOSTORE_POD_NAMESPACE)",
                },
            ]


NO_TELEMETRY = SidecarTelemetry()
METRICS_PORT = "cs-metrics"
FIELD_POD = {"fieldPath": "metadata.name"}
FIELD_NS = {"fieldPath": "metadata.namespace"}


def inject(
    pod: dict[str, Any],
    stores: list[StoreMount],
    image: str,
    telemetry: SidecarTelemetry = NO_TELEMETRY,
) -> None:
    """Add the sidecar to `pod` (a manifest dict), in place; raises InjectionRefused."""
    if already_injected(pod):
        return
    spec = pod.setdefault("spec", {})
    refuse_unsafe(spec)
    callers = allowed_containers(pod)
    annotations = pod.setdefault("metadata", {}).setdefault("annotations", {})
    volumes = spec.setdefault("volumes", [])
    volumes.append({"name": "convostore-socket", "emptyDir": {}})
    volumes.append(
        {"name": "convostore-token", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}
    )
    mounts: list[dict[str, Any]] = [
        {"name": "convostore-socket", "mountPath": SOCKET_DIR},
        {"name": "convostore-token", "mountPath": TOKEN_DIR},
    ]
    args = ["sidecar", "--socket", f"{SOCKET_DIR}/sidecar.sock", "--socket-mode", "0666"]
    args += ["--issue-token", TOKEN_FILE, "--health-port", str(HEALTH_PORT)]
    if annotations.get(TCP) != "true":
        args.append("--no-tcp")
    args += mount_stores(stores, volumes, mounts, data_size(annotations))
    sidecar = sidecar_container(image, args, mounts)
    telemetry.apply(sidecar)
    spec.setdefault("initContainers", []).append(sidecar)
    grant_callers(spec, callers)
    annotations[CONFIG_HASH] = combined_hash(stores)


def refuse_unsafe(spec: dict[str, Any]) -> None:
    """Pods where another container could reach the sidecar's loopback or its token."""
    if spec.get("hostNetwork"):
        raise InjectionRefused(
            "convostore: a pod on the host's network cannot have the sidecar: its "
            "loopback is the node's, shared by every pod there"
        )
    if spec.get("shareProcessNamespace"):
        raise InjectionRefused(
            "convostore: a pod that shares its process namespace cannot have the sidecar: "
            "every container there could read the sidecar's token and memory through /proc"
        )


def data_size(annotations: dict[str, Any]) -> str:
    size = str(annotations.get(DATA_SIZE, DATA_SIZE_LIMIT))
    if not QUANTITY.fullmatch(size):
        raise InjectionRefused(
            f"convostore: {DATA_SIZE} must be a size such as 512Mi or 2Gi (Ki, Mi, Gi or Ti), "
            f"got {size[:40]!r}"
        )
    return size


def mount_stores(
    stores: list[StoreMount],
    volumes: list[dict[str, Any]],
    mounts: list[dict[str, Any]],
    size_limit: str,
) -> list[str]:
    """Each store's config (and key) Secret as read-only volumes of the sidecar, and a
    data directory when one keeps SQLite in the pod; the sidecar's `--config` args."""
    args = []
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
        volumes.append({"name": "convostore-data", "emptyDir": {"sizeLimit": size_limit}})
        mounts.append({"name": "convostore-data", "mountPath": DATA_DIR})
    return args


def sidecar_container(image: str, args: list[str], mounts: list[dict[str, Any]]) -> dict[str, Any]:
    """A native sidecar, restricted, probed over HTTP on the health-only listener."""
    return {
        "name": SIDECAR,
        "image": image,
        "restartPolicy": "Always",
        "args": args,
        "volumeMounts": mounts,
        "securityContext": RESTRICTED,
        "startupProbe": {
            "httpGet": {"path": "/healthz", "port": HEALTH_PORT},
            "periodSeconds": 1,
            "failureThreshold": 60,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": HEALTH_PORT},
            "periodSeconds": 20,
            "timeoutSeconds": 5,
        },
        "resources": {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"memory": SIDECAR_MEMORY_LIMIT},
        },
    }


def grant_callers(spec: dict[str, Any], callers: list[str]) -> None:
    """The socket and token directories, read-only, and the client's env, for the
    containers allowed to call the sidecar, and no others."""
    for container in spec.get("containers") or []:
        if container.get("name") not in callers:
            continue
        env = container.setdefault("env", [])
        names = {e.get("name") for e in env}
        for name, value in (("CONVOSTORE_URL", SOCKET_URL), ("CONVOSTORE_TOKEN_FILE", TOKEN_FILE)):
            if name not in names:
                env.append({"name": name, "value": value})
        container.setdefault("volumeMounts", []).extend(
            [
                {"name": "convostore-socket", "mountPath": SOCKET_DIR, "readOnly": True},
                {"name": "convostore-token", "mountPath": TOKEN_DIR, "readOnly": True},
            ]
        )


def combined_hash(stores: list[StoreMount]) -> str:
    joined = ",".join(f"{s.name}={s.config_hash}" for s in sorted(stores, key=lambda s: s.name))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]
