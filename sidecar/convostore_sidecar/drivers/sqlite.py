"""SQLite driver: the embedded default, one file in WAL mode.

Each operation is one function run on a dedicated thread that owns its connection: one
writer thread, whose transactions (`BEGIN IMMEDIATE`) make appends and pops atomic, and
one reader thread, so reads proceed while a write is in progress (WAL). Running a whole
operation per thread hop, rather than one hop per statement, keeps a turn's overhead
small. Several sidecar processes may share one file: SQLite's file locks serialize their
writers and `busy_timeout` makes them wait instead of failing.

Items live in a table keyed by (store, session, seq): the latest N are read backwards
along that key, so a long session is never read whole to return a few items.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from .base import AppendResult, BackendUnavailable, Check, Idempotency, Transform, replay_of

if TYPE_CHECKING:
    from ..config import Section, StoreConfig

T = TypeVar("T")

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS convostore_schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS convostore_sessions (
    store TEXT NOT NULL, session_id TEXT NOT NULL,
    next_seq INTEGER NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (store, session_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS convostore_sessions_updated
    ON convostore_sessions (store, updated_at);
CREATE TABLE IF NOT EXISTS convostore_items (
    store TEXT NOT NULL, session_id TEXT NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (store, session_id, seq)
);
CREATE TABLE IF NOT EXISTS convostore_idempotency (
    store TEXT NOT NULL, session_id TEXT NOT NULL, key TEXT NOT NULL,
    fingerprint TEXT NOT NULL, appended INTEGER NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (store, session_id, key)
) WITHOUT ROWID;
"""

LATEST_SQL = """
SELECT i.data FROM convostore_items AS i JOIN convostore_sessions AS s
  ON s.store = i.store AND s.session_id = i.session_id
WHERE i.store = ? AND i.session_id = ? AND s.updated_at > ?
ORDER BY i.seq DESC LIMIT ?
"""


@dataclass(frozen=True)
class Settings:
    path: str = "./convostore.db"
    busy_timeout: float = 5.0

    @classmethod
    def parse(cls, s: Section) -> Settings:
        path = s.string("path", cls.path)
        if "\x00" in path:
            s.fail("path", "must not contain NUL")
        return cls(
            path=path,
            busy_timeout=s.duration("busyTimeout", cls.busy_timeout, low=0, high=600),
        )


def open_driver(store: StoreConfig) -> SqliteDriver:
    return SqliteDriver(store)


