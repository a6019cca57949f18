"""The Redis driver's operations, each one script call (or a read) on the session's keys."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from redis.asyncio.cluster import PipelineCommand, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    ClusterError,
    ConnectionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    TimeoutError,
    TryAgainError,
    WatchError,
)

from ..base import (
    ERASURES_KEPT,
    MAIN,
    AppendResult,
    BackendUnavailable,
    BranchIdUsed,
    BranchInfo,
    BranchNotFound,
    Cause,
    Check,
    ErasureRecord,
    Idempotency,
    Items,
    ItemShape,
    KeepsStructure,
    LabelChanges,
    Meta,
    Sealed,
    SessionInfo,
    SessionQuery,
    SubjectKey,
    TooManyLabels,
    Transform,
    TurnNotFound,
    TurnUsage,
    Usage,
    UserTurn,
    replay_of,
    scoped_prefix,
    stored,
    stored_at,
    wall_clock,
)

if TYPE_CHECKING:
    from ...config import StoreConfig


from .client import connect
from .labels import Listings, record_of
from .scripts import (
    APPEND,
    BRANCH_KEYS,
    CLEAR,
    COMPACT,
    CREATE_BRANCH,
    DELETE_BRANCH,
    ERASE,
    KEEP_SUBJECT_KEY,
    LABEL,
    POP,
    READ,
    RECORD_USAGE,
    REPLACE_SUBJECT_KEY,
    SESSION_KEYS,
    SUBJECTS,
    Outcome,
)
from .settings import Settings
from .values import clean, decode_usage, encode_usage, live_branches, suffix

T = TypeVar("T")
_UNAVAILABLE = (ConnectionError, TimeoutError, BusyLoadingError, OSError)
_RESHAPING = (ClusterError, TryAgainError, AskError, RedisClusterException)
"""A cluster failing over or moving slots, for longer than the client follows it, or
none of its nodes reachable (redis-py's own exception, not a RedisError)."""
OPTIMISTIC_ATTEMPTS = 50
KNOWN_BRANCHES_KEPT = 4096


def open_driver(store: StoreConfig) -> RedisDriver:
    return RedisDriver(store)


class RedisDriver(KeepsStructure):
    def __init__(self, store: StoreConfig) -> None:
        settings: Settings = store.settings
        self.retention = store.retention
        self.prefix = scoped_prefix(settings.key_prefix, store, ":", "convostore:")
        clients = connect(settings)
        self.client, self._cluster, self._sentinels = (
            clients.data,
            clients.cluster,
            clients.sentinels,
        )
        self._known_branches: dict[str, tuple[str, ...]] = {}
        self._wait = (settings.wait_replicas, settings.wait_timeout)
        self._timeout = settings.timeout
        self._idle_timeout = settings.idle_timeout
        self._last_call = time.monotonic()
        self._idle_closer: asyncio.Task[None] | None = None
        self._append = self.client.register_script(APPEND)
        self._pop = self.client.register_script(POP)
        self._create_branch = self.client.register_script(CREATE_BRANCH)
        self._delete_branch = self.client.register_script(DELETE_BRANCH)
        self._clear = self.client.register_script(CLEAR)
        self._record_usage = self.client.register_script(RECORD_USAGE)
        self._compact = self.client.register_script(COMPACT)
        self._read = self.client.register_script(READ)
        self._index = f"{self.prefix}:sessions"
        self._label = self.client.register_script(LABEL)
        self._erase = self.client.register_script(ERASE)
        self._subject_keys = f"{self._base(SUBJECTS)}:keys"
        self._keep_subject_key = self.client.register_script(KEEP_SUBJECT_KEY)
        self._replace_subject_key = self.client.register_script(REPLACE_SUBJECT_KEY)
        self._listings = Listings(self.client, self.prefix, self._about, self._through_migration)
        self._idempotency_to_forget: set[str] = set()

    def _declared(
        self, session_id: str, branches: Sequence[str], extra: Sequence[str]
    ) -> list[str]:
        """A script's KEYS: the session's name, then `extra`, then every key of the
        session, each branch's included (see `undeclared` in the scripts)."""
        base = self._base(session_id)
        keys = [base, *extra, *(f"{base}:{kind}" for kind in SESSION_KEYS)]
        for sfx in ("", *(f"@{name}" for name in branches)):
            keys.extend(f"{base}:{kind}{sfx}" for kind in BRANCH_KEYS)
        return keys

    async def _session_script(
        self,
        script: AsyncScript,
        session_id: str,
        args: Sequence[Any],
        *,
        extra: Sequence[str] = (),
    ) -> Any:
        """Runs a session's script with its keys declared for the branches this driver
        last saw there; when a branch it did not know has appeared, with them all."""
        branches = self._known_branches.get(session_id, ())
        for _ in range(OPTIMISTIC_ATTEMPTS):
            keys = self._declared(session_id, branches, extra)
            call = functools.partial(script, keys=keys, args=list(args), client=self.client)
            outcome = await self._through_migration(call)
            if outcome[0] != Outcome.UNDECLARED:
                return outcome
            names = await self.client.hkeys(f"{self._base(session_id)}:branches")
            branches = tuple(sorted(name.decode() for name in cast(list[bytes], names)))
            if len(self._known_branches) >= KNOWN_BRANCHES_KEPT:
                self._known_branches.clear()
            self._known_branches[session_id] = branches
        raise BackendUnavailable(f"redis: session {session_id!r} changed too often to write")

    def keys(self, session_id: str) -> tuple[str, str]:
        base = f"{self.prefix}:{{{session_id}}}"
        return f"{base}:items", f"{base}:seq"

    def _ttl_ms(self) -> int:
        ttl = self.retention.ttl_seconds
        return int(ttl * 1000) if ttl else 0

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        self._last_call = time.monotonic()
        try:
            return await fn()
        except _UNAVAILABLE as exc:
            full = "max number of clients reached" in str(exc)
            cause = Cause.TOO_MANY_CONNECTIONS if full else Cause.UNAVAILABLE
            raise BackendUnavailable(f"redis: {exc}", cause) from exc
        except ReadOnlyError as exc:
            raise BackendUnavailable(f"redis: {exc}", Cause.READ_ONLY) from exc
        except OutOfMemoryError as exc:
            raise BackendUnavailable(f"redis: {exc}", Cause.OUT_OF_MEMORY) from exc
        except _RESHAPING as exc:
            raise BackendUnavailable(f"redis cluster: {type(exc).__name__}: {exc}") from exc

    async def open(self) -> None:
        """Nothing to prepare: the client connects on first use."""
        self._idle_closer = asyncio.create_task(self._close_when_idle())

    async def _close_when_idle(self) -> None:
        idle = self._idle_timeout
        while True:
            await asyncio.sleep(max(idle - (time.monotonic() - self._last_call), idle / 4))
            if time.monotonic() - self._last_call >= idle:
                with contextlib.suppress(*_UNAVAILABLE):  # a broken one is gone anyway
                    await self._close_free_connections()

    async def _close_free_connections(self) -> None:
        """The connections no call is using; a call after this connects again."""
        if self._cluster is not None:
            nodes = self._cluster.get_nodes()
            await asyncio.gather(*(node.disconnect_free_connections() for node in nodes))
        else:
            await self.client.connection_pool.disconnect(inuse_connections=False)

    async def close(self) -> None:
        if self._idle_closer is not None:
            self._idle_closer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._idle_closer
        await self.client.aclose()
        for sentinel in self._sentinels:
            await sentinel.aclose()

    async def ping(self) -> None:
        cluster = self._cluster
        if cluster is None:
            await self._call(self.client.ping)
            return
        info = await self._call(lambda: cluster.cluster_info(target_nodes=RedisCluster.RANDOM))
        if info.get("cluster_state") != "ok":
            raise BackendUnavailable(f"redis cluster: state is {info.get('cluster_state')!r}")

    def _base(self, session_id: str) -> str:
        return f"{self.prefix}:{{{session_id}}}"

    async def _through_migration(self, call: Callable[[], Awaitable[T]]) -> T:
        """Asks again, for up to `timeout`, while Redis refuses a call because its slot is
        moving: TRYAGAIN while the keys are split between two nodes, or redirections
        beyond redis-py's own limit. A refused call did not run, so asking again cannot
        apply a write twice. A slot moves in moments, but may hold more keys than
        redis-py's 0.4 s of asking covers."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        while True:
            try:
                return await call()
            except (TryAgainError, ClusterError) as exc:
                if isinstance(exc, ClusterDownError) or loop.time() > deadline:
                    raise
                await asyncio.sleep(0.05)

    async def _replicated(self, session_id: str, write: Callable[[], Awaitable[T]]) -> T:
        """Runs `write`; with `waitReplicas`, answers only once that many replicas hold
        it. Fewer in time: BackendUnavailable, and the client's retry, carrying the same
        Idempotency-Key, is a replay that waits again."""
        replicas, timeout = self._wait
        result = await write()
        if replicas:
            acknowledged = await self._replicas_holding(session_id)
            if acknowledged < replicas:
                raise BackendUnavailable(
                    f"redis: the write reached {acknowledged} of {replicas} replica(s) "
                    f"within waitTimeout ({timeout:g}s)",
                    Cause.OUTCOME_UNKNOWN,
                )
        return result

    async def _replicas_holding(self, session_id: str) -> int:
        """How many replicas hold the session's last write. WAIT counts only the writes
        of its own connection, and the write may have run on another one, or written
        nothing (the replay of an append, which must wait for the original all the
        same). So a marker is written in the session's slot and WAIT sent after it, on
        one connection to that slot's primary: the marker follows every earlier write
        of the session in the primary's replication stream."""
        replicas, timeout = self._wait
        marker, ms = f"{self._base(session_id)}:replicated", int(timeout * 1000)
        if self._cluster is None:
            async with self.client.pipeline(transaction=False) as pipe:  # one connection
                pipe.set(marker, b"", px=ms + 1000)
                pipe.wait(replicas, ms)
                return cast(int, (await pipe.execute())[1])
        sent = [
            PipelineCommand(0, "SET", marker, b"", "PX", ms + 1000),
            PipelineCommand(1, "WAIT", replicas, ms),
        ]
        primary = self._cluster.get_node_from_key(marker)
        if primary is None:
            raise BackendUnavailable("redis cluster: no primary serves the session's slot")
        await primary.execute_pipeline(sent)
        for command in sent:
            if isinstance(command.result, Exception):
                raise BackendUnavailable(
                    f"redis cluster: cannot wait for replicas: {command.result}"
                )
        return cast(int, sent[1].result)

    async def _script(self, script: AsyncScript, session_id: str, *args: Any) -> Any:
        return await self._call(lambda: self._session_script(script, session_id, args))

    async def append_to(
        self,
        session_id: str,
        branch: str,
        items: Items,
        meta: Sequence[Meta],
        idempotency: Idempotency | None,
    ) -> AppendResult:
        idem_key = f"{self._base(session_id)}:idem:" + (
            hashlib.sha256(idempotency.key.encode()).hexdigest()[:40] if idempotency else ""
        )
        head: list[Any] = [
            suffix(branch),
            "1" if idempotency else "0",
            idempotency.fingerprint if idempotency else "",
            int(idempotency.ttl_seconds * 1000) if idempotency else 0,
            self._ttl_ms(),
            self.retention.max_items or 0,
            f"{wall_clock():.6f}",
            len(items),
        ]
        shapes = [f"{clean(m.kind)}\t{clean(m.tool or '')}" for m in meta]

        async def run() -> Any:
            """Sealed items are bound to their ids: read the id counter, seal, and append
            only if no other append took those ids meanwhile (else again)."""
            for attempt in range(OPTIMISTIC_ATTEMPTS):
                expected = -1
                if isinstance(items, Sealed):
                    if attempt:
                        await asyncio.sleep(random.uniform(0, 0.001 * min(attempt, 20)))
                    expected = int(await self.client.get(f"{self._base(session_id)}:ids") or 0)
                args = [*head, *stored(items, expected + 1), *shapes, expected]
                outcome = await self._session_script(
                    self._append, session_id, args, extra=[idem_key]
                )
                if outcome[0] != Outcome.POSITIONS_MOVED:
                    break
            else:
                raise BackendUnavailable(
                    f"redis: session {session_id!r} changed too often to append"
                )
            if outcome[0] == Outcome.DONE and outcome[1] == 1:  # the append began it
                index = {session_id: 0}
                await self._through_migration(lambda: self.client.zadd(self._index, index))
            if outcome[0] == Outcome.DONE and outcome[4] == 1:  # its record, too
                await self._listings.added(session_id, float(outcome[5]), True, [])
            return outcome

        outcome = await self._call(lambda: self._replicated(session_id, run))
        if outcome[0] == Outcome.NO_BRANCH:
            raise BranchNotFound(branch)
        if outcome[0] == Outcome.REPLAYED:
            assert idempotency is not None
            fingerprint, _, count = outcome[1].decode().partition(" ")
            return replay_of(idempotency, fingerprint, int(count))
        return AppendResult(len(items), replayed=False, turn=outcome[2], anchor=outcome[3])

    async def latest_in(
        self, session_id: str, branch: str, limit: int | None, max_bytes: int | None = None
    ) -> list[bytes]:
        await self._require_branch(session_id, branch)
        items_key = f"{self._base(session_id)}:items{suffix(branch)}"
        if max_bytes is None:
            start = 0 if limit is None else -limit
            return cast(
                list[bytes], await self._call(lambda: self.client.lrange(items_key, start, -1))
            )
        return await self._read_newest([items_key], limit, max_bytes)

    async def _read_newest(
        self, keys: list[str], limit: int | None, max_bytes: int | None
    ) -> list[bytes]:
        args = [-1 if limit is None else limit, -1 if max_bytes is None else max_bytes]
        read = functools.partial(self._read, keys=keys, args=args, client=self.client)
        return cast(list[bytes], await self._call(read))

    async def _require_branch(self, session_id: str, branch: str) -> None:
        if not await self.branch_exists(session_id, branch):
            raise BranchNotFound(branch)

    async def branch_exists(self, session_id: str, branch: str) -> bool:
        if branch == MAIN:
            return True
        key = f"{self._base(session_id)}:branches"
        live = await self._call(lambda: self.client.hget(key, branch))
        return live == b"1"

    async def pop_from(self, session_id: str, branch: str, check: Check | None) -> bytes | None:
        return await self._call(functools.partial(self._checked_pop, session_id, branch, check))

    async def _checked_pop(self, session_id: str, branch: str, check: Check | None) -> bytes | None:
        """Without a check one script pops. With one, the newest item is read and checked
        first, then popped by the script only if it is still the newest (else again)."""
        items_key = f"{self._base(session_id)}:items{suffix(branch)}"
        for attempt in range(OPTIMISTIC_ATTEMPTS):
            if attempt:  # poppers that lost the race spread out instead of colliding again
                await asyncio.sleep(random.uniform(0, 0.001 * min(attempt, 20)))
            expect: list[Any] = ["any", ""]
            if check is not None:
                newest = cast(bytes | None, await self.client.lindex(items_key, -1))
                if newest is not None:
                    check(newest)
                expect = ["none", ""] if newest is None else ["item", newest]
            args = [suffix(branch), self._ttl_ms(), *expect]
            outcome = await self._session_script(self._pop, session_id, args)
            if outcome[0] == Outcome.NEWER_ARRIVED:
                continue
            if outcome[0] == Outcome.NO_BRANCH:
                raise BranchNotFound(branch)
            return cast(bytes, outcome[1]) if len(outcome) > 1 else None
        raise BackendUnavailable(f"redis: session {session_id!r} changed too often to pop")

    async def clear(self, session_id: str) -> None:
        async def run() -> None:
            await self._session_script(self._clear, session_id, [])
            await self.client.zrem(self._index, session_id)

        await self._call(lambda: self._replicated(session_id, run))

    async def branches(self, session_id: str) -> list[BranchInfo]:
        base = self._base(session_id)
        names = await self._live_branches(base)

        async def read() -> list[Any]:
            async with self.client.pipeline(transaction=True) as pipe:
                for name in names:
                    sfx = suffix(name)
                    pipe.llen(f"{base}:items{sfx}")
                    pipe.zcard(f"{base}:turns{sfx}")
                    pipe.lindex(f"{base}:meta{sfx}", 0)
                return await pipe.execute()

        counts = await self._call(read)
        found = []
        for index, name in enumerate(names):
            count, users, first = counts[index * 3 : index * 3 + 3]
            if count:
                found.append(BranchInfo(name, count, users, float(first.split(b"\t")[3])))
        return sorted(found, key=lambda b: (b.created_at, b.branch_id))

    async def _live_branches(self, base: str) -> list[str]:
        """`main` and every live branch, by id."""
        registry = await self._call(lambda: self.client.hgetall(f"{base}:branches"))
        return [MAIN, *live_branches(cast(dict[bytes, bytes], registry))]

    async def create_branch(self, session_id: str, source: str, turn: int, new: str) -> None:
        args = [suffix(source), new, turn, f"{time.time():.6f}", self._ttl_ms()]
        new_keys = self._declared(session_id, [new], [])[-len(BRANCH_KEYS) :]
        outcome = await self._call(
            lambda: self._session_script(self._create_branch, session_id, args, extra=new_keys)
        )
        if outcome[0] == Outcome.NO_BRANCH:
            raise BranchNotFound(source)
        if outcome[0] == Outcome.TURN_NOT_FOUND:
            raise TurnNotFound(turn)
        if outcome[0] == Outcome.BRANCH_ID_USED:
            raise BranchIdUsed(new)

    async def delete_branch(self, session_id: str, branch: str) -> None:
        outcome = await self._script(self._delete_branch, session_id, suffix(branch))
        if outcome[0] == Outcome.NO_BRANCH:
            raise BranchNotFound(branch)

    async def compact(
        self, session_id: str, branch: str, expected: Sequence[bytes], replacement: Items
    ) -> bool:
        """The summary takes the ids (positions) of the first items it replaces: read
        first, to seal it, and checked by the script with the items themselves."""
        n, k = len(expected), len(replacement)
        meta_key = f"{self._base(session_id)}:meta{suffix(branch)}"

        async def run() -> Any:
            shapes = cast(list[bytes], await self.client.lrange(meta_key, 0, k - 1))
            ids = [int(entry.rsplit(b"\t", 1)[1]) for entry in shapes]
            if len(ids) < k:
                return [Outcome.HISTORY_CHANGED]
            head = [suffix(branch), self._ttl_ms(), f"{time.time():.6f}", n, k]
            args = [*head, *expected, *stored_at(replacement, ids), *ids]
            return await self._session_script(self._compact, session_id, args)

        outcome = await self._call(lambda: self._replicated(session_id, run))
        if outcome[0] == Outcome.NO_BRANCH:
            raise BranchNotFound(branch)
        return bool(outcome[0] == Outcome.DONE)

    async def full_history(
        self, session_id: str, branch: str, limit: int, max_bytes: int | None = None
    ) -> list[bytes]:
        """The live items from the newest back, of which those a compaction wrote (only
        ever at the front) are left out, then the archived ones, in one script."""
        await self._require_branch(session_id, branch)
        base, sfx = self._base(session_id), suffix(branch)
        keys = [f"{base}:items{sfx}", f"{base}:meta{sfx}", f"{base}:archive{sfx}"]
        return await self._read_newest(keys, limit, max_bytes)

    async def user_turns(self, session_id: str, branch: str) -> list[UserTurn]:
        await self._require_branch(session_id, branch)
        base, sfx = self._base(session_id), suffix(branch)

        async def read() -> tuple[list[Any], list[Any]]:
            ids: list[Any] = await self.client.zrange(f"{base}:turns{sfx}", 0, -1, withscores=True)
            if not ids:
                return [], []
            users = await self.client.hmget(f"{base}:users{sfx}", [i[0] for i in ids])
            return ids, users

        ids, users = await self._call(read)
        turns = []
        for (_, turn), user in zip(ids, users, strict=True):
            if user is not None:
                _, created, data = user.split(b"\t", 2)
                turns.append(UserTurn(int(turn), data, float(created)))
        return turns

    async def shapes(self, session_id: str, branch: str) -> list[ItemShape]:
        await self._require_branch(session_id, branch)
        key = f"{self._base(session_id)}:meta{suffix(branch)}"
        entries = await self._call(lambda: self.client.lrange(key, 0, -1))
        shapes = []
        for entry in cast(list[bytes], entries):
            turn, kind, tool, _, _ = entry.decode().split("\t")
            shapes.append(ItemShape(int(turn), kind, tool or None))
        return shapes

    async def record_usage(
        self, session_id: str, branch: str, turn: int | None, anchor: int | None, usage: Usage
    ) -> int | None:
        outcome = await self._script(
            self._record_usage,
            session_id,
            suffix(branch),
            "" if turn is None else turn,
            "" if anchor is None else anchor,
            encode_usage(usage),
            self._ttl_ms(),
        )
        if outcome[0] == Outcome.NO_BRANCH:
            raise BranchNotFound(branch)
        return int(outcome[1]) if len(outcome) > 1 else None

    async def usage(self, session_id: str, branch: str | None) -> list[TurnUsage]:
        key = f"{self._base(session_id)}:usage"
        entries = await self._call(lambda: self.client.hgetall(key))
        rows = []
        for field, value in cast(dict[bytes, bytes], entries).items():
            name, turn = field.decode().split("\t")
            if branch is None or name == branch:
                rows.append(TurnUsage(name, int(turn), decode_usage(value)))
        return sorted(rows, key=lambda row: (row.branch, row.turn))

    def _about(self, session_id: str) -> str:
        return f"{self._base(session_id)}:about"

    async def label(self, session_id: str, changes: LabelChanges, most: int) -> SessionInfo:
        args = [f"{wall_clock():.6f}", self._ttl_ms(), most, len(changes)]
        for name, value in changes.items():
            args += [name, value or ""]

        async def run() -> SessionInfo:
            outcome = await self._session_script(self._label, session_id, args)
            if outcome[0] == Outcome.TOO_MANY_LABELS:
                raise TooManyLabels(most)
            began, created, updated = outcome[1] == 1, float(outcome[2]), float(outcome[3])
            labels = _pairs(outcome[4])
            await self._listings.added(session_id, created, began, labels, _pairs(outcome[5]))
            return SessionInfo(session_id, created, updated, dict(labels))

        return await self._call(lambda: self._replicated(session_id, run))

    async def session_info(self, session_id: str) -> SessionInfo | None:
        fields = await self._call(lambda: self.client.hgetall(self._about(session_id)))
        return record_of(session_id, cast(dict[bytes, bytes], fields))

    async def find_sessions(self, query: SessionQuery) -> list[SessionInfo]:
        return await self._call(lambda: self._listings.find(query))

    async def erase(self, session_id: str, idle_since: float | None = None) -> int | None:
        cutoff = "" if idle_since is None else f"{idle_since:.6f}"

        async def run() -> int | None:
            outcome = await self._session_script(self._erase, session_id, [cutoff])
            if outcome[1] == -1:  # written since
                return None
            await self._through_migration(lambda: self.client.zrem(self._index, session_id))
            await self._listings.removed(session_id, _pairs(outcome[2]))
            self._idempotency_to_forget.add(session_id)
            return int(outcome[1])

        return await self._call(lambda: self._replicated(session_id, run))

    async def settle_erasures(self) -> None:
        """The erased sessions' idempotency records: each a key of its own (to expire on
        its own), found by one scan of the store's keys for every session erased since
        the last settling (a scan that fails is made again by the retried erasure)."""
        erased = set(self._idempotency_to_forget)
        if erased:
            await self._call(functools.partial(self._forget_idempotency, erased))
            self._idempotency_to_forget -= erased

    async def _forget_idempotency(self, erased: set[str]) -> None:
        pattern = _glob_escape(self.prefix) + ":{*}:idem:*"
        if self._cluster is None:
            keys = self.client.scan_iter(match=pattern, count=1000)
        else:
            keys = self._cluster.scan_iter(
                match=pattern, count=1000, target_nodes=RedisCluster.PRIMARIES
            )
        base = len(self.prefix) + 2
        found = [key async for key in keys if key[base:].decode().split("}:idem:")[0] in erased]
        for key in found:
            await self._through_migration(functools.partial(self.client.delete, key))

    async def subject_key(self, subject: str) -> bytes | None:
        wrapped = await self._call(lambda: self.client.hget(self._subject_keys, subject))
        return cast(bytes | None, wrapped)

    async def keep_subject_key(self, subject: str, wrapped: bytes) -> bytes:
        """Waits for `waitReplicas` like an append: items sealed under a key that a
        failover lost could never be read."""
        keys, args = [self._subject_keys], [subject.encode(), wrapped]

        async def run() -> bytes:
            return cast(bytes, await self._keep_subject_key(keys=keys, args=args))

        return await self._call(lambda: self._replicated(SUBJECTS, run))

    async def replace_subject_key(self, subject: str, old: bytes, new: bytes) -> bool:
        keys, args = [self._subject_keys], [subject.encode(), old, new]

        async def run() -> bool:
            return bool(await self._replace_subject_key(keys=keys, args=args))

        return await self._call(lambda: self._replicated(SUBJECTS, run))

    async def forget_subject_key(self, subject: str) -> bool:
        async def run() -> bool:
            return bool(await self.client.hdel(self._subject_keys, subject))

        return await self._call(lambda: self._replicated(SUBJECTS, run))

    async def subject_keys(self, cursor: str, limit: int) -> tuple[list[SubjectKey], str]:
        """A page of HSCAN, whose cursor this is."""
        step = await self._call(
            lambda: self.client.hscan(self._subject_keys, int(cursor or 0), count=limit)
        )
        following, fields = cast(tuple[int, dict[bytes, bytes]], step)
        keys = [SubjectKey(name.decode(), wrapped) for name, wrapped in fields.items()]
        return keys, str(following) if following else ""

    async def record_erasure(self, record: ErasureRecord) -> None:
        """In a list, newest first, each record as JSON."""
        entry = json.dumps(dataclasses.asdict(record))
        key = f"{self.prefix}:erasures"

        async def keep() -> None:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.lpush(key, entry)
                pipe.ltrim(key, 0, ERASURES_KEPT - 1)
                await pipe.execute()

        await self._call(keep)

    async def erasures(self, limit: int) -> list[ErasureRecord]:
        entries = await self._call(
            lambda: self.client.lrange(f"{self.prefix}:erasures", 0, limit - 1)
        )
        found = [json.loads(entry) for entry in cast(list[bytes], entries)]
        return [ErasureRecord(**{**e, "label_names": tuple(e["label_names"])}) for e in found]

    async def list_sessions(self, prefix: str, after: str | None, limit: int) -> list[str]:
        low = f"({after}" if after and after >= prefix else f"[{prefix}"
        found: list[str] = []
        while len(found) < limit:
            ids, alive = await self._call(
                functools.partial(self._index_page, low, prefix, limit - len(found))
            )
            if not ids:
                break
            found.extend(alive)
            low = f"({ids[-1]}"
        return found

    async def _index_page(self, low: str, prefix: str, count: int) -> tuple[list[str], list[str]]:
        """Ids from the index, and those of them whose session still exists."""
        raw = await self.client.zrange(
            self._index, low, f"({prefix}\x7f", bylex=True, offset=0, num=count
        )
        ids = [r.decode() for r in cast(list[bytes], raw)]
        if not ids:
            return [], []
        async with self.client.pipeline(transaction=False) as pipe:
            for session_id in ids:
                pipe.exists(self.keys(session_id)[1])
            exists = await pipe.execute()
        gone = [sid for sid, ok in zip(ids, exists, strict=True) if not ok]
        if gone:
            await self.client.zrem(self._index, *gone)
        return ids, [sid for sid, ok in zip(ids, exists, strict=True) if ok]

    async def sweep(self) -> int:
        """Redis expires keys itself; listings prune the index as they go."""
        return 0

    async def rewrite(self, session_id: str, transform: Transform) -> int:
        return await self._call(functools.partial(self._rewrite, session_id, transform))

    async def _rewrite(self, session_id: str, transform: Transform) -> int:
        """Every branch's items, archived ones included, and the copies of user messages,
        in one transaction."""
        base = self._base(session_id)
        for _ in range(OPTIMISTIC_ATTEMPTS):
            async with self.client.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(f"{base}:branches")
                    registry = cast(dict[bytes, bytes], await pipe.hgetall(f"{base}:branches"))
                    sfxs = ["", *(suffix(name) for name in live_branches(registry))]
                    lists = [f"{base}:{kind}{sfx}" for sfx in sfxs for kind in ("items", "archive")]
                    keys = [*lists, *(f"{base}:users{sfx}" for sfx in sfxs)]
                    await pipe.watch(*keys)
                    changed = 0
                    writes: list[tuple[str, Any, bytes]] = []
                    for key in lists:
                        items = await pipe.lrange(key, 0, -1)
                        for index, item in enumerate(cast(list[bytes], items)):
                            if (new := transform(item)) is not None:
                                writes.append((key, index, new))
                                changed += 1
                    for sfx in sfxs:
                        users = await pipe.hgetall(f"{base}:users{sfx}")
                        for user_id, user in cast(dict[bytes, bytes], users).items():
                            position, created, data = user.split(b"\t", 2)
                            if (new := transform(data)) is not None:
                                value = b"\t".join((position, created, new))
                                writes.append((f"{base}:users{sfx}", user_id, value))
                    pipe.multi()  # type: ignore[no-untyped-call]
                    for key, where, value in writes:
                        if key.rsplit(":", 1)[-1].startswith(("items", "archive")):
                            pipe.lset(key, where, cast(str, value))
                        else:
                            pipe.hset(key, where, value)
                    await pipe.execute()
                    return changed
                except WatchError:
                    continue
        raise BackendUnavailable(f"redis: session {session_id!r} changed too often to rewrite")


def _pairs(flat: Sequence[bytes]) -> list[tuple[str, str]]:
    return [(flat[i].decode(), flat[i + 1].decode()) for i in range(0, len(flat), 2)]


def _glob_escape(text: str) -> str:
    """`text` matched literally by a SCAN pattern."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)
