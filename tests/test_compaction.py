"""Compaction in the store, against the Agents SDK's own `OpenAIResponsesCompactionSession`:
the same scripted conversation through the real Runner, once over the SDK's SQLiteSession
and once over `SidecarSession` on each backend (a `convostore sidecar` process), both
compacting through the `responses.compact` stand-in with the real `openai` client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from agents.memory import OpenAIResponsesCompactionSession, SQLiteSession
from convostore import SidecarSession, SidecarStore
from convostore.errors import RequestRejectedError
from convostore_sidecar.keyring import generate_key
from openai import AsyncOpenAI

from tests.compaction_support import compaction_config, converse, history
from tests.openai_standin import OpenAIStandIn
from tests.support import (
    POSTGRES_POOLED,
    SidecarProcess,
    attributes,
    eventually,
    otlp_receiver,
    unique,
)
from tests.test_process import run_cli

COMPACTING = ("sqlite", "postgres", "redis", POSTGRES_POOLED, "sqlalchemy")


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
    theirs = await converse(sdk_session, store=store, api=openai_api)
    await client.close()
    their_requests = list(openai_api.compact_bodies)
    openai_api.compact_bodies.clear()

    compaction = compaction_config(openai_api, openai_key_file)
    sidecar = sidecar_process({"stores": {"default": store_config(backend, compaction=compaction)}})
    sidecar.start()
    ours = await converse(SidecarSession(unique(), url=sidecar.url), store=store, api=openai_api)

    assert len(their_requests) >= 2
    assert all(("input" in body) == (store is False) for body in their_requests)
    assert openai_api.compact_bodies == their_requests
    assert ours.inputs == theirs.inputs
    assert ours.usage.requests == theirs.usage.requests
    assert ours.usage.total_tokens == theirs.usage.total_tokens > 0


@pytest.mark.parametrize(
    "store",
    [None, False],
    ids=["compaction_session_example", "compaction_session_stateless_example"],
)
async def test_the_sdks_compaction_session_wraps_a_sidecar_session_as_it_wraps_sqlite(
    store: bool | None,
    store_config: Callable[..., dict[str, Any]],
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
    openai_api: OpenAIStandIn,
    tmp_path: Path,
) -> None:
    """The SDK's example wraps its compaction session around another session; around a
    `SidecarSession` (a store that does not compact itself) it reads every item with
    `limit=2**31 - 1` and rewrites the history: the model, the compaction calls and the
    stored history are the same as around the SDK's SQLiteSession."""
    outcomes = []
    sidecar = sidecar_process({"stores": {"default": store_config("sqlite")}})
    sidecar.start()
    for underlying in (
        SQLiteSession("sdk", str(tmp_path / "sdk.db")),
        SidecarSession(unique(), url=sidecar.url),
    ):
        client = AsyncOpenAI(
            api_key=openai_api.api_key, base_url=openai_api.base_url, max_retries=0
        )
        wrapped = OpenAIResponsesCompactionSession("s", underlying, client=client)
        conversation = await converse(wrapped, store=store, api=openai_api)
        await client.close()
        outcomes.append(
            (conversation.inputs, list(openai_api.compact_bodies), await underlying.get_items())
        )
        openai_api.compact_bodies.clear()
    theirs, ours = outcomes
    assert len(theirs[1]) >= 2, "the SDK's session compacted"
    assert ours == theirs


@pytest.fixture
def compacting_store(
    store_config: Callable[..., dict[str, Any]], openai_api: OpenAIStandIn, openai_key_file: Path
) -> Callable[..., dict[str, Any]]:
    """A sidecar config whose one store compacts through the stand-in."""

    def make(
        backend: str, *, compaction: dict[str, Any] | None = None, **store: Any
    ) -> dict[str, Any]:
        settings = compaction_config(openai_api, openai_key_file, **(compaction or {}))
        return {"stores": {"default": store_config(backend, compaction=settings, **store)}}

    return make


