"""The operator exactly as `helm install` runs it: every replica the chart's Deployment
asks for, a container of the built image started with its args, env and security
context, against the API server emulator over HTTP (see `deployed.py`); with the chart's
defaults and with the webhook disabled."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import itertools
import json
import time
from typing import Any

import aiohttp
import pytest
import yaml

from tests.containers import EngineError
from tests.operator.conftest import NAMESPACE, create_store, phase_is, store_object
from tests.operator.deployed import (
    RELEASE_NAMESPACE,
    Deployment,
    Replica,
    WebhookTarget,
    admission,
    probe,
    render_chart,
    webhook_target,
)
from tests.operator.emulator import LEASES, RealisticEmulator
from tests.support import eventually

pytestmark = pytest.mark.kmock(cls=RealisticEmulator)
HOOKS = "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
AGENT_POD = {
    "metadata": {
        "generateName": "agent-",
        "annotations": {"convostore.dev/inject": "true", "convostore.dev/stores": "chat"},
    },
    "spec": {"containers": [{"name": "agent", "image": "agent:1"}]},
}


@pytest.fixture
async def deploy(cluster: Any) -> Any:
    """Renders the chart with these `--set` values, applies what the operator reads, and
    starts the Deployment's replicas."""
    started: list[Deployment] = []

    async def start(*sets: str) -> Deployment:
        docs = render_chart(*sets)
        for doc in docs:
            if doc["kind"] == "MutatingWebhookConfiguration":
                await cluster.post(
                    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
                    json=doc,
                )
        deployment = Deployment(docs, str(cluster.url))
        started.append(deployment)
        await deployment.start()
        return deployment

    yield start
    for deployment in started:
        for replica in deployment.replicas:
            print(f"--- {replica.name}\n{replica.log}")
        await deployment.close()


def lease_holder(cluster: Any, deployment: Deployment) -> str | None:
    lease = cluster.objects[LEASES, RELEASE_NAMESPACE, deployment.env["CONVOSTORE_LEASE"]]
    return None if lease.deleted else lease["spec"].get("holderIdentity")


def leader_of(cluster: Any, deployment: Deployment) -> Replica | None:
    holder = lease_holder(cluster, deployment)
    return next((r for r in deployment.replicas if r.name == holder), None)


def rendered_config(cluster: Any, store: str) -> dict[str, Any]:
    secret = cluster.objects["v1/secrets", NAMESPACE, f"{store}-convostore"]
    config: dict[str, Any] = yaml.safe_load(base64.b64decode(secret["data"]["config.yaml"]))
    return config


def is_injected(response: dict[str, Any]) -> bool:
    if response.get("allowed") is not True or "patch" not in response:
        return False
    ops = json.loads(base64.b64decode(response["patch"]))
    spec = next(op["value"] for op in ops if op["path"] == "/spec")
    return [c["name"] for c in spec.get("initContainers", [])] == ["convostore"]


async def keep_admitting(
    replicas: list[Replica], target: WebhookTarget, answers: list[dict[str, Any]]
) -> None:
    """Send admissions to these replicas in turn until cancelled, as the Service would."""
    while True:
        for replica in replicas:
            origin = await replica.exposed(9443)
            answers.append(await admission(origin, target, AGENT_POD, NAMESPACE))


async def stop_within_grace(deployment: Deployment, replica: Replica) -> float:
    """SIGTERM, then the process must end on its own, with 0, inside the pod's grace
    period (after which the kubelet would SIGKILL it); the seconds it took."""
    began = time.monotonic()
    replica.terminate()
    code = await asyncio.wait_for(replica.wait(), deployment.grace_seconds)
    assert code == 0, replica.log
    return time.monotonic() - began


