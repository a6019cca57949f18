"""The Dapr driver's conflict handling, token and outages, against the Dapr stand-in."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from convostore import SidecarSession, SidecarStore, StoreUnavailableError
from dapr.proto.runtime.v1 import dapr_pb2_grpc, state_pb2

from tests.dapr_standin import DaprStandIn
from tests.support import RunningSidecar, StartSidecar, unique


@pytest.fixture
async def dapr_sidecar(
    start_sidecar: StartSidecar, store_config: Callable[..., dict[str, Any]]
) -> RunningSidecar:
    return await start_sidecar({"stores": {"conf": store_config("dapr", maxItems=100)}})


def session(sidecar: RunningSidecar, session_id: str) -> SidecarSession:
    return SidecarSession(session_id, "conf", url=sidecar.url, retries=0)


async def test_append_retries_when_the_head_changed_underneath(
    dapr_sidecar: RunningSidecar, dapr_runtime: DaprStandIn
) -> None:
    sid = unique()
    await session(dapr_sidecar, sid).add_items([{"n": 1}])
    before = dapr_runtime.calls["ExecuteStateTransaction"]
    dapr_runtime.interfere(f"||{sid}", times=2)
    await session(dapr_sidecar, sid).add_items([{"n": 2}, {"n": 3}])
    assert dapr_runtime.calls["ExecuteStateTransaction"] - before == 3
    assert await session(dapr_sidecar, sid).get_items() == [{"n": 1}, {"n": 2}, {"n": 3}]


async def test_creation_race_keeps_the_first_head(
    dapr_sidecar: RunningSidecar, dapr_runtime: DaprStandIn
) -> None:
    sid = unique()
    saves = dapr_runtime.calls["SaveState"]
    dapr_runtime.interfere(f"||{sid}", times=1)
    await session(dapr_sidecar, sid).add_items([{"n": 1}])
    assert dapr_runtime.calls["SaveState"] - saves >= 1
    assert await session(dapr_sidecar, sid).get_items() == [{"n": 1}]


async def test_pop_retries_and_never_returns_an_item_twice(
    dapr_sidecar: RunningSidecar, dapr_runtime: DaprStandIn
) -> None:
    sid = unique()
    await session(dapr_sidecar, sid).add_items([{"n": 1}, {"n": 2}])
    before = dapr_runtime.calls["ExecuteStateTransaction"]
    dapr_runtime.interfere(f"||{sid}", times=1)
    assert await session(dapr_sidecar, sid).pop_item() == {"n": 2}
    assert dapr_runtime.calls["ExecuteStateTransaction"] - before == 2
    assert await session(dapr_sidecar, sid).pop_item() == {"n": 1}
    assert await session(dapr_sidecar, sid).pop_item() is None


async def test_clear_retries_when_the_head_changed(
    dapr_sidecar: RunningSidecar, dapr_runtime: DaprStandIn
) -> None:
    sid = unique()
    await session(dapr_sidecar, sid).add_items([{"n": 1}])
    dapr_runtime.interfere(f"||{sid}", times=1)
    await session(dapr_sidecar, sid).clear_session()
    assert await session(dapr_sidecar, sid).get_items() == []


async def test_session_index_update_retries(
    dapr_sidecar: RunningSidecar, dapr_runtime: DaprStandIn
) -> None:
    sid = unique()
    await session(dapr_sidecar, unique()).add_items([{"n": 0}])
    dapr_runtime.interfere("|sessions", times=1)
    await session(dapr_sidecar, sid).add_items([{"n": 1}])
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{dapr_sidecar.url}/v1/stores/conf/sessions") as resp,
    ):
        assert sid in (await resp.json())["sessions"]


async def test_endless_conflicts_give_up_with_503_and_store_nothing(
    dapr_sidecar: RunningSidecar, dapr_runtime: DaprStandIn
) -> None:
    sid = unique()
    await session(dapr_sidecar, sid).add_items([{"n": 1}])
    dapr_runtime.interfere(f"||{sid}", times=10_000)
    with pytest.raises(StoreUnavailableError) as error:
        await session(dapr_sidecar, sid).add_items([{"n": 2}])
    assert error.value.code == "backend_unavailable"
    dapr_runtime.interfere(f"||{sid}", times=0)
    assert await session(dapr_sidecar, sid).get_items() == [{"n": 1}]


async def test_many_poppers_under_contention_take_distinct_items(
    dapr_sidecar: RunningSidecar,
) -> None:
    sid = unique()
    await session(dapr_sidecar, sid).add_items([{"n": n} for n in range(40)])

    async def drain() -> list[int]:
        got = []
        while (item := await session(dapr_sidecar, sid).pop_item()) is not None:
            got.append(item["n"])
        return got

    results = await asyncio.gather(*(drain() for _ in range(6)))
    assert sorted(n for r in results for n in r) == list(range(40))


@pytest.fixture
async def token_runtime(redis_url: str) -> AsyncIterator[DaprStandIn]:
    runtime = DaprStandIn(redis_url, api_token="s3cret-token")
    runtime.start()
    yield runtime
    runtime.stop()


async def test_dapr_api_token_is_sent(
    token_runtime: DaprStandIn, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    async with grpc.aio.insecure_channel(token_runtime.endpoints["grpcEndpoint"]) as channel:
        stub = dapr_pb2_grpc.DaprStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetState(state_pb2.GetStateRequest(store_name="statestore", key="x"))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    token = tmp_path / "dapr-token"
    token.write_text("s3cret-token\n")
    store = {
        "backend": "dapr",
        "dapr": {"stateStore": "statestore", "apiTokenFile": str(token), **token_runtime.endpoints},
    }
    sidecar = await start_sidecar({"stores": {"conf": store}})
    await session(sidecar, "tok").add_items([{"n": 1}])
    assert await session(sidecar, "tok").get_items() == [{"n": 1}]


async def test_dapr_outage_gives_503_and_recovers(
    redis_url: str, start_sidecar: StartSidecar
) -> None:
    runtime = DaprStandIn(redis_url)
    runtime.start()
    store = {
        "backend": "dapr",
        "dapr": {"stateStore": "statestore", "timeout": 1, **runtime.endpoints},
    }
    sidecar = await start_sidecar({"stores": {"conf": store}})
    sid = unique()
    await session(sidecar, sid).add_items([{"n": 1}])
    runtime.stop()
    with pytest.raises(StoreUnavailableError) as error:
        await session(sidecar, sid).get_items()
    assert error.value.code == "backend_unavailable"
    async with aiohttp.ClientSession() as http, http.get(sidecar.url + "/readyz") as resp:
        assert resp.status == 503
    runtime.start()
    try:
        assert await SidecarSession(sid, "conf", url=sidecar.url).get_items() == [{"n": 1}]
    finally:
        runtime.stop()


async def test_a_session_named_like_the_index_is_just_a_session(
    dapr_sidecar: RunningSidecar,
) -> None:
    session = SidecarSession("sessions", "conf", url=dapr_sidecar.url)
    other = SidecarSession(unique(), "conf", url=dapr_sidecar.url)
    await session.add_items([{"n": 1}])
    await other.add_items([{"n": 2}])
    await session.add_items([{"n": 3}])
    assert await session.get_items() == [{"n": 1}, {"n": 3}]
    listed = [sid async for sid in SidecarStore("conf", dapr_sidecar.url).session_ids()]
    assert sorted(listed) == sorted(["sessions", other.session_id])
    await session.clear_session()
    assert [sid async for sid in SidecarStore("conf", dapr_sidecar.url).session_ids()] == [
        other.session_id
    ]
