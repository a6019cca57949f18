"""Every replica serves the same webhook certificate, and a renewal made by one replica
reaches the others while they run."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import ssl
from typing import Any

import pytest
from convostore_operator.certs import WebhookTLS, issue
from convostore_operator.kube import Kube
from convostore_operator.webhook import AdmissionServer
from cryptography import x509

from tests.operator.conftest import WEBHOOK
from tests.operator.emulator import RealisticEmulator
from tests.servers import free_port
from tests.support import eventually

pytestmark = pytest.mark.kmock(cls=RealisticEmulator)
HOOKS = "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"


async def create_configuration(cluster: Any) -> None:
    service = {"name": WEBHOOK.service, "namespace": WEBHOOK.namespace, "path": "/inject-sidecar"}
    await cluster.post(
        f"/apis/{HOOKS}",
        json={
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": WEBHOOK.configuration},
            "webhooks": [
                {
                    "name": name,
                    "admissionReviewVersions": ["v1"],
                    "sideEffects": "None",
                    "clientConfig": {"service": service},
                }
                for name in ("inject.convostore.dev", "again.convostore.dev")
            ],
        },
    )


def published_bundle(cluster: Any) -> set[bytes]:
    hooks = cluster.objects[HOOKS, None, WEBHOOK.configuration]["webhooks"]
    return {base64.b64decode(h["clientConfig"]["caBundle"]) for h in hooks}


async def test_replicas_starting_together_agree_on_one_certificate(
    cluster: Any, kube: Kube
) -> None:
    await create_configuration(cluster)
    replicas = [AdmissionServer(kube, WEBHOOK, "convostore:test") for _ in range(4)]
    await asyncio.gather(*(asyncio.to_thread(r.sync) for r in replicas))
    first = replicas[0].tls
    assert first is not None
    assert all(r.tls == first for r in replicas), "replicas serve different certificates"
    assert published_bundle(cluster) == {first.ca_bundle}


def served_serial(port: int) -> int:
    pem = ssl.get_server_certificate(("127.0.0.1", port))
    return x509.load_pem_x509_certificate(pem.encode()).serial_number


async def test_a_renewal_by_another_replica_is_served_without_a_restart(
    cluster: Any, kube: Kube
) -> None:
    await create_configuration(cluster)
    port = free_port()
    settings = dataclasses.replace(WEBHOOK, port=port, tls_check_seconds=0.2)
    replica = AdmissionServer(kube, settings, "convostore:test")
    await replica.start()
    stop = asyncio.Event()
    syncing = asyncio.create_task(replica.keep_in_sync(stop))
    try:
        assert replica.tls is not None
        before = x509.load_pem_x509_certificate(replica.tls.cert).serial_number
        assert await asyncio.to_thread(served_serial, port) == before

        # another replica renews: a new serving certificate under the same CA
        stored = await asyncio.to_thread(
            kube.read_secret_versioned, WEBHOOK.namespace, WEBHOOK.tls_secret
        )
        assert stored is not None
        current = WebhookTLS.from_secret(stored.data)
        later = datetime.datetime.now(datetime.UTC)
        renewed = issue(WEBHOOK.hostnames, later, current)
        assert await asyncio.to_thread(
            kube.replace_secret,
            WEBHOOK.namespace,
            WEBHOOK.tls_secret,
            renewed.secret_data(),
            stored.version,
        )
        after = x509.load_pem_x509_certificate(renewed.cert).serial_number
        await eventually(lambda: asyncio.to_thread(lambda: served_serial(port) == after), within=20)
        assert published_bundle(cluster) == {renewed.ca_bundle}
    finally:
        stop.set()
        await syncing
        await replica.stop()
