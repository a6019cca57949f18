"""`AdvancedSidecarSession` against the Agents SDK's own `AdvancedSQLiteSession`: the same
scripted conversation (the real `Runner`, tool calls and usage included) runs on both,
and every public read must be equal once ids and timestamps are set aside."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from agents import Agent, Runner
from agents.extensions.memory import AdvancedSQLiteSession
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call
from agents.usage import Usage
from convostore import AdvancedSidecarSession, SidecarStore
from convostore_sidecar.keyring import generate_key

from tests.support import (
    POSTGRES_POOLED,
    REDIS_CLUSTER,
    SQLALCHEMY_POSTGRES,
    SQLALCHEMY_SQLITE,
    StartSidecar,
    lookup_weather,
    unique,
)

BRANCHING = (
    "sqlite",
    "postgres",
    "redis",
    REDIS_CLUSTER,
    POSTGRES_POOLED,
    "sqlalchemy",
    SQLALCHEMY_POSTGRES,
    SQLALCHEMY_SQLITE,
)
StoreConfig = Callable[..., dict[str, Any]]


def scrub(value: Any) -> Any:
    """The value without what legitimately differs: ids and timestamps."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if k not in ("id", "timestamp", "created_at")}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value


def step(output: Any, tokens: int) -> ModelStep:
    usage = Usage(requests=1, input_tokens=tokens, output_tokens=tokens // 2)
    usage.total_tokens = usage.input_tokens + usage.output_tokens
    return ModelStep(output=[output], usage=usage)


async def outcome(call: Callable[[], Awaitable[Any]]) -> Any:
    """What a call returns, or the error it raises, as a comparable value."""
    try:
        return await call()
    except ValueError as exc:
        return ("ValueError", str(exc))


async def converse(session: Any) -> dict[str, Any]:
    """A scripted conversation with branches, tools and usage; every read, in order."""
    model = ScriptedModel(
        [
            step(assistant_message("Hi Ada"), 10),
            step(function_call("lookup_weather", {"city": "Oslo"}, call_id="call_1"), 20),
            step(assistant_message("Sunny in Oslo"), 30),
            step(assistant_message("You are Ada"), 40),
            step(function_call("lookup_weather", {"city": "Bergen"}, call_id="call_2"), 50),
            step(assistant_message("Sunny in Bergen"), 60),
            step(assistant_message("Hello again"), 70),
        ]
    )
    agent = Agent(name="assistant", model=model, tools=[lookup_weather])
    reads: dict[str, Any] = {}

    async def run(text: str) -> None:
        result = await Runner.run(agent, text, session=session)
        await session.store_run_usage(result)

    async def read_all(label: str) -> None:
        reads[f"{label} items"] = await session.get_items()
        reads[f"{label} latest 3"] = await session.get_items(3)
        reads[f"{label} turns"] = await session.get_conversation_turns()
        reads[f"{label} by turns"] = await session.get_conversation_by_turns()
        reads[f"{label} tools"] = await session.get_tool_usage()
        reads[f"{label} turn usage"] = await session.get_turn_usage()
        reads[f"{label} turn 2 usage"] = await session.get_turn_usage(2)
        reads[f"{label} turn 9 usage"] = await session.get_turn_usage(9)
        reads[f"{label} session usage"] = await session.get_session_usage()
        # listed by creation time, which the SDK keeps to the second: compared by id
        branches = await session.list_branches()
        reads[f"{label} branches"] = sorted(branches, key=lambda b: str(b["branch_id"]))
        reads[f"{label} weather"] = await session.find_turns_by_content("WEATHER")
        reads[f"{label} nothing"] = await session.find_turns_by_content("zebra")

    for text in ("My name is Ada", "Weather in Oslo?", "What is my name?"):
        await run(text)
    await read_all("main")
    reads["branch from turn 2"] = await session.create_branch_from_turn(2, "retry")
    await read_all("retry before")
    await run("Weather in Bergen?")
    await read_all("retry after")
    reads["main from retry"] = await session.get_items(branch_id="main")
    reads["main usage"] = await session.get_session_usage("main")
    reads["retry usage"] = await session.get_session_usage("retry")
    reads["unknown branch items"] = await session.get_items(branch_id="nowhere")
    reads["unknown branch turns"] = await session.get_conversation_turns("nowhere")
    reads["by content"] = await session.create_branch_from_content("bergen", "bergen-again")
    await read_all("by content")
    await run("Hello?")
    reads["errors"] = [
        await outcome(lambda: session.create_branch_from_turn(99)),
        await outcome(lambda: session.create_branch_from_turn(1, "retry")),
        await outcome(lambda: session.create_branch_from_turn(1, "  ")),
        await outcome(lambda: session.create_branch_from_content("zebra")),
        await outcome(lambda: session.delete_branch("main")),
        await outcome(lambda: session.delete_branch("bergen-again")),
        await outcome(lambda: session.delete_branch("nowhere")),
        await outcome(lambda: session.switch_to_branch("nowhere")),
    ]
    await session.switch_to_branch("main")
    reads["popped"] = await session.pop_item()
    await read_all("main popped")
    await session.delete_branch("retry")
    await read_all("retry deleted")
    reads["switch to deleted"] = await outcome(lambda: session.switch_to_branch("retry"))
    await session.switch_to_branch("bergen-again")
    reads["force delete"] = await session.delete_branch("bergen-again", force=True)
    await read_all("forced")
    await session.clear_session()
    await read_all("cleared")
    reads["reuse after clear"] = await outcome(lambda: session.create_branch_from_turn(1, "retry"))
    return reads


@pytest.mark.parametrize("backend", BRANCHING)
@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
async def test_advanced_session_matches_the_sdks_own(
    backend: str,
    encrypted: bool,
    tmp_path: Path,
    start_sidecar: StartSidecar,
    store_config: StoreConfig,
) -> None:
    theirs = AdvancedSQLiteSession(
        session_id="ada", db_path=tmp_path / "sdk.db", create_tables=True
    )
    try:
        expected = scrub(await converse(theirs))
    finally:
        theirs.close()
    at_rest = {"encryption": {"keys": [{"id": "k1", "value": generate_key()}]}}
    config = store_config(backend, **(at_rest if encrypted else {}))
    sidecar = await start_sidecar({"stores": {"chat": config}})
    ours = scrub(await converse(AdvancedSidecarSession(unique(), "chat", url=sidecar.url)))
    assert ours.keys() == expected.keys()
    for key in expected:
        assert ours[key] == expected[key], key
    assert expected["main turns"][1]["full_content"] == "Weather in Oslo?"
    assert expected["retry after session usage"]["total_turns"] == 4


async def test_usage_goes_to_the_writers_own_turn_under_concurrent_writers(
    start_sidecar: StartSidecar, store_config: StoreConfig
) -> None:
    sidecar = await start_sidecar({"stores": {"chat": store_config("sqlite")}})
    session_id = unique()
    first, second = (AdvancedSidecarSession(session_id, "chat", url=sidecar.url) for _ in range(2))
    await first.add_items([{"role": "user", "content": "first writer"}])
    await second.add_items([{"role": "user", "content": "second writer"}])
    await first.add_items([{"role": "assistant", "content": "answer to first"}])
    run = SimpleNamespace(
        context_wrapper=SimpleNamespace(usage=Usage(requests=1, input_tokens=7, total_tokens=7))
    )
    await first.store_run_usage(run)
    turns = await first.get_turn_usage()
    assert isinstance(turns, list)
    assert [(t["user_turn_number"], t["input_tokens"]) for t in turns] == [(1, 7)]
    for _ in range(3):
        await second.pop_item()
    await second.add_items([{"role": "user", "content": "a new first turn"}])
    await first.store_run_usage(run)
    assert await first.get_turn_usage() == []
    assert await second.get_session_usage() is None


VERSION_1 = """
CREATE TABLE convostore_schema (version INTEGER NOT NULL);
INSERT INTO convostore_schema VALUES (1);
CREATE TABLE convostore_sessions (
    store TEXT NOT NULL, session_id TEXT NOT NULL,
    next_seq INTEGER NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (store, session_id)
) WITHOUT ROWID;
CREATE TABLE convostore_items (
    store TEXT NOT NULL, session_id TEXT NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (store, session_id, seq)
);
CREATE TABLE convostore_idempotency (
    store TEXT NOT NULL, session_id TEXT NOT NULL, key TEXT NOT NULL,
    fingerprint TEXT NOT NULL, appended INTEGER NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (store, session_id, key)
) WITHOUT ROWID;
INSERT INTO convostore_sessions VALUES ('chat', 'old', 2, 4102444800);
INSERT INTO convostore_items
    VALUES ('chat', 'old', 0, CAST('{"role":"user","content":"before"}' AS BLOB));
INSERT INTO convostore_items
    VALUES ('chat', 'old', 1, CAST('{"role":"assistant","content":"a"}' AS BLOB));
"""


@pytest.fixture
def version_1_file(tmp_path: Path) -> Path:
    path = tmp_path / "v1.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(VERSION_1)
    return path


async def test_a_version_1_sqlite_file_gains_structure_and_keeps_its_items(
    version_1_file: Path, start_sidecar: StartSidecar
) -> None:
    config = {"backend": "sqlite", "sqlite": {"path": str(version_1_file)}}
    sidecar = await start_sidecar({"stores": {"chat": config}})
    session = AdvancedSidecarSession("old", "chat", url=sidecar.url)
    assert [i["content"] for i in await session.get_items()] == ["before", "a"]
    await session.add_items([{"role": "user", "content": "after"}])
    # items written before the structure existed count as turn 0 of main
    assert [t["full_content"] for t in await session.get_conversation_turns()] == ["after"]
    await session.create_branch_from_turn(1, "fresh")
    assert [i["content"] for i in await session.get_items()] == ["before", "a"]
    with sqlite3.connect(version_1_file) as conn:
        assert conn.execute("SELECT version FROM convostore_schema").fetchall() == [(3,)]
    # sessions made before they had a creation time are taken as made at their last write
    record = await session.set_metadata({"user_id": "u1"})
    assert record["created_at"] == "2100-01-01T00:00:00Z"
    listed = SidecarStore("chat", sidecar.url).find_sessions({"user_id": "u1"})
    assert [r["session_id"] async for r in listed] == ["old"]
