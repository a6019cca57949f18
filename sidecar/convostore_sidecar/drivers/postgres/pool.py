"""A PostgreSQL store's connections: a pool made on first use (a database down at
start-up does not keep the sidecar from starting), and every call on it, with the
server's errors as the driver reports them and the schema's version checked once."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import asyncpg

from ..base import BackendMisconfigured, BackendUnavailable, Cause
from .errors import CAUSES, MISCONFIGURED, UNAVAILABLE
from .schema import installed_version, version_problem
from .settings import Settings

T = TypeVar("T")
APPLICATION = "convostore-sidecar"
STATEMENT_CACHE = 100
"""asyncpg's default: the statements a connection keeps prepared (none through a pooler)."""


async def _nothing_to_reset(conn: asyncpg.Connection) -> None:
    """What a released connection needs beyond asyncpg's own rollback of an open
    transaction: nothing. The driver leaves no session state (settings are the
    connection's own or `SET LOCAL`, advisory locks end with their transaction, no
    `LISTEN`, no cursor outlives its transaction), and asyncpg's default reset query
    costs a round trip on every release: one more for every call (bench/NOTES.md,
    "Per-request cost")."""


class Connections:
    def __init__(self, settings: Settings, schema: str) -> None:
        self.settings, self.schema = settings, schema
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        self._schema_ready = False

    def _password(self) -> str | None:
        if not self.settings.password_file:
            return None
        return Path(self.settings.password_file).read_text("utf-8").strip()

    async def _get_pool(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        async with self._pool_lock:
            if self._pool is None:
                pooled = self.settings.transaction_pooler
                pool = await asyncpg.create_pool(
                    self.settings.dsn,
                    password=self._password(),
                    ssl=self.settings.ssl(),
                    min_size=self.settings.pool_min,
                    max_size=self.settings.pool_max,
                    timeout=self.settings.connect_timeout,
                    command_timeout=self.settings.statement_timeout + 1,
                    max_inactive_connection_lifetime=self.settings.idle_timeout,
                    server_settings=(
                        {"application_name": APPLICATION} if pooled else self._session_settings()
                    ),
                    # a statement prepared on one server connection is unknown on the next
                    statement_cache_size=0 if pooled else STATEMENT_CACHE,
                    reset=_nothing_to_reset,
                )
                self._pool = pool
        return self._pool

    def _session_settings(self) -> dict[str, str]:
        """What each connection sets for its session, or, through a transaction pooler,
        each transaction for itself (`_local_settings`)."""
        settings = {
            "statement_timeout": str(int(self.settings.statement_timeout * 1000)),
            "application_name": APPLICATION,
        }
        if self.settings.synchronous_commit is not None:
            settings["synchronous_commit"] = self.settings.synchronous_commit
        return settings

    @functools.cached_property
    def _local_settings(self) -> str:
        settings = self._session_settings()
        del settings["application_name"]
        return "".join(f"SET LOCAL {name} = '{value}';" for name, value in settings.items())

    async def run(
        self, fn: Callable[[asyncpg.Connection], Awaitable[T]], *, migrated: bool = True
    ) -> T:
        """`fn` on a pooled connection, with the server's errors mapped to the API's;
        until the schema is found at this sidecar's version, only with `migrated=False`."""
        try:
            pool = await self._get_pool()
            async with pool.acquire(timeout=self.settings.connect_timeout) as conn:
                if not self.settings.transaction_pooler:
                    return await self._checked(conn, fn, migrated)
                async with conn.transaction():  # every statement on one server connection
                    await conn.execute(self._local_settings)
                    return await self._checked(conn, fn, migrated)
        except MISCONFIGURED as exc:
            raise BackendMisconfigured(f"postgres refuses the store's settings: {exc}") from exc
        except asyncpg.ReadOnlySQLTransactionError as exc:
            # the server was a primary and is one no longer (a failover demoted it): every
            # pooled connection goes to it, so all are replaced, each new one finding
            # the host that now accepts writes (target_session_attrs)
            if self._pool is not None:
                await self._pool.expire_connections()
            raise BackendUnavailable(
                f"postgres: the server no longer accepts writes: {exc}", Cause.READ_ONLY
            ) from exc
        except UNAVAILABLE as exc:
            cause = next((c for kind, c in CAUSES if isinstance(exc, kind)), Cause.UNAVAILABLE)
            raise BackendUnavailable(f"postgres: {exc!r}", cause) from exc

    async def _checked(
        self,
        conn: asyncpg.Connection,
        fn: Callable[[asyncpg.Connection], Awaitable[T]],
        migrated: bool,
    ) -> T:
        if migrated and not self._schema_ready:
            problem = version_problem(self.schema, await installed_version(conn, self.schema))
            if problem:
                raise BackendMisconfigured(problem)
            self._schema_ready = True
        return await fn(conn)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
