"""Tool calls, and history read by whole turns: the agent sees the latest turn with its
tool call and the tool's output together, never one without the other.

    convostore sidecar --config examples/sidecar.yaml
    OPENAI_API_KEY=... python examples/02_tools_and_whole_turns.py
"""

from __future__ import annotations

import asyncio

from agents import Agent, Model, Runner, function_tool
from convostore import SidecarSession


@function_tool
def weather(city: str) -> str:
    """Today's weather in a city."""
    return f"sunny in {city}"


async def main(model: Model | None = None) -> None:
    agent = Agent(name="assistant", instructions="Reply briefly.", model=model, tools=[weather])
    # the Runner is given the latest user turn, whole, before each new question
    async with SidecarSession("example-02", history_turns=1) as session:
        await session.clear_session()
        for question in ("Is it sunny in Oslo?", "And in Bergen?", "Which was warmer?"):
            result = await Runner.run(agent, question, session=session)
            print(f"{question} {result.final_output}")
        print(f"{len(await session.get_items(limit=1000))} items stored in all")


if __name__ == "__main__":
    asyncio.run(main())
