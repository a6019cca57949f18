"""Fixtures that run the real Kopf operator against the emulated Kubernetes API."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf
import pytest
from convostore_operator.kube import Kube, api_client
from convostore_operator.main import operator_settings
from convostore_operator.registration import OperatorConfig, register
from convostore_operator.webhook import AdmissionServer, WebhookSettings

from tests.operator.emulator import STORES, RealisticEmulator, declare_resources
from tests.servers import free_port

pytestmark = pytest.mark.kmock(cls=RealisticEmulator)
NAMESPACE = "agents"
CPUS = os.cpu_count() or 1


@pytest.fixture
def cluster(kmock: RealisticEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    declare_resources(kmock)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "kind: Config\ncurrent-context: emulator\n"
        f"clusters: [{{name: emulator, cluster: {{server: '{str(kmock.url).rstrip('/')}'}}}}]\n"
        "contexts: [{name: emulator, context: {cluster: emulator}}]\nusers: []\n"
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    return kmock


@pytest.fixture
def kube(cluster: Any) -> Kube:
    return Kube(api_client())


Operator = Callable[..., Awaitable[None]]
WEBHOOK = WebhookSettings(
    namespace="convostore-system",
    service="convostore-webhook",
    configuration="convostore",
    tls_secret="convostore-webhook-tls",
    address="127.0.0.1",
)


@dataclass
class WebhookEndpoint:
    url: str
    ca: bytes
    hostname: str
    path: str


@pytest.fixture
async def operator(cluster: Any, kube: Kube) -> AsyncIterator[Operator]:
    """Starts the operator's reconcile loop (standalone, one namespace) in this test's
    event loop, and the admission webhook over HTTPS on a loopback port
    (`operator.webhook`), both as `convostore operator run` builds them.

    Kopf cancels, when it stops, every task that did not exist when it started; each
    operator is told to spare the other operators' runners and this fixture's teardown."""
    runners: list[asyncio.Task[None]] = []
    stops: list[asyncio.Event] = []
    spared: list[set[asyncio.Task[Any]]] = []
    admission: list[AdmissionServer] = []

    async def start(
        config: OperatorConfig | None = None,
        *,
        clusterwide: bool = False,
        memo_kube: Kube | None = None,
        **settings_changes: Any,
    ) -> None:
        registry = kopf.OperatorRegistry()
        register(registry, config or OperatorConfig(sidecar_image="convostore:test"))
        settings = kopf.OperatorSettings()
        operator_settings(settings)
        settings.posting.level = 0
        for name, value in settings_changes.items():
            section, field = name.split("__")
            setattr(getattr(settings, section), field, value)
        if not admission:
            port = free_port()
            server = AdmissionServer(
                kube, dataclasses.replace(WEBHOOK, port=port), "convostore:test"
            )
            await server.start()
            assert server.tls is not None
            admission.append(server)
            start.webhook = WebhookEndpoint(  # type: ignore[attr-defined]
                f"https://127.0.0.1:{port}", server.tls.ca_bundle, WEBHOOK.hostnames[0], server.path
            )
        stop = asyncio.Event()
        spare = set(asyncio.all_tasks()) | set(runners)
        tasks = await kopf.spawn_tasks(
            registry=registry,
            settings=settings,
            namespaces=[] if clusterwide else [NAMESPACE],
            clusterwide=clusterwide,
            standalone=True,
            stop_flag=stop,
            memo=kopf.Memo(kube=memo_kube or kube),
        )
        runner = asyncio.create_task(kopf.run_tasks(tasks, ignored=spare))
        for earlier in spared:
            earlier.add(runner)
        runners.append(runner)
        stops.append(stop)
        spared.append(spare)

    yield start
    for spare in spared:
        spare.add(asyncio.current_task())  # type: ignore[arg-type]
    for stop in stops:
        stop.set()
    await asyncio.wait_for(asyncio.gather(*runners), 30)
    for server in admission:
        await server.stop()


def store_object(cluster: Any, name: str) -> Any:
    obj = cluster.objects[STORES, NAMESPACE, name]
    return None if obj.deleted else obj


def is_gone(cluster: Any, name: str) -> bool:
    return store_object(cluster, name) is None


def phase_is(cluster: Any, name: str, phase: str) -> bool:
    return bool(store_object(cluster, name)["status"].get("phase") == phase)


def condition(obj: Any, kind: str) -> dict[str, Any]:
    """The status condition of that type (an AssertionError, which `eventually` waits
    out, while it is not there)."""
    for item in (obj.get("status") or {}).get("conditions") or []:
        if item["type"] == kind:
            return dict(item)
    raise AssertionError(f"no {kind} condition yet")


async def create(cluster: Any, api_version: str, kind: str, name: str, **fields: Any) -> None:
    """POST one namespaced object to the emulator, as `kubectl create` would."""
    prefix = "/api" if "/" not in api_version else "/apis"
    plural = kind.lower() + ("es" if kind.endswith("s") else "s")
    await cluster.post(
        f"{prefix}/{api_version}/namespaces/{NAMESPACE}/{plural}",
        json={
            "apiVersion": api_version,
            "kind": kind,
            "metadata": {"name": name, "namespace": NAMESPACE},
            **fields,
        },
    )


async def create_store(cluster: Any, name: str, spec: dict[str, Any]) -> None:
    await create(cluster, "convostore.dev/v1alpha1", "ConversationStore", name, spec=spec)


async def create_workload(cluster: Any, kind: str, name: str, stores: str) -> None:
    """A Deployment or StatefulSet whose pods ask for the sidecar with these stores."""
    template = {
        "metadata": {
            "labels": {"app": name},
            "annotations": {"convostore.dev/inject": "true", "convostore.dev/stores": stores},
        },
        "spec": {"containers": [{"name": "agent", "image": "agent:1"}]},
    }
    spec = {"selector": {"matchLabels": {"app": name}}, "template": template}
    await create(cluster, "apps/v1", kind, name, spec=spec)


def events_for(cluster: Any, name: str) -> list[dict[str, Any]]:
    found = []
    for (resource, _, _), obj in cluster.objects.items():
        regarding = obj.get("involvedObject") or obj.get("regarding") or {}
        if resource.plural == "events" and not obj.deleted and regarding.get("name") == name:
            found.append(dict(obj))
    return found


def reasons_of_events(cluster: Any, name: str) -> set[str]:
    """Events are posted in the background: wait on this with `eventually`."""
    return {str(e["reason"]) for e in events_for(cluster, name)}


def secret_data(cluster: Any, name: str) -> dict[str, bytes] | None:
    """A Secret's decoded data as the emulated API server holds it (None if absent).

    Tests read the emulator directly: a blocking kubernetes-client call from the test's
    event loop would stall the emulator, which serves on that same loop."""
    try:
        obj = cluster.objects["v1/secrets", NAMESPACE, name]
    except KeyError:
        return None
    if obj.deleted:
        return None
    return {key: base64.b64decode(value) for key, value in (obj.get("data") or {}).items()}


async def create_secret(
    cluster: Any,
    name: str,
    data: dict[str, str],
    annotations: dict[str, str] | None = None,
    namespace: str = NAMESPACE,
    labels: dict[str, str] | None = None,
) -> None:
    """A Secret that lends itself to every store (`convostore.dev/allowed-stores: "*"`)
    unless `annotations` says otherwise."""
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    if annotations is None:
        annotations = {"convostore.dev/allowed-stores": "*"}
    await cluster.post(
        f"/api/v1/namespaces/{namespace}/secrets",
        json={
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "annotations": annotations,
                "labels": labels or {},
            },
            "data": encoded,
        },
    )


async def lend_url(
    cluster: Any, url: str, name: str = "endpoint", namespace: str = NAMESPACE
) -> dict[str, str]:
    """The store author's own Secret holding `url`, as a `urlSecretRef`: an endpoint a
    Secret names, which the operator connects to (one written in the spec alone it
    leaves to the sidecars)."""
    await create_secret(cluster, name, {"url": url}, namespace=namespace)
    return {"name": name, "key": "url"}


@pytest.fixture
async def full_default_pool() -> AsyncIterator[None]:
    """Every thread of the event loop's default executor busy until the test ends (its
    size is asyncio's: the CPU count plus 4, at most 32)."""
    release = threading.Event()
    loop = asyncio.get_running_loop()
    busy = [loop.run_in_executor(None, release.wait) for _ in range(min(32, CPUS + 4))]
    yield
    release.set()
    await asyncio.gather(*busy)
