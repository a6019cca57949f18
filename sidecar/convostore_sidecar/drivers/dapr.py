"""Dapr driver: the state API of the pod's own Dapr sidecar, through the `dapr` SDK.

Layout, per session, in the state store the config names:

    <prefix>||<session>            head: {"first", "next", "refreshed"} (ETag-guarded)
    <prefix>||<session>||<seq>     one record per item; never rewritten by an append
    <prefix>||<session>||idem||<h> an Idempotency-Key seen, with its request fingerprint
    <prefix>||sessions             the sorted list of session ids, for listing

An append writes its items, the idempotency record and the new head in one state
transaction that carries the head's ETag: if another writer changed the head since it
was read, the whole transaction is refused (gRPC ABORTED) and the append is retried on
the new head, a bounded number of times. Pops and clears work the same way, so two pops
never return the same item. A head is created with first-write concurrency and no ETag,
which Dapr documents as "only if the key does not exist".

With a `ttl`, records carry `ttlInSeconds`: the head `ttl`, items twice that. Whenever a
write finds the items last refreshed more than `ttl` ago, it re-saves them, so no item
expires while its session lives and an idle session disappears whole.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import grpc
from dapr.aio.clients import DaprClient
from dapr.clients.exceptions import DaprGrpcError, DaprInternalError
from dapr.clients.grpc._request import TransactionalStateOperation, TransactionOperationType
from dapr.clients.grpc._state import Concurrency, StateOptions
from dapr.conf import settings as dapr_settings

from .base import (
    AppendResult,
    BackendUnavailable,
    Check,
    Gathered,
    Idempotency,
    Items,
    Transform,
    replay_of,
    scoped_prefix,
    stored,
)

if TYPE_CHECKING:
    from ..config import StoreConfig
    from ..sections import Section

T = TypeVar("T")
UPSERT, DELETE = TransactionOperationType.upsert, TransactionOperationType.delete
READ_PAGE = (16, 256)
"""The fewest and most items a read asks the state store for at once (one bulk get)."""


class Conflict(Exception):
    """The head changed between our read and our write (an ETag mismatch)."""


@dataclass(frozen=True)
class Settings:
    state_store: str
    key_prefix: str | None = None
    grpc_endpoint: str | None = None
    http_endpoint: str | None = None
    api_token_file: str | None = None
    timeout: float = 5.0
    max_attempts: int = 50

    @classmethod
    def parse(cls, s: Section) -> Settings:
        state_store = s.string("stateStore")
        if state_store is None:
            s.fail("stateStore", "is required: the name of the Dapr state store component")
        prefix = s.string("keyPrefix")
        if prefix is not None and "||" in prefix:
            s.fail("keyPrefix", "must not contain '||', Dapr's key separator")
        return cls(
            state_store=state_store,
            key_prefix=prefix,
            grpc_endpoint=s.string("grpcEndpoint"),
            http_endpoint=s.string("httpEndpoint"),
            api_token_file=s.string("apiTokenFile"),
            timeout=s.duration("timeout", cls.timeout, low=0.05, high=300),
            max_attempts=s.integer("maxAttempts", cls.max_attempts, low=1, high=1000),
        )


def open_driver(store: StoreConfig) -> DaprDriver:
    return DaprDriver(store)


@dataclass
class Head:
    first: int = 0
    next: int = 0
    refreshed: float = 0.0

    def encode(self) -> bytes:
        return json.dumps(
            {"first": self.first, "next": self.next, "refreshed": self.refreshed}
        ).encode()


class DaprDriver:
    def __init__(self, store: StoreConfig) -> None:
        self.settings: Settings = store.settings
        self.retention = store.retention
        self.prefix = scoped_prefix(self.settings.key_prefix, store, "/", "convostore-")
        self._client: DaprClient | None = None
        self._client_lock = asyncio.Lock()
        self.grpc_endpoint = (
            self.settings.grpc_endpoint
            or os.environ.get("DAPR_GRPC_ENDPOINT")
            or f"127.0.0.1:{os.environ.get('DAPR_GRPC_PORT', '50001')}"
        )
        self.http_endpoint = (
            self.settings.http_endpoint
            or os.environ.get("DAPR_HTTP_ENDPOINT")
            or f"http://127.0.0.1:{os.environ.get('DAPR_HTTP_PORT', '3500')}"
        ).rstrip("/")
        self._api_token: str | None = None
        if self.settings.api_token_file:
            with open(self.settings.api_token_file, encoding="utf-8") as f:
                self._api_token = f.read().strip()

    # keys

    def head_key(self, session_id: str) -> str:
        return f"{self.prefix}||{session_id}"

    def item_key(self, session_id: str, seq: int) -> str:
        return f"{self.prefix}||{session_id}||{seq}"

    def idem_key(self, session_id: str, key: str) -> str:
        return f"{self.prefix}||{session_id}||idem||{hashlib.sha256(key.encode()).hexdigest()[:40]}"

    @property
    def index_key(self) -> str:
        """One bar, where every session key has two: no session id can name it."""
        return f"{self.prefix}|sessions"

    async def _index(self) -> tuple[list[str], str | None]:
        """The session ids and the index's ETag; a store indexed before the index moved
        (to `index_key`) is read from where it was, `<prefix>||sessions`, until the first
        change writes it anew."""
        resp = await self._call(lambda c: c.get_state(self.settings.state_store, self.index_key))
        if resp.data:
            return list(json.loads(resp.data)), resp.etag or None
        legacy = f"{self.prefix}||sessions"
        old = await self._call(lambda c: c.get_state(self.settings.state_store, legacy))
        try:
            ids = json.loads(old.data) if old.data else []
        except ValueError:
            ids = []
        if not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
            ids = []  # a session of that name, not an index
        return ids, None

    # plumbing

    async def _get_client(self) -> DaprClient:
        """The SDK's client checks the sidecar's health synchronously, for up to a minute,
        when it is made; so it is made only after a quick asynchronous check succeeded."""
        if self._client is not None:
            return self._client
        async with self._client_lock:
            if self._client is None:
                await self._probe()
                setattr(dapr_settings, "DAPR_HTTP_ENDPOINT", self.http_endpoint)  # noqa: B010
                if self._api_token:
                    setattr(dapr_settings, "DAPR_API_TOKEN", self._api_token)  # noqa: B010
                self._client = DaprClient(address=self.grpc_endpoint)
        return self._client

    async def _probe(self) -> None:
        url = f"{self.http_endpoint}/v1.0/healthz/outbound"
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http, http.get(url) as resp:
                if resp.status >= 300:
                    raise BackendUnavailable(f"dapr: {url} answered {resp.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BackendUnavailable(f"dapr: sidecar not reachable at {url}: {exc!r}") from exc

    async def _call(self, fn: Callable[[DaprClient], Awaitable[T]]) -> T:
        client = await self._get_client()
        try:
            return await asyncio.wait_for(fn(client), self.settings.timeout)
        except TimeoutError as exc:
            raise BackendUnavailable("dapr: no answer in time") from exc
        except (DaprGrpcError, DaprInternalError) as exc:
            code = _grpc_code(exc)
            if code == grpc.StatusCode.ABORTED or "etag mismatch" in str(exc).lower():
                raise Conflict(str(exc)) from exc
            raise BackendUnavailable(f"dapr: {code}: {exc}") from exc

    async def _retry(self, attempt_fn: Callable[[], Awaitable[T]], what: str) -> T:
        for attempt in range(self.settings.max_attempts):
            try:
                return await attempt_fn()
            except Conflict:
                await asyncio.sleep(random.uniform(0, min(0.2, 0.005 * 2**attempt)))
        raise BackendUnavailable(
            f"dapr: {what} kept conflicting with other writers "
            f"({self.settings.max_attempts} attempts)"
        )

    def _ttl_meta(self, factor: int = 1) -> dict[str, str]:
        ttl = self.retention.ttl_seconds
        return {"ttlInSeconds": str(max(1, int(ttl * factor)))} if ttl else {}

    async def _read_head(self, session_id: str) -> tuple[Head | None, str]:
        resp = await self._call(
            lambda c: c.get_state(self.settings.state_store, self.head_key(session_id))
        )
        if not resp.data:
            return None, ""
        return Head(**json.loads(resp.data)), resp.etag

    async def _create_head(self, session_id: str) -> None:
        """First-write without an ETag: succeeds only for the first creator."""
        try:
            await self._call(
                lambda c: c.save_state(
                    self.settings.state_store,
                    self.head_key(session_id),
                    Head(refreshed=time.time()).encode(),
                    options=StateOptions(concurrency=Concurrency.first_write),
                    state_metadata=self._ttl_meta(),
                )
            )
        except Conflict:
            return
        await self._update_index(lambda ids: ids | {session_id})

    async def _transact(self, operations: list[TransactionalStateOperation]) -> None:
        await self._call(
            lambda c: c.execute_state_transaction(self.settings.state_store, operations)
        )

    async def _items(self, session_id: str, seqs: Sequence[int]) -> list[tuple[int, bytes]]:
        """The items at `seqs` that still exist, in order."""
        if not seqs:
            return []
        keys = [self.item_key(session_id, seq) for seq in seqs]
        resp = await self._call(
            lambda c: c.get_bulk_state(self.settings.state_store, keys, parallelism=8)
        )
        found = {item.key: _as_bytes(item.data) for item in resp.items if item.data}
        return [(seq, found[key]) for seq, key in zip(seqs, keys, strict=True) if key in found]

    async def _refresh_ops(self, session_id: str, head: Head) -> list[TransactionalStateOperation]:
        """Re-saves of every item when they were last saved more than `ttl` ago."""
        ttl = self.retention.ttl_seconds
        if not ttl or head.refreshed > time.time() - ttl:
            return []
        head.refreshed = time.time()
        items = await self._items(session_id, range(head.first, head.next))
        return [
            TransactionalStateOperation(
                self.item_key(session_id, seq), data, metadata=self._ttl_meta(2)
            )
            for seq, data in items
        ]

    def _head_op(self, session_id: str, head: Head, etag: str) -> TransactionalStateOperation:
        return TransactionalStateOperation(
            self.head_key(session_id), head.encode(), etag=etag, metadata=self._ttl_meta()
        )

    # the driver interface

    async def open(self) -> None:
        """The client is made on first use, so the sidecar starts before Dapr's does."""

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def ping(self) -> None:
        await self._probe()
        await self._call(lambda c: c.get_state(self.settings.state_store, self.index_key))

    async def append(
        self, session_id: str, items: Items, idempotency: Idempotency | None
    ) -> AppendResult:
        async def attempt() -> AppendResult:
            head, etag = await self._read_head(session_id)
            if head is None:
                await self._create_head(session_id)
                raise Conflict("created the head; read it again")
            ops: list[TransactionalStateOperation] = []
            if idempotency is not None:
                key = self.idem_key(session_id, idempotency.key)
                seen = await self._call(lambda c: c.get_state(self.settings.state_store, key))
                if seen.data:
                    fingerprint, _, count = seen.data.decode().partition(" ")
                    return replay_of(idempotency, fingerprint, int(count))
                ttl = {"ttlInSeconds": str(max(1, int(idempotency.ttl_seconds)))}
                record = f"{idempotency.fingerprint} {len(items)}"
                ops.append(TransactionalStateOperation(key, record, metadata=ttl))
            ops += await self._refresh_ops(session_id, head)
            ops += [
                TransactionalStateOperation(
                    self.item_key(session_id, head.next + i), data, metadata=self._ttl_meta(2)
                )
                for i, data in enumerate(stored(items, head.next))  # the head's ETag holds them
            ]
            head.next += len(items)
            if self.retention.max_items and head.next - head.first > self.retention.max_items:
                trimmed = range(head.first, head.next - self.retention.max_items)
                ops += [
                    TransactionalStateOperation(
                        self.item_key(session_id, seq), operation_type=DELETE
                    )
                    for seq in trimmed
                    if seq < head.next - len(items)
                ]
                head.first = head.next - self.retention.max_items
            ops.append(self._head_op(session_id, head, etag))
            await self._transact(ops)
            return AppendResult(appended=len(items), replayed=False)

        return await self._retry(attempt, "an append")

    async def latest(
        self, session_id: str, limit: int | None, max_bytes: int | None = None
    ) -> list[bytes]:
        """In pages from the newest back, so that a byte cap stops the reading."""
        head, _ = await self._read_head(session_id)
        if head is None:
            return []
        start = head.first if limit is None else max(head.first, head.next - limit)
        gathered, stop = Gathered(max_bytes), head.next
        while stop > start:
            first = max(start, stop - gathered.page(*READ_PAGE))
            page = await self._items(session_id, range(first, stop))
            if not all(gathered.take(data) for _, data in reversed(page)):
                break
            stop = first
        return gathered.oldest_first()

    async def pop(self, session_id: str, check: Check | None = None) -> bytes | None:
        async def attempt() -> bytes | None:
            head, etag = await self._read_head(session_id)
            if head is None or head.next == head.first:
                return None
            newest = await self._items(session_id, [head.next - 1])
            head.next -= 1
            if not newest:
                await self._transact([self._head_op(session_id, head, etag)])
                raise Conflict("the newest item was already gone; look again")
            data = newest[0][1]
            if check is not None:
                check(data)
            ops = await self._refresh_ops(session_id, head)
            ops += [
                TransactionalStateOperation(
                    self.item_key(session_id, head.next), operation_type=DELETE
                ),
                self._head_op(session_id, head, etag),
            ]
            await self._transact(ops)
            return data

        return await self._retry(attempt, "a pop")

    async def clear(self, session_id: str) -> None:
        async def attempt() -> None:
            head, etag = await self._read_head(session_id)
            if head is None:
                return
            ops = [
                TransactionalStateOperation(self.item_key(session_id, seq), operation_type=DELETE)
                for seq in range(head.first, head.next)
            ]
            ops.append(
                TransactionalStateOperation(
                    self.head_key(session_id), etag=etag, operation_type=DELETE
                )
            )
            await self._transact(ops)

        await self._retry(attempt, "a clear")
        await self._update_index(lambda ids: ids - {session_id})

    async def _update_index(self, change: Callable[[set[str]], set[str]]) -> None:
        async def attempt() -> None:
            listed, etag = await self._index()
            ids = set(listed)
            new = change(ids)
            if new == ids:
                return
            value = json.dumps(sorted(new)).encode()
            await self._call(
                lambda c: c.save_state(
                    self.settings.state_store,
                    self.index_key,
                    value,
                    etag=etag,
                    options=StateOptions(concurrency=Concurrency.first_write),
                )
            )

        await self._retry(attempt, "an update of the session index")

    async def list_sessions(self, prefix: str, after: str | None, limit: int) -> list[str]:
        listed, _ = await self._index()
        ids = [sid for sid in listed if sid.startswith(prefix) and (after is None or sid > after)]
        found: list[str] = []
        gone: set[str] = set()
        for start in range(0, len(ids), 100):
            batch = ids[start : start + 100]
            heads = await self._call(functools.partial(self._bulk_heads, batch))
            alive = {item.key for item in heads.items if item.data}
            for sid in batch:
                if self.head_key(sid) in alive:
                    found.append(sid)
                else:
                    gone.add(sid)
            if len(found) >= limit:
                break
        if gone:
            await self._update_index(lambda current: current - gone)
        return found[:limit]

    async def _bulk_heads(self, session_ids: list[str], client: DaprClient) -> Any:
        keys = [self.head_key(sid) for sid in session_ids]
        return await client.get_bulk_state(self.settings.state_store, keys, parallelism=8)

    async def sweep(self) -> int:
        """Dapr expires records itself (`ttlInSeconds`); listings prune the index."""
        return 0

    async def rewrite(self, session_id: str, transform: Transform) -> int:
        async def attempt() -> int:
            head, etag = await self._read_head(session_id)
            if head is None:
                return 0
            ops = [
                TransactionalStateOperation(
                    self.item_key(session_id, seq), new, metadata=self._ttl_meta(2)
                )
                for seq, data in await self._items(session_id, range(head.first, head.next))
                if (new := transform(data)) is not None
            ]
            if ops:
                await self._transact([*ops, self._head_op(session_id, head, etag)])
            return len(ops)

        return await self._retry(attempt, "a rewrite")


def _as_bytes(data: bytes | str) -> bytes:
    return data if isinstance(data, bytes) else data.encode()


def _grpc_code(exc: Exception) -> grpc.StatusCode | None:
    """The gRPC status behind an SDK error; `save_state` keeps it only as the cause."""
    for error in (exc, exc.__cause__):
        if isinstance(error, grpc.RpcError):
            code: grpc.StatusCode = error.code()
            return code
    return None
