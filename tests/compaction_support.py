"""What the compaction tests share: a scripted conversation with tool calls, run through
the Agents SDK's real Runner, and a store config whose compaction calls the stand-in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents import Agent, ModelSettings, RunConfig, Runner, Session
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call
from agents.usage import Usage

from tests.openai_standin import OpenAIStandIn
from tests.support import lookup_weather

TURNS = 12


def weather_steps(turns: int) -> list[ModelStep]:
    """Even turns call the weather tool before answering; odd ones answer at once. Every
    response has its own id, which `previous_response_id` compaction chains from."""
    steps: list[ModelStep] = []
    for turn in range(turns):
        if turn % 2 == 0:
            call = function_call("lookup_weather", {"city": f"city {turn}"}, call_id=f"c{turn}")
            steps.append(ModelStep(output=[call], response_id=f"resp_{turn}_tool"))
        steps.append(
            ModelStep(output=[assistant_message(f"answer {turn}")], response_id=f"resp_{turn}")
        )
    return steps


@dataclass
class Conversation:
    """What the model was sent on every call, and the run's usage, summed over turns."""

    inputs: list[Any]
    usage: Usage


async def converse(
    session: Session, *, store: bool | None, turns: int = TURNS, api: OpenAIStandIn | None = None
) -> Conversation:
    """`turns` turns through the Runner; `api` keeps the model's responses, so that a
    compaction can chain from them (`previous_response_id`)."""
    steps = weather_steps(turns)
    if api is not None:
        api.remember_responses(steps)
    model = ScriptedModel(steps)
    agent = Agent(name="assistant", model=model, tools=[lookup_weather])
    config = RunConfig(model_settings=ModelSettings(store=store))
    usage = Usage()
    for turn in range(turns):
        result = await Runner.run(agent, f"question {turn}", session=session, run_config=config)
        usage.add(result.context_wrapper.usage)
    return Conversation([call.input for call in model.calls], usage)


def compaction_config(api: OpenAIStandIn, key_file: Path, **extra: Any) -> dict[str, Any]:
    return {"apiKeyFile": str(key_file), "baseURL": api.base_url, "maxRetries": 0, **extra}


def history(turns: int, *, tools: bool = True) -> list[dict[str, Any]]:
    """Items as the Runner stores them: per turn a user message, a tool call with its
    output when `tools`, and the answer; 3 items other than user messages per turn."""
    items: list[dict[str, Any]] = []
    for turn in range(turns):
        items.append({"role": "user", "content": f"question {turn}"})
        if tools:
            items.append(
                {"type": "function_call", "call_id": f"c{turn}", "name": "f", "arguments": "{}"}
            )
            items.append({"type": "function_call_output", "call_id": f"c{turn}", "output": "ok"})
        items.append({"role": "assistant", "content": f"answer {turn}"})
    return items
