"""`POST .../items:compact` and `view=full` as an API: malformed and hostile requests get
a clear 4xx and change nothing; stores that do not compact say why; the model's key never
shows; the trigger, branches and retention behave as documented."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from agents import Agent, Runner
from agents.testing import ScriptedModel, assistant_message
from convostore import AdvancedSidecarSession, SidecarSession
from convostore.errors import RequestRejectedError, StoreUnavailableError

from tests.compaction_support import compaction_config, history
from tests.openai_standin import OpenAIStandIn
from tests.support import RunningSidecar, StartSidecar, unique

StoreConfig = Callable[..., dict[str, Any]]


@pytest.fixture
async def sidecar(
    start_sidecar: StartSidecar,
    store_config: StoreConfig,
    openai_api: OpenAIStandIn,
    openai_key_file: Path,
) -> RunningSidecar:
    """Two stores on SQLite: `chat` compacts through the stand-in, `plain` does not."""
    compaction = compaction_config(openai_api, openai_key_file)
    return await start_sidecar(
        {
            "stores": {
                "chat": store_config("sqlite", compaction=compaction),
                "plain": store_config("sqlite"),
            }
        }
    )


@pytest.mark.parametrize(
    ("options", "status", "code"),
    [
        (
            {"data": b"{not json", "headers": {"Content-Type": "application/json"}},
            400,
            "invalid_body",
        ),
        ({"json": [1, 2]}, 400, "invalid_body"),
        ({"json": {"force": True, "extra": 1}}, 400, "invalid_body"),
        ({"json": {"force": "yes"}}, 400, "invalid_body"),
        ({"json": {"store": "false"}}, 400, "invalid_body"),
        ({"json": {"compaction_mode": "chain"}}, 400, "invalid_body"),
        ({"json": {"response_id": 7}}, 400, "invalid_body"),
        ({"json": {"response_id": ""}}, 400, "invalid_body"),
        ({"json": {"response_id": "x" * 257}}, 400, "invalid_body"),
        ({"json": {"response_id": "résumé"}}, 400, "invalid_body"),
        ({"json": {"response_id": "a b"}}, 400, "invalid_body"),
        (
            {"json": {"compaction_mode": "previous_response_id", "force": True}},
            400,
            "response_id_required",
        ),
        (
            {"data": b"force=1", "headers": {"Content-Type": "text/plain"}},
            415,
            "unsupported_media_type",
        ),
        ({"json": {"response_id": "r" * 10_000}}, 413, "request_too_large"),
        ({"json": {}, "params": {"branch": "../x"}}, 400, "invalid_branch_id"),
        ({"json": {}, "params": {"branch": "main/archive"}}, 400, "invalid_branch_id"),
        ({"json": {}, "params": {"branch": "nope"}}, 404, "branch_not_found"),
    ],
)
async def test_bad_requests_get_a_clear_error_and_change_nothing(
    sidecar: RunningSidecar,
    openai_api: OpenAIStandIn,
    options: dict[str, Any],
    status: int,
    code: str,
) -> None:
    session = SidecarSession(unique(), "chat", url=sidecar.url)
    await session.add_items(history(4))
    url = f"{sidecar.url}/v1/stores/chat/sessions/{session.session_id}/items:compact"
    async with aiohttp.ClientSession() as http, http.post(url, **options) as resp:
        assert (resp.status, (await resp.json())["error"]["code"]) == (status, code)
    assert await session.get_items() == history(4)
    assert openai_api.compact_bodies == []


async def test_the_archive_is_no_branch_a_client_can_name(sidecar: RunningSidecar) -> None:
    session = AdvancedSidecarSession(unique(), "chat", url=sidecar.url)
    await session.add_items(history(4))
    await session.run_compaction({"force": True})
    url = f"{sidecar.url}/v1/stores/chat/sessions/{session.session_id}"
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/items", params={"branch": "main/archive"}) as resp:
            assert resp.status == 400
        async with http.get(url + "/branches") as resp:
            assert [b["branch_id"] for b in (await resp.json())["branches"]] == ["main"]


async def test_a_store_without_compaction_answers_409_and_the_runner_asks_once(
    sidecar: RunningSidecar,
) -> None:
    """The Runner asks after every turn, and agents often make a session per request:
    a store that said it does not compact is not asked again for a minute."""
    model = ScriptedModel([[assistant_message(f"a{n}")] for n in range(3)])
    session_id = unique()
    for n in range(3):
        per_request = SidecarSession(session_id, "plain", url=sidecar.url)
        await Runner.run(Agent(name="a", model=model), f"q{n}", session=per_request)
    assert len(await per_request.get_items()) == 6
    assert sidecar_requests(await metrics(sidecar), "/items:compact", "409") == 1

    with pytest.raises(RequestRejectedError) as refused:
        await per_request.run_compaction()  # called directly, it asks, and says why not
    assert (refused.value.status, refused.value.code) == (409, "compaction_not_configured")
    assert sidecar_requests(await metrics(sidecar), "/items:compact", "409") == 2


async def metrics(sidecar: RunningSidecar) -> str:
    async with aiohttp.ClientSession() as http, http.get(sidecar.url + "/metrics") as resp:
        return await resp.text()


def sidecar_requests(text: str, route: str, status: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("convostore_requests_total{")
        and route in line
        and f'status="{status}"' in line
    )


async def test_the_model_key_never_shows_in_errors_or_logs(
    sidecar: RunningSidecar, openai_api: OpenAIStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    openai_api.api_key = "sk-proj-another-key-0000000000000000"
    session = SidecarSession(unique(), "chat", url=sidecar.url)
    await session.add_items(history(4))
    with pytest.raises(StoreUnavailableError) as failed:
        await session.run_compaction({"force": True})
    assert (failed.value.status, failed.value.code) == (502, "compaction_failed")
    assert "401" in failed.value.message
    assert "sk-test" not in failed.value.message
    assert "0123456789abcdef"[-4:] not in failed.value.message
    assert "sk-test" not in caplog.text
    assert await session.get_items() == history(4)


async def test_the_trigger_counts_what_compaction_shrinks_or_estimated_tokens(
    start_sidecar: StartSidecar,
    store_config: StoreConfig,
    openai_api: OpenAIStandIn,
    openai_key_file: Path,
) -> None:
    by_items = compaction_config(openai_api, openai_key_file, trigger={"items": 4})
    by_tokens = compaction_config(openai_api, openai_key_file, trigger={"tokens": 200})
    sidecar = await start_sidecar(
        {
            "stores": {
                "items": store_config("sqlite", compaction=by_items),
                "tokens": store_config("sqlite", compaction=by_tokens),
            }
        }
    )
    users = [{"role": "user", "content": f"u{n}"} for n in range(20)]
    for store, below, above in (
        ("items", users + history(1), history(2)[:-1]),
        ("tokens", history(2), history(4)),
    ):
        for items, compacts in ((below, False), (above, True)):
            session = SidecarSession(unique(), store, url=sidecar.url)
            await session.add_items(items)
            await session.run_compaction()
            assert session.last_compaction is not None
            assert session.last_compaction["compacted"] is compacts, (store, len(items))
            if not compacts:
                assert session.last_compaction["reason"] == "below_threshold"


async def test_an_advanced_session_compacts_its_current_branch_only(
    sidecar: RunningSidecar,
) -> None:
    session = AdvancedSidecarSession(unique(), "chat", url=sidecar.url)
    await session.add_items(history(4))
    await session.create_branch_from_turn(3, "alt")
    await session.add_items(history(4))
    await session.run_compaction({"force": True})
    assert session.last_compaction is not None
    assert session.last_compaction["compacted"]
    assert await session.get_items(branch_id="main") == history(4)
    alt = await session.get_items()
    assert alt[-1]["type"] == "compaction"
    assert await session.get_full_items() == history(4)[:8] + history(4)


async def test_the_archive_ages_out_with_the_session(
    start_sidecar: StartSidecar,
    store_config: StoreConfig,
    openai_api: OpenAIStandIn,
    openai_key_file: Path,
) -> None:
    compaction = compaction_config(openai_api, openai_key_file)
    config = store_config("sqlite", compaction=compaction, ttl=1)
    sidecar = await start_sidecar({"stores": {"chat": config}})
    session = SidecarSession(unique(), "chat", url=sidecar.url)
    await session.add_items(history(4))
    await session.run_compaction()
    assert await session.get_full_items() == history(4)
    deadline = asyncio.get_running_loop().time() + 10
    while await session.get_full_items():
        assert asyncio.get_running_loop().time() < deadline, "the archive outlived the session"
        await asyncio.sleep(0.1)
    assert await session.get_items() == []


async def test_a_model_that_does_not_answer_in_time_changes_nothing(
    start_sidecar: StartSidecar,
    store_config: StoreConfig,
    openai_api: OpenAIStandIn,
    openai_key_file: Path,
) -> None:
    compaction = compaction_config(openai_api, openai_key_file, timeout=0.3)
    sidecar = await start_sidecar(
        {"stores": {"chat": store_config("sqlite", compaction=compaction)}}
    )
    session = SidecarSession(unique(), "chat", url=sidecar.url)
    await session.add_items(history(4))
    openai_api.compact_delay = 2.0
    with pytest.raises(StoreUnavailableError) as late:
        await session.run_compaction({"force": True})
    assert (late.value.status, late.value.code) == (504, "compaction_timeout")
    assert await session.get_items() == history(4)
    openai_api.compact_delay = 0.0
    await session.run_compaction({"force": True})
    assert session.last_compaction is not None
    assert session.last_compaction["compacted"]
