"""Sidecar injection through the operator's real admission webhook, over HTTPS."""

from __future__ import annotations

import asyncio
import base64
import copy
import functools
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import pytest
from convostore import SidecarSession
from convostore.errors import UnauthorizedError
from convostore_operator.crd import DATA_DIR
from convostore_operator.inject import HEALTH_PORT, METRICS_PORT, SidecarTelemetry
from convostore_operator.kube import Kube
from convostore_operator.webhook import admit

from tests.operator.conftest import NAMESPACE, Operator, create_store, phase_is, secret_data
from tests.operator.deployed import WebhookTarget, admission
from tests.operator.emulator import RealisticEmulator
from tests.support import eventually, otlp_receiver

pytestmark = pytest.mark.kmock(cls=RealisticEmulator)


def agent_pod(annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "agent-", "annotations": annotations or {}},
        "spec": {
            "containers": [
                {"name": "agent", "image": "agent:1"},
                {"name": "tools", "image": "tools:1", "env": [{"name": "A", "value": "1"}]},
            ]
        },
    }


async def review(operator: Operator, pod: dict[str, Any]) -> dict[str, Any]:
    """Send one AdmissionReview as the API server would; return its `response`."""
    endpoint = operator.webhook  # type: ignore[attr-defined]
    target = WebhookTarget(endpoint.path, endpoint.hostname, endpoint.ca)
    return await admission(endpoint.url.removeprefix("https://"), target, pod, NAMESPACE)


def patched(pod: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    assert response["allowed"] is True
    if "patch" not in response:
        return pod
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    result: dict[str, Any] = jsonpatch.apply_patch(copy.deepcopy(pod), ops)
    return result


async def ready_stores(cluster: Any, operator: Operator, *specs: tuple[str, Any]) -> None:
    await operator()
    for name, spec in specs:
        await create_store(cluster, name, spec)
    for name, _ in specs:
        await eventually(functools.partial(phase_is, cluster, name, "Ready"))


async def test_injects_the_native_sidecar_with_config_keys_and_url(
    cluster: Any, operator: Operator
) -> None:
    await ready_stores(
        cluster,
        operator,
        ("chat", {"backend": "sqlite"}),
        ("vault", {"backend": "sqlite", "encryption": {"enabled": True}}),
    )
    pod = agent_pod({"convostore.dev/inject": "true", "convostore.dev/stores": "chat, vault"})
    result = patched(pod, await review(operator, pod))

    [sidecar] = result["spec"]["initContainers"]
    assert sidecar["name"] == "convostore"
    assert sidecar["image"] == "convostore:test"
    assert sidecar["restartPolicy"] == "Always"
    args = sidecar["args"]
    assert args[:3] == ["sidecar", "--socket", "/var/run/convostore/sidecar.sock"]
    assert "--no-tcp" in args, "the socket alone: no port for every container of the pod"
    assert args[args.index("--issue-token") + 1] == "/var/run/convostore-token/token"
    configs = [args[i + 1] for i, arg in enumerate(args) if arg == "--config"]
    assert configs == [
        "/etc/convostore/stores/chat/config.yaml",
        "/etc/convostore/stores/vault/config.yaml",
    ]
    security = sidecar["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}

    volumes = {v["name"]: v for v in result["spec"]["volumes"]}
    assert volumes["convostore-store-chat"]["secret"]["secretName"] == "chat-convostore"
    assert volumes["convostore-keys-vault"]["secret"]["secretName"] == "vault-convostore-keys"
    assert "emptyDir" in volumes["convostore-socket"]
    assert volumes["convostore-token"]["emptyDir"]["medium"] == "Memory"
    assert volumes["convostore-data"]["emptyDir"] == {"sizeLimit": "1Gi"}, (
        "embedded SQLite needs a writable dir, bounded"
    )

    agent, tools = result["spec"]["containers"]
    env = {e["name"]: e["value"] for e in agent["env"]}
    assert env["CONVOSTORE_URL"] == "unix:///var/run/convostore/sidecar.sock"
    assert env["CONVOSTORE_TOKEN_FILE"] == "/var/run/convostore-token/token"
    assert {"name": "convostore-socket", "mountPath": "/var/run/convostore", "readOnly": True} in (
        agent["volumeMounts"]
    )
    assert tools == pod["spec"]["containers"][1], "a container not named gets nothing"
    assert len(result["metadata"]["annotations"]["convostore.dev/config-hash"]) == 16


async def test_only_the_containers_named_may_call_the_sidecar(cluster: Any, kube: Kube) -> None:
    await create_store(cluster, "chat", {"backend": "sqlite"})

    async def callers(annotations: dict[str, str]) -> list[str]:
        pod = agent_pod(
            {"convostore.dev/inject": "true", "convostore.dev/stores": "chat", **annotations}
        )
        result = patched(pod, await admit({"namespace": NAMESPACE, "object": pod}, kube, "img"))
        return [
            c["name"]
            for c in result["spec"]["containers"]
            if any(m["name"] == "convostore-token" for m in c.get("volumeMounts", []))
        ]

    assert await callers({}) == ["agent"], "the first container by default"
    assert await callers({"kubectl.kubernetes.io/default-container": "tools"}) == ["tools"]
    assert await callers({"convostore.dev/containers": "tools, agent"}) == ["agent", "tools"]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"metadata": {"annotations": {"convostore.dev/containers": "ghost"}}}, "'ghost'"),
        ({"metadata": {"annotations": {"convostore.dev/containers": " , "}}}, "no container"),
        ({"spec": {"hostNetwork": True}}, "host's network"),
        ({"spec": {"shareProcessNamespace": True}}, "shares its process namespace"),
        (
            {"metadata": {"annotations": {"convostore.dev/data-size-limit": "1Gi; rm -rf"}}},
            "convostore.dev/data-size-limit must be a size such as 512Mi",
        ),
        ({"metadata": {"annotations": {"convostore.dev/data-size-limit": "0Gi"}}}, "got '0Gi'"),
    ],
)
async def test_pods_that_cannot_have_the_sidecar_safely_are_denied_with_the_reason(
    cluster: Any, kube: Kube, change: dict[str, Any], reason: str
) -> None:
    await create_store(cluster, "chat", {"backend": "sqlite"})
    pod = agent_pod({"convostore.dev/inject": "true", "convostore.dev/stores": "chat"})
    pod["metadata"]["annotations"].update(change.get("metadata", {}).get("annotations", {}))
    pod["spec"].update(change.get("spec", {}))
    answer = await admit({"namespace": NAMESPACE, "object": pod}, kube, "img")
    assert answer["allowed"] is False
    assert reason in answer["status"]["message"]


