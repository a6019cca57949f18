"""The sidecar image run as an injected pod runs it: the operator's webhook patches an
agent pod, and the patched manifest runs on the container engine (`tests.containers.Pod`)
with the sidecar's args, user, read-only root, dropped capabilities, memory limit and
volumes; the agent is a second container that shares the socket and token volumes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from convostore_operator.inject import SOCKET_URL

from tests.containers import SIDECAR_IMAGE, Container, EngineError, Pod, images
from tests.operator.conftest import Operator, secret_data
from tests.operator.emulator import RealisticEmulator
from tests.operator.test_webhook import patched, probed_as_the_kubelet_probes, ready_stores, review
from tests.support import eventually

pytestmark = pytest.mark.kmock(cls=RealisticEmulator)
AGENT_UID = 1000
WRITER = """
import asyncio, sys
from convostore import SidecarSession

async def main():
    session = SidecarSession(sys.argv[1], "chat", retries=0)
    for n in range(int(sys.argv[2])):
        try:
            await session.add_items([{"role": "user", "content": f"m{n}"}])
        except Exception as error:
            print("failed", n, type(error).__name__, flush=True)
            return
        print("acked", n, flush=True)

asyncio.run(main())
"""
READER = """
import asyncio, json, sys
from convostore import SidecarSession

print(json.dumps(asyncio.run(SidecarSession(sys.argv[1], "chat").get_items())))
"""
OUTSIDER = """
import json, os, socket, urllib.error, urllib.request

found = {}
try:
    socket.socket(socket.AF_UNIX).connect(os.environ["SOCKET"])
    found["socket"] = "connected"
except OSError as error:
    found["socket"] = type(error).__name__
for port in (8790, 8791):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/stores/chat/sessions/u1/items")
        found[port] = 200
    except urllib.error.HTTPError as error:
        found[port] = error.code
    except OSError as error:
        found[port] = type(error).__name__
print(json.dumps(found))
"""


@pytest.fixture
def pod_of(cluster: Any) -> Iterator[Any]:
    """Runs patched pod manifests on the engine, with the Secrets the operator rendered."""
    images()
    pods: list[Pod] = []

    def run(manifest: dict[str, Any]) -> Pod:
        names = [v["secret"]["secretName"] for v in manifest["spec"]["volumes"] if "secret" in v]
        secrets = {name: secret_data(cluster, name) or {} for name in names}
        pods.append(Pod(manifest, secrets))
        return pods[-1]

    yield run
    for pod in pods:
        for container in pod.containers[1:]:
            print(f"--- {container.name}\n{container.logs()}")
        pod.close()


def agent_pod() -> dict[str, Any]:
    """An agent pod as its author writes it: one container, not root, read-only root."""
    security = {"runAsUser": AGENT_UID, "runAsGroup": AGENT_UID, "readOnlyRootFilesystem": True}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "agent-",
            "annotations": {"convostore.dev/inject": "true", "convostore.dev/stores": "chat"},
        },
        "spec": {
            "containers": [{"name": "agent", "image": "agent:1", "securityContext": security}]
        },
    }


def as_agent(manifest: dict[str, Any], code: str, *args: str) -> dict[str, Any]:
    """The pod's agent container, running `code` with the client library."""
    [agent] = manifest["spec"]["containers"]
    return {**agent, "command": ["python", "-c", code, *args]}


async def finished(container: Container) -> str:
    code = await asyncio.wait_for(container.wait(), 60)
    assert code == 0, container.logs()
    return container.logs()


async def injected(operator: Operator, cluster: Any) -> dict[str, Any]:
    await ready_stores(cluster, operator, ("chat", {"backend": "sqlite"}))
    return patched(agent_pod(), await review(operator, agent_pod()))


async def started(pod: Pod, manifest: dict[str, Any]) -> Container:
    [spec] = manifest["spec"]["initContainers"]
    sidecar = pod.run(spec, SIDECAR_IMAGE)
    await until_started(pod, sidecar, spec)
    return sidecar


