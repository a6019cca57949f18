"""The operator's RBAC rules grant exactly what it uses: every API call it makes in a
full life cycle is recorded by the emulator and compared with `rbac.RULES`."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path
from typing import Any

import pytest
from convostore_operator import rbac
from convostore_operator.inject import INJECT, STORES
from convostore_operator.kube import Kube, api_client
from convostore_operator.leader import Election, LeaseSettings
from convostore_operator.webhook import AdmissionServer, admit

from tests.operator.conftest import (
    NAMESPACE,
    WEBHOOK,
    Operator,
    create_store,
    create_workload,
    eventually,
    is_gone,
    phase_is,
    store_object,
)
from tests.operator.emulator import RealisticEmulator

pytestmark = pytest.mark.kmock(cls=RealisticEmulator)
STORES_URL = f"/apis/convostore.dev/v1alpha1/namespaces/{NAMESPACE}/conversationstores"
VERBS = {"LIST": "list", "WATCH": "watch", "FETCH": "get", "CREATE": "create", "DELETE": "delete"}


def used_permissions(cluster: Any) -> set[tuple[str, str, str]]:
    """(api group, resource[/subresource], verb) of every call not made by the test."""
    used = set()
    for request in cluster:
        if request.resource is None or request.resource.plural is None:
            continue  # discovery, which every authenticated client may read
        if request.headers.get("User-Agent", "").startswith("kmock"):
            continue  # the test itself
        if request.action.name == "UPDATE":
            verb = "patch" if request.method.name == "PATCH" else "update"
        else:
            verb = VERBS[request.action.name]
        resource = request.resource.plural
        if request.subresource:
            resource += f"/{request.subresource}"
        used.add((request.resource.group or "", resource, verb))
    return used


def observed(cluster: Any, name: str, generation: int) -> bool:
    return bool(store_object(cluster, name)["status"]["observedGeneration"] == generation)


def rolled(cluster: Any, kind: str, name: str) -> bool:
    template = cluster.objects[f"apps/v1/{kind}", NAMESPACE, name]["spec"]["template"]
    return "convostore.dev/config-hash-vault" in template["metadata"]["annotations"]


async def test_rules_grant_exactly_what_a_full_life_cycle_uses(
    cluster: Any, kube: Kube, operator: Operator, redis_url: str, tmp_path: Path
) -> None:
    await cluster.post(
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
        json={
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "convostore"},
            "webhooks": [
                {
                    "name": "inject.convostore.dev",
                    "admissionReviewVersions": ["v1"],
                    "sideEffects": "None",
                    "clientConfig": {
                        "service": {"name": "convostore-webhook", "namespace": "convostore-system"}
                    },
                }
            ],
        },
    )
    await create_workload(cluster, "Deployment", "agent", "vault")
    await create_workload(cluster, "StatefulSet", "memory", "vault")
    election = Election(api_client(), LeaseSettings(namespace="convostore-system"))
    for _ in range(2):  # takes the Lease, then renews it
        assert await asyncio.to_thread(election.try_acquire_or_renew)
    await asyncio.to_thread(election.release)
    await operator(clusterwide=True)  # its webhook issues the certificate
    await asyncio.to_thread(AdmissionServer(kube, WEBHOOK, "convostore:test").sync)  # reuses it
    hooks = cluster.objects[
        "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations", None, "convostore"
    ]
    assert hooks["webhooks"][0]["clientConfig"]["caBundle"]
    await create_store(cluster, "vault", {"backend": "sqlite", "encryption": {"enabled": True}})
    await create_store(
        cluster,
        "portable",
        {
            "backend": "dapr",
            "dapr": {"stateStore": "chat-state", "component": {"type": "state.redis"}},
        },
    )
    await create_store(
        cluster,
        "scratch",
        {
            "backend": "redis",
            "deletionPolicy": "Delete",
            "redis": {"url": redis_url, "keyPrefix": "rbac"},
        },
    )
    for name in ("vault", "portable", "scratch"):
        await eventually(functools.partial(phase_is, cluster, name, "Ready"))
    await cluster.patch(f"{STORES_URL}/vault", json={"spec": {"retention": {"ttl": "1h"}}})
    await cluster.patch(
        f"{STORES_URL}/portable",
        json={"spec": {"dapr": {"component": {"type": "state.redis", "version": "v2"}}}},
    )
    for name in ("vault", "portable"):
        await eventually(functools.partial(observed, cluster, name, 2))
    await eventually(functools.partial(rolled, cluster, "statefulsets", "memory"))
    assert rolled(cluster, "deployments", "agent")
    await cluster.delete(f"{STORES_URL}/scratch")
    await eventually(functools.partial(is_gone, cluster, "scratch"))
    pod = {
        "metadata": {"annotations": {INJECT: "true", STORES: "vault"}},
        "spec": {"containers": [{"name": "agent", "image": "agent:1"}]},
    }
    answer = await admit({"namespace": NAMESPACE, "object": pod}, kube, "convostore:test")
    assert answer["allowed"] is True

    used = used_permissions(cluster)
    assert used - rbac.allowed() == set(), "the operator needs permissions it is not granted"
    assert rbac.allowed() - used == set(), "granted permissions the operator never uses"
