"""A first agent with memory: the second run remembers the first.

convostore sidecar --config examples/sidecar.yaml     # in one shell
OPENAI_API_KEY=... python examples/01_first_agent.py  # in another
"""

from __future__ import annotations

import asyncio

from agents import Agent, Model, Runner
from convostore import SidecarSession


async def main(model: Model | None = None) -> None:
    agent = Agent(name="assistant", instructions="Reply briefly.", model=model)
    # the sidecar at $CONVOSTORE_URL, else http://127.0.0.1:8790; the store "default"
    async with SidecarSession("example-01") as session:
        await session.clear_session()  # each run of the example starts afresh
        await Runner.run(agent, "My name is Ada.", session=session)
        result = await Runner.run(agent, "What is my name?", session=session)
        print(result.final_output)
        print(f"{len(await session.get_items())} items remembered")


if __name__ == "__main__":
    asyncio.run(main())