async def until_started(pod: Pod, sidecar: Container, spec: dict[str, Any]) -> None:
    """Until the sidecar's startup probe, sent as the kubelet sends it, succeeds."""
    probe = spec["startupProbe"]["httpGet"]

    async def probe_succeeds() -> bool:
        if not sidecar.running:
            raise EngineError(f"the sidecar stopped:\n{sidecar.logs()}")
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://{pod.ip}:{probe['port']}{probe['path']}") as answer,
            ):
                return answer.status == 200
        except aiohttp.ClientError:
            return False

    await eventually(probe_succeeds, within=60)


async def test_the_agent_container_reaches_the_sidecar_image_over_the_shared_socket(
    cluster: Any, operator: Operator, pod_of: Any
) -> None:
    manifest = await injected(operator, cluster)
    pod: Pod = pod_of(manifest)
    sidecar = await started(pod, manifest)
    assert sidecar.inspect("{{.Config.User}}") == "65532:65532"
    assert sidecar.inspect("{{.HostConfig.ReadonlyRootfs}}") == "true"
    assert sidecar.inspect("{{.HostConfig.Memory}}") == str(256 * 1024 * 1024)

    writer = pod.run(as_agent(manifest, WRITER, "u1", "3"), SIDECAR_IMAGE)
    assert (await finished(writer)).splitlines() == ["acked 0", "acked 1", "acked 2"]
    reader = pod.run(as_agent(manifest, READER, "u1"), SIDECAR_IMAGE)
    items = json.loads(await finished(reader))
    assert [item["content"] for item in items] == ["m0", "m1", "m2"]

    [spec] = manifest["spec"]["initContainers"]
    await probed_as_the_kubelet_probes(spec, pod.ip)

    outsider_spec = {
        "name": "outsider",
        "command": ["python", "-c", OUTSIDER],
        "env": [{"name": "SOCKET", "value": SOCKET_URL.removeprefix("unix://")}],
        "securityContext": {"runAsUser": AGENT_UID, "readOnlyRootFilesystem": True},
    }
    found = json.loads(await finished(pod.run(outsider_spec, SIDECAR_IMAGE)))
    assert found == {"socket": "FileNotFoundError", "8790": "URLError", "8791": 404}, found


async def test_sigterm_from_the_engine_stops_the_sidecar_cleanly_and_loses_nothing(
    cluster: Any, operator: Operator, pod_of: Any
) -> None:
    """The kubelet stops a native sidecar with SIGTERM after the app: it finishes what it
    answers, exits 0 inside the grace period, and everything it acknowledged is there
    when it starts again on the same volumes."""
    manifest = await injected(operator, cluster)
    pod: Pod = pod_of(manifest)
    sidecar = await started(pod, manifest)
    writer = pod.run(as_agent(manifest, WRITER, "u1", "100000"), SIDECAR_IMAGE)
    await eventually(lambda: writer.logs().count("acked") >= 50, within=60)

    sidecar.kill("SIGTERM")
    assert await asyncio.wait_for(sidecar.wait(), 30) == 0, sidecar.logs()
    assert "Traceback" not in sidecar.logs(), sidecar.logs()
    await asyncio.wait_for(writer.wait(), 60)
    acked = [line for line in writer.logs().splitlines() if line.startswith("acked")]
    assert "failed" in writer.logs(), "the writer outlived the sidecar"

    sidecar.start()
    await until_started(pod, sidecar, manifest["spec"]["initContainers"][0])
    reader = pod.run(as_agent(manifest, READER, "u1"), SIDECAR_IMAGE)
    stored = [item["content"] for item in json.loads(await finished(reader))]
    expected = [f"m{n}" for n in range(len(acked))]
    assert stored[: len(acked)] == expected, "an acknowledged write was lost"
    assert len(stored) - len(acked) in (0, 1), "only the write cut short may or may not be there"
