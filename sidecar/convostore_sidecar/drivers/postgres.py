"""PostgreSQL driver: a sessions table and an items table keyed by (store, session, seq).

Appends and pops lock the session's row first (`SELECT ... FOR UPDATE`), so operations
on one session are serialized and sequence numbers follow commit order: concurrent
batches never interleave or reorder, and two pops never return the same item. An append
is one call of the schema's `append` function, which runs that whole transaction on the
server in one round trip. The latest N items are read backwards along the items'
primary key. Item bytes are `bytea`,
never `jsonb`, which would reorder keys and rewrite numbers.

The schema is created on first contact, under an advisory lock so that many sidecars
starting at once do not race, and recorded in a schema-version table. The pool is made
lazily: a sidecar starts while its database is down and recovers when it returns.
Expired sessions are swept in batches by whichever sidecar holds the sweep lock.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import asyncpg

from .base import AppendResult, BackendUnavailable, Check, Idempotency, Transform, replay_of

if TYPE_CHECKING:
    from ..config import Section, StoreConfig

T = TypeVar("T")
SCHEMA_VERSION = 1
SCHEMA_LOCK = 0x636F6E766F  # "convo": one advisory lock id for schema creation
SWEEP_LOCK = 0x73776565  # "swee": at most one sidecar sweeps at a time
SWEEP_BATCH = 500
IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")

SCHEMA = """
CREATE TABLE IF NOT EXISTS {s}.schema_version (
    version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS {s}.sessions (
    store text NOT NULL, session_id text NOT NULL,
    next_seq bigint NOT NULL, updated_at timestamptz NOT NULL,
    PRIMARY KEY (store, session_id));
CREATE INDEX IF NOT EXISTS sessions_updated ON {s}.sessions (store, updated_at);
CREATE TABLE IF NOT EXISTS {s}.items (
    store text NOT NULL, session_id text NOT NULL, seq bigint NOT NULL, data bytea NOT NULL,
    PRIMARY KEY (store, session_id, seq),
    FOREIGN KEY (store, session_id) REFERENCES {s}.sessions ON DELETE CASCADE);
CREATE TABLE IF NOT EXISTS {s}.idempotency_keys (
    store text NOT NULL, session_id text NOT NULL, key text NOT NULL,
    fingerprint text NOT NULL, appended integer NOT NULL, expires_at timestamptz NOT NULL,
    PRIMARY KEY (store, session_id, key));
CREATE INDEX IF NOT EXISTS idempotency_expiry ON {s}.idempotency_keys (store, expires_at);
CREATE OR REPLACE FUNCTION {s}.append(
    p_store text, p_session text, p_items bytea[], p_key text, p_fingerprint text,
    p_key_ttl float8, p_ttl float8, p_max_items bigint
) RETURNS TABLE (replayed boolean, fingerprint text, appended integer)
LANGUAGE plpgsql AS $$
DECLARE
    v_next bigint;
    v_expired boolean;
BEGIN
    IF p_key IS NOT NULL THEN
        INSERT INTO {s}.idempotency_keys AS k VALUES (
            p_store, p_session, p_key, p_fingerprint, cardinality(p_items),
            now() + make_interval(secs => p_key_ttl))
        ON CONFLICT (store, session_id, key) DO UPDATE
            SET fingerprint = EXCLUDED.fingerprint, appended = EXCLUDED.appended,
                expires_at = EXCLUDED.expires_at
            WHERE k.expires_at <= now();
        IF NOT FOUND THEN
            RETURN QUERY SELECT true, k.fingerprint, k.appended FROM {s}.idempotency_keys AS k
                WHERE k.store = p_store AND k.session_id = p_session AND k.key = p_key;
            RETURN;
        END IF;
    END IF;
    INSERT INTO {s}.sessions VALUES (p_store, p_session, 0, now()) ON CONFLICT DO NOTHING;
    SELECT s.next_seq, (p_ttl IS NOT NULL AND s.updated_at <= now() - make_interval(secs => p_ttl))
        INTO v_next, v_expired
        FROM {s}.sessions AS s WHERE s.store = p_store AND s.session_id = p_session FOR UPDATE;
    IF v_expired THEN
        DELETE FROM {s}.items AS i WHERE i.store = p_store AND i.session_id = p_session;
    END IF;
    INSERT INTO {s}.items (store, session_id, seq, data)
        SELECT p_store, p_session, v_next + t.ord - 1, t.data
        FROM unnest(p_items) WITH ORDINALITY AS t(data, ord);
    UPDATE {s}.sessions AS s SET next_seq = v_next + cardinality(p_items), updated_at = now()
        WHERE s.store = p_store AND s.session_id = p_session;
    IF p_max_items IS NOT NULL THEN
        DELETE FROM {s}.items AS i WHERE i.store = p_store AND i.session_id = p_session
            AND i.seq < v_next + cardinality(p_items) - p_max_items;
    END IF;
    RETURN QUERY SELECT false, NULL::text, cardinality(p_items);
END $$;
INSERT INTO {s}.schema_version (version) VALUES ({v}) ON CONFLICT DO NOTHING;
"""

LATEST_SQL = """
SELECT i.data FROM {s}.items AS i JOIN {s}.sessions AS s USING (store, session_id)
WHERE i.store = $1 AND i.session_id = $2 AND ($3::float8 IS NULL OR
      s.updated_at > now() - make_interval(secs => $3::float8))
ORDER BY i.seq DESC LIMIT $4
"""

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # a connection cut between a statement and its COMMIT
    asyncpg.CannotConnectNowError,
    asyncpg.OperatorInterventionError,
    asyncpg.QueryCanceledError,
)


@dataclass(frozen=True)
class Settings:
    dsn: str = "postgresql://localhost/postgres"
    password_file: str | None = None
    schema: str = "convostore"
    pool_min: int = 1
    pool_max: int = 10
    connect_timeout: float = 2.0
    statement_timeout: float = 5.0

    @classmethod
    def parse(cls, s: Section) -> Settings:
        dsn = s.string("dsn")
        if dsn is None:
            s.fail("dsn", "is required (postgresql://user@host:port/database)")
        if not dsn.startswith(("postgresql://", "postgres://")):
            s.fail("dsn", "must start with postgresql:// (the password may go in passwordFile)")
        settings = cls(
            dsn=dsn,
            password_file=s.string("passwordFile"),
            schema=s.string("schema", cls.schema, pattern=IDENTIFIER),
            pool_min=s.integer("poolMin", cls.pool_min, low=0, high=100),
            pool_max=s.integer("poolMax", cls.pool_max, low=1, high=1000),
            connect_timeout=s.duration("connectTimeout", cls.connect_timeout, low=0.1, high=60),
            statement_timeout=s.duration(
                "statementTimeout", cls.statement_timeout, low=0.01, high=3600
            ),
        )
        if settings.pool_min > settings.pool_max:
            s.fail("poolMin", f"must not exceed poolMax ({settings.pool_max})")
        return settings


def open_driver(store: StoreConfig) -> PostgresDriver:
    return PostgresDriver(store)


class PostgresDriver:
    def __init__(self, store: StoreConfig) -> None:
        self.settings: Settings = store.settings
        self.store = store.name
        self.retention = store.retention
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        s = self.settings.schema
        self.latest_sql = LATEST_SQL.format(s=s)
        self._s = s

    def _password(self) -> str | None:
        if not self.settings.password_file:
            return None
        return Path(self.settings.password_file).read_text("utf-8").strip()

    async def _get_pool(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        async with self._pool_lock:
            if self._pool is None:
                pool = await asyncpg.create_pool(
                    self.settings.dsn,
                    password=self._password(),
                    min_size=self.settings.pool_min,
                    max_size=self.settings.pool_max,
                    timeout=self.settings.connect_timeout,
                    command_timeout=self.settings.statement_timeout + 1,
                    server_settings={
                        "statement_timeout": str(int(self.settings.statement_timeout * 1000)),
                        "application_name": "convostore-sidecar",
                    },
                )
                try:
                    await self._create_schema(pool)
                except BaseException:
                    await pool.close()
                    raise
                self._pool = pool
        return self._pool

    async def _create_schema(self, pool: asyncpg.Pool) -> None:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self._s}")
            newest = await conn.fetchval(
                "SELECT to_regclass($1) IS NOT NULL", f"{self._s}.schema_version"
            )
            if newest:
                version = await conn.fetchval(f"SELECT max(version) FROM {self._s}.schema_version")
                if version is not None and version > SCHEMA_VERSION:
                    raise RuntimeError(
                        f"schema {self._s} has version {version}, newer than this sidecar's"
                    )
            await conn.execute(SCHEMA.format(s=self._s, v=SCHEMA_VERSION))

    async def _run(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        try:
            pool = await self._get_pool()
            async with pool.acquire(timeout=self.settings.connect_timeout) as conn:
                return await fn(conn)
        except _UNAVAILABLE as exc:
            raise BackendUnavailable(f"postgres: {exc!r}") from exc

    def _ttl(self) -> float | None:
        return self.retention.ttl_seconds

    async def open(self) -> None:
        """The pool and schema are made on first use, so a database outage at start-up
        does not keep the sidecar from starting."""

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def ping(self) -> None:
        await self._run(lambda conn: conn.fetchval("SELECT 1"))

    async def append(
        self, session_id: str, items: Sequence[bytes], idempotency: Idempotency | None
    ) -> AppendResult:
        """One round trip: the schema's `append` function does the whole transaction."""
        row = await self._run(
            lambda conn: conn.fetchrow(
                f"SELECT * FROM {self._s}.append($1, $2, $3, $4, $5, $6, $7, $8)",
                self.store,
                session_id,
                list(items),
                idempotency.key if idempotency else None,
                idempotency.fingerprint if idempotency else None,
                idempotency.ttl_seconds if idempotency else None,
                self._ttl(),
                self.retention.max_items,
            )
        )
        if row["replayed"]:
            assert idempotency is not None
            return replay_of(idempotency, row["fingerprint"], row["appended"])
        return AppendResult(appended=len(items), replayed=False)

    async def latest(self, session_id: str, limit: int | None) -> list[bytes]:
        rows = await self._run(
            lambda conn: conn.fetch(self.latest_sql, self.store, session_id, self._ttl(), limit)
        )
        return [row[0] for row in reversed(rows)]

    async def pop(self, session_id: str, check: Check | None = None) -> bytes | None:
        s, store = self._s, self.store

        async def pop(conn: asyncpg.Connection) -> bytes | None:
            async with conn.transaction():
                row = await conn.fetchrow(
                    f"SELECT ($3::float8 IS NOT NULL AND"
                    f" updated_at <= now() - make_interval(secs => $3::float8)) AS expired"
                    f" FROM {s}.sessions WHERE store = $1 AND session_id = $2 FOR UPDATE",
                    store,
                    session_id,
                    self._ttl(),
                )
                if row is None or row["expired"]:
                    return None
                newest = await conn.fetchrow(
                    f"SELECT seq, data FROM {s}.items WHERE store = $1 AND session_id = $2"
                    f" ORDER BY seq DESC LIMIT 1",
                    store,
                    session_id,
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
                    f"UPDATE {s}.sessions SET updated_at = now()"
                    f" WHERE store = $1 AND session_id = $2",
                    store,
                    session_id,
                )
                data: bytes = newest["data"]
                return data

        return await self._run(pop)

    async def clear(self, session_id: str) -> None:
        await self._run(
            lambda conn: conn.execute(
                f"DELETE FROM {self._s}.sessions WHERE store = $1 AND session_id = $2",
                self.store,
                session_id,
            )
        )

    async def list_sessions(self, prefix: str, after: str | None, limit: int) -> list[str]:
        rows = await self._run(
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

        async def sweep(conn: asyncpg.Connection) -> int:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", SWEEP_LOCK):
                return 0
            try:
                await conn.execute(
                    f"DELETE FROM {s}.idempotency_keys WHERE ctid IN (SELECT ctid FROM"
                    f" {s}.idempotency_keys WHERE store = $1 AND expires_at <= now() LIMIT $2)",
                    store,
                    SWEEP_BATCH * 10,
                )
                if ttl is None:
                    return 0
                swept = 0
                while True:
                    status = await conn.execute(
                        f"DELETE FROM {s}.sessions WHERE (store, session_id) IN ("
                        f" SELECT store, session_id FROM {s}.sessions WHERE store = $1"
                        f" AND updated_at <= now() - make_interval(secs => $2) LIMIT $3)",
                        store,
                        ttl,
                        SWEEP_BATCH,
                    )
                    deleted = int(status.split()[-1])
                    swept += deleted
                    if deleted < SWEEP_BATCH:
                        return swept
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", SWEEP_LOCK)

        return await self._run(sweep)

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

        return await self._run(rewrite)
