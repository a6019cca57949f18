"""Two operator replicas with Kopf peering: only the one with the higher priority acts."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import pytest
from convostore_operator.kube import Kube, api_client

from tests.operator.conftest import NAMESPACE, Operator, create_store, eventually, phase_is
from tests.operator.emulator import RealisticEmulator

pytestmark = pytest.mark.kmock(cls=RealisticEmulator)


class RecordingKube(Kube):
    """Notes which replica rendered which store."""

    def __init__(self) -> None:
        super().__init__(api_client())
        self.rendered: list[str] = []

    def apply_secret(self, namespace: str, name: str, *args: Any, **kwargs: Any) -> None:
        self.rendered.append(name)
        super().apply_secret(namespace, name, *args, **kwargs)


async def test_only_the_leading_replica_reconciles(cluster: Any, operator: Operator) -> None:
    await cluster.post(
        f"/apis/kopf.dev/v1/namespaces/{NAMESPACE}/kopfpeerings",
        json={
            "apiVersion": "kopf.dev/v1",
            "kind": "KopfPeering",
            "metadata": {"name": "convostore", "namespace": NAMESPACE},
        },
    )
    leader, follower = RecordingKube(), RecordingKube()
    await operator(peering=100, memo_kube=leader)
    await operator(peering=10, memo_kube=follower)
    peers = await eventually(
        lambda: (
            len(
                cluster.objects["kopf.dev/v1/kopfpeerings", NAMESPACE, "convostore"].get("status")
                or {}
            )
            == 2
        )
    )
    assert peers
    await asyncio.sleep(1)  # the follower sees the leader and pauses
    for name in ("one", "two", "three"):
        await create_store(cluster, name, {"backend": "sqlite"})
    for name in ("one", "two", "three"):
        await eventually(functools.partial(phase_is, cluster, name, "Ready"))
    assert sorted(leader.rendered) == ["one-convostore", "three-convostore", "two-convostore"]
    assert follower.rendered == []
