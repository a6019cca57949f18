"""A `sqlalchemy` store's connections: an engine made on first use (a database down at
start-up does not keep the sidecar from starting) and dropped after `idleTimeout`
without calls (an idle sidecar holds no connection), and every call as one transaction,
with the database's errors as the driver reports them and the schema's version checked
once."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ..base import BackendMisconfigured, BackendUnavailable, Cause
from .errors import MISCONFIGURED, RETRY, classify
from .settings import Settings
from .tables import SchemaProblem, Tables, installed_version, version_problem

T = TypeVar("T")
ATTEMPTS = 3
"""Runs of a call that the database rolled back for a deadlock, before giving up."""


class Connections:
    def __init__(self, settings: Settings, tables: Tables) -> None:
        self.settings, self.tables = settings, tables
        self._engine: AsyncEngine | None = None
        self._lock = asyncio.Lock()
        self._schema_ready = False
        self._in_flight = 0
        self._last_used = 0.0
        self._idle_check: asyncio.TimerHandle | None = None
        self.dialect = ""

    def _make_engine(self) -> AsyncEngine:
        try:
            url = self.settings.target()
        except (OSError, ValueError) as exc:
            raise BackendMisconfigured(f"sqlalchemy: cannot read the store's URL: {exc}") from exc
        backend = url.get_backend_name()
        engine = create_async_engine(
            url,
            connect_args=self.settings.connect_args(url),
            pool_size=self.settings.pool_max,
            max_overflow=0,
            pool_timeout=self.settings.connect_timeout,
            **({} if backend == "sqlite" else {"isolation_level": "READ COMMITTED"}),
        )
        _prepare_sessions(engine, url, self.settings)
        self.dialect = backend
        return engine

    async def _get_engine(self) -> AsyncEngine:
        if self._engine is None:
            async with self._lock:
                if self._engine is None:
                    self._engine = self._make_engine()
        return self._engine

    async def transact(
        self, fn: Callable[[AsyncConnection], Awaitable[T]], *, migrated: bool = True
    ) -> T:
        """`fn` in one transaction, run again if the database rolled it back for a
        deadlock; within a deadline, so a database that stops answering is reported
        rather than waited on."""
        budget = self.settings.connect_timeout + 2 * self.settings.statement_timeout + 1
        self._in_flight += 1
        try:
            for attempt in range(ATTEMPTS):
                try:
                    async with asyncio.timeout(budget):
                        return await self._once(fn, migrated)
                except DBAPIError as exc:
                    outcome = classify(self.dialect, exc)
                    if outcome == RETRY and attempt + 1 < ATTEMPTS:
                        continue
                    raise self._reported(exc, outcome) from exc
                except TimeoutError as exc:
                    raise BackendUnavailable(
                        f"sqlalchemy: no answer from the database within {budget:g}s"
                    ) from exc
                except OSError as exc:
                    raise BackendUnavailable(f"sqlalchemy: {exc!r}") from exc
            raise AssertionError("unreachable: the last attempt returns or raises")
        finally:
            self._in_flight -= 1
            self._last_used = time.monotonic()
            self._schedule_idle_check()

    async def _once(self, fn: Callable[[AsyncConnection], Awaitable[T]], migrated: bool) -> T:
        engine = await self._get_engine()
        async with engine.connect() as conn, conn.begin():
            if migrated and not self._schema_ready:
                try:
                    problem = version_problem(await installed_version(conn, self.tables))
                except SchemaProblem as exc:
                    problem = str(exc)
                if problem:
                    raise BackendMisconfigured(problem)
                self._schema_ready = True
            return await fn(conn)

    def _reported(self, exc: DBAPIError, outcome: Cause | str | None) -> Exception:
        summary = f"sqlalchemy ({self.dialect}): {exc.orig!r}"
        if outcome == MISCONFIGURED:
            return BackendMisconfigured(f"{summary}: the database refuses the store's settings")
        if isinstance(outcome, Cause):
            return BackendUnavailable(summary, outcome)
        if outcome == RETRY:
            return BackendUnavailable(summary, Cause.LOCK_TIMEOUT)
        return exc

    def _schedule_idle_check(self) -> None:
        if self._idle_check is None and self._engine is not None:
            loop = asyncio.get_running_loop()
            self._idle_check = loop.call_later(self.settings.idle_timeout, self._close_if_idle)

    def _close_if_idle(self) -> None:
        """Close the engine (its connections) once no call has run for `idleTimeout`;
        the next call makes a new one, reading the URL and password files again."""
        self._idle_check = None
        idle_for = time.monotonic() - self._last_used
        if self._in_flight or idle_for < self.settings.idle_timeout:
            loop = asyncio.get_running_loop()
            wait = max(self.settings.idle_timeout - idle_for, 0.01)
            self._idle_check = loop.call_later(wait, self._close_if_idle)
            return
        engine, self._engine = self._engine, None
        if engine is not None:
            task = asyncio.ensure_future(engine.dispose())
            task.add_done_callback(lambda done: done.exception())

    async def close(self) -> None:
        if self._idle_check is not None:
            self._idle_check.cancel()
            self._idle_check = None
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.dispose()


def _prepare_sessions(engine: AsyncEngine, url: URL, settings: Settings) -> None:
    """Each new connection's session settings: the time a lock wait may take, and a
    statement a second more (so a lock wait that runs out says so, not that the statement
    did); on SQLite, the write-ahead log, full syncs and transactions that take the
    write lock when they begin (two writers never both read, then both wait)."""
    backend = url.get_backend_name()
    seconds = settings.statement_timeout
    lock_wait = max(1, math.ceil(seconds))  # MySQL counts lock waits in whole seconds

    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        if backend == "sqlite":
            for pragma in ("journal_mode = WAL", "synchronous = FULL", "foreign_keys = ON"):
                cursor.execute(f"PRAGMA {pragma}")
        elif backend == "postgresql":
            cursor.execute(f"SET statement_timeout = {int(seconds * 1000)}")
            cursor.execute(f"SET lock_timeout = {int(seconds * 1000)}")
        else:
            cursor.execute(f"SET SESSION innodb_lock_wait_timeout = {lock_wait}")
            cursor.execute("SELECT VERSION()")
            if "mariadb" in str(cursor.fetchone()[0]).lower():  # a bound on any statement
                cursor.execute(f"SET SESSION max_statement_time = {lock_wait + 1}")
            else:  # MySQL's bounds reads only
                cursor.execute(f"SET SESSION max_execution_time = {(lock_wait + 1) * 1000}")
        cursor.close()

    if backend == "sqlite":

        @event.listens_for(engine.sync_engine, "begin")
        def on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