@pytest.mark.parametrize(
    "values", [(), ("webhook.enabled=false",)], ids=["chart-defaults", "webhook-disabled"]
)
async def test_the_charts_deployment_reconciles_hands_over_and_stops(
    cluster: Any, deploy: Any, values: tuple[str, ...]
) -> None:
    deployment: Deployment = await deploy(*values)
    replicas = deployment.replicas
    assert len(replicas) == 2, "the chart's default is two replicas"
    webhook = any(doc["kind"] == "MutatingWebhookConfiguration" for doc in deployment.docs)
    assert webhook == (values == ())

    chart = next(doc for doc in deployment.docs if doc["kind"] == "Deployment")
    [container] = chart["spec"]["template"]["spec"]["containers"]
    ready_path = container["readinessProbe"]["httpGet"]["path"]
    for replica in replicas:  # ready as the kubelet sees it: then its webhook serves
        await eventually(functools.partial(_answers, replica, ready_path), within=60)
    leader = await eventually(lambda: leader_of(cluster, deployment), within=60)
    await create_store(cluster, "chat", {"backend": "sqlite"})
    await eventually(functools.partial(phase_is, cluster, "chat", "Ready"), within=60)
    assert rendered_config(cluster, "chat")["stores"]["chat"]["backend"] == "sqlite"

    answers: list[dict[str, Any]] = []
    admitting: asyncio.Task[None] | None = None
    if webhook:
        target = webhook_target(deployment.docs, cluster.objects[HOOKS, None, "convostore"])
        for replica in replicas:
            response = await admission(await replica.exposed(9443), target, AGENT_POD, NAMESPACE)
            assert is_injected(response), f"{replica.name} answered {response}"
        survivors = [r for r in replicas if r is not leader]
        admitting = asyncio.create_task(keep_admitting(survivors, target, answers))

    stopped_in = await stop_within_grace(deployment, leader)
    began = time.monotonic()
    survivor = await eventually(
        lambda: (r := leader_of(cluster, deployment)) and r is not leader and r, within=60
    )
    print(f"leader stopped in {stopped_in:.2f} s; take-over {time.monotonic() - began:.2f} s")
    await cluster.patch(
        f"/apis/convostore.dev/v1alpha1/namespaces/{NAMESPACE}/conversationstores/chat",
        json={"spec": {"retention": {"ttl": "1h"}}},
    )
    await eventually(
        lambda: store_object(cluster, "chat")["status"]["observedGeneration"] == 2, within=60
    )
    assert rendered_config(cluster, "chat")["stores"]["chat"]["ttl"] == "1h"

    if admitting is not None:
        admitting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await admitting
        assert answers, "no admission was answered during the hand-over"
        refused = [a for a in answers if not is_injected(a)]
        assert refused == [], f"{len(refused)} of {len(answers)} admissions went wrong"

    await stop_within_grace(deployment, survivor)
    for replica in replicas:
        assert "Traceback" not in replica.log, replica.log
    assert lease_holder(cluster, deployment) is None, "the last replica released the Lease"
    assert_one_leader_at_a_time(replicas)


def leadership(replica: Replica) -> list[tuple[str, str]]:
    """(began, ended) of each time this replica led, from its own log lines, which stamp
    the Lease taken before Kopf starts and released (or lost) after Kopf has stopped."""
    spans, began = [], None
    for line in replica.log.splitlines():
        stamp = line[:23]
        if "leader election:" in line and "now leads" in line:
            began = stamp
        elif began and "leader election:" in line and ("released" in line or "lost" in line):
            spans.append((began, stamp))
            began = None
    assert began is None, f"{replica.name} never let go of its lead"
    return spans


def assert_one_leader_at_a_time(replicas: list[Replica]) -> None:
    spans = sorted(span for replica in replicas for span in leadership(replica))
    assert spans, "no replica ever led"
    for (_, ended), (began, _) in itertools.pairwise(spans):
        assert ended <= began, f"two replicas reconciled at once: {spans}"


async def _answers(replica: Replica, path: str) -> bool:
    if not replica.container.running:
        raise EngineError(f"{replica.name} stopped:\n{replica.log}")
    with contextlib.suppress(OSError, aiohttp.ClientError):
        return await probe(replica, path) == 200
    return False


async def test_a_killed_leader_is_replaced_once_its_lease_runs_out(
    cluster: Any, deploy: Any
) -> None:
    deployment: Deployment = await deploy()
    leader = await eventually(lambda: leader_of(cluster, deployment), within=60)
    await create_store(cluster, "chat", {"backend": "sqlite"})
    await eventually(functools.partial(phase_is, cluster, "chat", "Ready"), within=60)
    lease = cluster.objects[LEASES, RELEASE_NAMESPACE, deployment.env["CONVOSTORE_LEASE"]]
    lease_seconds = int(lease["spec"]["leaseDurationSeconds"])

    leader.crash()
    began = time.monotonic()
    await leader.wait()
    survivor = await eventually(
        lambda: (r := leader_of(cluster, deployment)) and r is not leader and r,
        within=lease_seconds * 3,
    )
    took = time.monotonic() - began
    print(f"take-over after a crash: {took:.2f} s (lease {lease_seconds} s)")
    assert took >= lease_seconds * 0.9, "the Lease was taken before it ran out"
    await cluster.patch(
        f"/apis/convostore.dev/v1alpha1/namespaces/{NAMESPACE}/conversationstores/chat",
        json={"spec": {"retention": {"ttl": "2h"}}},
    )
    await eventually(lambda: rendered_config(cluster, "chat")["stores"]["chat"].get("ttl") == "2h")
    await stop_within_grace(deployment, survivor)
