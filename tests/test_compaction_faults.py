"""Compaction when things go wrong, on every backend that compacts, with `convostore sidecar`
processes: the model call fails, another client appends while the model works, two
sidecars compact one session at once, the sidecar is killed mid-compaction. In each case
no acknowledged item is lost, none is doubled, and the history is either exactly as it
was or the summary followed by everything appended since."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from convostore import SidecarSession
from convostore.errors import StoreUnavailableError

from tests.compaction_support import compaction_config, converse, history
from tests.openai_standin import OpenAIStandIn
from tests.support import POSTGRES_POOLED, SidecarProcess, eventually, unique

COMPACTING = ("sqlite", "postgres", "redis", POSTGRES_POOLED, "sqlalchemy")
Start = Callable[..., SidecarProcess]


@pytest.fixture
def compacting(
    store_config: Callable[..., dict[str, Any]],
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
    openai_api: OpenAIStandIn,
    openai_key_file: Path,
) -> Callable[[str], tuple[dict[str, Any], Start]]:
    """A store config with compaction through the stand-in, and a way to start sidecars
    (as many as wanted) that serve it."""

    def make(backend: str) -> tuple[dict[str, Any], Start]:
        store = store_config(backend, compaction=compaction_config(openai_api, openai_key_file))
        config = {"stores": {"default": store}}

        def start() -> SidecarProcess:
            process = sidecar_process(config)
            process.start()
            return process

        return config, start

    return make


def summary_of(items: list[dict[str, Any]]) -> bool:
    """Whether `items` are what the stand-in returns: user messages, then one compaction."""
    return items[-1]["type"] == "compaction" and all(i.get("role") == "user" for i in items[:-1])


@pytest.mark.parametrize("backend", COMPACTING)
async def test_a_failed_model_call_leaves_the_history_as_it_was(
    backend: str,
    compacting: Callable[[str], tuple[dict[str, Any], Start]],
    openai_api: OpenAIStandIn,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, start = compacting(backend)
    sidecar = start()
    session = SidecarSession(unique(), url=sidecar.url)
    await session.add_items(history(4))
    before = await session.get_items()

    openai_api.fail(500, times=1)
    with pytest.raises(StoreUnavailableError) as failed:
        await session.run_compaction({"force": True})
    assert failed.value.code == "compaction_failed"
    assert "500" in failed.value.message
    assert await session.get_items() == before
    assert await session.get_full_items() == before

    openai_api.fail(503, times=100)
    with caplog.at_level(logging.WARNING, logger="convostore"):
        await converse(session, store=None, turns=1)  # the Runner's own call: logged, not raised
    assert "not compacted, history kept" in caplog.text
    assert session.last_compaction is not None
    assert session.last_compaction["reason"] == "compaction_failed"
    after = await session.get_items()
    assert after[: len(before)] == before
    assert len(after) == len(before) + 4
    async with aiohttp.ClientSession() as http, http.get(f"{sidecar.url}/metrics") as resp:
        metrics = await resp.text()
    failures = 'convostore_compactions_total{outcome="compaction_failed",store="default"} 2.0'
    assert failures in metrics
    assert "a compaction failed: compaction_failed" in sidecar.log_path.read_text()


@pytest.mark.parametrize("backend", COMPACTING)
async def test_appends_during_the_model_call_stay_after_the_summary(
    backend: str,
    compacting: Callable[[str], tuple[dict[str, Any], Start]],
    openai_api: OpenAIStandIn,
) -> None:
    _, start = compacting(backend)
    sidecar = start()
    session_id = unique()
    agent, other = (
        SidecarSession(session_id, url=sidecar.url),
        SidecarSession(session_id, url=sidecar.url),
    )
    await agent.add_items(history(4))
    openai_api.hold_compactions()
    compaction = asyncio.create_task(agent.run_compaction())
    await eventually(lambda: openai_api.compactions_waiting == 1)
    late = history(1, tools=False)
    await other.add_items(late)
    openai_api.release_compactions()
    await compaction

    assert agent.last_compaction is not None
    assert agent.last_compaction["compacted"]
    assert agent.last_compaction["replaced"] == 16
    live = await agent.get_items()
    assert summary_of(live[:-2])
    assert live[-2:] == late
    assert await agent.get_full_items() == history(4) + late


@pytest.mark.parametrize("backend", COMPACTING)
async def test_two_sidecars_compact_a_session_once(
    backend: str,
    compacting: Callable[[str], tuple[dict[str, Any], Start]],
    openai_api: OpenAIStandIn,
) -> None:
    _, start = compacting(backend)
    first, second = start(), start()
    session_id = unique()
    sessions = [SidecarSession(session_id, url=s.url) for s in (first, second)]
    await sessions[0].add_items(history(4))
    openai_api.hold_compactions()
    compactions = [asyncio.create_task(s.run_compaction({"force": True})) for s in sessions]
    await eventually(lambda: openai_api.compactions_waiting == 2)
    openai_api.release_compactions()
    await asyncio.gather(*compactions)

    outcomes = sorted(str(s.last_compaction and s.last_compaction.get("reason")) for s in sessions)
    assert outcomes == ["None", "history_changed"]
    live = await sessions[1].get_items()
    assert summary_of(live)
    assert len(live) == 5
    assert await sessions[1].get_full_items() == history(4)


@pytest.mark.parametrize("backend", COMPACTING)
async def test_a_sidecar_killed_during_compaction_loses_nothing(
    backend: str,
    compacting: Callable[[str], tuple[dict[str, Any], Start]],
    openai_api: OpenAIStandIn,
) -> None:
    """Killed while the model works, the history is as it was; killed the moment the
    model answers (before, during or after the replacement: the race decides), it is
    either as it was or compacted, never in between, and the originals are all kept."""
    _, start = compacting(backend)
    sidecar = start()
    session = SidecarSession(unique(), url=sidecar.url, retries=0)
    await session.add_items(history(4))
    openai_api.hold_compactions()
    compaction = asyncio.create_task(session.run_compaction({"force": True}))
    await eventually(lambda: openai_api.compactions_waiting == 1)
    sidecar.stop(signal.SIGKILL)
    with pytest.raises(StoreUnavailableError):
        await compaction
    openai_api.release_compactions()
    sidecar = start()
    assert await SidecarSession(session.session_id, url=sidecar.url).get_items() == history(4)

    for _ in range(3):
        before = await SidecarSession(session.session_id, url=sidecar.url).get_items()
        session = SidecarSession(session.session_id, url=sidecar.url, retries=0)
        openai_api.hold_compactions()
        compaction = asyncio.create_task(session.run_compaction({"force": True}))
        await eventually(lambda: openai_api.compactions_waiting == 1)
        openai_api.release_compactions()
        sidecar.stop(signal.SIGKILL)
        with contextlib.suppress(StoreUnavailableError):
            await compaction
        sidecar = start()
        after = SidecarSession(session.session_id, url=sidecar.url)
        live = await after.get_items()
        assert live == before or summary_of(live)
        assert await after.get_full_items() == history(4)
