"""The PostgreSQL driver's operations, each one transaction on a pooled connection."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, TypeVar

import asyncpg

from ..base import (
    COMPACTED,
    AppendResult,
    BackendMisconfigured,
    BranchInfo,
    BranchNotFound,
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
    Transform,
    TurnUsage,
    Usage,
    UserTurn,
    archive_of,
    replay_of,
    stored,
)
from .schema import (
    NO_BRANCH,
    SchemaTooNew,
    migrate,
)

if TYPE_CHECKING:
    from ...config import StoreConfig


from . import labels, structure
from .pool import Connections
from .rows import SessionRows
from .settings import Settings
from .statements import LATEST_SQL, USAGE_SQL, USER_TURNS_SQL

T = TypeVar("T")
SWEEP_LOCK = 0x73776565  # "swee": at most one sidecar sweeps at a time
SWEEP_BATCH = 500


def open_driver(store: StoreConfig) -> PostgresDriver:
    return PostgresDriver(store)


class PostgresDriver(KeepsStructure):
    def __init__(self, store: StoreConfig) -> None:
        self._config = store
        self.settings: Settings = store.settings
        self.store = store.identity
        self.retention = store.retention
        s = self.settings.schema
        self._connections = Connections(self.settings, s)
        self.latest_sql = LATEST_SQL.format(s=s)
        self.user_turns_sql = USER_TURNS_SQL.format(s=s)
        self.usage_sql = USAGE_SQL.format(s=s)
        self._s = s
        self._rows = SessionRows(s, self.store, self.retention.ttl_seconds)

    def _ttl(self) -> float | None:
        return self.retention.ttl_seconds

    async def open(self) -> None:
        """The pool is made on first use, so a database outage at start-up does not
        keep the sidecar from starting."""

    async def migrate(self) -> str:
        """Bring the schema to this version (`convostore migrate`, the operator), over
        `directDsn` when the store names one."""
        direct = self.settings.direct_dsn
        try:
            if direct is None:
                return str(
                    await self._connections.run(lambda conn: migrate(conn, self._s), migrated=False)
                )
            straight = replace(
                self.settings, dsn=direct, direct_dsn=None, transaction_pooler=False, pool_min=0
            )
            driver = PostgresDriver(replace(self._config, settings=straight))
            try:
                return await driver.migrate()
            finally:
                await driver.close()
        except SchemaTooNew as exc:
            raise BackendMisconfigured(str(exc)) from exc

    async def close(self) -> None:
        await self._connections.close()

    async def ping(self) -> None:
        await self._connections.run(lambda conn: conn.fetchval("SELECT 1"))

    async def append_to(
        self,
        session_id: str,
        branch: str,
        items: Items,
        meta: Sequence[Meta],
        idempotency: Idempotency | None,
    ) -> AppendResult:
        """One round trip: the schema's `append` function does the whole transaction.
        Sealed items take one more, in the same transaction: the session's row is locked
        and its next sequence number read, which the function then gives the first."""

        async def append(conn: asyncpg.Connection) -> asyncpg.Record:
            first = 0
            if isinstance(items, Sealed):
                first = await conn.fetchval(
                    f"INSERT INTO {self._s}.sessions AS s VALUES ($1, $2, 0, now())"
                    " ON CONFLICT (store, session_id) DO UPDATE SET next_seq = s.next_seq"
                    " RETURNING s.next_seq",
                    self.store,
                    session_id,
                )
            return await conn.fetchrow(
                f"SELECT * FROM {self._s}.append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                self.store,
                session_id,
                stored(items, first),
                idempotency.key if idempotency else None,
                idempotency.fingerprint if idempotency else None,
                idempotency.ttl_seconds if idempotency else None,
                self._ttl(),
                self.retention.max_items,
                branch,
                [m.kind for m in meta],
                [m.tool for m in meta],
            )

        async def in_transaction(conn: asyncpg.Connection) -> asyncpg.Record:
            async with conn.transaction():
                return await append(conn)

        try:
            row = await self._connections.run(
                in_transaction if isinstance(items, Sealed) else append
            )
        except asyncpg.PostgresError as exc:
            if exc.sqlstate == NO_BRANCH:
                raise BranchNotFound(branch) from exc
            raise
        if row["replayed"]:
            assert idempotency is not None
            return replay_of(idempotency, row["fingerprint"], row["appended"])
        return AppendResult(len(items), replayed=False, turn=row["turn"], anchor=row["anchor"])

    async def latest_in(
        self, session_id: str, branch: str, limit: int | None, max_bytes: int | None = None
    ) -> list[bytes]:
        async def read(conn: asyncpg.Connection) -> list[bytes]:
            await self._rows.require_branch(conn, session_id, branch)
            rows = await conn.fetch(
                self.latest_sql, self.store, session_id, self._ttl(), limit, branch, max_bytes
            )
            return [row[0] for row in reversed(rows)]

        return await self._connections.run(read)

    async def pop_from(self, session_id: str, branch: str, check: Check | None) -> bytes | None:
        s, store = self._s, self.store

        async def pop(conn: asyncpg.Connection) -> bytes | None:
            async with conn.transaction():
                alive = await self._rows.lock(conn, session_id)
                await self._rows.require_branch(conn, session_id, branch)
                if not alive:
                    return None
                newest = await conn.fetchrow(
                    f"SELECT seq, data, turn FROM {s}.items WHERE store = $1 AND session_id = $2"
                    f" AND branch = $3 ORDER BY seq DESC LIMIT 1",
                    store,
                    session_id,
                    branch,
                )
                if newest is None:
                    return None
                if check is not None:
                    check(newest["data"])
                await conn.execute(
                    f"DELETE FROM {s}.items WHERE store = $1 AND session_id = $2 AND seq = $3",
                    store,
                    session_id,
                    newest["seq"],
                )
                await conn.execute(
                    f"DELETE FROM {s}.usage WHERE store = $1 AND session_id = $2"
                    f" AND branch = $3 AND turn = $4 AND NOT EXISTS (SELECT 1 FROM {s}.items"
                    f"  WHERE store = $1 AND session_id = $2 AND branch = $3 AND turn = $4)",
                    store,
                    session_id,
                    branch,
                    newest["turn"],
                )
                await conn.execute(
                    f"UPDATE {s}.sessions SET updated_at = now()"
                    f" WHERE store = $1 AND session_id = $2",
                    store,
                    session_id,
                )
                data: bytes = newest["data"]
                return data

        return await self._connections.run(pop)

    async def clear(self, session_id: str) -> None:
        s = self._s

        async def clear(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                await conn.execute(
                    f"DELETE FROM {s}.sessions WHERE store = $1 AND session_id = $2",
                    self.store,
                    session_id,
                )
                await conn.execute(
                    f"UPDATE {s}.branches SET live = false WHERE store = $1 AND session_id = $2",
                    self.store,
                    session_id,
                )

        await self._connections.run(clear)

    async def branch_exists(self, session_id: str, branch: str) -> bool:
        async def exists(conn: asyncpg.Connection) -> bool:
            try:
                await self._rows.require_branch(conn, session_id, branch)
            except BranchNotFound:
                return False
            return True

        return await self._connections.run(exists)

    async def branches(self, session_id: str) -> list[BranchInfo]:
        rows = await self._connections.run(
            lambda conn: conn.fetch(
                f"SELECT i.branch, count(*), count(*) FILTER (WHERE i.kind = 'user'),"
                f" extract(epoch FROM min(i.created_at))"
                f" FROM {self._s}.items AS i JOIN {self._s}.sessions AS s"
                f"  USING (store, session_id)"
                f" WHERE i.store = $1 AND i.session_id = $2 AND ($3::float8 IS NULL"
                f"  OR s.updated_at > now() - make_interval(secs => $3::float8))"
                f" AND strpos(i.branch, '/') = 0"
                f" GROUP BY i.branch"
                f' ORDER BY min(i.created_at), i.branch COLLATE "C"',
                self.store,
                session_id,
                self._ttl(),
            )
        )
        return [BranchInfo(r[0], r[1], r[2], float(r[3])) for r in rows]

    async def create_branch(self, session_id: str, source: str, turn: int, new: str) -> None:
        await self._connections.run(
            lambda conn: structure.create_branch(conn, self._rows, session_id, source, turn, new)
        )

    async def delete_branch(self, session_id: str, branch: str) -> None:
        await self._connections.run(
            lambda conn: structure.delete_branch(conn, self._rows, session_id, branch)
        )

    async def compact(
        self, session_id: str, branch: str, expected: Sequence[bytes], replacement: Items
    ) -> bool:
        return await self._connections.run(
            lambda conn: structure.compact(
                conn, self._rows, session_id, branch, expected, replacement
            )
        )

    async def full_history(
        self, session_id: str, branch: str, limit: int, max_bytes: int | None = None
    ) -> list[bytes]:
        async def read(conn: asyncpg.Connection) -> list[bytes]:
            await self._rows.require_branch(conn, session_id, branch)
            if not await self._rows.alive(conn, session_id):
                return []
            archive = archive_of(branch)
            rows = await conn.fetch(
                "SELECT data FROM (SELECT data, branch, seq,"
                "   sum(octet_length(data)) OVER newest - octet_length(data) AS before"
                f" FROM {self._s}.items WHERE store = $1 AND session_id = $2"
                "  AND branch IN ($3, $4) AND kind <> $5"
                "  WINDOW newest AS (ORDER BY branch = $4, seq DESC ROWS UNBOUNDED PRECEDING)"
                "  ORDER BY branch = $4, seq DESC LIMIT $6"
                ") AS w WHERE $7::int8 IS NULL OR before <= $7 ORDER BY branch = $4, seq DESC",
                self.store,
                session_id,
                branch,
                archive,
                COMPACTED,
                limit,
                max_bytes,
            )
            return [row[0] for row in reversed(rows)]

        return await self._connections.run(read)

    async def user_turns(self, session_id: str, branch: str) -> list[UserTurn]:
        async def read(conn: asyncpg.Connection) -> list[UserTurn]:
            await self._rows.require_branch(conn, session_id, branch)
            if not await self._rows.alive(conn, session_id):
                return []
            rows = await conn.fetch(self.user_turns_sql, self.store, session_id, branch)
            return [UserTurn(r[0], r[1], float(r[2])) for r in rows]

        return await self._connections.run(read)

    async def shapes(self, session_id: str, branch: str) -> list[ItemShape]:
        async def read(conn: asyncpg.Connection) -> list[ItemShape]:
            await self._rows.require_branch(conn, session_id, branch)
            if not await self._rows.alive(conn, session_id):
                return []
            rows = await conn.fetch(
                f"SELECT turn, kind, tool FROM {self._s}.items"
                f" WHERE store = $1 AND session_id = $2 AND branch = $3 ORDER BY seq",
                self.store,
                session_id,
                branch,
            )
            return [ItemShape(*row) for row in rows]

        return await self._connections.run(read)

    async def record_usage(
        self, session_id: str, branch: str, turn: int | None, anchor: int | None, usage: Usage
    ) -> int | None:
        return await self._connections.run(
            lambda conn: structure.record_usage(
                conn, self._rows, session_id, branch, turn, anchor, usage
            )
        )

    async def usage(self, session_id: str, branch: str | None) -> list[TurnUsage]:
        async def read(conn: asyncpg.Connection) -> list[TurnUsage]:
            if not await self._rows.alive(conn, session_id):
                return []
            rows = await conn.fetch(self.usage_sql, self.store, session_id, branch)
            return [TurnUsage(r[0], r[1], Usage(*r[2:])) for r in rows]

        return await self._connections.run(read)

    async def label(self, session_id: str, changes: LabelChanges, most: int) -> SessionInfo:
        return await self._connections.run(
            lambda conn: labels.label(conn, self._rows, session_id, changes, most)
        )

    async def session_info(self, session_id: str) -> SessionInfo | None:
        return await self._connections.run(
            lambda conn: labels.session_info(conn, self._rows, session_id)
        )

    async def find_sessions(self, query: SessionQuery) -> list[SessionInfo]:
        return await self._connections.run(
            lambda conn: labels.find_sessions(conn, self._rows, query)
        )

    async def erase(self, session_id: str, idle_since: float | None = None) -> int | None:
        s, store = self._s, self.store

        async def erase(conn: asyncpg.Connection) -> int | None:
            async with conn.transaction():
                written = await conn.fetchval(
                    f"SELECT extract(epoch from updated_at)::float8 FROM {s}.sessions"
                    " WHERE store = $1 AND session_id = $2 FOR UPDATE",
                    store,
                    session_id,
                )
                if idle_since is not None and written is not None and written > idle_since:
                    return None
                held = await conn.fetchval(
                    f"SELECT count(*) FROM {s}.items WHERE store = $1 AND session_id = $2",
                    store,
                    session_id,
                )
                for table in ("sessions", "branches", "idempotency_keys"):
                    await conn.execute(
                        f"DELETE FROM {s}.{table} WHERE store = $1 AND session_id = $2",
                        store,
                        session_id,
                    )
                return int(held)

        return await self._connections.run(erase)

    async def subject_key(self, subject: str) -> bytes | None:
        wrapped = await self._connections.run(
            lambda conn: conn.fetchval(
                f"SELECT wrapped FROM {self._s}.subject_keys WHERE store = $1 AND subject = $2",
                self.store,
                subject,
            )
        )
        return None if wrapped is None else bytes(wrapped)

    async def keep_subject_key(self, subject: str, wrapped: bytes) -> bytes:
        """One statement: the insert, or the key a racing sidecar kept first."""
        kept = await self._connections.run(
            lambda conn: conn.fetchval(
                f"WITH made AS (INSERT INTO {self._s}.subject_keys VALUES ($1, $2, $3)"
                " ON CONFLICT DO NOTHING RETURNING wrapped)"
                " SELECT wrapped FROM made UNION ALL SELECT wrapped FROM"
                f" {self._s}.subject_keys WHERE store = $1 AND subject = $2 LIMIT 1",
                self.store,
                subject,
                wrapped,
            )
        )
        if kept is None:  # the racing key was forgotten in between
            return await self.keep_subject_key(subject, wrapped)
        return bytes(kept)

    async def replace_subject_key(self, subject: str, old: bytes, new: bytes) -> bool:
        done = await self._connections.run(
            lambda conn: conn.execute(
                f"UPDATE {self._s}.subject_keys SET wrapped = $4"
                " WHERE store = $1 AND subject = $2 AND wrapped = $3",
                self.store,
                subject,
                old,
                new,
            )
        )
        return bool(done != "UPDATE 0")

    async def forget_subject_key(self, subject: str) -> bool:
        done = await self._connections.run(
            lambda conn: conn.execute(
                f"DELETE FROM {self._s}.subject_keys WHERE store = $1 AND subject = $2",
                self.store,
                subject,
            )
        )
        return bool(done != "DELETE 0")

    async def subject_keys(self, cursor: str, limit: int) -> tuple[list[SubjectKey], str]:
        rows = await self._connections.run(
            lambda conn: conn.fetch(
                f"SELECT subject, wrapped FROM {self._s}.subject_keys WHERE store = $1"
                ' AND subject COLLATE "C" > $2 ORDER BY subject COLLATE "C" LIMIT $3',
                self.store,
                cursor,
                limit,
            )
        )
        keys = [SubjectKey(row["subject"], bytes(row["wrapped"])) for row in rows]
        return keys, keys[-1].subject if len(keys) == limit else ""

    async def record_erasure(self, record: ErasureRecord) -> None:
        await self._connections.run(lambda conn: labels.record_erasure(conn, self._rows, record))

    async def erasures(self, limit: int) -> list[ErasureRecord]:
        return await self._connections.run(lambda conn: labels.erasures(conn, self._rows, limit))

    async def list_sessions(self, prefix: str, after: str | None, limit: int) -> list[str]:
        rows = await self._connections.run(
            lambda conn: conn.fetch(
                f"SELECT session_id FROM {self._s}.sessions WHERE store = $1"
                f' AND session_id COLLATE "C" >= $2 AND session_id COLLATE "C" > $3'
                f' AND session_id COLLATE "C" < $4 AND ($5::float8 IS NULL OR'
                f" updated_at > now() - make_interval(secs => $5::float8))"
                f' ORDER BY session_id COLLATE "C" LIMIT $6',
                self.store,
                prefix,
                after or "",
                prefix + "\x7f",
                self._ttl(),
                limit,
            )
        )
        return [row[0] for row in rows]

    async def sweep(self) -> int:
        s, store, ttl = self._s, self.store, self._ttl()

        async def locked(conn: asyncpg.Connection) -> bool:
            """At most one sidecar sweeps a batch at a time; the lock goes with the
            transaction, so no pooler can leave it held."""
            return bool(await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", SWEEP_LOCK))

        async def forget_keys(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                if await locked(conn):
                    await conn.execute(
                        f"DELETE FROM {s}.idempotency_keys WHERE ctid IN (SELECT ctid FROM"
                        f" {s}.idempotency_keys WHERE store = $1 AND expires_at <= now()"
                        " LIMIT $2)",
                        store,
                        SWEEP_BATCH * 10,
                    )

        async def expire_batch(conn: asyncpg.Connection) -> int | None:
            """Sessions deleted, or None while another sidecar sweeps."""
            async with conn.transaction():
                if not await locked(conn):
                    return None
                gone = await conn.fetch(
                    f"DELETE FROM {s}.sessions WHERE (store, session_id) IN ("
                    f" SELECT store, session_id FROM {s}.sessions WHERE store = $1"
                    f" AND updated_at <= now() - make_interval(secs => $2) LIMIT $3)"
                    f" RETURNING session_id",
                    store,
                    ttl,
                    SWEEP_BATCH,
                )
                await conn.execute(
                    f"DELETE FROM {s}.branches WHERE store = $1 AND session_id = ANY($2::text[])",
                    store,
                    [row[0] for row in gone],
                )
                return len(gone)

        await self._connections.run(forget_keys)
        swept = 0
        while ttl is not None:
            deleted = await self._connections.run(expire_batch)
            swept += deleted or 0
            if deleted is None or deleted < SWEEP_BATCH:
                break
        return swept

    async def rewrite(self, session_id: str, transform: Transform) -> int:
        s, store = self._s, self.store

        async def rewrite(conn: asyncpg.Connection) -> int:
            async with conn.transaction():
                await conn.execute(
                    f"SELECT 1 FROM {s}.sessions WHERE store = $1 AND session_id = $2 FOR UPDATE",
                    store,
                    session_id,
                )
                rows = await conn.fetch(
                    f"SELECT seq, data FROM {s}.items WHERE store = $1 AND session_id = $2",
                    store,
                    session_id,
                )
                changed = [
                    (store, session_id, row["seq"], new)
                    for row in rows
                    if (new := transform(row["data"])) is not None
                ]
                await conn.executemany(
                    f"UPDATE {s}.items SET data = $4"
                    f" WHERE store = $1 AND session_id = $2 AND seq = $3",
                    changed,
                )
                return len(changed)

        return await self._connections.run(rewrite)