async def admitted_with(cluster: Any, kube: Kube, annotation: str, value: str) -> Any:
    """A pod asking for a SQLite store, with one more annotation, as the webhook patches it."""
    await create_store(cluster, "chat", {"backend": "sqlite"})
    annotations = {
        "convostore.dev/inject": "true",
        "convostore.dev/stores": "chat",
        annotation: value,
    }
    pod = agent_pod(annotations)
    return patched(pod, await admit({"namespace": NAMESPACE, "object": pod}, kube, "img"))


async def test_the_sqlite_volume_takes_the_size_the_pod_asks_for(cluster: Any, kube: Kube) -> None:
    result = await admitted_with(cluster, kube, "convostore.dev/data-size-limit", "5Gi")
    volumes = {v["name"]: v for v in result["spec"]["volumes"]}
    assert volumes["convostore-data"]["emptyDir"] == {"sizeLimit": "5Gi"}


async def test_tcp_is_served_only_when_the_pod_asks(cluster: Any, kube: Kube) -> None:
    result = await admitted_with(cluster, kube, "convostore.dev/tcp", "true")
    [sidecar] = result["spec"]["initContainers"]
    assert "--no-tcp" not in sidecar["args"]
    assert "--issue-token" in sidecar["args"], "the token still guards the port"


async def test_injection_is_idempotent(cluster: Any, operator: Operator) -> None:
    await ready_stores(cluster, operator, ("chat", {"backend": "sqlite"}))
    pod = agent_pod({"convostore.dev/inject": "true", "convostore.dev/stores": "chat"})
    once = patched(pod, await review(operator, pod))
    twice = patched(once, await review(operator, once))
    assert twice == once
    assert len(twice["spec"]["initContainers"]) == 1


@pytest.mark.parametrize(
    "stores",
    ["missing", "chat,missing", "../../etc/passwd", "x" * 5000, 'chat,{"a":1}'],
)
async def test_a_pod_naming_an_unknown_store_is_denied_by_name(
    cluster: Any, operator: Operator, stores: str
) -> None:
    await ready_stores(cluster, operator, ("chat", {"backend": "sqlite"}))
    pod = agent_pod({"convostore.dev/inject": "true", "convostore.dev/stores": stores})
    response = await review(operator, pod)
    assert response["allowed"] is False
    assert "patch" not in response
    message = response["status"]["message"]
    assert "no ConversationStore named" in message
    assert NAMESPACE in message
    assert "'chat'" not in message, "only the missing names are reported"


