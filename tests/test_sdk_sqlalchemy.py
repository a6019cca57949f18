"""The behaviour the Agents SDK's own `SQLAlchemySession` tests check (its
`tests/extensions/memory/test_sqlalchemy_session.py`, the tests of behaviour, not of its
internals), each scenario run twice on one database: on the SDK's `SQLAlchemySession`
and on `SidecarSession` through a `sqlalchemy` store, which must answer the same. On
MariaDB (where a team on MySQL lands), PostgreSQL and SQLite."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from agents import Agent, RunConfig, Runner
from agents.extensions.memory import SQLAlchemySession
from agents.memory import Session, SessionSettings
from agents.testing import ScriptedModel, assistant_message
from convostore import SidecarSession
from sqlalchemy.ext.asyncio import create_async_engine

from tests.support import (
    SQLALCHEMY_POSTGRES,
    SQLALCHEMY_SQLITE,
    StartSidecar,
    make_sdk_tables_on_mysql,
    unique,
)

Scenario = Callable[[Callable[..., Session]], Awaitable[Any]]


class Both:
    """Runs a scenario on the SDK's session and on the sidecar's, on the same database,
    and asserts both gave the same answer (which the scenario also checks)."""

    def __init__(self, sdk: Callable[..., Session], ours: Callable[..., Session], url: str):
        self.sdk, self.ours, self.url = sdk, ours, url

    async def __call__(self, scenario: Scenario) -> None:
        assert await scenario(self.sdk) == await scenario(self.ours)


REASONING = {"id": "rs_1", "type": "reasoning", "summary": [{"type": "summary_text", "text": "."}]}
MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "status": "completed",
    "content": [{"type": "output_text", "text": "done", "annotations": [], "logprobs": []}],
}


@pytest.fixture(params=["sqlalchemy", SQLALCHEMY_POSTGRES, SQLALCHEMY_SQLITE])
async def both(
    request: pytest.FixtureRequest,
    start_sidecar: StartSidecar,
    store_config: Callable[..., dict[str, Any]],
) -> AsyncIterator[Both]:
    config = store_config(request.param)
    sidecar = await start_sidecar({"stores": {"default": config}})
    url = config["sqlalchemy"]["url"]
    on_mysql = url.startswith("mysql")
    engines: list[Any] = []
    if on_mysql:
        engine = create_async_engine(url)
        await make_sdk_tables_on_mysql(engine)
        await engine.dispose()

    def sdk(session_id: str | None = None, **options: Any) -> Session:
        session = SQLAlchemySession.from_url(
            session_id or unique(), url=url, create_tables=not on_mysql, **options
        )
        engines.append(session.engine)
        return session

    def ours(session_id: str | None = None, **options: Any) -> Session:
        return SidecarSession(session_id or unique(), url=sidecar.url, **options)

    yield Both(sdk, ours, url)
    for engine in engines:
        await engine.dispose()


def contents(items: list[Any]) -> list[Any]:
    return [item.get("content") for item in items]


async def test_direct_operations(both: Both) -> None:
    async def scenario(make: Callable[..., Session]) -> Any:
        session = make()
        await session.add_items(
            [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there!"}]
        )
        stored = contents(await session.get_items())
        assert stored == ["Hello", "Hi there!"]
        popped = await session.pop_item()
        assert popped is not None
        assert popped.get("content") == "Hi there!"
        after_pop = contents(await session.get_items())
        assert after_pop == ["Hello"]
        await session.clear_session()
        assert await session.get_items() == []
        return stored, after_pop

    await both(scenario)


async def test_non_ascii_round_trips(both: Both) -> None:
    async def scenario(make: Callable[..., Session]) -> Any:
        session = make()
        items = [{"role": "user", "content": "café, 東京, 🚀"}]
        await session.add_items(items)  # type: ignore[arg-type]
        assert await session.get_items() == items
        return await session.get_items()

    await both(scenario)


async def test_runner_passes_history_and_sessions_stay_apart(
    both: Both,
) -> None:
    async def scenario(make: Callable[..., Session]) -> Any:
        cats, dogs = make(), make()
        model = ScriptedModel(
            [
                [assistant_message("San Francisco")],
                [assistant_message("I like dogs too.")],
                [assistant_message("California")],
            ]
        )
        agent = Agent(name="test", model=model)
        first = await Runner.run(
            agent, "Where is the Golden Gate Bridge? I like cats.", session=cats
        )
        await Runner.run(agent, "I like dogs.", session=dogs)
        second = await Runner.run(agent, "What state is it in?", session=cats)
        given = [str(item.get("content", "")) for item in model.calls[-1].input]
        assert any("Golden Gate Bridge" in text for text in given)
        assert not any("dogs" in text for text in given)
        return first.final_output, second.final_output, given

    await both(scenario)


async def test_limits(both: Both) -> None:
    async def scenario(make: Callable[..., Session]) -> Any:
        session = make()
        await session.add_items([{"role": "user", "content": str(n)} for n in range(1, 5)])
        latest = contents(await session.get_items(limit=2))
        assert latest == ["3", "4"]
        assert len(await session.get_items()) == 4
        assert len(await session.get_items(limit=10)) == 4
        return latest

    await both(scenario)


async def test_empty_session(both: Both) -> None:
    async def scenario(make: Callable[..., Session]) -> Any:
        session = make()
        assert await session.pop_item() is None
        await session.add_items([])
        assert await session.get_items() == []
        return await session.get_items()

    await both(scenario)


async def test_concurrent_pops_take_each_item_once(
    both: Both,
) -> None:
    async def scenario(make: Callable[..., Session]) -> Any:
        writer = make()
        other = make(writer.session_id)
        await writer.add_items(
            [{"role": "user", "content": "first"}, {"role": "assistant", "content": "second"}]
        )
        popped = await asyncio.gather(writer.pop_item(), other.pop_item())
        taken = sorted(str(item.get("content")) for item in popped if item is not None)
        assert taken == ["first", "second"]
        assert await writer.get_items() == []
        return taken

    await both(scenario)


async def test_concurrent_first_writes_lose_nothing(
    both: Both,
) -> None:
    async def scenario(make: Callable[..., Session]) -> Any:
        session, other = make(), make()
        submitted = [f"msg-{n}" for n in range(25)]
        results = await asyncio.gather(
            *(session.add_items([{"role": "user", "content": text}]) for text in submitted),
            other.add_items([{"role": "user", "content": "elsewhere"}]),
            return_exceptions=True,
        )
        assert [r for r in results if isinstance(r, BaseException)] == []
        stored = sorted(contents(await session.get_items()))
        assert stored == sorted(submitted)
        assert contents(await other.get_items()) == ["elsewhere"]
        return stored

    if both.url.startswith("mysql"):
        # the SDK's session deadlocks here on MariaDB (InnoDB picks a victim among the
        # first writes racing to insert the session's row; 4 of 25 failed in one run),
        # which its SQLite-only test does not meet: the sidecar alone is held to it
        await scenario(both.ours)
    else:
        await both(scenario)


async def test_a_batch_keeps_its_order_and_pop_takes_its_last(
    both: Both,
) -> None:
    async def scenario(make: Callable[..., Session]) -> Any:
        session = make()
        older = {**MESSAGE, "id": "older"}
        await session.add_items([older])  # type: ignore[list-item]
        await session.add_items([REASONING, MESSAGE])  # type: ignore[list-item]
        ids = [item["id"] for item in await session.get_items()]  # type: ignore[typeddict-item]
        assert ids == ["older", "rs_1", "msg_1"]
        latest = [item["id"] for item in await session.get_items(limit=2)]  # type: ignore[typeddict-item]
        assert latest == ["rs_1", "msg_1"]
        popped = await session.pop_item()
        assert popped == MESSAGE
        return ids, latest, popped

    await both(scenario)


async def test_session_settings_limit_and_its_overrides(
    both: Both,
) -> None:
    async def scenario(make: Callable[..., Session]) -> Any:
        assert make().session_settings == SessionSettings()
        assert make(session_settings={"limit": 5}).session_settings == SessionSettings(limit=5)
        session = make(session_settings=SessionSettings(limit=3))
        await session.add_items([{"role": "user", "content": f"Message {n}"} for n in range(10)])
        by_default = contents(await session.get_items())
        assert by_default == ["Message 7", "Message 8", "Message 9"]
        explicit = contents(await session.get_items(limit=2))
        assert explicit == ["Message 8", "Message 9"]
        model = ScriptedModel([[assistant_message("Got it")]])
        run_config = RunConfig(session_settings=SessionSettings(limit=2))
        await Runner.run(
            Agent(name="test", model=model), "New question", session=session, run_config=run_config
        )
        given = contents(list(model.calls[0].input))
        assert given == ["Message 8", "Message 9", "New question"]
        return by_default, explicit, given

    await both(scenario)
