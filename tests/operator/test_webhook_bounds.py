"""The admission webhook answers only the API server, within bounds, on its own threads.

Its port is open to every pod (the NetworkPolicy cannot name the API server's address
on every distribution), so these tests call it as a stranger would: without the path
token from the webhook configuration, with an oversized body, naming many stores, and
while the process's shared thread pool is full.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from convostore_operator.kube import Kube
from convostore_operator.webhook import (
    INJECT_PATH,
    MAX_BODY,
    MAX_CONNECTIONS,
    MAX_STORES,
    AdmissionServer,
)

from tests.operator.conftest import NAMESPACE, WEBHOOK
from tests.operator.deployed import WebhookTarget, admission
from tests.operator.emulator import RealisticEmulator
from tests.operator.test_webhook_tls import HOOKS, create_configuration
from tests.servers import free_port
from tests.support import eventually

pytestmark = pytest.mark.kmock(cls=RealisticEmulator)


@pytest.fixture
async def webhook(cluster: Any, kube: Kube) -> AsyncIterator[AdmissionServer]:
    await create_configuration(cluster)
    server = AdmissionServer(kube, dataclasses.replace(WEBHOOK, port=free_port()), "img")
    await server.start()
    yield server
    await server.stop()


def target(server: AdmissionServer, path: str | None = None) -> WebhookTarget:
    assert server.tls is not None
    return WebhookTarget(path or server.path, WEBHOOK.hostnames[0], server.tls.ca_bundle)


def asking_pod(stores: str = "chat") -> dict[str, Any]:
    annotations = {"convostore.dev/inject": "true", "convostore.dev/stores": stores}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "agent", "annotations": annotations},
        "spec": {"containers": [{"name": "agent", "image": "agent:1"}]},
    }


async def post(server: AdmissionServer, path: str, body: bytes) -> int:
    assert server.tls is not None
    tls = ssl.create_default_context(cadata=server.tls.ca_bundle.decode())
    url = f"https://127.0.0.1:{server.webhook.port}{path}"
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            url, data=io.BytesIO(body), ssl=tls, server_hostname=WEBHOOK.hostnames[0]
        ) as answer,
    ):
        return answer.status


async def test_the_configuration_carries_the_token_every_replica_answers_to(
    cluster: Any, kube: Kube, webhook: AdmissionServer
) -> None:
    other = AdmissionServer(kube, WEBHOOK, "img")
    await asyncio.to_thread(other.sync)
    assert other.path == webhook.path
    assert webhook.path.startswith(INJECT_PATH + "/")
    assert len(webhook.path) > len(INJECT_PATH) + 40
    hooks = cluster.objects[HOOKS, None, WEBHOOK.configuration]["webhooks"]
    assert {h["clientConfig"]["service"]["path"] for h in hooks} == {webhook.path}


@pytest.mark.parametrize(
    "path",
    [INJECT_PATH, INJECT_PATH + "/guess", INJECT_PATH + "/", "/"],
    ids=["no-token", "wrong-token", "empty-token", "root"],
)
async def test_a_caller_without_the_token_learns_nothing(
    cluster: Any, webhook: AdmissionServer, path: str
) -> None:
    status = await post(webhook, path, b'{"request": {"uid": "x", "object": {}}}')
    assert status == 404
    response = await admission(
        f"127.0.0.1:{webhook.webhook.port}", target(webhook), asking_pod(), NAMESPACE
    )
    assert response["allowed"] is False, "the API server's call is still answered"
    assert "no ConversationStore named 'chat'" in response["status"]["message"]


async def test_an_oversized_body_is_refused_before_it_is_parsed(webhook: AdmissionServer) -> None:
    assert await post(webhook, webhook.path, b"[" + b"1," * (MAX_BODY // 2) + b"1]") == 413


async def test_a_pod_may_name_only_so_many_stores(webhook: AdmissionServer) -> None:
    many = ",".join(f"s{n}" for n in range(MAX_STORES + 1))
    origin = f"127.0.0.1:{webhook.webhook.port}"
    response = await admission(origin, target(webhook), asking_pod(many), NAMESPACE)
    assert response["allowed"] is False
    assert f"at most {MAX_STORES}" in response["status"]["message"]


async def test_admissions_are_answered_while_the_shared_thread_pool_is_full(
    webhook: AdmissionServer, full_default_pool: None
) -> None:
    origin = f"127.0.0.1:{webhook.webhook.port}"
    response = await asyncio.wait_for(
        admission(origin, target(webhook), asking_pod(), NAMESPACE), 10
    )
    assert "no ConversationStore named 'chat'" in response["status"]["message"]


async def test_strangers_holding_connections_are_capped_and_dropped_when_idle(
    webhook: AdmissionServer,
) -> None:
    """Connections past the cap are told to come back, and the API server's call gets
    through once the strangers' idle connections are closed."""
    assert webhook.tls is not None
    tls = ssl.create_default_context(cadata=webhook.tls.ca_bundle.decode())
    port = webhook.webhook.port

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(
            "127.0.0.1", port, ssl=tls, server_hostname=WEBHOOK.hostnames[0]
        )

    held = [await connect() for _ in range(MAX_CONNECTIONS)]
    reader, writer = await connect()
    refused = await asyncio.wait_for(reader.read(200), 10)
    writer.close()
    assert refused.startswith(b"HTTP/1.1 503"), refused
    for _, held_writer in held:
        held_writer.close()
    origin = f"127.0.0.1:{port}"
    response = await eventually(
        lambda: admission(origin, target(webhook), asking_pod(), NAMESPACE), within=10
    )
    assert "no ConversationStore named 'chat'" in response["status"]["message"]
