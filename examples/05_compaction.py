"""Compaction in the store: once a session passes its trigger, the sidecar asks the
compaction model for a summary that replaces the older items, and keeps the originals.

    echo "$OPENAI_API_KEY" > openai-api-key   # the sidecar's key, never the agent's
    convostore sidecar --config examples/sidecar.yaml
    OPENAI_API_KEY=... python examples/05_compaction.py
"""

from __future__ import annotations

import asyncio

from agents import Agent, Model, Runner
from convostore import SidecarSession


async def main(model: Model | None = None) -> None:
    agent = Agent(name="assistant", instructions="Reply briefly.", model=model)
    async with SidecarSession("example-05", store="compacting") as session:
        await session.clear_session()
        for day in ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"):
            await Runner.run(agent, f"Note that I swim on {day}.", session=session)
        await session.run_compaction({"force": True})
        outcome = session.last_compaction or {}
        print(f"compacted: {outcome.get('compacted')}, {outcome.get('replaced')} items replaced")
        print(f"the agent now reads {len(await session.get_items())} items")
        print(f"the conversation as said: {len(await session.get_full_items())} items")


if __name__ == "__main__":
    asyncio.run(main())
