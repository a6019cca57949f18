"""Least privilege, proven: a full life cycle of the operator (stores created, changed,
rolled, deleted; the Lease taken, renewed and released; the webhook's certificate made
and published; an admission) runs against the emulated API server, which records every
call; each must be allowed by the RBAC objects the chart renders, and every grant they
hold must be used, in cluster-wide mode and with `operator.watchNamespaces`."""

from __future__ import annotations

import asyncio
import base64
import datetime
import functools
from typing import Any

import pytest
from convostore_operator.certs import issue
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
    is_gone,
    lend_url,
    phase_is,
    store_object,
)
from tests.operator.deployed import RELEASE_NAMESPACE, only, render_chart
from tests.operator.emulator import RealisticEmulator
from tests.operator.rbac_check import Call, grants
from tests.support import eventually

pytestmark = pytest.mark.kmock(cls=RealisticEmulator)
STORES_URL = f"/apis/convostore.dev/v1alpha1/namespaces/{NAMESPACE}/conversationstores"
VERBS = {"LIST": "list", "WATCH": "watch", "FETCH": "get", "CREATE": "create", "DELETE": "delete"}


def calls_made(cluster: Any) -> set[Call]:
    """Every call the operator made (not discovery, not the test's own)."""
    made = set()
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
        made.add(
            Call(request.resource.group or "", resource, verb, request.namespace, request.name)
        )
    return made


def observed(cluster: Any, name: str, generation: int) -> bool:
    return bool(store_object(cluster, name)["status"]["observedGeneration"] == generation)


def rolled(cluster: Any, kind: str, name: str) -> bool:
    template = cluster.objects[f"apps/v1/{kind}", NAMESPACE, name]["spec"]["template"]
    return "convostore.dev/config-hash-vault" in template["metadata"]["annotations"]


@pytest.mark.parametrize(
    "values",
    [("operator.clusterWide=true",), (f"operator.watchNamespaces={{{NAMESPACE}}}",)],
    ids=["cluster-wide", "namespaced"],
)
async def test_the_charts_rbac_allows_every_call_and_nothing_unused(
    cluster: Any, kube: Kube, operator: Operator, redis_url: str, values: tuple[str, ...]
) -> None:
    docs = render_chart(*values)
    cluster_wide = "operator.clusterWide=true" in values
    deployment = only(docs, "Deployment")
    env = {
        e["name"]: e.get("value")
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    await cluster.post(
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
        json=only(docs, "MutatingWebhookConfiguration"),
    )
    await create_workload(cluster, "Deployment", "agent", "vault")
    await create_workload(cluster, "StatefulSet", "memory", "vault")
    lease = LeaseSettings(namespace=RELEASE_NAMESPACE, name=str(env["CONVOSTORE_LEASE"]))
    election = Election(api_client(), lease)
    for _ in range(2):  # takes the Lease, then renews it
        assert await asyncio.to_thread(election.try_acquire_or_renew)
    await election.release()
    assert WEBHOOK.configuration == env["CONVOSTORE_WEBHOOK_CONFIGURATION"]
    assert WEBHOOK.tls_secret == env["CONVOSTORE_WEBHOOK_TLS_SECRET"]
    await operator(clusterwide=cluster_wide)  # its webhook makes the certificate
    aged = issue(
        WEBHOOK.hostnames, datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=300)
    )
    await cluster.patch(
        f"/api/v1/namespaces/{RELEASE_NAMESPACE}/secrets/{WEBHOOK.tls_secret}",
        json={"data": {k: base64.b64encode(v).decode() for k, v in aged.secret_data().items()}},
    )
    await asyncio.to_thread(AdmissionServer(kube, WEBHOOK, "convostore:test").sync)  # renews it
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
            "redis": {"urlSecretRef": await lend_url(cluster, redis_url), "keyPrefix": "rbac"},
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

    granted = grants(docs, account, RELEASE_NAMESPACE)
    made = calls_made(cluster)
    refused = sorted(str(c) for c in made if not any(g.allows(c) for g in granted))
    assert refused == [], "calls the chart's RBAC would refuse"
    unused = sorted(str(g) for g in granted if not any(g.allows(c) for c in made))
    assert unused == [], "granted but never used"
    if not cluster_wide:
        assert all(g.namespace is not None or g.names for g in granted), (
            "namespaced mode grants nothing cluster-wide but named objects"
        )
        secrets = [g for g in granted if g.resource == "secrets"]
        assert {g.namespace for g in secrets} == {NAMESPACE, RELEASE_NAMESPACE}
    named = [g for g in granted if g.resource in ("mutatingwebhookconfigurations", "leases")]
    assert all(g.names or g.verb == "create" for g in named), "own objects are granted by name"
