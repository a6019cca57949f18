"""The Agents SDK's own memory examples (`examples/memory` in its repository: the SQLite,
Redis and Dapr ones), each taken step by step as a script of ours and run twice: with the
SDK's session class, and with the one line that makes the session changed to the line the
README's "From the SDK's class to ours" gives. The model is a `ScriptedModel`; what the
script prints, every input the model is given and the stored history must be equal.
(SQLite, SQLAlchemy, OpenAI's Conversations, Redis, Dapr and the advanced session here;
the compaction wrapper's examples in `test_compaction.py`, the encrypted one in
`test_sdk_fidelity.py`.)"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from agents import Agent, OpenAIConversationsSession, Runner, SQLiteSession, function_tool
from agents.extensions.memory import (
    AdvancedSQLiteSession,
    DaprSession,
    RedisSession,
    SQLAlchemySession,
)
from agents.memory import SessionABC
from agents.testing import ScriptedModel, assistant_message, function_call
from convostore import AdvancedSidecarSession, SidecarSession
from dapr.conf import settings as dapr_settings

from tests.dapr_standin import DaprStandIn
from tests.openai_standin import OpenAIStandIn
from tests.support import SidecarProcess
from tests.test_advanced import step
from tests.test_openai import without_ids

QUESTIONS = [
    "What city is the Golden Gate Bridge in?",
    "What state is it in?",
    "What's the population of that state?",
]
ANSWERS = ["San Francisco.", "California.", "About 39 million.", "Hello!"]
SessionMaker = Callable[[str], Any]


@dataclass
class Outcome:
    printed: str
    inputs: list[Any]
    stored: list[Any]


def scripted_agent() -> tuple[Agent[Any], ScriptedModel]:
    model = ScriptedModel([[assistant_message(answer)] for answer in ANSWERS])
    return Agent(name="Assistant", instructions="Reply very concisely.", model=model), model


async def three_turns(agent: Agent[Any], session: Any, out: io.StringIO) -> None:
    """The turns every one of the SDK's session examples takes, printed as it prints."""
    for ordinal, question in zip(("First", "Second", "Third"), QUESTIONS, strict=True):
        print(f"{ordinal} turn:\nUser: {question}", file=out)
        result = await Runner.run(agent, question, session=session)
        print(f"Assistant: {result.final_output}\n", file=out)
    print("=== Conversation Complete ===", file=out)


async def latest_two(session: Any, out: io.StringIO) -> None:
    print("\n=== Latest Items Demo ===\nLatest 2 items:", file=out)
    for i, msg in enumerate(await session.get_items(limit=2), 1):
        print(f"  {i}. {msg.get('role', 'unknown')}: {msg.get('content', '')}", file=out)


async def sqlite_example(make: SessionMaker) -> Outcome:
    """examples/memory/sqlite_session_example.py"""
    agent, model = scripted_agent()
    out = io.StringIO()
    session = make("conversation_123")
    await three_turns(agent, session, out)
    await latest_two(session, out)
    print(f"Total items in session: {len(await session.get_items())}", file=out)
    return Outcome(out.getvalue(), [call.input for call in model.calls], await session.get_items())


async def isolation_demo(
    agent: Agent[Any], session: Any, new_session: Any, out: io.StringIO
) -> None:
    print("\n=== Session Isolation Demo ===", file=out)
    result = await Runner.run(agent, "Hello, this is a new conversation!", session=new_session)
    print(f"New session response: {result.final_output}", file=out)
    print(f"Original session has {len(await session.get_items())} items", file=out)
    print(f"New session has {len(await new_session.get_items())} items", file=out)
    await new_session.clear_session()


async def redis_example(make: SessionMaker) -> Outcome:
    """examples/memory/redis_session_example.py: `from_url`, `ping`, a clean start, the
    turns, persistence, the latest items, isolation, `close()`."""
    agent, model = scripted_agent()
    out = io.StringIO()
    session = make("redis_conversation_123")
    assert await session.ping()
    await session.clear_session()
    await three_turns(agent, session, out)
    print(f"Total messages stored: {len(await session.get_items())}", file=out)
    await latest_two(session, out)
    new_session = make("different_conversation_456")
    await isolation_demo(agent, session, new_session, out)
    stored = await session.get_items()
    await session.close()
    await new_session.close()
    return Outcome(out.getvalue(), [call.input for call in model.calls], stored)


