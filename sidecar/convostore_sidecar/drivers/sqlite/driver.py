"""The SQLite driver's operations, each one function run on the reader's or the
writer's thread."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import astuple
from pathlib import Path
from typing import TYPE_CHECKING

from ..base import (
    COMPACTED,
    ERASURES_KEPT,
    MAIN,
    AppendResult,
    BackendUnavailable,
    BranchIdUsed,
    BranchInfo,
    BranchNotFound,
    Check,
    ErasureRecord,
    Gathered,
    Idempotency,
    Items,
    ItemShape,
    KeepsStructure,
    LabelChanges,
    Meta,
    SessionInfo,
    SessionQuery,
    SubjectKey,
    TooManyLabels,
    Transform,
    TurnNotFound,
    TurnUsage,
    Usage,
    UserTurn,
    archive_of,
    erasure_of,
    replay_of,
    stored,
    stored_at,
    wall_clock,
)
from ..finding import Bind, Dialect, count_sql, fewest_first, find_sql
from .schema import (
    INDEXES,
    LATEST_SQL,
    NEWEST_SQL,
    SCHEMA,
    SCHEMA_VERSION,
    SESSION_CREATED,
    STRUCTURE_COLUMNS,
    USAGE_SQL,
    USER_TURNS_SQL,
)
from .settings import Settings, unusable_path
from .threads import Connection, Writer

if TYPE_CHECKING:
    from ...config import StoreConfig

TRUNCATE_ATTEMPTS = 50
DIALECT = Dialect("convostore_sessions", "convostore_labels", "{}", float)


def open_driver(store: StoreConfig) -> SqliteDriver:
    return SqliteDriver(store)


def newest_within(rows: sqlite3.Cursor, max_bytes: int | None) -> list[bytes]:
    """Rows of one item, newest first, read one by one only as far as `max_bytes` lets
    them; then the statement is finished, so that it holds no read snapshot."""
    gathered = Gathered(max_bytes)
    try:
        for (data,) in rows:
            if not gathered.take(data):
                break
    finally:
        rows.close()
    return gathered.oldest_first()


class SqliteDriver(KeepsStructure):
    def __init__(self, store: StoreConfig) -> None:
        settings: Settings = store.settings
        self.store = store.identity
        self.retention = store.retention
        self._path = settings.path
        self._unusable = functools.partial(unusable_path, store.name, settings.path)
        directory = Path(settings.path).parent
        if not directory.is_dir():
            raise self._unusable(
                f"its directory {str(directory)!r} does not exist: create it, or name a file "
                "in a directory that does"
            )
        self._writer = Writer(settings)
        self._reader = Connection(settings, "sqlite-reader")

    def _live_after(self, now: float) -> float:
        """Sessions written after this moment have not expired."""
        ttl = self.retention.ttl_seconds
        return now - ttl if ttl else float("-inf")

    async def open(self) -> None:
        def migrate(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT max(version) FROM convostore_schema").fetchone()
            if row[0] is None:
                conn.execute("INSERT INTO convostore_schema VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                raise RuntimeError(
                    f"the SQLite file's schema version {row[0]} is newer than this sidecar's"
                )
            elif row[0] < SCHEMA_VERSION:
                if row[0] == 1:
                    for column in STRUCTURE_COLUMNS:
                        conn.execute(f"ALTER TABLE convostore_items ADD COLUMN {column}")
                conn.execute(f"ALTER TABLE convostore_sessions ADD COLUMN {SESSION_CREATED}")
                conn.execute("UPDATE convostore_sessions SET created_at = updated_at")
                conn.execute("UPDATE convostore_schema SET version = ?", (SCHEMA_VERSION,))

        try:
            await self._writer.run(
                lambda conn: conn.executescript(f"BEGIN IMMEDIATE; {SCHEMA} COMMIT;")
            )
            await self._writer.transact(migrate)
            await self._writer.run(
                lambda conn: conn.executescript(f"BEGIN IMMEDIATE; {INDEXES} COMMIT;")
            )
        except (BackendUnavailable, sqlite3.DatabaseError) as exc:
            raise self._unusable(str(exc.__cause__ or exc)) from None

    async def close(self) -> None:
        await self._writer.close()
        await self._reader.close()

    async def ping(self) -> None:
        await self._reader.run(lambda conn: conn.execute("SELECT 1").fetchone())
        await self._writer.run(lambda _: self._writer.check_file())

    async def append_to(
        self,
        session_id: str,
        branch: str,
        items: Items,
        meta: Sequence[Meta],
        idempotency: Idempotency | None,
    ) -> AppendResult:
        store, now = self.store, wall_clock()

        def append(conn: sqlite3.Connection) -> AppendResult:
            if idempotency is not None:
                replayed = self._replay_or_record(conn, session_id, idempotency, len(items), now)
                if replayed is not None:
                    return replayed
            row = conn.execute(
                "SELECT next_seq, updated_at FROM convostore_sessions"
                " WHERE store = ? AND session_id = ?",
                (store, session_id),
            ).fetchone()
            first = 0 if row is None else row[0]
            if row is not None and row[1] <= self._live_after(now):
                self._forget(conn, session_id, expired=True)
            self._require_branch(conn, session_id, branch, now)
            newest = conn.execute(NEWEST_SQL, (store, session_id, branch)).fetchone()
            turn = 0 if newest is None else newest[1]
            rows, anchor = [], None
            for offset, (data, shape) in enumerate(zip(stored(items, first), meta, strict=True)):
                if shape.kind == "user":
                    turn, anchor = turn + 1, first + offset
                row = (store, session_id, first + offset, data, branch, turn, *astuple(shape), now)
                rows.append(row)
            conn.executemany("INSERT INTO convostore_items VALUES (?,?,?,?,?,?,?,?,?)", rows)
            next_seq = first + len(items)
            conn.execute(
                "INSERT INTO convostore_sessions VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (store, session_id) DO UPDATE"
                " SET next_seq = excluded.next_seq, updated_at = excluded.updated_at",
                (store, session_id, next_seq, now, now),
            )
            if self.retention.max_items:
                conn.execute(
                    "DELETE FROM convostore_items WHERE store = ? AND session_id = ?"
                    " AND branch = ? AND seq < (SELECT seq FROM convostore_items"
                    "  WHERE store = ? AND session_id = ? AND branch = ?"
                    "  ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                    (store, session_id, branch) * 2 + (self.retention.max_items - 1,),
                )
            if anchor is None:
                anchor = self._turn_start(conn, session_id, branch, turn)
            return AppendResult(len(items), replayed=False, turn=turn, anchor=anchor)

        return await self._writer.transact(append)

    def _replay_or_record(
        self,
        conn: sqlite3.Connection,
        session_id: str,
        idempotency: Idempotency,
        count: int,
        now: float,
    ) -> AppendResult | None:
        """The replay of an append whose key was seen (raising if its body differed), or
        None once the key is recorded for this one, in the append's own transaction."""
        seen = conn.execute(
            "SELECT fingerprint, appended FROM convostore_idempotency"
            " WHERE store = ? AND session_id = ? AND key = ? AND expires_at > ?",
            (self.store, session_id, idempotency.key, now),
        ).fetchone()
        if seen is not None:
            return replay_of(idempotency, seen[0], seen[1])
        conn.execute(
            "INSERT OR REPLACE INTO convostore_idempotency VALUES (?, ?, ?, ?, ?, ?)",
            (
                self.store,
                session_id,
                idempotency.key,
                idempotency.fingerprint,
                count,
                now + idempotency.ttl_seconds,
            ),
        )
        return None

    def _forget(self, conn: sqlite3.Connection, session_id: str, *, expired: bool) -> None:
        """Everything of a session; a clear keeps its branch ids reserved, an expiry not."""
        key = (self.store, session_id)
        tables = (
            "convostore_items",
            "convostore_sessions",
            "convostore_usage",
            "convostore_labels",
        )
        for table in tables:
            conn.execute(f"DELETE FROM {table} WHERE store = ? AND session_id = ?", key)
        conn.execute(
            "DELETE FROM convostore_branches WHERE store = ? AND session_id = ?"
            if expired
            else "UPDATE convostore_branches SET live = 0 WHERE store = ? AND session_id = ?",
            key,
        )

    def _require_branch(
        self, conn: sqlite3.Connection, session_id: str, branch: str, now: float
    ) -> None:
        if branch == MAIN:
            return
        live = conn.execute(
            "SELECT 1 FROM convostore_branches AS b JOIN convostore_sessions AS s"
            "  ON s.store = b.store AND s.session_id = b.session_id"
            " WHERE b.store = ? AND b.session_id = ? AND b.branch = ? AND b.live = 1"
            "  AND s.updated_at > ?",
            (self.store, session_id, branch, self._live_after(now)),
        ).fetchone()
        if live is None:
            raise BranchNotFound(branch)

    def _turn_start(
        self, conn: sqlite3.Connection, session_id: str, branch: str, turn: int
    ) -> int | None:
        """The sequence number of the turn's first item: its user message, or for turn 0
        (items before any user message) the branch's first item."""
        key = (self.store, session_id, branch)
        row = (
            conn.execute(
                "SELECT seq FROM convostore_items WHERE store = ? AND session_id = ?"
                " AND branch = ? ORDER BY seq LIMIT 1",
                key,
            ).fetchone()
            if turn == 0
            else conn.execute(
                "SELECT seq FROM convostore_items WHERE store = ? AND session_id = ?"
                " AND branch = ? AND kind = 'user' AND turn = ?",
                (*key, turn),
            ).fetchone()
        )
        return None if row is None else int(row[0])

    async def latest_in(
        self, session_id: str, branch: str, limit: int | None, max_bytes: int | None = None
    ) -> list[bytes]:
        now = wall_clock()
        params = (self.store, session_id, branch, self._live_after(now))

        def read(conn: sqlite3.Connection) -> list[bytes]:
            self._require_branch(conn, session_id, branch, now)
            rows = conn.execute(LATEST_SQL, (*params, -1 if limit is None else limit))
            return newest_within(rows, max_bytes)

        return await self._reader.run(read)

    async def pop_from(self, session_id: str, branch: str, check: Check | None) -> bytes | None:
        store, now = self.store, wall_clock()

        def pop(conn: sqlite3.Connection) -> bytes | None:
            self._require_branch(conn, session_id, branch, now)
            row = conn.execute(
                "SELECT i.seq, i.data, i.turn FROM convostore_items AS i"
                " JOIN convostore_sessions AS s"
                "  ON s.store = i.store AND s.session_id = i.session_id"
                " WHERE i.store = ? AND i.session_id = ? AND i.branch = ? AND s.updated_at > ?"
                " ORDER BY i.seq DESC LIMIT 1",
                (store, session_id, branch, self._live_after(now)),
            ).fetchone()
            if row is None:
                return None
            if check is not None:
                check(row[1])
            conn.execute(
                "DELETE FROM convostore_items WHERE store = ? AND session_id = ? AND seq = ?",
                (store, session_id, row[0]),
            )
            newest = conn.execute(NEWEST_SQL, (store, session_id, branch)).fetchone()
            if newest is None or newest[1] != row[2]:
                conn.execute(
                    "DELETE FROM convostore_usage WHERE store = ? AND session_id = ?"
                    " AND branch = ? AND turn = ?",
                    (store, session_id, branch, row[2]),
                )
            conn.execute(
                "UPDATE convostore_sessions SET updated_at = ? WHERE store = ? AND session_id = ?",
                (now, store, session_id),
            )
            data: bytes = row[1]
            return data

        return await self._writer.transact(pop)

    async def clear(self, session_id: str) -> None:
        await self._writer.transact(lambda conn: self._forget(conn, session_id, expired=False))

    async def branch_exists(self, session_id: str, branch: str) -> bool:
        def exists(conn: sqlite3.Connection) -> bool:
            try:
                self._require_branch(conn, session_id, branch, wall_clock())
            except BranchNotFound:
                return False
            return True

        return await self._reader.run(exists)

    async def branches(self, session_id: str) -> list[BranchInfo]:
        params = (self.store, session_id, self._live_after(wall_clock()))

        def read(conn: sqlite3.Connection) -> list[BranchInfo]:
            rows = conn.execute(
                "SELECT i.branch, count(*), sum(i.kind = 'user'), min(i.created_at)"
                " FROM convostore_items AS i JOIN convostore_sessions AS s"
                "  ON s.store = i.store AND s.session_id = i.session_id"
                " WHERE i.store = ? AND i.session_id = ? AND s.updated_at > ?"
                "  AND instr(i.branch, '/') = 0"
                " GROUP BY i.branch ORDER BY min(i.created_at), i.branch",
                params,
            ).fetchall()
            return [BranchInfo(*row) for row in rows]

        return await self._reader.run(read)

    async def create_branch(self, session_id: str, source: str, turn: int, new: str) -> None:
        store, now = self.store, wall_clock()

        def create(conn: sqlite3.Connection) -> None:
            self._require_branch(conn, session_id, source, now)
            start = conn.execute(
                "SELECT i.seq FROM convostore_items AS i JOIN convostore_sessions AS s"
                "  ON s.store = i.store AND s.session_id = i.session_id"
                " WHERE i.store = ? AND i.session_id = ? AND i.branch = ? AND i.kind = 'user'"
                "  AND i.turn = ? AND s.updated_at > ?",
                (store, session_id, source, turn, self._live_after(now)),
            ).fetchone()
            if start is None:
                raise TurnNotFound(turn)
            taken = conn.execute(
                "SELECT 1 FROM convostore_branches WHERE store = ? AND session_id = ?"
                " AND branch = ?",
                (store, session_id, new),
            ).fetchone()
            if taken is not None or new == MAIN:
                raise BranchIdUsed(new)
            first = conn.execute(
                "SELECT next_seq FROM convostore_sessions WHERE store = ? AND session_id = ?",
                (store, session_id),
            ).fetchone()[0]
            copied = conn.execute(
                "INSERT INTO convostore_items"
                " SELECT store, session_id, ? + row_number() OVER (ORDER BY seq) - 1, data,"
                "  ?, turn, kind, tool, ?"
                " FROM convostore_items WHERE store = ? AND session_id = ? AND branch = ?"
                "  AND seq < ? ORDER BY seq",
                (first, new, now, store, session_id, source, start[0]),
            ).rowcount
            conn.execute(
                "INSERT INTO convostore_branches VALUES (?, ?, ?, 1, ?)",
                (store, session_id, new, now),
            )
            conn.execute(
                "UPDATE convostore_sessions SET next_seq = ?, updated_at = ?"
                " WHERE store = ? AND session_id = ?",
                (first + copied, now, store, session_id),
            )

        await self._writer.transact(create)

    async def delete_branch(self, session_id: str, branch: str) -> None:
        key = (self.store, session_id, branch)

        def delete(conn: sqlite3.Connection) -> None:
            self._require_branch(conn, session_id, branch, wall_clock())
            for table in ("convostore_items", "convostore_usage"):
                conn.execute(
                    f"DELETE FROM {table} WHERE store = ? AND session_id = ? AND branch IN (?, ?)",
                    (*key, archive_of(branch)),
                )
            conn.execute(
                "UPDATE convostore_branches SET live = 0"
                " WHERE store = ? AND session_id = ? AND branch = ?",
                key,
            )

        await self._writer.transact(delete)

    async def compact(
        self, session_id: str, branch: str, expected: Sequence[bytes], replacement: Items
    ) -> bool:
        store, now = self.store, wall_clock()

        def replace(conn: sqlite3.Connection) -> bool:
            self._require_branch(conn, session_id, branch, now)
            if not self._alive(conn, session_id, now):
                return False
            rows = conn.execute(
                "SELECT seq, data, turn, kind FROM convostore_items"
                " WHERE store = ? AND session_id = ? AND branch = ? ORDER BY seq LIMIT ?",
                (store, session_id, branch, len(expected)),
            ).fetchall()
            if not rows or [row[1] for row in rows] != list(expected):
                return False
            head = next((i for i, row in enumerate(rows) if row[3] != COMPACTED), len(rows))
            first = conn.execute(
                "SELECT next_seq FROM convostore_sessions WHERE store = ? AND session_id = ?",
                (store, session_id),
            ).fetchone()[0]
            key = (store, session_id)
            conn.executemany(
                "DELETE FROM convostore_items WHERE store = ? AND session_id = ? AND seq = ?",
                [(*key, row[0]) for row in rows[:head]],
            )
            conn.executemany(
                "UPDATE convostore_items SET seq = ?, branch = ?"
                " WHERE store = ? AND session_id = ? AND seq = ?",
                [
                    (first + offset, archive_of(branch), *key, row[0])
                    for offset, row in enumerate(rows[head:])
                ],
            )
            seqs = [row[0] for row in rows[: len(replacement)]]
            turn = rows[-1][2]
            conn.executemany(
                "INSERT INTO convostore_items VALUES (?,?,?,?,?,?,?,?,?)",
                [
                    (*key, seq, data, branch, turn, COMPACTED, None, now)
                    for seq, data in zip(seqs, stored_at(replacement, seqs), strict=True)
                ],
            )
            conn.execute(
                "UPDATE convostore_sessions SET next_seq = ?, updated_at = ?"
                " WHERE store = ? AND session_id = ?",
                (first + len(rows) - head, now, *key),
            )
            return True

        return await self._writer.transact(replace)

    async def full_history(
        self, session_id: str, branch: str, limit: int, max_bytes: int | None = None
    ) -> list[bytes]:
        now = wall_clock()
        archive = archive_of(branch)

        def read(conn: sqlite3.Connection) -> list[bytes]:
            self._require_branch(conn, session_id, branch, now)
            if not self._alive(conn, session_id, now):
                return []
            rows = conn.execute(
                "SELECT data FROM convostore_items WHERE store = ? AND session_id = ?"
                " AND branch IN (?, ?) AND kind <> ? ORDER BY branch = ?, seq DESC LIMIT ?",
                (self.store, session_id, branch, archive, COMPACTED, archive, limit),
            )
            return newest_within(rows, max_bytes)

        return await self._reader.run(read)

    async def user_turns(self, session_id: str, branch: str) -> list[UserTurn]:
        now = wall_clock()

        def read(conn: sqlite3.Connection) -> list[UserTurn]:
            self._require_branch(conn, session_id, branch, now)
            if not self._alive(conn, session_id, now):
                return []
            rows = conn.execute(USER_TURNS_SQL, (self.store, session_id, branch)).fetchall()
            return [UserTurn(*row) for row in rows]

        return await self._reader.run(read)

    async def shapes(self, session_id: str, branch: str) -> list[ItemShape]:
        now = wall_clock()

        def read(conn: sqlite3.Connection) -> list[ItemShape]:
            self._require_branch(conn, session_id, branch, now)
            if not self._alive(conn, session_id, now):
                return []
            rows = conn.execute(
                "SELECT turn, kind, tool FROM convostore_items"
                " WHERE store = ? AND session_id = ? AND branch = ? ORDER BY seq",
                (self.store, session_id, branch),
            ).fetchall()
            return [ItemShape(*row) for row in rows]

        return await self._reader.run(read)

    def _alive(self, conn: sqlite3.Connection, session_id: str, now: float) -> bool:
        row = conn.execute(
            "SELECT updated_at FROM convostore_sessions WHERE store = ? AND session_id = ?",
            (self.store, session_id),
        ).fetchone()
        return row is not None and row[0] > self._live_after(now)

    async def record_usage(
        self, session_id: str, branch: str, turn: int | None, anchor: int | None, usage: Usage
    ) -> int | None:
        store, now = self.store, wall_clock()

        def record(conn: sqlite3.Connection) -> int | None:
            self._require_branch(conn, session_id, branch, now)
            if not self._alive(conn, session_id, now):
                return None
            nonlocal turn, anchor
            if turn is None:
                newest = conn.execute(NEWEST_SQL, (store, session_id, branch)).fetchone()
                if newest is None:
                    return None
                turn = int(newest[1])
                anchor = self._turn_start(conn, session_id, branch, turn)
            present = conn.execute(
                "SELECT 1 FROM convostore_items WHERE store = ? AND session_id = ?"
                " AND seq = ? AND branch = ? AND turn = ?",
                (store, session_id, anchor, branch, turn),
            ).fetchone()
            if present is None:
                return None
            conn.execute(
                "INSERT OR REPLACE INTO convostore_usage VALUES (?,?,?,?,?,?,?,?,?,?)",
                (store, session_id, branch, turn, *astuple(usage)),
            )
            return turn

        return await self._writer.transact(record)

    async def usage(self, session_id: str, branch: str | None) -> list[TurnUsage]:
        now = wall_clock()

        def read(conn: sqlite3.Connection) -> list[TurnUsage]:
            if not self._alive(conn, session_id, now):
                return []
            rows = conn.execute(USAGE_SQL, (self.store, session_id, branch, branch)).fetchall()
            return [TurnUsage(row[0], row[1], Usage(*row[2:])) for row in rows]

        return await self._reader.run(read)

    async def label(self, session_id: str, changes: LabelChanges, most: int) -> SessionInfo:
        store, now = self.store, wall_clock()

        def label(conn: sqlite3.Connection) -> SessionInfo:
            row = conn.execute(
                "SELECT created_at, updated_at FROM convostore_sessions"
                " WHERE store = ? AND session_id = ?",
                (store, session_id),
            ).fetchone()
            if row is not None and row[1] <= self._live_after(now):
                self._forget(conn, session_id, expired=True)
                row = None
            created = now if row is None else row[0]
            conn.execute(
                "INSERT INTO convostore_sessions VALUES (?, ?, 0, ?, ?)"
                " ON CONFLICT (store, session_id) DO UPDATE SET updated_at = excluded.updated_at",
                (store, session_id, now, created),
            )
            for name, value in changes.items():
                if value is None:
                    conn.execute(
                        "DELETE FROM convostore_labels WHERE store = ? AND session_id = ?"
                        " AND name = ?",
                        (store, session_id, name),
                    )
                else:
                    conn.execute(
                        "INSERT INTO convostore_labels VALUES (?, ?, ?, ?, ?)"
                        " ON CONFLICT (store, session_id, name) DO UPDATE"
                        " SET value = excluded.value",
                        (store, session_id, name, value, created),
                    )
            labels = self._labels_of(conn, [session_id])[session_id]
            if len(labels) > most:
                raise TooManyLabels(most)
            return SessionInfo(session_id, created, now, labels)

        return await self._writer.transact(label)

    def _labels_of(
        self, conn: sqlite3.Connection, session_ids: Sequence[str]
    ) -> dict[str, dict[str, str]]:
        found: dict[str, dict[str, str]] = {session_id: {} for session_id in session_ids}
        marks = ",".join("?" * len(session_ids))
        for session_id, name, value in conn.execute(
            "SELECT session_id, name, value FROM convostore_labels"
            f" WHERE store = ? AND session_id IN ({marks})",
            (self.store, *session_ids),
        ):
            found[session_id][name] = value
        return found

    async def session_info(self, session_id: str) -> SessionInfo | None:
        params = (self.store, session_id, self._live_after(wall_clock()))

        def read(conn: sqlite3.Connection) -> SessionInfo | None:
            row = conn.execute(
                "SELECT created_at, updated_at FROM convostore_sessions"
                " WHERE store = ? AND session_id = ? AND updated_at > ?",
                params,
            ).fetchone()
            if row is None:
                return None
            return SessionInfo(
                session_id, row[0], row[1], self._labels_of(conn, [session_id])[session_id]
            )

        return await self._reader.run(read)

    def _sql(self, build: Callable[[Bind], str]) -> tuple[str, list[object]]:
        """A statement that `build` writes with `?` placeholders, and its parameters."""
        params: list[object] = []

        def bind(value: object) -> str:
            params.append(value)
            return "?"

        return build(bind), params

    async def find_sessions(self, query: SessionQuery) -> list[SessionInfo]:
        live_after = self._live_after(wall_clock())

        def alive(bind: Bind) -> str:
            return f"s.updated_at > {bind(live_after)}"

        def count(conn: sqlite3.Connection, name: str, value: str) -> int:
            sql, params = self._sql(lambda bind: count_sql(DIALECT, bind, self.store, name, value))
            return int(conn.execute(sql, params).fetchone()[0])

        def read(conn: sqlite3.Connection) -> list[SessionInfo]:
            asked = query
            if len(query.labels) > 1:
                counts = [count(conn, *label) for label in query.labels.items()]
                asked = fewest_first(query, counts)
            sql, params = self._sql(lambda bind: find_sql(asked, DIALECT, bind, self.store, alive))
            rows = conn.execute(sql, params).fetchall()
            labels = self._labels_of(conn, [row[0] for row in rows]) if rows else {}
            return [
                SessionInfo(sid, created, updated, labels[sid]) for sid, created, updated in rows
            ]

        return await self._reader.run(read)

    async def erase(self, session_id: str, idle_since: float | None = None) -> int | None:
        """With SQLite's `secure_delete` on for the erasure, so the pages it frees are
        zeroed (`settle_erasures` then clears the write-ahead log)."""
        key = (self.store, session_id)

        def erase(conn: sqlite3.Connection) -> int | None:
            if idle_since is not None:
                row = conn.execute(
                    "SELECT updated_at FROM convostore_sessions WHERE store = ? AND session_id = ?",
                    key,
                ).fetchone()
                if row is not None and row[0] > idle_since:
                    return None
            conn.execute("PRAGMA secure_delete = ON")
            try:
                (held,) = conn.execute(
                    "SELECT count(*) FROM convostore_items WHERE store = ? AND session_id = ?",
                    key,
                ).fetchone()
                self._forget(conn, session_id, expired=True)
                conn.execute(
                    "DELETE FROM convostore_idempotency WHERE store = ? AND session_id = ?", key
                )
            finally:
                conn.execute("PRAGMA secure_delete = OFF")
            return int(held)

        return await self._writer.transact(erase)

    async def settle_erasures(self) -> None:
        """The write-ahead log checkpointed and truncated: it held the erased pages as they
        were before. Readers in the way make it wait, then answer unavailable (the erasure
        is asked again, and settles then)."""
        for attempt in range(TRUNCATE_ATTEMPTS):
            busy = await self._writer.run(
                lambda conn: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            )
            if not busy:
                return
            await asyncio.sleep(0.01 * (attempt + 1))
        raise BackendUnavailable(
            f"sqlite {self._path}: readers kept the write-ahead log, which still holds erased "
            "pages, from being truncated"
        )

    async def subject_key(self, subject: str) -> bytes | None:
        row = await self._reader.run(
            lambda conn: conn.execute(
                "SELECT wrapped FROM convostore_subject_keys WHERE store = ? AND subject = ?",
                (self.store, subject),
            ).fetchone()
        )
        return None if row is None else bytes(row[0])

    async def keep_subject_key(self, subject: str, wrapped: bytes) -> bytes:
        def keep(conn: sqlite3.Connection) -> bytes:
            key = (self.store, subject)
            conn.execute(
                "INSERT OR IGNORE INTO convostore_subject_keys VALUES (?,?,?)", (*key, wrapped)
            )
            (kept,) = conn.execute(
                "SELECT wrapped FROM convostore_subject_keys WHERE store = ? AND subject = ?", key
            ).fetchone()
            return bytes(kept)

        return await self._writer.transact(keep)

    async def replace_subject_key(self, subject: str, old: bytes, new: bytes) -> bool:
        def replace(conn: sqlite3.Connection) -> bool:
            return bool(
                conn.execute(
                    "UPDATE convostore_subject_keys SET wrapped = ?"
                    " WHERE store = ? AND subject = ? AND wrapped = ?",
                    (new, self.store, subject, old),
                ).rowcount
            )

        return await self._writer.transact(replace)

    async def forget_subject_key(self, subject: str) -> bool:
        """With `secure_delete` on, as an erasure runs (the caller settles the log)."""

        def forget(conn: sqlite3.Connection) -> bool:
            conn.execute("PRAGMA secure_delete = ON")
            try:
                return bool(
                    conn.execute(
                        "DELETE FROM convostore_subject_keys WHERE store = ? AND subject = ?",
                        (self.store, subject),
                    ).rowcount
                )
            finally:
                conn.execute("PRAGMA secure_delete = OFF")

        return await self._writer.transact(forget)

    async def subject_keys(self, cursor: str, limit: int) -> tuple[list[SubjectKey], str]:
        rows = await self._reader.run(
            lambda conn: conn.execute(
                "SELECT subject, wrapped FROM convostore_subject_keys WHERE store = ?"
                " AND subject > ? ORDER BY subject LIMIT ?",
                (self.store, cursor, limit),
            ).fetchall()
        )
        keys = [SubjectKey(subject, bytes(wrapped)) for subject, wrapped in rows]
        return keys, keys[-1].subject if len(keys) == limit else ""

    async def record_erasure(self, record: ErasureRecord) -> None:
        row = (self.store, record.erasure_id, record.at, ",".join(record.label_names))
        counts = (record.sessions, record.items, int(record.complete))

        def keep(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO convostore_erasures VALUES (?,?,?,?,?,?,?)", row + counts)
            conn.execute(
                "DELETE FROM convostore_erasures WHERE store = ? AND at < (SELECT at FROM"
                " convostore_erasures WHERE store = ? ORDER BY at DESC LIMIT 1 OFFSET ?)",
                (self.store, self.store, ERASURES_KEPT - 1),
            )

        await self._writer.transact(keep)

    async def erasures(self, limit: int) -> list[ErasureRecord]:
        def read(conn: sqlite3.Connection) -> list[ErasureRecord]:
            rows = conn.execute(
                "SELECT erasure_id, at, label_names, sessions, items, complete"
                " FROM convostore_erasures WHERE store = ? ORDER BY at DESC LIMIT ?",
                (self.store, limit),
            ).fetchall()
            return [erasure_of(*row) for row in rows]

        return await self._reader.run(read)

    async def list_sessions(self, prefix: str, after: str | None, limit: int) -> list[str]:
        params = (
            self.store,
            prefix,
            after or "",
            prefix + "\x7f",
            self._live_after(wall_clock()),
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
        store, now = self.store, wall_clock()
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
                self._forget(conn, session_id, expired=True)
            return len(ids)

        return await self._writer.transact(sweep)

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

        return await self._writer.transact(rewrite)
