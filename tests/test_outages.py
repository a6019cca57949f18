"""Backend outages: fail fast with 503, report not ready, recover alone, lose nothing.

Each test owns a private database server so it can stop it mid-conversation. A writer
keeps appending numbered items through the real client; afterwards every append that
was acknowledged must be present exactly once, and nothing may be present twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from convostore import SidecarSession, StoreUnavailableError
from convostore_sidecar.http.state import METRICS

from tests.servers import PostgresServer, RedisServer
from tests.support import RunningSidecar, StartSidecar, migrate, unique

Server = RedisServer | PostgresServer


@pytest.fixture(params=["redis", "postgres"])
async def outage_subject(
    request: pytest.FixtureRequest, start_sidecar: StartSidecar
) -> AsyncIterator[tuple[Server, RunningSidecar]]:
    server: Server
    if request.param == "redis":
        server = RedisServer()
        store: dict[str, Any] = {"backend": "redis", "redis": {"url": "", "timeout": 1}}
    else:
        server = PostgresServer()
        store = {"backend": "postgres", "postgres": {"dsn": "", "connectTimeout": 1}}
    server.start()
    store[request.param]["url" if request.param == "redis" else "dsn"] = (
        server.url if isinstance(server, RedisServer) else server.dsn
    )
    migrate({"stores": {"conf": store}})
    sidecar = await start_sidecar({"stores": {"conf": store}})
    yield server, sidecar
    server.destroy()


async def ready(sidecar: RunningSidecar) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(sidecar.url + "/readyz") as resp:
        return resp.status, await resp.json()


async def wait_until(check: Callable[[], Any], within: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)


async def test_acknowledged_appends_survive_an_outage_exactly_once(
    outage_subject: tuple[Server, RunningSidecar],
) -> None:
    server, sidecar = outage_subject
    session_id = unique()
    session = SidecarSession(session_id, "conf", url=sidecar.url, retries=2)
    acknowledged: list[int] = []
    failures: list[StoreUnavailableError] = []
    stop_writing = asyncio.Event()

    async def writer() -> None:
        n = 0
        while not stop_writing.is_set():
            try:
                await session.add_items([{"n": n}])
                acknowledged.append(n)
            except StoreUnavailableError as exc:
                failures.append(exc)
                await asyncio.sleep(0.05)
            n += 1

    task = asyncio.create_task(writer())
    await wait_until(lambda: _at_least(acknowledged, 20))
    await asyncio.to_thread(server.stop)
    await wait_until(lambda: _at_least(failures, 3))
    status, body = await ready(sidecar)
    assert status == 503
    assert body["ready"] is False
    assert body["stores"]["conf"] == "unavailable"
    acked_during_outage = len(acknowledged)
    await asyncio.to_thread(server.start)
    await wait_until(lambda: _at_least(acknowledged, acked_during_outage + 20))
    stop_writing.set()
    await task

    await wait_until(lambda: _ready(sidecar))  # readiness is re-checked every few seconds
    assert {f.code for f in failures} == {"backend_unavailable"}
    present = [item["n"] for item in await session.get_items()]
    assert len(present) == len(set(present)), "an item was stored twice"
    assert present == sorted(present)
    assert set(acknowledged) <= set(present)


async def _at_least(values: list[Any], count: int) -> bool:
    return len(values) >= count


async def test_outage_answers_503_with_retry_after_and_only_safe_retries(
    outage_subject: tuple[Server, RunningSidecar],
) -> None:
    server, sidecar = outage_subject
    session_id = unique()
    url = f"{sidecar.url}/v1/stores/conf/sessions/{session_id}/items"
    await SidecarSession(session_id, "conf", url=sidecar.url).add_items([{"n": 1}])
    await asyncio.to_thread(server.stop)
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert (await resp.json())["error"]["code"] == "backend_unavailable"

    session = SidecarSession(session_id, "conf", url=sidecar.url, retries=2)
    with pytest.raises(StoreUnavailableError):
        await session.pop_item()
    with pytest.raises(StoreUnavailableError):
        await session.get_items()
    text = sidecar.app[METRICS].exposition().decode()
    assert _count(text, "items:pop", "503") == 1, "a pop must not be retried"
    assert _count(text, "/items", "503") == 1 + 3, "reads are retried"
    assert "convostore_backend_errors_total{backend=" in text

    await asyncio.to_thread(server.start)
    assert await session.get_items() == [{"n": 1}]


def _count(metrics: str, route_suffix: str, status: str) -> int:
    total = 0
    for line in metrics.splitlines():
        if line.startswith("convostore_requests_total{") and f'status="{status}"' in line:
            route = line.split('route="')[1].split('"')[0]
            if route.endswith(route_suffix):
                total += int(float(line.rsplit(" ", 1)[1]))
    return total


async def test_sidecar_starts_while_the_backend_is_down(
    start_sidecar: StartSidecar,
) -> None:
    server = RedisServer()
    pg = PostgresServer()
    try:
        sidecar = await start_sidecar(
            {
                "stores": {
                    "chat": {"backend": "redis", "redis": {"url": server.url}},
                    "audit": {"backend": "postgres", "postgres": {"dsn": pg.dsn}},
                }
            }
        )
        status, body = await ready(sidecar)
        assert status == 503
        assert set(body["stores"]) == {"chat", "audit"}
        server.start()
        await asyncio.to_thread(pg.start)
        migrate({"stores": {"audit": {"backend": "postgres", "postgres": {"dsn": pg.dsn}}}})
        await wait_until(lambda: _ready(sidecar))
        for store in ("chat", "audit"):
            session = SidecarSession("late", store, url=sidecar.url)
            await session.add_items([{"ok": store}])
            assert await session.get_items() == [{"ok": store}]
    finally:
        server.destroy()
        pg.destroy()


async def _ready(sidecar: RunningSidecar) -> bool:
    return (await ready(sidecar))[0] == 200


@pytest.mark.parametrize(
    ("change", "cause"),
    [
        (lambda dsn: dsn.rsplit("/", 1)[0] + "/no_such_database", "does not exist"),
        (lambda dsn: dsn.replace("postgres@", "ghost_role@"), "ghost_role"),
    ],
    ids=["wrong-database", "wrong-role"],
)
async def test_a_store_the_database_refuses_says_why_and_is_not_ready(
    start_sidecar: StartSidecar,
    postgres_dsn: str,
    caplog: pytest.LogCaptureFixture,
    change: Callable[[str], str],
    cause: str,
) -> None:
    dsn = change(postgres_dsn)
    sidecar = await start_sidecar(
        {"stores": {"audit": {"backend": "postgres", "postgres": {"dsn": dsn}}}}
    )
    with pytest.raises(StoreUnavailableError) as refused:
        await SidecarSession("s", "audit", url=sidecar.url, retries=0).get_items()
    assert (refused.value.status, refused.value.code) == (503, "backend_misconfigured")
    assert "store 'audit'" in refused.value.message
    assert cause in refused.value.message
    status, body = await ready(sidecar)
    assert status == 503
    assert cause in body["details"]["audit"]
    assert "Traceback" not in caplog.text