async def test_pods_that_do_not_ask_are_left_alone(cluster: Any, operator: Operator) -> None:
    await ready_stores(cluster, operator, ("chat", {"backend": "sqlite"}))
    for asked in (None, {"convostore.dev/inject": "false"}, {"other": "true"}):
        pod = agent_pod(asked)
        assert patched(pod, await review(operator, pod)) == pod


@pytest.mark.parametrize(
    ("spec", "writable"),
    [
        ({"backend": "sqlite"}, True),
        ({"backend": "openai", "openai": {"apiKeySecretRef": {"name": "k", "key": "k"}}}, True),
        (
            {
                "backend": "openai",
                "openai": {
                    "apiKeySecretRef": {"name": "k", "key": "k"},
                    "mapping": {"backend": "redis", "redis": {"url": "redis://r:6379"}},
                },
            },
            False,
        ),
        ({"backend": "redis", "redis": {"url": "redis://r:6379"}}, False),
    ],
    ids=["sqlite", "openai-default-map", "openai-redis-map", "redis"],
)
async def test_stores_that_keep_a_sqlite_file_get_the_writable_directory(
    cluster: Any, kube: Kube, spec: dict[str, Any], writable: bool
) -> None:
    """Injected pods have a read-only root: every store with a SQLite file (its own, or
    an openai store's session map) needs the data volume where its path points."""
    await create_store(cluster, "chat", spec)
    pod = agent_pod({"convostore.dev/inject": "true", "convostore.dev/stores": "chat"})
    result = patched(pod, await admit({"namespace": NAMESPACE, "object": pod}, kube, "img"))
    volumes = {v["name"] for v in result["spec"]["volumes"]}
    [sidecar] = result["spec"]["initContainers"]
    mounts = {m["mountPath"] for m in sidecar["volumeMounts"]}
    assert ("convostore-data" in volumes) is writable
    assert (DATA_DIR in mounts) is writable


def on_disk(path: str, mounts: dict[str, Path]) -> str:
    """A path inside the pod, where the test put the volume mounted there."""
    for mount_path, where in sorted(mounts.items(), key=lambda m: -len(m[0])):
        if path == mount_path or path.startswith(mount_path + "/"):
            return str(where) + path[len(mount_path) :]
    return path


async def test_an_injected_pod_runs_and_only_its_named_container_gets_in(
    cluster: Any, operator: Operator, tmp_path: Path
) -> None:
    """The injected sidecar started with its own args, its volumes as directories (the
    kubelet's part): the named container's env reaches it; the socket refuses others;
    its probes are HTTP requests, as the kubelet makes them, to a listener that serves
    the probes alone (no probe starts a process)."""
    await ready_stores(cluster, operator, ("chat", {"backend": "sqlite"}))
    pod = agent_pod({"convostore.dev/inject": "true", "convostore.dev/stores": "chat"})
    result = patched(pod, await review(operator, pod))
    [sidecar] = result["spec"]["initContainers"]
    mounts, args = mounted(cluster, sidecar, tmp_path)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "convostore", *args, cwd=tmp_path
    )
    try:
        agent = result["spec"]["containers"][0]
        env = {e["name"]: on_disk(e["value"].removeprefix("unix://"), mounts) for e in agent["env"]}
        url, token_file = f"unix://{env['CONVOSTORE_URL']}", env["CONVOSTORE_TOKEN_FILE"]
        await eventually(lambda: Path(token_file).exists() and Path(url[7:]).exists(), within=30)
        session = SidecarSession("u1", "chat", url=url, token_file=token_file)
        await session.add_items([{"role": "user", "content": "hello"}])
        assert await session.get_items() == [{"role": "user", "content": "hello"}]
        with pytest.raises(UnauthorizedError):
            await SidecarSession("u1", "chat", url=url).get_items()
        await probed_as_the_kubelet_probes(sidecar)
    finally:
        process.terminate()
        assert await process.wait() == 0


