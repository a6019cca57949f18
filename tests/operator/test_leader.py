"""Leader election on a Lease: one holder, an explicit release, expiry judged on the
candidate's own clock, and a holder that cannot renew steps down."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import kubernetes
import pytest
from convostore_operator.kube import api_client, configuration
from convostore_operator.leader import Election, LeaseSettings

from tests.operator.emulator import LEASES, RealisticEmulator
from tests.servers import free_port
from tests.support import eventually

pytestmark = pytest.mark.kmock(cls=RealisticEmulator)
LEASE_SECONDS = 2


def candidate(identity: str) -> Election:
    settings = LeaseSettings(
        "convostore-system",
        identity=identity,
        lease_seconds=LEASE_SECONDS,
        renew_deadline=1.0,
        retry_seconds=0.2,
    )
    return Election(api_client(), settings)


def holder(cluster: Any) -> Any:
    return cluster.objects[LEASES, "convostore-system", "convostore-operator"]["spec"].get(
        "holderIdentity"
    )


async def test_one_candidate_holds_until_it_releases(cluster: Any) -> None:
    first, second = candidate("pod-a"), candidate("pod-b")
    assert await asyncio.to_thread(first.try_acquire_or_renew)
    assert not await asyncio.to_thread(second.try_acquire_or_renew)
    assert await asyncio.to_thread(first.try_acquire_or_renew), "the holder renews"
    assert not await asyncio.to_thread(second.try_acquire_or_renew)
    assert holder(cluster) == "pod-a"

    await first.release()
    assert holder(cluster) is None
    assert await asyncio.to_thread(second.try_acquire_or_renew), "no wait after a release"
    assert holder(cluster) == "pod-b"
    lease = cluster.objects[LEASES, "convostore-system", "convostore-operator"]
    assert lease["spec"]["leaseTransitions"] == 1


async def test_a_lease_left_unrenewed_is_taken_after_its_duration(cluster: Any) -> None:
    first, second = candidate("pod-a"), candidate("pod-b")
    assert await asyncio.to_thread(first.try_acquire_or_renew)
    stop = asyncio.Event()
    began = time.monotonic()
    assert await second.acquire(stop)
    assert time.monotonic() - began >= LEASE_SECONDS, "taken before it ran out"
    assert holder(cluster) == "pod-b"
    assert not await asyncio.to_thread(first.try_acquire_or_renew), "the old holder is out"


async def test_a_holder_that_cannot_renew_steps_down_before_the_lease_runs_out(
    cluster: Any,
) -> None:
    election = candidate("pod-a")
    assert await asyncio.to_thread(election.try_acquire_or_renew)
    unreachable = configuration()
    unreachable.host = f"http://127.0.0.1:{free_port()}"
    unreachable.retries = 0
    election.api = kubernetes.client.CoordinationV1Api(kubernetes.client.ApiClient(unreachable))
    began = time.monotonic()
    await asyncio.wait_for(election.hold(asyncio.Event()), LEASE_SECONDS * 5)
    assert time.monotonic() - began < LEASE_SECONDS, "stepped down too late"


async def test_a_holder_whose_lease_was_taken_steps_down_at_its_next_renewal(
    cluster: Any,
) -> None:
    first = candidate("pod-a")
    assert await asyncio.to_thread(first.try_acquire_or_renew)
    holding = asyncio.create_task(first.hold(asyncio.Event()))
    lease = cluster.objects[LEASES, "convostore-system", "convostore-operator"]
    await cluster.patch(
        "/apis/coordination.k8s.io/v1/namespaces/convostore-system/leases/convostore-operator",
        json={"spec": {"holderIdentity": "pod-b"}},
    )
    assert lease["spec"]["holderIdentity"] == "pod-b"
    await asyncio.wait_for(holding, LEASE_SECONDS)
    assert not await asyncio.to_thread(first.try_acquire_or_renew)


async def test_a_full_shared_thread_pool_does_not_hold_renewals_back(
    cluster: Any, full_default_pool: None
) -> None:
    """A burst elsewhere in the replica (admissions once filled this pool) must not keep
    the leader from renewing, or another replica takes the Lease while it still leads."""
    election = candidate("pod-a")
    assert await asyncio.wait_for(election.acquire(asyncio.Event()), 5)

    def renewed() -> Any:
        return cluster.objects[LEASES, "convostore-system", "convostore-operator"]["spec"][
            "renewTime"
        ]

    first = renewed()
    stop = asyncio.Event()
    holding = asyncio.create_task(election.hold(stop))
    await eventually(lambda: renewed() != first, within=LEASE_SECONDS * 2)
    assert not holding.done(), "the holder stepped down"
    stop.set()
    await holding