@pytest.fixture
def compacting_sidecar(
    compacting_store: Callable[..., dict[str, Any]],
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
) -> Callable[..., SidecarProcess]:
    """A started `convostore sidecar` serving `compacting_store(...)`, or a given config."""

    def start(backend: str | dict[str, Any], **options: Any) -> SidecarProcess:
        config = backend if isinstance(backend, dict) else compacting_store(backend, **options)
        process = sidecar_process(config)
        process.start()
        return process

    return start


@pytest.mark.parametrize("backend", COMPACTING)
async def test_nothing_is_thrown_away_and_export_writes_it_all(
    backend: str,
    compacting_sidecar: Callable[..., SidecarProcess],
    openai_api: OpenAIStandIn,
    tmp_path: Path,
) -> None:
    sidecar = compacting_sidecar(backend)
    session = SidecarSession(unique(), url=sidecar.url)
    await converse(session, store=None, api=openai_api)
    plain = SQLiteSession("plain", str(tmp_path / "plain.db"))
    await converse(plain, store=None)
    said = await plain.get_items()
    live = await session.get_items()
    assert len(live) < len(said)
    assert live[0]["type"] == "compaction"
    assert await session.get_full_items() == said
    assert await session.get_full_items(limit=3) == said[-3:]

    for view, expected in (("full", said), ("live", live)):
        exported = tmp_path / f"{view}.jsonl"
        command = ["sessions", "--url", sidecar.url, "export", "--view", view, "-o", str(exported)]
        assert run_cli(*command).returncode == 0
        records = [json.loads(line) for line in exported.read_text().splitlines()]
        assert records[0] == {"convostore_export": 2}
        assert [r["item"] for r in records if "item" in r] == expected
        assert {r["session_id"] for r in records[1:]} == {session.session_id}


def said(item_id: str) -> dict[str, Any]:
    """An assistant message as a response's output holds it, and the Runner stores it."""
    text = {"type": "output_text", "text": f"said as {item_id}", "annotations": []}
    return {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [text],
    }


@pytest.mark.parametrize("backend", COMPACTING)
async def test_a_compaction_chains_only_from_the_sessions_own_responses(
    backend: str, compacting_sidecar: Callable[..., SidecarProcess], openai_api: OpenAIStandIn
) -> None:
    """A token holder naming another conversation's response would have the sidecar's key
    summarise that chain into their session: refused unless the response's output is in
    the session, and no compaction is asked of the model."""
    openai_api.responses["resp_theirs"] = [said("msg_theirs")]
    openai_api.responses["resp_mine"] = [said("msg_mine")]
    sidecar = compacting_sidecar(backend)
    session = SidecarSession(unique(), url=sidecar.url)
    await session.add_items([*history(3), said("msg_mine")])
    before = await session.get_items()
    chain = {"compaction_mode": "previous_response_id", "force": True}
    for foreign in ("resp_theirs", "resp_never_made"):
        with pytest.raises(RequestRejectedError) as refused:
            await session.run_compaction({**chain, "response_id": foreign})
        assert refused.value.code == "response_not_in_session"
    assert openai_api.compact_bodies == []
    assert await session.get_items() == before

    await session.run_compaction({**chain, "response_id": "resp_mine"})
    assert session.last_compaction is not None
    assert session.last_compaction["compacted"] is True
    assert openai_api.compact_bodies[-1]["previous_response_id"] == "resp_mine"


@pytest.mark.parametrize("backend", COMPACTING)
async def test_recent_user_turns_stay_verbatim_after_the_summary(
    backend: str, compacting_sidecar: Callable[..., SidecarProcess], openai_api: OpenAIStandIn
) -> None:
    sidecar = compacting_sidecar(backend, compaction={"keepRecentTurns": 2})
    session = SidecarSession(unique(), url=sidecar.url)
    await session.add_items(history(6))
    await session.run_compaction({"response_id": "resp_1"})

    assert session.last_compaction is not None
    assert session.last_compaction["mode"] == "input"  # a response chain would cover the kept turns
    assert (session.last_compaction["replaced"], session.last_compaction["kept"]) == (16, 8)
    assert openai_api.compact_bodies[-1]["input"] == history(6)[:16]
    live = await session.get_items()
    assert live[-8:] == history(6)[-8:]
    assert [item.get("role") or item["type"] for item in live[:-8]] == ["user"] * 4 + ["compaction"]

    await session.run_compaction({"compaction_mode": "previous_response_id", "force": True})
    assert session.last_compaction["reason"] == "partial_needs_input"