def mounted(
    cluster: Any, sidecar: dict[str, Any], tmp_path: Path
) -> tuple[dict[str, Path], list[str]]:
    """The kubelet's part for the injected `chat` sidecar: each volume a directory, the
    store's config Secret written into its own (its data directory pointed at the
    one made here), and the container's args with the mount paths made local."""
    mounts = {m["mountPath"]: tmp_path / m["name"] for m in sidecar["volumeMounts"]}
    for where in mounts.values():
        where.mkdir()
    for name, data in (secret_data(cluster, "chat-convostore") or {}).items():
        if name == "config.yaml":
            data = data.replace(DATA_DIR.encode(), str(mounts[DATA_DIR]).encode())
        (mounts["/etc/convostore/stores/chat"] / name).write_bytes(data)
    return mounts, [on_disk(arg, mounts) for arg in sidecar["args"]]


async def probed_as_the_kubelet_probes(sidecar: dict[str, Any], pod_ip: str = "127.0.0.1") -> None:
    probes = [sidecar[kind] for kind in ("startupProbe", "livenessProbe")]
    assert not [p for p in probes if "exec" in p], "an exec probe starts a process each time"
    ports = {probe["httpGet"]["port"] for probe in probes}
    async with aiohttp.ClientSession() as http:
        for probe in probes:
            get = probe["httpGet"]
            async with http.get(f"http://{pod_ip}:{get['port']}{get['path']}") as resp:
                assert resp.status == 200, probe
        [port] = ports
        async with http.get(f"http://{pod_ip}:{port}/readyz") as resp:
            assert (resp.status, await resp.json()) == (200, {"ready": True})  # no store names
        async with http.get(f"http://{pod_ip}:{port}/v1/stores/chat/sessions/u1/items") as resp:
            assert resp.status == 404  # the API is not there
        async with http.get(f"http://{pod_ip}:{port}/metrics") as resp:
            assert resp.status == 404


def kubelet_env(container: dict[str, Any], pod_name: str) -> dict[str, str]:
    """The container's env as the kubelet gives it: field refs read off the pod, and
    `$(NAME)` replaced by the variables defined before it."""
    fields = {"metadata.name": pod_name, "metadata.namespace": NAMESPACE}
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        value = entry.get("value")
        if value is None:
            value = fields[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        env[entry["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], value)
    return env


async def test_telemetry_reaches_the_injected_sidecar_as_the_chart_asks(
    cluster: Any, operator: Operator, kube: Kube, tmp_path: Path
) -> None:
    """With the chart's podMonitor and tracing on, the operator injects sidecars that
    serve /metrics on the port the PodMonitor scrapes by name, and send their traces to
    the collector, named by pod and namespace; the probes' answers are unchanged."""
    await ready_stores(cluster, operator, ("chat", {"backend": "sqlite"}))
    async with otlp_receiver() as receiver:
        telemetry = SidecarTelemetry(otlp_endpoint=receiver.url, metrics=True)
        pod = agent_pod({"convostore.dev/inject": "true", "convostore.dev/stores": "chat"})
        asked = {"namespace": NAMESPACE, "object": pod}
        result = patched(pod, await admit(asked, kube, "img", None, telemetry))
        [sidecar] = result["spec"]["initContainers"]
        assert sidecar["ports"] == [{"name": METRICS_PORT, "containerPort": HEALTH_PORT}]
        mounts, args = mounted(cluster, sidecar, tmp_path)
        env = {**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "50", **kubelet_env(sidecar, "agent-1")}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "convostore", *args, cwd=tmp_path, env=env
        )
        try:
            agent = result["spec"]["containers"][0]
            paths = {
                e["name"]: on_disk(e["value"].removeprefix("unix://"), mounts) for e in agent["env"]
            }
            url, token_file = f"unix://{paths['CONVOSTORE_URL']}", paths["CONVOSTORE_TOKEN_FILE"]
            await eventually(lambda: Path(token_file).exists(), within=30)
            session = SidecarSession("u1", "chat", url=url, token_file=token_file)
            await session.add_items([{"role": "user", "content": "hello"}])
            async with aiohttp.ClientSession() as http:
                metrics = f"http://127.0.0.1:{HEALTH_PORT}/metrics"
                async with http.get(metrics) as resp:
                    assert resp.status == 200
                    exposed = await resp.text()
            assert 'convostore_items_appended_total{store="chat"} 1.0' in exposed
            assert "u1" not in exposed, "no session id in the metrics"
            await eventually(lambda: any(s.name.startswith("POST") for s in receiver.spans))
            resource = receiver.resources[0]
            assert resource["service.name"] == "convostore-sidecar"
            assert (resource["k8s.pod.name"], resource["k8s.namespace.name"]) == (
                "agent-1",
                NAMESPACE,
            )
        finally:
            process.terminate()
            assert await process.wait() == 0
