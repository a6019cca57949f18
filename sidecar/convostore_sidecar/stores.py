"""The stores a sidecar serves: each store's config with its open driver.

Item calls on the `main` branch work on every driver; other branches, and the structure
calls (branches, turns, usage), go to drivers that keep structure, and are refused on
the others (`NotSupported`, naming the backend).

Retention sweeps run here, one background task per store, because expiry is a property
of the store rather than of any request: drivers already hide expired sessions from
reads, and the sweep reclaims their space in batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from .config import SidecarConfig, StoreConfig
from .drivers import BACKENDS, Capability, open_driver
from .drivers.base import (
    MAIN,
    AppendResult,
    BackendUnavailable,
    Branching,
    Check,
    Compacting,
    Driver,
    Idempotency,
    Meta,
)
from .encryption import EncryptedDriver
from .metrics import Metrics
from .refusals import Conflict, NotFound, NotSupported

if TYPE_CHECKING:
    from .compaction.compactor import Compactor

log = logging.getLogger("convostore.sidecar")


@dataclass
class Store:
    config: StoreConfig
    driver: Driver
    _compactor: Compactor | None = None

    @classmethod
    def open(cls, config: StoreConfig) -> Store:
        driver = open_driver(config)
        if config.encryption is not None:
            driver = EncryptedDriver(driver, config.encryption, config.identity)
        store = cls(config, driver)
        if config.compaction is not None:  # only then is the openai client loaded
            from .compaction.compactor import Compactor

            store._compactor = Compactor(
                config.compaction, config.limits, store.compacting, config.name
            )
        return store

    async def close(self) -> None:
        if self._compactor is not None:
            await self._compactor.close()
        await self.driver.close()

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def structured(self) -> bool:
        """Whether the driver keeps branches, turns and usage (`Branching`); behind
        encryption too, which passes structure through and seals only items."""
        return BACKENDS[self.config.backend].has("structure")

    @property
    def branching(self) -> Branching:
        """The driver's structure calls; NotSupported, naming the backend, when it has none."""
        if not self.structured:
            raise self._unsupported("structure", "keep branches, turns or usage")
        return cast(Branching, self.driver)

    @property
    def compacting(self) -> Compacting:
        """Compaction and its archive; NotSupported, naming the backend, when it keeps none."""
        if not self.structured:
            raise self._unsupported("compaction", "compact histories")
        return cast(Compacting, self.driver)

    def _unsupported(self, capability: Capability, what: str) -> NotSupported:
        backend = self.config.backend
        why = BACKENDS[backend].lacks[capability]
        return NotSupported(
            "not_supported", f"store {self.name!r}: the {backend} backend cannot {what}: {why}"
        )

    @property
    def compactor(self) -> Compactor:
        """NotSupported from a backend that cannot compact, else a Conflict for a store
        whose config has no `compaction` section."""
        if self._compactor is not None:
            return self._compactor
        _ = self.compacting  # a backend that cannot compact says so first
        raise Conflict(
            "compaction_not_configured",
            f"store {self.name!r} has no compaction section in its config",
        )

    async def append(
        self,
        session_id: str,
        branch: str,
        items: Sequence[bytes],
        meta: Sequence[Meta],
        idempotency: Idempotency | None,
    ) -> AppendResult:
        if branch == MAIN and not self.structured:
            return await self.driver.append(session_id, items, idempotency)
        return await self.branching.append_to(session_id, branch, items, meta, idempotency)

    async def latest(
        self, session_id: str, branch: str, limit: int | None, max_bytes: int | None = None
    ) -> list[bytes]:
        if branch == MAIN and not self.structured:
            return await self.driver.latest(session_id, limit, max_bytes)
        return await self.branching.latest_in(session_id, branch, limit, max_bytes)

    async def pop(self, session_id: str, branch: str, check: Check | None) -> bytes | None:
        if branch == MAIN and not self.structured:
            return await self.driver.pop(session_id, check)
        return await self.branching.pop_from(session_id, branch, check)


class Stores:
    def __init__(self, config: SidecarConfig) -> None:
        self._stores = {name: Store.open(cfg) for name, cfg in config.stores.items()}
        self._sweepers: list[asyncio.Task[None]] = []

    def __iter__(self) -> Iterator[Store]:
        return iter(self._stores.values())

    def get(self, name: str) -> Store:
        store = self._stores.get(name)
        if store is None:
            raise NotFound("store_not_found", f"this sidecar serves no store named {name!r}")
        return store

    def __contains__(self, name: object) -> bool:
        return name in self._stores

    async def open(self, metrics: Metrics) -> None:
        for store in self._stores.values():
            await store.driver.open()
            self._sweepers.append(asyncio.create_task(_sweep_forever(store, metrics)))

    async def close(self) -> None:
        for task in self._sweepers:
            task.cancel()
        for task in self._sweepers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for store in self._stores.values():
            await store.close()


async def _sweep_forever(store: Store, metrics: Metrics) -> None:
    while True:
        await asyncio.sleep(store.config.sweep_interval)
        try:
            swept = await store.driver.sweep()
        except BackendUnavailable as exc:
            log.warning("store %s: retention sweep skipped: %s", store.name, exc)
            continue
        if swept:
            metrics.sessions_expired.labels(store.name).inc(swept)