@pytest.mark.parametrize("backend", COMPACTING)
async def test_a_tool_call_is_never_separated_from_its_output(
    backend: str, compacting_sidecar: Callable[..., SidecarProcess], openai_api: OpenAIStandIn
) -> None:
    sidecar = compacting_sidecar(backend)
    session = SidecarSession(unique(), url=sidecar.url)
    pending = [
        *history(4),
        {"type": "function_call", "call_id": "late", "name": "f", "arguments": "{}"},
    ]
    await session.add_items(pending)
    await session.run_compaction({"force": True})
    assert session.last_compaction is not None
    assert session.last_compaction["reason"] == "tool_call_pending"
    assert await session.get_items() == pending
    assert openai_api.compact_bodies == []

    await session.add_items([{"type": "function_call_output", "call_id": "late", "output": "ok"}])
    await session.run_compaction({"force": True})
    assert session.last_compaction["compacted"]


@pytest.mark.parametrize("backend", COMPACTING)
async def test_compacted_and_archived_items_stay_encrypted_through_a_key_rotation(
    backend: str,
    compacting_store: Callable[..., dict[str, Any]],
    compacting_sidecar: Callable[..., SidecarProcess],
) -> None:
    old, new = {"id": "old", "value": generate_key()}, {"id": "new", "value": generate_key()}
    config = compacting_store(backend, encryption={"keys": [old]})
    sidecar = compacting_sidecar(config)
    session_id = unique()
    await converse(SidecarSession(session_id, url=sidecar.url), store=False)
    live = await SidecarSession(session_id, url=sidecar.url).get_items()
    full = await SidecarSession(session_id, url=sidecar.url).get_full_items()
    summary = 1 + max(i for i, item in enumerate(live) if item.get("type") == "compaction")
    sidecar.stop()

    config["stores"]["default"]["encryption"] = {"keys": [new, old], "primary": "new"}
    rotating = compacting_sidecar(config)
    assert await SidecarSession(session_id, url=rotating.url).reencrypt() == summary + len(full)
    rotating.stop()

    config["stores"]["default"]["encryption"] = {"keys": [new]}
    reread = SidecarSession(session_id, url=compacting_sidecar(config).url)
    assert await reread.get_items() == live
    assert await reread.get_full_items() == full


