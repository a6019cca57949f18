"""End-to-end encryption in the agent process: the sidecar and its backend hold only
ciphertext, and the agent reads plain items.

    convostore sidecar --config examples/sidecar.yaml
    python examples/04_encryption.py
"""

from __future__ import annotations

import asyncio
import os

from convostore import EncryptedSession, SidecarSession


async def main(key: bytes | None = None) -> None:
    key = key or os.urandom(32)  # keep yours in a secret store: lost keys lose the history
    async with SidecarSession("example-04") as stored:
        await stored.clear_session()
        session = EncryptedSession(stored, key)
        await session.add_items([{"role": "user", "content": "my card ends in 4242"}])
        print(f"the agent reads: {(await session.get_items())[0]['content']}")
        raw = await stored.get_items()
        print(f"the store holds the text: {'4242' in str(raw)}")


if __name__ == "__main__":
    asyncio.run(main())
