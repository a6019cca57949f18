"""The operator as the chart deploys it: the rendered Deployment's replicas, each a pod
on the container engine (`tests.containers.Pod`) running the built operator image with
the chart's args, env, security context, limits and volumes, against the emulated API
server served over HTTP and reached from the containers through the engine's network.

Only what a cluster would provide is substituted: the API server address (a kubeconfig
instead of the in-cluster service account) and the downward-API values (pod name and
namespace). Everything else comes from `helm template` and the image.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import os
import ssl
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.chart.tools import ROOT, helm_binary
from tests.containers import OPERATOR_IMAGE, Container, Pod, bridge_gateway, images
from tests.servers import free_port

CHART = ROOT / "charts" / "convostore"
RELEASE, RELEASE_NAMESPACE = "convostore", "convostore-system"


def render_chart(*sets: str) -> list[dict[str, Any]]:
    home = Path(os.environ.get("TMPDIR", "/tmp")) / f"helm-{os.getpid()}"
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home),
        "HELM_CONFIG_HOME": str(home),
        "HELM_DATA_HOME": str(home),
    }
    args = [str(helm_binary()), "template", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE]
    for value in sets:
        args += ["--set", value]
    output = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(output) if doc]


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [found] = [doc for doc in docs if doc["kind"] == kind]
    return found


KUBECONFIG = "/var/run/convostore-test/kubeconfig"


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


async def relay_tcp_to_tcp(host: str, port: int, to_host: str, to_port: int) -> asyncio.Server:
    """A listener on host:port that joins each connection to a new one to to_host:to_port:
    the emulator listens on the host's loopback, which containers cannot reach."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer_reader, peer_writer = await asyncio.open_connection(to_host, to_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, peer_writer), _pipe(peer_reader, writer))

    return await asyncio.start_server(handle, host, port)


@dataclass
class Replica:
    """One replica's pod: the operator container from the built image, in a pod of its
    own (its own address, so every replica binds the chart's ports)."""

    name: str
    pod: Pod
    container: Container

    @property
    def log(self) -> str:
        return self.container.logs()

    def terminate(self) -> None:
        """SIGTERM from the engine to the container's PID 1, as the kubelet sends it."""
        self.container.kill("SIGTERM")

    def crash(self) -> None:
        """SIGKILL: a node lost, no chance to release anything."""
        self.container.kill("SIGKILL")

    async def wait(self) -> int:
        return await self.container.wait()

    async def exposed(self, port: int) -> str:
        """The URL origin of the replica's `port`, at its pod's address."""
        return f"{self.pod.ip}:{port}"

    def close(self) -> None:
        self.pod.close()


class Deployment:
    """The chart's operator Deployment, its replicas run from the operator image."""

    def __init__(self, docs: list[dict[str, Any]], api_url: str) -> None:
        self.docs = docs
        self.manifest = only(docs, "Deployment")
        self.pod_spec = self.manifest["spec"]["template"]["spec"]
        [self.container] = self.pod_spec["containers"]
        self.api_url = api_url
        self.replicas: list[Replica] = []
        self.api_relay: asyncio.Server | None = None

    @property
    def grace_seconds(self) -> int:
        return int(self.pod_spec.get("terminationGracePeriodSeconds", 30))

    @property
    def env(self) -> dict[str, str]:
        return {e["name"]: e.get("value", "") for e in self.container.get("env", [])}

    def _pod_manifest(self) -> dict[str, Any]:
        """The Deployment's pod template, given what a cluster gives every pod: a way to
        the API server (a kubeconfig here, for the service account's in-cluster one)."""
        spec = copy.deepcopy(self.pod_spec)
        spec["volumes"].append({"name": "kubeconfig", "secret": {"secretName": "kubeconfig"}})
        [container] = spec["containers"]
        container["env"].append({"name": "KUBECONFIG", "value": KUBECONFIG})
        mount = {"name": "kubeconfig", "mountPath": Path(KUBECONFIG).parent.as_posix()}
        container["volumeMounts"].append({**mount, "readOnly": True})
        return {"metadata": self.manifest["spec"]["template"]["metadata"], "spec": spec}

    async def start(self) -> None:
        images()
        host, port = self.api_url.removeprefix("http://").rstrip("/").split(":")
        gateway, relay_port = bridge_gateway(), free_port()
        self.api_relay = await relay_tcp_to_tcp(gateway, relay_port, host, int(port))
        kubeconfig = (
            "kind: Config\ncurrent-context: cluster\n"
            f"clusters: [{{name: cluster, cluster: {{server: 'http://{gateway}:{relay_port}'}}}}]\n"
            "contexts: [{name: cluster, context: {cluster: cluster}}]\nusers: []\n"
        )
        manifest = self._pod_manifest()
        for index in range(int(self.manifest["spec"]["replicas"])):
            name = f"{self.manifest['metadata']['name']}-{uuid.uuid4().hex[:5]}-{index}"
            downward = {"metadata.name": name, "metadata.namespace": RELEASE_NAMESPACE}
            pod = Pod(manifest, {"kubeconfig": {"kubeconfig": kubeconfig.encode()}}, downward)
            [spec] = manifest["spec"]["containers"]
            self.replicas.append(Replica(name, pod, pod.run(spec, OPERATOR_IMAGE)))

    async def close(self) -> None:
        for replica in self.replicas:
            replica.close()
        if self.api_relay is not None:
            self.api_relay.close()


async def probe(replica: Replica, path: str) -> int:
    """What the kubelet's HTTP probe on `path` gets from the replica's health port."""
    origin = await replica.exposed(8080)
    async with aiohttp.ClientSession() as http, http.get(f"http://{origin}{path}") as answer:
        return answer.status


@dataclass(frozen=True)
class WebhookTarget:
    path: str
    hostname: str
    ca_bundle: bytes


def webhook_target(docs: list[dict[str, Any]], stored: dict[str, Any]) -> WebhookTarget:
    """Where the API server would send admissions, and the CA it would trust: the Service
    from the rendered configuration, the path (with its token) and the caBundle as the
    operator set them."""
    [hook] = only(docs, "MutatingWebhookConfiguration")["webhooks"]
    service = hook["clientConfig"]["service"]
    [live] = stored["webhooks"]
    return WebhookTarget(
        path=live["clientConfig"]["service"]["path"],
        hostname=f"{service['name']}.{service['namespace']}.svc",
        ca_bundle=base64.b64decode(live["clientConfig"]["caBundle"]),
    )


async def admission(
    origin: str, target: WebhookTarget, pod: dict[str, Any], namespace: str
) -> dict[str, Any]:
    """One AdmissionReview as the API server sends it, over TLS verified against the
    caBundle for the Service's name; the `response`."""
    uid = str(uuid.uuid4())
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE",
            "namespace": namespace,
            "object": pod,
        },
    }
    tls = ssl.create_default_context(cadata=target.ca_bundle.decode())
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"https://{origin}{target.path}",
            json=review,
            ssl=tls,
            server_hostname=target.hostname,
        ) as answer,
    ):
        assert answer.status == 200, await answer.text()
        payload = await answer.json()
    response: dict[str, Any] = payload["response"]
    assert response["uid"] == uid
    return response
