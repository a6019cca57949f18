"""Branches and usage, as the Agents SDK's `AdvancedSQLiteSession` has them, on any store
that keeps structure: retry a turn on a new branch, and see the tokens each turn cost.

    convostore sidecar --config examples/sidecar.yaml
    OPENAI_API_KEY=... python examples/03_branches_and_usage.py
"""

from __future__ import annotations

import asyncio

from agents import Agent, Model, Runner
from convostore import AdvancedSidecarSession


async def main(model: Model | None = None) -> None:
    agent = Agent(name="planner", instructions="Plan trips in one line.", model=model)
    async with AdvancedSidecarSession("example-03") as session:
        await session.clear_session()
        for question in ("Plan a day in Oslo.", "Add a museum."):
            result = await Runner.run(agent, question, session=session)
            await session.store_run_usage(result)
        branch = await session.create_branch_from_turn(2)  # try turn 2 another way
        result = await Runner.run(agent, "Add a fjord cruise.", session=session)
        await session.store_run_usage(result)
        print(f"on {branch}: {result.final_output}")
        for info in await session.list_branches():
            print(f"branch {info['branch_id']}: {info['user_turns']} user turns")
        usage = await session.get_session_usage()
        print(f"{usage['requests'] if usage else 0} model requests in all")


if __name__ == "__main__":
    asyncio.run(main())