class _Connection:
    """A connection confined to its own thread; `run` executes one function there."""

    def __init__(self, path: str, busy_timeout: float, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._path, self._busy_timeout = path, busy_timeout
        self.conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self.conn is None:
            conn = sqlite3.connect(
                self._path,
                timeout=self._busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self.conn = conn
        return self.conn

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            return fn(self._connect())

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except sqlite3.OperationalError as exc:
            raise BackendUnavailable(f"sqlite {self._path}: {exc}") from exc

    async def close(self) -> None:
        def close() -> None:
            if self.conn is not None:
                self.conn.close()
                self.conn = None

        await asyncio.get_running_loop().run_in_executor(self._executor, close)
        self._executor.shutdown(wait=True)


def _transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


class SqliteDriver:
    def __init__(self, store: StoreConfig) -> None:
        settings: Settings = store.settings
        self.store = store.name
        self.retention = store.retention
        Path(settings.path).parent.mkdir(parents=True, exist_ok=True)
        self._writer = _Connection(settings.path, settings.busy_timeout, "sqlite-writer")
        self._reader = _Connection(settings.path, settings.busy_timeout, "sqlite-reader")

    def _live_after(self, now: float) -> float:
        """Sessions written after this moment have not expired."""
        ttl = self.retention.ttl_seconds
        return now - ttl if ttl else float("-inf")

    async def open(self) -> None:
        def create(conn: sqlite3.Connection) -> None:
            conn.executescript(f"BEGIN IMMEDIATE; {SCHEMA} COMMIT;")
            _transaction(conn, check_version)

        def check_version(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT max(version) FROM convostore_schema").fetchone()
            if row[0] is None:
                conn.execute("INSERT INTO convostore_schema VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                raise RuntimeError(
                    f"the SQLite file's schema version {row[0]} is newer than this sidecar's"
                )

        await self._writer.run(create)

    async def close(self) -> None:
        await self._writer.close()
        await self._reader.close()

    async def ping(self) -> None:
        await self._reader.run(lambda conn: conn.execute("SELECT 1").fetchone())

    async def append(
        self, session_id: str, items: Sequence[bytes], idempotency: Idempotency | None
    ) -> AppendResult:
        store, now = self.store, time.time()

        def append(conn: sqlite3.Connection) -> AppendResult:
            if idempotency is not None:
                seen = conn.execute(
                    "SELECT fingerprint, appended FROM convostore_idempotency"
                    " WHERE store = ? AND session_id = ? AND key = ? AND expires_at > ?",
                    (store, session_id, idempotency.key, now),
                ).fetchone()
                if seen is not None:
                    return replay_of(idempotency, seen[0], seen[1])
                conn.execute(
                    "INSERT OR REPLACE INTO convostore_idempotency VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        store,
                        session_id,
                        idempotency.key,
                        idempotency.fingerprint,
                        len(items),
                        now + idempotency.ttl_seconds,
                    ),
                )
            row = conn.execute(
                "SELECT next_seq, updated_at FROM convostore_sessions"
                " WHERE store = ? AND session_id = ?",
                (store, session_id),
            ).fetchone()
            first = 0 if row is None else row[0]
            if row is not None and row[1] <= self._live_after(now):
                conn.execute(
                    "DELETE FROM convostore_items WHERE store = ? AND session_id = ?",
                    (store, session_id),
                )
            conn.executemany(
                "INSERT INTO convostore_items VALUES (?, ?, ?, ?)",
                [(store, session_id, first + i, data) for i, data in enumerate(items)],
            )
            next_seq = first + len(items)
            conn.execute(
                "INSERT INTO convostore_sessions VALUES (?, ?, ?, ?)"
                " ON CONFLICT (store, session_id) DO UPDATE"
                " SET next_seq = excluded.next_seq, updated_at = excluded.updated_at",
                (store, session_id, next_seq, now),
            )
            if self.retention.max_items:
                conn.execute(
                    "DELETE FROM convostore_items WHERE store = ? AND session_id = ? AND seq < ?",
                    (store, session_id, next_seq - self.retention.max_items),
                )
            return AppendResult(appended=len(items), replayed=False)

        return await self._writer.run(lambda conn: _transaction(conn, append))

    async def latest(self, session_id: str, limit: int | None) -> list[bytes]:
        params = (
            self.store,
            session_id,
            self._live_after(time.time()),
            -1 if limit is None else limit,
        )

        def read(conn: sqlite3.Connection) -> list[bytes]:
            rows = conn.execute(LATEST_SQL, params).fetchall()
            return [row[0] for row in reversed(rows)]

        return await self._reader.run(read)

    async def pop(self, session_id: str, check: Check | None = None) -> bytes | None:
        store, now = self.store, time.time()

        def pop(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(
                "SELECT i.seq, i.data FROM convostore_items AS i JOIN convostore_sessions AS s"
                "  ON s.store = i.store AND s.session_id = i.session_id"
                " WHERE i.store = ? AND i.session_id = ? AND s.updated_at > ?"
                " ORDER BY i.seq DESC LIMIT 1",
                (store, session_id, self._live_after(now)),
            ).fetchone()
            if row is None:
                return None
            if check is not None:
                check(row[1])
            conn.execute(
                "DELETE FROM convostore_items WHERE store = ? AND session_id = ? AND seq = ?",
                (store, session_id, row[0]),
            )
            conn.execute(
                "UPDATE convostore_sessions SET updated_at = ? WHERE store = ? AND session_id = ?",
                (now, store, session_id),
            )
            data: bytes = row[1]
            return data

        return await self._writer.run(lambda conn: _transaction(conn, pop))

    async def clear(self, session_id: str) -> None:
        key = (self.store, session_id)

        def clear(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM convostore_items WHERE store = ? AND session_id = ?", key)
            conn.execute("DELETE FROM convostore_sessions WHERE store = ? AND session_id = ?", key)

        await self._writer.run(lambda conn: _transaction(conn, clear))

    async def list_sessions(self, prefix: str, after: str | None, limit: int) -> list[str]:
        params = (
            self.store,
            prefix,
            after or "",
            prefix + "\x7f",
            self._live_after(time.time()),
            limit,
        )

        def list_ids(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT session_id FROM convostore_sessions WHERE store = ?"
                " AND session_id >= ? AND session_id > ? AND session_id < ?"
                " AND updated_at > ? ORDER BY session_id LIMIT ?",
                params,
            ).fetchall()
            return [row[0] for row in rows]

        return await self._reader.run(list_ids)

    async def sweep(self) -> int:
        store, now = self.store, time.time()
        cutoff = self._live_after(now)

        def sweep(conn: sqlite3.Connection) -> int:
            conn.execute(
                "DELETE FROM convostore_idempotency WHERE store = ? AND expires_at <= ?",
                (store, now),
            )
            ids = [
                row[0]
                for row in conn.execute(
                    "SELECT session_id FROM convostore_sessions"
                    " WHERE store = ? AND updated_at <= ? LIMIT 500",
                    (store, cutoff),
                )
            ]
            for session_id in ids:
                conn.execute(
                    "DELETE FROM convostore_items WHERE store = ? AND session_id = ?",
                    (store, session_id),
                )
                conn.execute(
                    "DELETE FROM convostore_sessions WHERE store = ? AND session_id = ?",
                    (store, session_id),
                )
            return len(ids)

        return await self._writer.run(lambda conn: _transaction(conn, sweep))

    async def rewrite(self, session_id: str, transform: Transform) -> int:
        key = (self.store, session_id)

        def rewrite(conn: sqlite3.Connection) -> int:
            rows = conn.execute(
                "SELECT seq, data FROM convostore_items WHERE store = ? AND session_id = ?", key
            ).fetchall()
            changed = [
                (new, *key, seq) for seq, data in rows if (new := transform(data)) is not None
            ]
            conn.executemany(
                "UPDATE convostore_items SET data = ?"
                " WHERE store = ? AND session_id = ? AND seq = ?",
                changed,
            )
            return len(changed)

        return await self._writer.run(lambda conn: _transaction(conn, rewrite))
