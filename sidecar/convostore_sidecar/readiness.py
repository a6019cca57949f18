"""Readiness: whether each store's backend answers, checked at most once per interval.

Kubelet probes, load balancers and curious neighbours may all call `/readyz`; none of
them should cause a backend call each (for an `openai` store that is an authenticated
API call), so one check per store runs at a time and its outcome is reused for
`CACHE_SECONDS`. A backend can answer pings and still refuse writes (out of memory,
read-only, out of disk): a store whose last write was refused within
`WRITES_FAILING_SECONDS`, with no write done since, is not ready either. Strangers learn
only ready or not per store; the reason (which may name hosts) is for callers holding
the token, or every caller when the sidecar has no token (then it listens on loopback
or a socket only).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from .drivers.base import BackendUnavailable
from .stores import Store

CACHE_SECONDS = 2.0
TIMEOUT_SECONDS = 2.0
WRITES_FAILING_SECONDS = 30.0


@dataclass
class Readiness:
    cache_seconds: float = CACHE_SECONDS
    _checked: dict[str, tuple[float, str | None]] = field(default_factory=dict)
    _running: dict[str, asyncio.Task[str | None]] = field(default_factory=dict)
    _refused: dict[str, tuple[float, str]] = field(default_factory=dict)

    def write_refused(self, store: str, why: str) -> None:
        self._refused[store] = (time.monotonic(), why)

    def write_done(self, store: str) -> bool:
        """Forget a refusal; True when there was one (the hot path asks nothing more)."""
        return self._refused.pop(store, None) is not None

    def failing_writes(self, store: str) -> str | None:
        """Why the store's writes are being refused, while they are."""
        refused = self._refused.get(store)
        if refused is None or time.monotonic() - refused[0] > WRITES_FAILING_SECONDS:
            return None
        return f"writes refused: {refused[1]}"

    async def states(self, stores: list[Store]) -> list[tuple[str | None, str | None]]:
        """Per store: why its backend does not answer, and why its writes are refused
        (None each when all is well)."""
        pinged = await asyncio.gather(*(self.problem(store) for store in stores))
        failing = [self.failing_writes(store.name) for store in stores]
        return list(zip(pinged, failing, strict=True))

    async def problem(self, store: Store) -> str | None:
        """None when the store's backend answered; else why not."""
        checked = self._checked.get(store.name)
        if checked is not None and time.monotonic() - checked[0] < self.cache_seconds:
            return checked[1]
        task = self._running.get(store.name)
        if task is None:
            task = asyncio.create_task(_ping(store))
            self._running[store.name] = task
            task.add_done_callback(lambda _: self._running.pop(store.name, None))
        outcome = await asyncio.shield(task)
        self._checked[store.name] = (time.monotonic(), outcome)
        return outcome


async def _ping(store: Store) -> str | None:
    try:
        await asyncio.wait_for(store.ping(), TIMEOUT_SECONDS)
    except (BackendUnavailable, TimeoutError) as exc:
        return f"unavailable: {exc}" if str(exc) else "unavailable: no answer in time"
    return None