async def dapr_example(make: SessionMaker) -> Outcome:
    """examples/memory/dapr_session_example.py: every session opened with `async with`."""
    agent, model = scripted_agent()
    out = io.StringIO()
    async with make("dapr_conversation_123") as session:
        assert await session.ping()
        await session.clear_session()
        await three_turns(agent, session, out)
        print(f"Total messages stored: {len(await session.get_items())}", file=out)
        await latest_two(session, out)
        async with make("different_conversation_456") as new_session:
            await isolation_demo(agent, session, new_session, out)
        stored = await session.get_items()
    with pytest.raises(RuntimeError):
        await session.get_items()  # closed on leaving the block, as the SDK's
    return Outcome(out.getvalue(), [call.input for call in model.calls], stored)


@pytest.fixture
async def sidecar_url(
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
    store_config: Callable[..., dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> str:
    """A sidecar serving the store `default` and the store `statestore`, whose URL agent
    code finds in `CONVOSTORE_URL`, as the injection sets it."""
    config = {"stores": {"default": store_config("sqlite"), "statestore": store_config("sqlite")}}
    config["stores"]["statestore"]["sqlite"]["path"] += ".statestore"
    sidecar = sidecar_process(config)
    sidecar.start()
    monkeypatch.setenv("CONVOSTORE_URL", sidecar.url)
    return sidecar.url


def assert_same(theirs: Outcome, ours: Outcome) -> None:
    assert ours.printed == theirs.printed
    assert ours.inputs == theirs.inputs
    assert ours.stored == theirs.stored
    assert len(theirs.inputs) >= 3
    assert theirs.stored


@pytest.mark.parametrize(
    ("sdk_line", "our_line"),
    [
        (SQLiteSession, SidecarSession),
        (
            lambda sid: SQLAlchemySession.from_url(
                sid, url="sqlite+aiosqlite:///:memory:", create_tables=True
            ),
            lambda sid: SidecarSession(sid, create_tables=True),
        ),
    ],
    ids=["sqlite_session_example", "sqlalchemy_session_example"],
)
async def test_the_sqlite_examples_with_one_line_changed(
    sidecar_url: str, sdk_line: SessionMaker, our_line: SessionMaker
) -> None:
    """examples/memory/sqlite_session_example.py and sqlalchemy_session_example.py,
    which take the same steps."""
    made: list[Any] = []

    def kept(session_id: str) -> Any:
        made.append(sdk_line(session_id))
        return made[-1]

    theirs = await sqlite_example(kept)
    for session in made:  # the example's process would end here
        if isinstance(session, SQLAlchemySession):
            await session.engine.dispose()
    ours = await sqlite_example(our_line)
    assert_same(theirs, ours)
    assert "Total items in session: 6" in ours.printed


async def test_the_openai_example_with_one_line_changed(
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
    store_config: Callable[..., dict[str, Any]],
    openai_api: OpenAIStandIn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """examples/memory/openai_session_example.py: the SDK's session with its default
    client, and an `openai` store, both on one stand-in of the Conversations API; the
    ids the API gives items differ between the two conversations and are set aside."""
    monkeypatch.setenv("OPENAI_API_KEY", openai_api.api_key)
    monkeypatch.setenv("OPENAI_BASE_URL", openai_api.base_url)
    sidecar = sidecar_process({"stores": {"assistant": store_config("openai")}})
    sidecar.start()
    monkeypatch.setenv("CONVOSTORE_URL", sidecar.url)
    made: list[OpenAIConversationsSession] = []

    def sdk_line(_: str) -> OpenAIConversationsSession:
        made.append(OpenAIConversationsSession())
        return made[-1]

    theirs = await sqlite_example(sdk_line)
    await made[0]._openai_client.close()  # the example's process would end here
    ours = await sqlite_example(lambda sid: SidecarSession(sid, "assistant"))
    for outcome in (theirs, ours):
        outcome.inputs, outcome.stored = without_ids(outcome.inputs), without_ids(outcome.stored)
    assert_same(theirs, ours)
    assert len(openai_api.conversations) == 2


async def test_the_redis_example_with_one_line_changed(redis_url: str, sidecar_url: str) -> None:
    theirs = await redis_example(lambda sid: RedisSession.from_url(sid, url=redis_url))
    ours = await redis_example(lambda sid: SidecarSession.from_url(sid, url=sidecar_url))
    assert_same(theirs, ours)
    assert "New session has 2 items" in ours.printed


async def test_the_dapr_example_with_one_line_changed(
    dapr_runtime: DaprStandIn, sidecar_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK's session against the Dapr runtime's stand-in, whose health endpoint the
    `dapr` client checks first (`DAPR_HTTP_ENDPOINT`, as `dapr run` sets it)."""
    monkeypatch.setattr(dapr_settings, "DAPR_HTTP_ENDPOINT", dapr_runtime.endpoints["httpEndpoint"])
    address = f"localhost:{dapr_runtime.grpc_port}"
    theirs = await dapr_example(
        lambda sid: DaprSession.from_address(
            sid, state_store_name="statestore", dapr_address=address
        )
    )
    ours = await dapr_example(lambda sid: SidecarSession(sid, "statestore"))
    assert_same(theirs, ours)


@pytest.mark.parametrize(
    ("line", "refused", "says"),
    [
        (lambda: SidecarSession("user_123", "conversations.db"), ValueError, "sqlite.path"),
        (lambda: SidecarSession("user_123", db_path="x.db"), TypeError, "sqlite.path"),
        (lambda: SidecarSession("user_123", ttl=3600), TypeError, "retention.ttl"),
        (lambda: SidecarSession("user_123", key_prefix="app"), TypeError, "redis.keyPrefix"),
        (lambda: SidecarSession("user_123", redis_client=object()), TypeError, "connection"),
        (lambda: SidecarSession("user_123", engine=object()), TypeError, "connection"),
        (lambda: SidecarSession("user_123", state_store_name="s"), TypeError, "dapr.stateStore"),
        (lambda: SidecarSession("user_123", colour="red"), TypeError, "unexpected keyword"),
        (
            lambda: SidecarSession.from_url("u", url="redis://:hunter2@localhost:6379/0"),
            ValueError,
            "the sidecar's URL",
        ),
        (
            lambda: SidecarSession.from_url("u", url="postgresql://u:hunter2@db/x"),
            ValueError,
            "ConversationStore",
        ),
    ],
)
def test_the_sdks_storage_options_are_refused_with_what_to_set_instead(
    line: Callable[[], Any], refused: type[Exception], says: str
) -> None:
    with pytest.raises(refused) as caught:
        line()
    assert says in str(caught.value)
    assert "hunter2" not in str(caught.value)


async def test_the_options_that_hold_here_are_taken(
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
    store_config: Callable[..., dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`create_tables` and `ensure_ascii` hold as given; `logger` gets the session's
    warnings (here: a read cut at the store's `maxReadItems`); the session is one of the
    SDK's `SessionABC`s; limits are taken as the SDK takes them."""
    sidecar = sidecar_process(
        {"stores": {"default": store_config("sqlite", limits={"maxReadItems": 2})}}
    )
    sidecar.start()
    mine = logging.getLogger("my.agent")
    session = SidecarSession(
        "u", url=sidecar.url, create_tables=True, ensure_ascii=False, logger=mine
    )
    assert isinstance(session, SessionABC)
    items = [{"role": "user", "content": f"é{n}"} for n in range(3)]
    await session.add_items(items)
    with caplog.at_level(logging.WARNING, logger="my.agent"):
        assert await session.get_items(limit=2**31 - 1) == items[1:]
    assert [r.name for r in caplog.records] == ["my.agent"]
    assert await session.get_items(limit=-1) == []
    assert await session.get_items(limit=0) == []


@function_tool
async def get_weather(city: str) -> str:
    if city.strip().lower() == "new york":
        return f"The weather in {city} is cloudy."
    return f"The weather in {city} is sunny."


def advanced_model() -> ScriptedModel:
    weather = [("San Francisco", "Sunny."), ("New York", "Cloudy.")]
    steps: list[Any] = [step(assistant_message("San Francisco."), 20)]
    for n, (city, answer) in enumerate(weather):
        if n == 1:
            steps.append(step(assistant_message("About 800,000."), 60))
        steps.append(step(function_call("get_weather", {"city": city}, call_id=f"c{n}"), 30))
        steps.append(step(assistant_message(answer), 40))
    steps.append(step(assistant_message("Times Square."), 50))
    return ScriptedModel(steps)


def describe(item: dict[str, Any]) -> str:
    role = str(item.get("role", item.get("type", "unknown")))
    if item.get("type") == "function_call":
        return f"{role}: {item.get('name', 'unknown')}({item.get('arguments', '{}')})"
    if item.get("type") == "function_call_output":
        return f"{role}: {item.get('output', '')}"
    return f"{role}: {item.get('content', item.get('output', ''))}"


async def advanced_example(make: SessionMaker) -> Outcome:
    """examples/memory/advanced_sqlite_session_example.py: turns with a tool and their
    usage, the structured reads, a branch from turn 2 continued, branch management."""
    model = advanced_model()
    agent = Agent(name="Assistant", model=model, tools=[get_weather])
    out = io.StringIO()
    session = make("conversation_comprehensive")
    questions = [QUESTIONS[0], "What's the weather in that city?", "What's the population?"]
    for question in questions:
        result = await Runner.run(agent, question, session=session)
        print(f"Assistant: {result.final_output}", file=out)
        print(f"Usage: {result.context_wrapper.usage.total_tokens} tokens", file=out)
        await session.store_run_usage(result)
    usage = await session.get_session_usage()
    print({k: usage[k] for k in ("requests", "total_tokens", "total_turns")}, file=out)
    for turn in await session.get_turn_usage():
        print(f"  Turn {turn['user_turn_number']}: {turn['total_tokens']} tokens", file=out)
    for number, items in (await session.get_conversation_by_turns()).items():
        print(f"  Turn {number}: {[(i['type'], i['tool_name']) for i in items]}", file=out)
    print(f"Tool usage: {await session.get_tool_usage()}", file=out)
    print(*map(describe, await session.get_items()), sep="\n", file=out)
    for turn in await session.get_conversation_turns():
        print(f"  Turn {turn['turn']}: {turn['content']}", file=out)
    branch_id = await session.create_branch_from_turn(2)
    print(f"Created branch: {re.sub(r'[0-9]{6,}', 'TIME', branch_id)}", file=out)
    print(*map(describe, await session.get_items()), sep="\n", file=out)
    for question in ("Actually, what's the weather in New York instead?", "And attractions?"):
        result = await Runner.run(agent, question, session=session)
        print(f"Assistant: {result.final_output}", file=out)
        await session.store_run_usage(result)
    print(*map(describe, await session.get_items()), sep="\n", file=out)
    # sorted: the SDK lists branches made within one second in an order of its own
    # (the README's "Where the two differ")
    for branch in sorted(await session.list_branches(), key=lambda b: b["branch_id"]):
        print(
            f"  {branch['branch_id'] == branch_id}: {branch['user_turns']} user turns, "
            f"{branch['message_count']} total messages, current {branch['is_current']}",
            file=out,
        )
    stored = {}
    for branch in ("main", branch_id):
        await session.switch_to_branch(branch)
        stored[branch == "main"] = await session.get_items()
        print(f"Items in {branch == 'main'}: {len(stored[branch == 'main'])}", file=out)
    session.close()
    return Outcome(out.getvalue(), [call.input for call in model.calls], [stored])


async def test_the_advanced_example_with_one_line_changed(sidecar_url: str) -> None:
    theirs = await advanced_example(
        lambda sid: AdvancedSQLiteSession(session_id=sid, create_tables=True)
    )
    ours = await advanced_example(
        lambda sid: AdvancedSidecarSession(session_id=sid, create_tables=True)
    )
    assert_same(theirs, ours)
    assert "Created branch: branch_from_turn_2_TIME" in ours.printed
