"""Compaction in the store, against the Agents SDK's own `OpenAIResponsesCompactionSession`:
the same scripted conversation through the real Runner, once over the SDK's SQLiteSession
and once over `SidecarSession` on each backend (a `convostore sidecar` process), both
compacting through the `responses.compact` stand-in with the real `openai` client."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from agents.memory import OpenAIResponsesCompactionSession, SQLiteSession
from convostore import SidecarSession
from openai import AsyncOpenAI

from tests.compaction_support import compaction_config, converse
from tests.openai_standin import OpenAIStandIn
from tests.support import SidecarProcess, unique

COMPACTING = ("sqlite", "postgres", "redis")


@pytest.mark.parametrize("backend", COMPACTING)
@pytest.mark.parametrize("store", [None, False], ids=["previous_response_id", "input"])
async def test_the_model_sees_what_it_sees_with_the_sdks_compaction_session(
    backend: str,
    store: bool | None,
    store_config: Callable[..., dict[str, Any]],
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
    openai_api: OpenAIStandIn,
    openai_key_file: Path,
    tmp_path: Path,
) -> None:
    client = AsyncOpenAI(api_key=openai_api.api_key, base_url=openai_api.base_url, max_retries=0)
    sdk_session = OpenAIResponsesCompactionSession(
        "sdk", SQLiteSession("sdk", str(tmp_path / "sdk.db")), client=client
    )
    theirs = await converse(sdk_session, store=store)
    await client.close()
    their_requests = list(openai_api.compact_bodies)
    openai_api.compact_bodies.clear()

    compaction = compaction_config(openai_api, openai_key_file)
    sidecar = sidecar_process({"stores": {"default": store_config(backend, compaction=compaction)}})
    sidecar.start()
    ours = await converse(SidecarSession(unique(), url=sidecar.url), store=store)

    assert len(their_requests) >= 2
    assert all(("input" in body) == (store is False) for body in their_requests)
    assert openai_api.compact_bodies == their_requests
    assert ours.inputs == theirs.inputs
    assert ours.usage.requests == theirs.usage.requests
    assert ours.usage.total_tokens == theirs.usage.total_tokens > 0
