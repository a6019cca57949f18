"""Agents appending through a failover, and the tally of what became of their appends.

Each writer appends numbered items to a session of its own through `SidecarSession`
and, as an agent retrying a turn would, repeats an unanswered append with the same
`Idempotency-Key` until it is answered. Afterwards every session is read back:
an acknowledged item that is missing was lost; an item stored twice was doubled.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from convostore import SidecarSession, StoreUnavailableError

from tests.support import SidecarProcess
from tests.test_outages import wait_until

ANSWER_WITHIN = 60.0
"""Seconds an append may go unanswered, retries included, before its writer fails."""


@dataclass
class Tally:
    acknowledged: int
    lost: int
    doubled: int
    refused: int
    """Attempts answered with an error (then retried): the outage as the agents saw it."""

    def __str__(self) -> str:
        return (
            f"{self.acknowledged} appends acknowledged, {self.lost} lost, "
            f"{self.doubled} doubled ({self.refused} attempts refused during the failover)"
        )


async def writing(
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess], store: dict[str, Any]
) -> Writers:
    """Agents appending to the store `chat` (configured by `store`) through a sidecar
    process, 40 appends in."""
    proc = sidecar_process({"stores": {"chat": store}})
    proc.start()
    writers = Writers(proc.url, "chat")
    writers.start()
    await wait_until(lambda: writers.at_least(40))
    return writers


def judge(
    tally: Tally, failover: str, wait_replicas: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """Print the figures, then hold the failover to what it must keep: never an append
    stored twice; with `waitReplicas`, never one lost; and the agents did see it."""
    mode = f"replicated (waitReplicas: {wait_replicas})" if wait_replicas else "answered at once"
    with capsys.disabled():
        print(f"\n{failover}, {mode}: {tally}")
    assert tally.doubled == 0
    if wait_replicas:
        assert tally.lost == 0
    assert tally.refused > 0, f"{failover} under load, yet no append was refused"


@dataclass
class Writers:
    url: str
    store: str
    count: int = 4
    acknowledged: dict[str, list[int]] = field(default_factory=dict)
    refused: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        run = uuid.uuid4().hex[:6]
        for w in range(self.count):
            session_id = f"failover-{run}-{w}"
            self.acknowledged[session_id] = []
            self._tasks.append(asyncio.create_task(self._write(session_id)))

    @property
    def total(self) -> int:
        return sum(len(numbers) for numbers in self.acknowledged.values())

    async def at_least(self, count: int) -> bool:
        if any(task.done() for task in self._tasks):
            await asyncio.gather(*self._tasks)  # a writer that failed says why
        return self.total >= count

    async def _write(self, session_id: str) -> None:
        session = SidecarSession(session_id, self.store, url=self.url, retries=1, timeout=5)
        n, loop = 0, asyncio.get_running_loop()
        while not self._stop.is_set():
            key, deadline = uuid.uuid4().hex, loop.time() + ANSWER_WITHIN
            while True:
                try:
                    await session.add_items([{"n": n}], idempotency_key=key)
                    break
                except StoreUnavailableError:
                    self.refused += 1
                    assert loop.time() < deadline, f"append {n} unanswered for {ANSWER_WITHIN}s"
                    await asyncio.sleep(0.05)  # a pause before the agent's retry
            self.acknowledged[session_id].append(n)
            n += 1

    async def stop(self) -> Tally:
        """Stop writing (each writer first gets its last append answered), then read
        every session back and count."""
        self._stop.set()
        await asyncio.gather(*self._tasks)
        lost = doubled = 0
        for session_id, numbers in self.acknowledged.items():
            stored = Counter(
                item["n"]
                for item in await SidecarSession(session_id, self.store, url=self.url).get_items()
            )
            lost += sum(1 for n in numbers if n not in stored)
            doubled += sum(times - 1 for times in stored.values() if times > 1)
        return Tally(self.total, lost, doubled, self.refused)
