"""The stores a sidecar serves: each store's config with its open driver.

`Store` is the one way to a store's backend, for the HTTP layer and the operator alike:
every operation is a method of it. Item calls on the `main` branch work on every driver;
other branches, and the structure calls (branches, turns, usage, compaction), go to
drivers that keep structure, and are refused on the others (`NotSupported`, naming the
backend).

Retention sweeps run here, one background task per store, because expiry is a property
of the store rather than of any request: drivers already hide expired sessions from
reads, and the sweep reclaims their space in batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from .config import SidecarConfig, StoreConfig
from .drivers import BACKENDS, Capability, open_driver
from .drivers.base import (
    MAIN,
    AppendResult,
    BackendUnavailable,
    BranchInfo,
    Branching,
    Check,
    Compacting,
    Driver,
    ErasureRecord,
    Idempotency,
    ItemShape,
    LabelChanges,
    Labelled,
    Meta,
    SessionInfo,
    SessionQuery,
    TurnUsage,
    Usage,
    UserTurn,
    wall_clock,
)
from .encryption import EncryptedDriver
from .exports import ExportCipher, SealedItem
from .instrumented import InstrumentedDriver
from .metrics import Metrics
from .refusals import Conflict, Invalid, NotFound, NotSupported
from .tracing import Tracing

if TYPE_CHECKING:
    from .compaction.compactor import Compactor
    from .compaction.policy import Request
    from .subjects import Subjects

log = logging.getLogger("convostore.sidecar")
ERASE_BATCH = 100


@dataclass
class Store:
    config: StoreConfig
    driver: Driver
    _compactor: Compactor | None = None

    @classmethod
    def open(
        cls, config: StoreConfig, metrics: Metrics | None = None, tracing: Tracing | None = None
    ) -> Store:
        """The store with its driver; with `metrics`, every backend call is timed (and,
        with `tracing`, traced)."""
        driver = open_driver(config)
        if metrics is not None:
            instrumented = InstrumentedDriver(driver, config.name, config.backend, metrics, tracing)
            driver = cast(Driver, instrumented)
        if config.encryption is not None:
            driver = EncryptedDriver(driver, config.encryption, config.identity)
        store = cls(config, driver)
        if config.compaction is not None:  # only then is the openai client loaded
            from .compaction.compactor import Compactor

            store._compactor = Compactor(
                config.compaction,
                config.limits.max_read_items,
                store._compacting,
                config.name,
                tracing,
            )
        return store

    async def open_driver(self) -> None:
        await self.driver.open()

    async def close(self) -> None:
        if self._compactor is not None:
            await self._compactor.close()
        await self.driver.close()

    async def ping(self) -> None:
        await self.driver.ping()

    async def sweep(self) -> int:
        """Expired sessions deleted: by the store's `ttl`, then by retention class."""
        swept = await self.driver.sweep()
        retention = self.config.labels.retention
        if retention is None or not self.structured:
            return swept
        now = wall_clock()
        erased: list[SessionInfo] = []
        for value, kept in retention.classes.items():
            cutoff = now - kept  # a session made after it was written after it too
            stale = SessionQuery(
                {retention.label: value}, ERASE_BATCH, created_before=cutoff, updated_before=cutoff
            )
            for info in await self._labelled.find_sessions(stale):
                # written since it was found: kept, in the erasure's own atomic step
                if await self._labelled.erase(info.session_id, cutoff) is not None:
                    erased.append(info)
        await self._shred(erased, {})
        await self._labelled.settle_erasures()
        return swept + len(erased)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def structured(self) -> bool:
        """Whether the driver keeps branches, turns and usage (`Branching`); behind
        encryption too, which passes structure through and seals only items."""
        return BACKENDS[self.config.backend].has("structure")

    @property
    def _branching(self) -> Branching:
        """The driver's structure calls; NotSupported, naming the backend, when it has none."""
        if not self.structured:
            raise self._unsupported("structure", "keep branches, turns or usage")
        return cast(Branching, self.driver)

    @property
    def _compacting(self) -> Compacting:
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

    def require_compaction(self) -> Compactor:
        """NotSupported from a backend that cannot compact, else a Conflict for a store
        whose config has no `compaction` section."""
        if self._compactor is not None:
            return self._compactor
        _ = self._compacting  # a backend that cannot compact says so first
        raise Conflict(
            "compaction_not_configured",
            f"store {self.name!r} has no compaction section in its config",
        )

    async def compact(self, session_id: str, branch: str, asked: Request) -> dict[str, Any]:
        """One compaction, if the store's policy says so."""
        return await self.require_compaction().run(session_id, branch, asked)

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
        return await self._branching.append_to(session_id, branch, items, meta, idempotency)

    async def latest(
        self, session_id: str, branch: str, limit: int | None, max_bytes: int | None = None
    ) -> list[bytes]:
        if branch == MAIN and not self.structured:
            return await self.driver.latest(session_id, limit, max_bytes)
        return await self._branching.latest_in(session_id, branch, limit, max_bytes)

    async def pop(self, session_id: str, branch: str, check: Check | None) -> bytes | None:
        if branch == MAIN and not self.structured:
            return await self.driver.pop(session_id, check)
        return await self._branching.pop_from(session_id, branch, check)

    async def full_history(
        self, session_id: str, branch: str, limit: int, max_bytes: int | None = None
    ) -> list[bytes]:
        """What compaction archived, then the live items no compaction wrote."""
        return await self._compacting.full_history(session_id, branch, limit, max_bytes)

    async def archive_head(
        self, session_id: str, branch: str, count: int, summary: Sequence[bytes]
    ) -> bool:
        """Put `summary` in place of the branch's first `count` items, which go to its
        archive, as a compaction does (an import restores one so); False when the
        branch holds fewer items."""
        most = self.config.limits.max_read_items
        snapshot = await self._compacting.snapshot(session_id, branch, most + 1)
        if len(snapshot.stored) > most:
            raise Conflict(
                "history_too_long",
                f"the branch holds more than limits.maxReadItems ({most}) items",
            )
        if len(snapshot.stored) < count:
            return False
        return await self._compacting.compact(
            session_id, branch, snapshot.stored[:count], list(summary)
        )

    async def clear(self, session_id: str) -> None:
        await self.driver.clear(session_id)

    async def list_sessions(self, prefix: str, after: str | None, limit: int) -> list[str]:
        return await self.driver.list_sessions(prefix, after, limit)

    @property
    def _labelled(self) -> Labelled:
        if not self.structured:
            raise self._unsupported("structure", "keep labels on sessions")
        return cast(Labelled, self.driver)

    async def label(self, session_id: str, changes: LabelChanges) -> SessionInfo:
        """Set and remove a session's labels, making its record when it has none."""
        return await self._labelled.label(session_id, changes, self.config.labels.most)

    async def session_info(self, session_id: str) -> SessionInfo:
        info = await self._labelled.session_info(session_id)
        if info is None:
            raise NotFound("session_not_found", f"store {self.name!r} holds no such session")
        return info

    async def find_sessions(self, query: SessionQuery) -> list[SessionInfo]:
        return await self._labelled.find_sessions(query)

    async def erase(self, labels: Mapping[str, str], budget: float) -> ErasureRecord:
        """Erase every session that carries all of `labels`, a page at a time, until none
        is left or `budget` seconds have passed (then the erasure is incomplete and is
        simply asked for again: it goes on where it stopped). Each call leaves a record
        of what it erased, which names no one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        erased: list[SessionInfo] = []
        items = 0
        while True:
            page = await self._labelled.find_sessions(SessionQuery(labels, ERASE_BATCH))
            for info in page:
                items += await self._labelled.erase(info.session_id) or 0
                erased.append(info)
            if not page or loop.time() > deadline:
                break
        await self._shred(erased, labels)
        await self._labelled.settle_erasures()
        sessions = len(erased)
        record = ErasureRecord(
            uuid.uuid4().hex, wall_clock(), tuple(sorted(labels)), sessions, items, not page
        )
        await self._labelled.record_erasure(record)
        return record

    async def _shred(self, erased: Sequence[SessionInfo], selector: Mapping[str, str]) -> None:
        """Destroy the keys of the subjects these erasures took the last session of (and
        of the subject the selector names, so a repeated erasure finishes an interrupted
        one). A subject with sessions left keeps its key: an erasure by tenant does not
        shred a person's sessions elsewhere."""
        subjects = self._subjects
        if subjects is None:
            return
        label = subjects.label
        values = {info.labels[label] for info in erased if label in info.labels}
        if label in selector:
            values.add(selector[label])
        for value in sorted(values):
            if not await self._labelled.find_sessions(SessionQuery({label: value}, 1)):
                await subjects.forget(value)

    async def erasures(self, limit: int) -> list[ErasureRecord]:
        return await self._labelled.erasures(limit)

    @property
    def _encrypted(self) -> EncryptedDriver:
        if not isinstance(self.driver, EncryptedDriver):
            raise Invalid("not_encrypted", f"store {self.name!r} has no encryption configured")
        return self.driver

    async def reencrypt(self, session_id: str) -> int:
        """Re-seal a session's items under the primary key; the count re-sealed."""
        return await self._encrypted.reencrypt(session_id)

    def keyring(self) -> tuple[str, list[str]]:
        """The primary key's id and every key id the store holds (ids only)."""
        keyring = self._encrypted.keyring
        return keyring.primary, sorted(keyring.keys)

    async def forget_subject_keys(self) -> int:
        """Destroy every subject's key (a store being deleted); how many there were."""
        subjects = self._subjects
        return 0 if subjects is None else await subjects.forget_all()

    @property
    def _subjects(self) -> Subjects | None:
        return self.driver.subjects if isinstance(self.driver, EncryptedDriver) else None

    async def subject_key_census(self) -> dict[str, int] | None:
        """How many subjects' keys each store key wraps; None without a subject label."""
        subjects = self._encrypted.subjects
        return None if subjects is None else await subjects.census()

    async def rewrap(self, budget: float) -> tuple[int, bool]:
        """Re-wrap the subjects' keys under the primary key, for up to `budget` seconds
        (then it is asked again); how many, and whether it is complete."""
        subjects = self._encrypted.subjects
        if subjects is None:
            return 0, True
        return await subjects.rewrap(budget)

    async def export_cipher(self, session_id: str) -> ExportCipher | None:
        """What seals the session's items for an export (`exports`); None when the store
        seals no subject's items or the session has no subject."""
        if self._subjects is None:
            return None
        return await self._encrypted.export_cipher(session_id)

    async def open_sealed(
        self, session_id: str, sealed: Mapping[int, SealedItem]
    ) -> dict[int, bytes]:
        """The items these exported ones were, by their index in an append: they open
        only in the store that sealed them, for a session of their subject."""
        cipher, subjects = await self.export_cipher(session_id), self._subjects
        if subjects is None:
            raise Conflict(
                "sealed_elsewhere",
                f"store {self.name!r} seals no subject's items, so sealed items do not open "
                "here: they open only in the store that exported them (export with "
                "--plaintext to move sessions between stores)",
            )
        if cipher is None:
            raise Conflict(
                "subject_required",
                "the items are sealed for a subject: set the session's "
                f"{subjects.label!r} label first (an import does, from the export)",
            )
        opened = {}
        for index, item in sealed.items():
            plaintext = cipher.open(item)
            if plaintext is None:
                raise Conflict(
                    "sealed_elsewhere",
                    f"item {index} does not open for this session: it was sealed by another "
                    "store, for another subject, for a subject since erased, or altered",
                )
            opened[index] = plaintext
        return opened

    async def key_census(self, session_id: str) -> tuple[dict[str, int], int, int]:
        """The items of the session depending on each key id, those stored in clear,
        and those of an erased subject."""
        return await self._encrypted.key_census(session_id)

    async def branches(self, session_id: str) -> list[BranchInfo]:
        return await self._branching.branches(session_id)

    async def branch_exists(self, session_id: str, branch: str) -> bool:
        return await self._branching.branch_exists(session_id, branch)

    async def create_branch(self, session_id: str, source: str, turn: int, new: str) -> None:
        await self._branching.create_branch(session_id, source, turn, new)

    async def delete_branch(self, session_id: str, branch: str) -> None:
        await self._branching.delete_branch(session_id, branch)

    async def user_turns(self, session_id: str, branch: str) -> list[UserTurn]:
        return await self._branching.user_turns(session_id, branch)

    async def shapes(self, session_id: str, branch: str) -> list[ItemShape]:
        return await self._branching.shapes(session_id, branch)

    async def record_usage(
        self, session_id: str, branch: str, turn: int | None, anchor: int | None, usage: Usage
    ) -> int | None:
        return await self._branching.record_usage(session_id, branch, turn, anchor, usage)

    async def usage(self, session_id: str, branch: str | None) -> list[TurnUsage]:
        return await self._branching.usage(session_id, branch)


class Stores:
    def __init__(
        self, config: SidecarConfig, metrics: Metrics, tracing: Tracing | None = None
    ) -> None:
        self._stores = {
            name: Store.open(cfg, metrics, tracing) for name, cfg in config.stores.items()
        }
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
            await store.open_driver()
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
            swept = await store.sweep()
        except BackendUnavailable as exc:
            log.warning("store %s: retention sweep skipped: %s", store.name, exc)
            metrics.sweeps.labels(store.name, "skipped").inc()
            continue
        metrics.sweeps.labels(store.name, "done").inc()
        metrics.last_sweep.labels(store.name).set_to_current_time()
        if swept:
            metrics.sessions_expired.labels(store.name).inc(swept)
