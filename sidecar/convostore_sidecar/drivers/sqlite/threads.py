"""The threads that own the SQLite connections: every call runs on one of them, so a
stalled disk stalls those threads and never the event loop; the writer commits in
groups."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import TypeVar, cast

from ..base import BackendUnavailable, Cause
from .settings import Settings

DEADLINE_MARGIN = 5.0
"""Seconds past `busyTimeout` (the longest SQLite itself waits for a lock) after which a
call is answered without waiting for the disk."""

T = TypeVar("T")


class Connection:
    """A connection confined to a thread of its own; `run` executes one function there.

    The thread takes calls from a queue and hands each outcome back to the event loop
    with one `call_soon_threadsafe`: a hop costs about two thirds of what
    `run_in_executor` costs (two chained futures and a work item per call), and every
    SQLite call pays one (see bench/NOTES.md, "Per-request cost").
    """

    def __init__(self, settings: Settings, name: str) -> None:
        self._settings = settings
        self._name = name
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self.conn is None:
            self.conn = _connect(self._settings, self._settings.busy_timeout)
        return self.conn

    def submit(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """`fn`, to be run on the thread; its outcome is the future's."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        if self._thread is None:
            # a daemon: a driver never closed (a failed start) must not hold the exit
            self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
            self._thread.start()
        self._calls.put((fn, cast("asyncio.Future[object]", future)))
        return future

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            fn, future = call
            try:
                outcome: tuple[bool, object] = (True, fn())
            except BaseException as exc:  # the caller's to handle, on the event loop
                outcome = (False, exc)
            with contextlib.suppress(RuntimeError):  # the loop closed while it ran
                future.get_loop().call_soon_threadsafe(_deliver, future, *outcome)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return await _answered(
                self._settings, self.submit(lambda: fn(self._connect())), Cause.UNAVAILABLE
            )
        except sqlite3.OperationalError as exc:
            raise unavailable(self._settings, exc) from exc

    async def close(self) -> None:
        def close() -> None:
            if self.conn is not None:
                self.conn.close()
                self.conn = None

        if self._thread is None:
            return
        await self.submit(close)
        self._calls.put(None)
        self._thread.join()
        self._thread = None


_Call = tuple[Callable[[], object], "asyncio.Future[object]"]


def _deliver(future: asyncio.Future[object], ok: bool, value: object) -> None:
    """A call's outcome, unless its caller stopped waiting (its deadline passed)."""
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(cast(BaseException, value))


def _connect(settings: Settings, busy_timeout: float) -> sqlite3.Connection:
    conn = sqlite3.connect(
        settings.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
    )
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={settings.synchronous.upper()}")
    except BaseException:
        conn.close()
        raise
    return conn


async def _answered(settings: Settings, future: asyncio.Future[T], cause: Cause) -> T:
    """A call that has not answered within `busyTimeout` and `DEADLINE_MARGIN` (a stalled
    disk, say) is answered 503 meanwhile; its thread finishes when the disk does. A write
    may then still be stored: `cause` says whether the caller must assume so."""
    seconds = settings.busy_timeout + DEADLINE_MARGIN
    try:
        async with asyncio.timeout(seconds):
            return await future
    except TimeoutError:
        raise BackendUnavailable(
            f"sqlite {settings.path}: no answer within {seconds:g} s (a stalled disk?)", cause
        ) from None


def unavailable(settings: Settings, exc: sqlite3.Error) -> BackendUnavailable:
    text = str(exc)
    cause = next((c for words, c in _CAUSES if words in text), Cause.UNAVAILABLE)
    return BackendUnavailable(f"sqlite {settings.path}: {exc}", cause)


_CAUSES = (
    ("database or disk is full", Cause.DISK_FULL),
    ("readonly database", Cause.READ_ONLY),
    ("database is locked", Cause.LOCK_TIMEOUT),
)
"""SQLite names a refusal's cause only in its message (its extended codes aside)."""


_Work = tuple[Callable[[sqlite3.Connection], object], "asyncio.Future[object]"]


class Writer(Connection):
    """The writing connection, committing in groups.

    Transactions that arrive while one is being committed wait and then run together,
    each in a savepoint of its own, under one `COMMIT`: one WAL sync and one thread
    hand-off for the lot, instead of one each. A transaction that raises is rolled back
    to its savepoint alone; a commit that fails fails every transaction of its group,
    none of which was acknowledged. A lone transaction runs as before, without a
    savepoint.
    """

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, "sqlite-writer")
        self._waiting: list[_Work] = []
        self._group: asyncio.Future[list[tuple[bool, object]]] | None = None
        self._file: tuple[int, int] | None = None

    def check_file(self) -> None:
        """Raises while the database file is not the one first written: SQLite goes on
        writing to a file deleted under it (to its unlinked inode, gone at the next
        start), so every later append would be acknowledged and lost."""
        try:
            seen = os.stat(self._settings.path)
        except FileNotFoundError:
            now = None
        else:
            now = (seen.st_dev, seen.st_ino)
        if self._file is None:
            self._file = now
        if now is None or now != self._file:
            raise BackendUnavailable(
                f"sqlite {self._settings.path}: the database file was deleted or replaced "
                "while the sidecar used it; writes are refused (none would be kept) until "
                "the sidecar restarts on a file that is there",
                Cause.STORAGE_GONE,
            )

    async def transact(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[object] = loop.create_future()
        self._waiting.append((fn, done))
        if self._group is None:
            self._commit_next(loop)
        return cast(T, await _answered(self._settings, done, Cause.OUTCOME_UNKNOWN))

    def _commit_next(self, loop: asyncio.AbstractEventLoop) -> None:
        group, self._waiting = self._waiting, []
        work = [fn for fn, _ in group]
        self._group = self.submit(lambda: self._commit(work))
        self._group.add_done_callback(lambda outcome: self._settle(loop, group, outcome))

    def _commit(
        self, group: list[Callable[[sqlite3.Connection], object]]
    ) -> list[tuple[bool, object]]:
        conn = self._connect()
        self.check_file()
        conn.execute("BEGIN IMMEDIATE")
        try:
            outcomes = [_attempt(conn, fn, alone=len(group) == 1) for fn in group]
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return outcomes

    def _settle(
        self,
        loop: asyncio.AbstractEventLoop,
        group: list[_Work],
        outcome: asyncio.Future[list[tuple[bool, object]]],
    ) -> None:
        self._group = None
        if self._waiting:
            self._commit_next(loop)
        if outcome.cancelled():
            for _, done in group:
                done.cancel()
            return
        failure = outcome.exception()
        results = [(False, failure)] * len(group) if failure else outcome.result()
        for (_, done), (ok, value) in zip(group, results, strict=True):
            if done.done():
                continue
            if ok:
                done.set_result(value)
            elif isinstance(value, sqlite3.OperationalError):
                done.set_exception(unavailable(self._settings, value))
            else:
                done.set_exception(cast(BaseException, value))

    async def close(self) -> None:
        while self._group is not None:  # its callers hear how it ended; close just waits
            await asyncio.wait({self._group})
        await super().close()


def _attempt(
    conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], object], *, alone: bool
) -> tuple[bool, object]:
    """One transaction of a group: its result, or its exception with its writes undone."""
    if alone:
        return True, fn(conn)
    conn.execute("SAVEPOINT one")
    try:
        result = fn(conn)
    except Exception as exc:
        conn.execute("ROLLBACK TO one")
        conn.execute("RELEASE one")
        return False, exc
    conn.execute("RELEASE one")
    return True, result
