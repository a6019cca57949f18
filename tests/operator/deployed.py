"""The operator as the chart deploys it: the rendered Deployment's replicas, command,
args and env, each replica a real `convostore` process in a network and PID namespace of
its own (`sandbox.py`), against the emulated API server served over HTTP.

Only what a cluster would provide is substituted: the API server address (a kubeconfig
instead of the in-cluster service account) and the downward-API values (pod name and
namespace). Everything else comes from `helm template` and the Dockerfile.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.chart.tools import ROOT, helm_binary
from tests.operator.sandbox import relay_tcp_to_unix, relay_unix_to_tcp
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


def entrypoint() -> list[str]:
    """The image's ENTRYPOINT, resolved to the installed command of this environment."""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("ENTRYPOINT "):
            command: list[str] = json.loads(line.removeprefix("ENTRYPOINT "))
            found = shutil.which(command[0], path=str(Path(sys.executable).parent))
            assert found, f"{command[0]} is not installed beside {sys.executable}"
            return [found, *command[1:]]
    raise AssertionError("the Dockerfile has no ENTRYPOINT")


@dataclass
class Replica:
    pod: str
    directory: Path
    process: asyncio.subprocess.Process
    relays: list[asyncio.Server] = field(default_factory=list)
    origins: dict[int, str] = field(default_factory=dict)

    @property
    def log(self) -> str:
        return (self.directory / "log").read_text(errors="replace")

    def pid1(self) -> int:
        """The host PID of the namespace's PID 1 (the operator), child of `unshare`."""
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        assert children, "the replica's PID 1 is gone"
        return int(children[0])

    def terminate(self) -> None:
        """SIGTERM to PID 1, as the kubelet sends it when the pod is deleted."""
        os.kill(self.pid1(), signal.SIGTERM)

    async def exposed(self, port: int) -> str:
        """A host URL origin that reaches the replica's `port` on its own loopback."""
        if port not in self.origins:
            local = free_port()
            socket = self.directory / f"{port}.sock"
            self.relays.append(await relay_tcp_to_unix("127.0.0.1", local, socket))
            self.origins[port] = f"127.0.0.1:{local}"
        return self.origins[port]

    async def close(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        for relay in self.relays:
            relay.close()


class Deployment:
    """The chart's operator Deployment, run as processes."""

    def __init__(self, docs: list[dict[str, Any]], api_url: str, workdir: Path) -> None:
        self.docs = docs
        self.manifest = only(docs, "Deployment")
        self.pod_spec = self.manifest["spec"]["template"]["spec"]
        [self.container] = self.pod_spec["containers"]
        self.api_url = api_url
        self.workdir = workdir
        self.replicas: list[Replica] = []
        self.api_relay: asyncio.Server | None = None

    @property
    def grace_seconds(self) -> int:
        return int(self.pod_spec.get("terminationGracePeriodSeconds", 30))

    @property
    def env(self) -> dict[str, str]:
        return {e["name"]: e.get("value", "") for e in self.container.get("env", [])}

    def _pod_env(self, pod: str) -> dict[str, str]:
        downward = {"metadata.name": pod, "metadata.namespace": RELEASE_NAMESPACE}
        env = {}
        for item in self.container.get("env", []):
            if "value" in item:
                env[item["name"]] = item["value"]
            else:
                env[item["name"]] = downward[item["valueFrom"]["fieldRef"]["fieldPath"]]
        return env

    async def start(self) -> None:
        host, port = self.api_url.removeprefix("http://").rstrip("/").split(":")
        api_socket = self.workdir / "api.sock"
        self.api_relay = await relay_unix_to_tcp(api_socket, host, int(port))
        command = [*entrypoint(), *self.container.get("args", [])]
        for index in range(int(self.manifest["spec"]["replicas"])):
            pod = f"{self.manifest['metadata']['name']}-{uuid.uuid4().hex[:5]}-{index}"
            directory = self.workdir / pod
            directory.mkdir()
            (directory / "kubeconfig").write_text(
                "kind: Config\ncurrent-context: cluster\n"
                "clusters: [{name: cluster, cluster: {server: 'http://127.0.0.1:6443'}}]\n"
                "contexts: [{name: cluster, context: {cluster: cluster}}]\nusers: []\n"
            )
            env = {
                "PATH": os.environ["PATH"],
                "PYTHONUNBUFFERED": "1",
                "KUBECONFIG": str(directory / "kubeconfig"),
                **self._pod_env(pod),
            }
            with (directory / "log").open("wb") as log:
                process = await asyncio.create_subprocess_exec(
                    *["unshare", "--net", "--pid", "--fork", "--kill-child"],
                    *[sys.executable, "-m", "tests.operator.sandbox"],
                    *["--dir", str(directory), "--api-socket", str(api_socket), "--"],
                    *command,
                    cwd=ROOT,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            self.replicas.append(Replica(pod, directory, process))

    async def close(self) -> None:
        for replica in self.replicas:
            await replica.close()
        if self.api_relay is not None:
            self.api_relay.close()


async def healthz(replica: Replica) -> int:
    origin = await replica.exposed(8080)
    async with aiohttp.ClientSession() as http, http.get(f"http://{origin}/healthz") as answer:
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