@pytest.mark.parametrize("backend", COMPACTING)
async def test_a_subjects_compacted_history_rotates_exports_and_is_shredded(
    backend: str,
    compacting_store: Callable[..., dict[str, Any]],
    compacting_sidecar: Callable[..., SidecarProcess],
) -> None:
    """With a subject label, the summary and the archive are sealed under the subject's
    key: a rotation re-wraps that key and seals no item again, the export seals them
    and restores the compaction into the store, and the subject's erasure leaves
    nothing."""
    old, new = {"id": "old", "value": generate_key()}, {"id": "new", "value": generate_key()}
    config = compacting_store(backend, encryption={"keys": [old], "subjectLabel": "user_id"})
    sidecar = compacting_sidecar(config)
    session_id, person = unique(), unique("person")
    labels = {"user_id": person, "topic": "compacted"}
    labelled = SidecarSession(session_id, url=sidecar.url, metadata=labels)
    await converse(labelled, store=False)
    kept = SidecarSession(unique(), url=sidecar.url, metadata={"user_id": person})
    await kept.add_items([{"role": "user", "content": "keeps the subject's key"}])
    live = await SidecarSession(session_id, url=sidecar.url).get_items()
    full = await SidecarSession(session_id, url=sidecar.url).get_full_items()
    assert any(item.get("type") == "compaction" for item in live)
    sidecar.stop()

    encryption = {"keys": [new, old], "primary": "new", "subjectLabel": "user_id"}
    config["stores"]["default"]["encryption"] = encryption
    rotating = compacting_sidecar(config)
    assert await SidecarStore("default", rotating.url).rewrap_subject_keys() == 1
    assert await SidecarSession(session_id, url=rotating.url).reencrypt() == 0
    rotating.stop()

    config["stores"]["default"]["encryption"] = {"keys": [new], "subjectLabel": "user_id"}
    current = compacting_sidecar(config)
    reread = SidecarSession(session_id, url=current.url)
    assert await reread.get_items() == live
    assert await reread.get_full_items() == full
    exported = run_cli("sessions", "--url", current.url, "export")
    assert exported.returncode == 0, exported.stderr
    records = [json.loads(line) for line in exported.stdout.splitlines()]
    mine = [r for r in records if r.get("session_id") == session_id]
    assert mine[0] == {"session_id": session_id, "labels": labels}
    assert len([r for r in mine if "item" in r]) == len(full)
    summary = next(r["archive"]["summary"] for r in mine if "archive" in r)
    sealed = [r["item"] for r in mine if "item" in r] + summary
    assert {item["type"] for item in sealed} == {"convostore.sealed"}
    store = SidecarStore("default", current.url)
    assert (await store.erase({"topic": "compacted"}))["erased_sessions"] == 1
    imported = run_cli("sessions", "--url", current.url, "import", "-", stdin=exported.stdout)
    assert imported.returncode == 0, imported.stderr
    assert "1 compactions restored" in imported.stderr
    assert await reread.get_items() == live
    assert await reread.get_full_items() == full
    assert (await store.erase({"user_id": person}))["erased_sessions"] == 2
    assert await reread.get_full_items() == []


def test_export_from_a_store_that_keeps_no_archive_writes_its_live_items(
    store_config: Callable[..., dict[str, Any]],
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
) -> None:
    sidecar = sidecar_process({"stores": {"default": store_config("dapr")}})
    sidecar.start()
    asyncio.run(SidecarSession("s1", url=sidecar.url).add_items(history(2)))
    exported = run_cli("sessions", "--url", sidecar.url, "export")
    assert exported.returncode == 0, exported.stderr
    records = [json.loads(line) for line in exported.stdout.splitlines()]
    assert records[0] == {"convostore_export": 2}
    assert [record["item"] for record in records[1:]] == history(2)


async def test_a_compactions_model_call_is_a_span_under_its_request(
    compacting_sidecar: Callable[..., SidecarProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With tracing on, the call to the model is a span of the compaction's request,
    naming the model and no item."""
    async with otlp_receiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        sidecar = compacting_sidecar("sqlite")
        session = SidecarSession(unique(), url=sidecar.url)
        await session.add_items(history(4))
        await session.run_compaction({"force": True})
        assert session.last_compaction is not None
        assert session.last_compaction["compacted"]

        def model_spans() -> list[Any]:
            return [s for s in receiver.spans if "gen_ai.operation.name" in attributes(s)]

        def with_parent() -> bool:
            """The request's span ends after the model call's: it may come in a later
            export."""
            parents = {s.parent_span_id for s in model_spans()}
            return any(s.span_id in parents for s in receiver.spans)

        await eventually(with_parent, within=30)
        [model] = model_spans()
        found = attributes(model)
        assert found["gen_ai.operation.name"] == "compact"
        assert model.name == f"compact {found['gen_ai.request.model']}"
        [request] = [s for s in receiver.spans if s.span_id == model.parent_span_id]
        assert request.name == "POST /v1/stores/{store}/sessions/{session_id}/items:compact"
        assert b"question" not in b"".join(s.SerializeToString() for s in receiver.spans)
