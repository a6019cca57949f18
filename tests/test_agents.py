"""The Agents SDK's real Runner, with a scripted model, keeping history in the sidecar."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agents import Agent, RunConfig, Runner
from agents.memory import SessionSettings
from agents.testing import ScriptedModel, assistant_message, function_call
from convostore import SidecarSession

from tests.support import RunningSidecar, SidecarProcess, lookup_weather


def texts(model_input: Any) -> list[str]:
    """The user and assistant texts a model call received, in order."""
    out = []
    for item in model_input if isinstance(model_input, list) else [model_input]:
        if isinstance(item, str):
            out.append(item)
            continue
        content = item.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out.extend(part["text"] for part in content if "text" in part)
    return out


async def test_history_carries_across_turns(sidecar: RunningSidecar) -> None:
    model = ScriptedModel([[assistant_message("Hi Ada")], [assistant_message("You are Ada")]])
    agent = Agent(name="assistant", model=model)
    session = SidecarSession("user_123", url=sidecar.url)
    first = await Runner.run(agent, "My name is Ada", session=session)
    second = await Runner.run(agent, "What is my name?", session=session)
    assert (first.final_output, second.final_output) == ("Hi Ada", "You are Ada")
    assert texts(model.calls[1].input) == ["My name is Ada", "Hi Ada", "What is my name?"]
    stored = await session.get_items()
    assert texts(stored) == ["My name is Ada", "Hi Ada", "What is my name?", "You are Ada"]


async def test_tool_calls_and_outputs_are_kept_in_order(sidecar: RunningSidecar) -> None:
    model = ScriptedModel(
        [
            [function_call("lookup_weather", {"city": "Oslo"}, call_id="call_1")],
            [assistant_message("It is sunny in Oslo")],
            [assistant_message("Still sunny")],
        ]
    )
    agent = Agent(name="assistant", model=model, tools=[lookup_weather])
    session = SidecarSession("tools", url=sidecar.url)
    await Runner.run(agent, "Weather in Oslo?", session=session)
    await Runner.run(agent, "And now?", session=session)
    stored = await session.get_items()
    kinds = [item.get("type", "message") for item in stored]
    assert kinds == [
        "message",
        "function_call",
        "function_call_output",
        "message",
        "message",
        "message",
    ]
    assert stored[2]["output"] == "sunny in Oslo"
    assert model.calls[2].input == stored[:5]


async def test_session_settings_limit_bounds_what_the_model_sees(
    sidecar: RunningSidecar,
) -> None:
    model = ScriptedModel([[assistant_message(f"answer {n}")] for n in range(3)])
    agent = Agent(name="assistant", model=model)
    session = SidecarSession("limited", url=sidecar.url)
    config = RunConfig(session_settings=SessionSettings(limit=2))
    for n in range(3):
        await Runner.run(agent, f"question {n}", session=session, run_config=config)
    assert texts(model.calls[2].input) == ["question 1", "answer 1", "question 2"]
    assert len(await session.get_items()) == 6


def weather_script(cities: list[str]) -> ScriptedModel:
    """Per city, one turn: a tool call, then the answer that uses its output."""
    turns: list[Any] = []
    for n, city in enumerate(cities):
        call = function_call("lookup_weather", {"city": city}, call_id=f"call_{n}")
        turns += [[call], [assistant_message(f"sunny in {city}")]]
    return ScriptedModel(turns)


def kinds(model_input: Any) -> list[str]:
    return [item.get("type", "message") for item in model_input]


async def test_history_turns_replays_whole_turns_with_their_tool_calls(
    sidecar: RunningSidecar,
) -> None:
    model = weather_script(["Oslo", "Bergen", "Tromsø"])
    agent = Agent(name="assistant", model=model, tools=[lookup_weather])
    session = SidecarSession("by-turns", url=sidecar.url, history_turns=1)
    for city in ("Oslo", "Bergen", "Tromsø"):
        await Runner.run(agent, f"Weather in {city}?", session=session)
    last_turn_first_call = model.calls[4].input
    assert texts(last_turn_first_call) == [
        "Weather in Bergen?",
        "sunny in Bergen",
        "Weather in Tromsø?",
    ]
    assert kinds(last_turn_first_call) == [
        "message",
        "function_call",
        "function_call_output",
        "message",
        "message",
    ]
    assert len(await SidecarSession("by-turns", url=sidecar.url).get_items()) == 12


async def test_whole_turns_widens_a_limit_that_would_split_a_tool_call(
    sidecar: RunningSidecar,
) -> None:
    config = RunConfig(session_settings=SessionSettings(limit=3))
    results = {}
    for whole in (False, True):
        model = weather_script(["Oslo", "Bergen"])
        agent = Agent(name="assistant", model=model, tools=[lookup_weather])
        session = SidecarSession(f"widened-{whole}", url=sidecar.url, whole_turns=whole)
        for city in ("Oslo", "Bergen"):
            await Runner.run(agent, f"Weather in {city}?", session=session, run_config=config)
        results[whole] = kinds(model.calls[2].input)
    assert results[False] == ["function_call", "function_call_output", "message", "message"]
    assert results[True] == [
        "message",
        "function_call",
        "function_call_output",
        "message",
        "message",
    ]


async def test_session_input_callback_shapes_the_input(sidecar: RunningSidecar) -> None:
    seen: list[int] = []

    def keep_last_user_turn(history: list[Any], new: list[Any]) -> list[Any]:
        seen.append(len(history))
        return history[-2:] + new

    model = ScriptedModel([[assistant_message(f"a{n}")] for n in range(3)])
    agent = Agent(name="assistant", model=model)
    session = SidecarSession("callback", url=sidecar.url)
    config = RunConfig(session_input_callback=keep_last_user_turn)
    for n in range(3):
        await Runner.run(agent, f"q{n}", session=session, run_config=config)
    assert seen == [0, 2, 4]
    assert texts(model.calls[2].input) == ["q1", "a1", "q2"]
    assert texts(await session.get_items()) == ["q0", "a0", "q1", "a1", "q2", "a2"]


async def test_streamed_runs_save_history(sidecar: RunningSidecar) -> None:
    model = ScriptedModel([[assistant_message("streamed reply")]])
    agent = Agent(name="assistant", model=model)
    session = SidecarSession("streamed", url=sidecar.url)
    result = Runner.run_streamed(agent, "hello", session=session)
    async for _ in result.stream_events():
        pass
    assert texts(await session.get_items()) == ["hello", "streamed reply"]


def test_run_sync_keeps_history_across_calls(
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess], tmp_path: Path
) -> None:
    proc = sidecar_process(
        {"stores": {"default": {"backend": "sqlite", "sqlite": {"path": str(tmp_path / "r.db")}}}}
    )
    proc.start()
    model = ScriptedModel([[assistant_message(f"reply {n}")] for n in range(3)])
    agent = Agent(name="assistant", model=model)
    session = SidecarSession("sync-user", url=proc.url)
    for n in range(3):
        assert Runner.run_sync(agent, f"turn {n}", session=session).final_output == f"reply {n}"
    assert texts(model.calls[2].input) == ["turn 0", "reply 0", "turn 1", "reply 1", "turn 2"]
    history = asyncio.run(SidecarSession("sync-user", url=proc.url).get_items())
    assert json.dumps(history[-1]["content"][0]["text"]) == '"reply 2"'
