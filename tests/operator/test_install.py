"""`kubectl apply -f manifests/install.yaml` on a fresh cluster: every object of the plain
install, in the file's order, created through the kubernetes client on the API emulator,
which (as a real API server's NamespaceLifecycle admission does) must not take an object
into a namespace that does not exist yet."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import yaml
from convostore_operator.kube import api_client
from kubernetes import utils

MANIFEST = Path(__file__).resolve().parents[2] / "manifests" / "install.yaml"


def namespace_exists(cluster: Any, name: str) -> bool:
    try:
        return not cluster.objects["v1/namespaces", None, name].deleted
    except KeyError:
        return False


async def test_the_plain_install_applies_to_an_empty_cluster(cluster: Any) -> None:
    docs = [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]
    assert not namespace_exists(cluster, "convostore-system"), "the cluster starts empty"
    client = api_client()
    created = []
    for doc in docs:
        namespace = doc["metadata"].get("namespace")
        where = f"{doc['kind']} {doc['metadata']['name']}"
        assert namespace is None or namespace_exists(cluster, namespace), (
            f"{where} goes into namespace {namespace!r}, which nothing before it made"
        )
        if doc["kind"] == "Namespace":
            # kmock 0.8 cannot parse `POST /api/v1/namespaces` (it reads "namespaces" as
            # the start of a namespaced path): the one kind stored as the server would
            cluster.objects["v1/namespaces", None, doc["metadata"]["name"]] = doc
        else:
            await asyncio.to_thread(utils.create_from_dict, client, doc)
        created.append(doc["kind"])
    assert created[:2] == ["CustomResourceDefinition", "Namespace"]
    assert {"Deployment", "MutatingWebhookConfiguration", "Role"} <= set(created)
    assert "Pod" not in created, "the chart's `helm test` Pod is for Helm users alone"
    for name in ("convostore-system", "agents"):
        assert namespace_exists(cluster, name)
    deployment = cluster.objects["apps/v1/deployments", "convostore-system", "convostore"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
