"""The `sqlalchemy` driver's operations, each one transaction on a pooled connection.

Every write locks the session's row first (`SELECT ... FOR UPDATE`; on SQLite the
transaction takes the write lock when it begins), so writes to one session are
serialized and sequence numbers follow commit order, as `drivers/base` requires.
Statements are SQLAlchemy Core, so each dialect gets its own SQL; none needs
`RETURNING` or functions only one database has.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Select,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from ..base import (
    COMPACTED,
    AppendResult,
    BackendMisconfigured,
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
    Transform,
    TurnUsage,
    Usage,
    UserTurn,
    archive_of,
    replay_of,
    stored,
    wall_clock,
)
from . import labels, structure
from .connections import Connections
from .rows import BRANCH, SESSION, STORE, SessionRows, insert_absent, upsert
from .settings import Settings
from .tables import SchemaProblem, migrate, newest_first, on_branch, tables

if TYPE_CHECKING:
    from ...config import StoreConfig

SWEEP_BATCH = 500


def open_driver(store: StoreConfig) -> SqlAlchemyDriver:
    return SqlAlchemyDriver(store)


class SqlAlchemyDriver(KeepsStructure):
    def __init__(self, store: StoreConfig) -> None:
        self.settings: Settings = store.settings
        self.store = store.identity
        self.retention = store.retention
        self.t = tables(self.settings.table_prefix)
        self._connections = Connections(self.settings, self.t)
        self.db = SessionRows(self.t, self.store, self.retention)
        s, i, k = self.t.sessions, self.t.items, self.t.idempotency
        self._add = insert(i)
        self._touch = (
            update(s)
            .where(s.c.store == STORE, s.c.session_id == SESSION)
            .values(next_seq=bindparam("next"), updated_at=bindparam("now"))
        )
        self._replayed = select(k.c.fingerprint, k.c.appended).where(
            k.c.store == STORE,
            k.c.session_id == SESSION,
            k.c.idempotency_key == bindparam("key"),
            k.c.expires_at > bindparam("now"),
        )
        self._latest: dict[tuple[bool, bool], Select[bytes]] = {}
        self._recorded: Any = None

    async def open(self) -> None:
        """The engine is made on first use, so a database outage at start-up does not
        keep the sidecar from starting."""

    async def migrate(self) -> str:
        try:
            return await self._connections.transact(
                lambda conn: migrate(conn, self.t), migrated=False
            )
        except SchemaProblem as exc:
            raise BackendMisconfigured(str(exc)) from exc

    async def close(self) -> None:
        await self._connections.close()

    async def ping(self) -> None:
        await self._connections.transact(lambda conn: conn.execute(text("SELECT 1")))

    async def append_to(
        self,
        session_id: str,
        branch: str,
        items: Items,
        meta: Sequence[Meta],
        idempotency: Idempotency | None,
    ) -> AppendResult:
        s = self.t.sessions
        now = wall_clock()

        async def append(conn: AsyncConnection) -> AppendResult:
            row = await self.db.lock(conn, session_id)
            if idempotency is not None:
                replayed = await self._replay(conn, session_id, idempotency, now)
                if replayed is not None:
                    return replayed
            first = 0 if row is None else int(row.next_seq)
            if row is not None and row.updated_at <= self.db.live_after(now):
                await self._forget(conn, session_id, expired=True)
                row = None
            if row is None:  # a concurrent first append makes this a duplicate: run again
                values = {"store": self.store, "session_id": session_id}
                await conn.execute(
                    insert(s).values(**values, next_seq=first, updated_at=now, created_at=now)
                )
            await self.db.require_branch(conn, session_id, branch, now)
            newest = await self.db.newest(conn, session_id, branch)
            turn = 0 if newest is None else int(newest.turn)
            rows, anchor = [], None
            for offset, (data, shape) in enumerate(zip(stored(items, first), meta, strict=True)):
                if shape.kind == "user":
                    turn, anchor = turn + 1, first + offset
                rows.append(
                    {
                        "store": self.store,
                        "session_id": session_id,
                        "seq": first + offset,
                        "data": data,
                        "size": len(data),
                        "branch": branch,
                        "turn": turn,
                        "kind": shape.kind,
                        "tool": shape.tool,
                        "created_at": now,
                    }
                )
            await conn.execute(self._add, rows)
            next_seq = {"next": first + len(items), "now": now}
            await conn.execute(self._touch, {**self.db.keys(session_id), **next_seq})
            if self.retention.max_items:
                await self._trim(conn, session_id, branch, self.retention.max_items)
            if idempotency is not None:
                await self._record(conn, session_id, idempotency, len(items), now)
            if anchor is None:
                anchor = await self.db.turn_start(conn, session_id, branch, turn)
            return AppendResult(len(items), replayed=False, turn=turn, anchor=anchor)

        return await self._connections.transact(append)

    async def _replay(
        self, conn: AsyncConnection, session_id: str, idempotency: Idempotency, now: float
    ) -> AppendResult | None:
        which = {**self.db.keys(session_id), "key": idempotency.key, "now": now}
        seen = (await conn.execute(self._replayed, which)).first()
        return None if seen is None else replay_of(idempotency, seen[0], seen[1])

    async def _record(
        self,
        conn: AsyncConnection,
        session_id: str,
        idempotency: Idempotency,
        count: int,
        now: float,
    ) -> None:
        row = {
            "store": self.store,
            "session_id": session_id,
            "idempotency_key": idempotency.key,
            "fingerprint": idempotency.fingerprint,
            "appended": count,
            "expires_at": now + idempotency.ttl_seconds,
        }
        if self._recorded is None:  # the dialect's own upsert, built on first use
            keys: dict[str, Any] = {name: bindparam(f"v_{name}") for name in row}
            self._recorded = upsert(conn, self.t.idempotency, keys)
        await conn.execute(self._recorded, {f"v_{name}": value for name, value in row.items()})

    async def _trim(self, conn: AsyncConnection, session_id: str, branch: str, keep: int) -> None:
        """Drop the branch's items older than its newest `keep` (two statements: MySQL
        cannot delete from a table its own subquery reads)."""
        i = self.t.items
        oldest_kept = (
            await conn.execute(
                select(i.c.seq)
                .where(self.db.of(i, session_id), i.c.branch == branch)
                .order_by(i.c.seq.desc())
                .limit(1)
                .offset(keep - 1)
            )
        ).scalar()
        if oldest_kept is not None:
            await conn.execute(
                delete(i).where(
                    self.db.of(i, session_id), i.c.branch == branch, i.c.seq < oldest_kept
                )
            )

    async def _forget(self, conn: AsyncConnection, session_id: str, *, expired: bool) -> None:
        """Everything of a session; a clear keeps its branch ids reserved, an expiry not."""
        for table in (self.t.items, self.t.usage, self.t.labels, self.t.sessions):
            await conn.execute(delete(table).where(self.db.of(table, session_id)))
        b = self.t.branches
        await conn.execute(
            delete(b).where(self.db.of(b, session_id))
            if expired
            else update(b).where(self.db.of(b, session_id)).values(live=False)
        )

    async def _gather(
        self,
        conn: AsyncConnection,
        where: list[ColumnElement[bool]],
        limit: int | None,
        gathered: Gathered,
    ) -> bool:
        """Items newest first into `gathered`, up to `limit` in all and its byte cap;
        whether the read may go on (to older items elsewhere)."""
        room = None if limit is None else limit - len(gathered)
        cap = None if gathered.max_bytes is None else gathered.max_bytes - gathered.total
        if room == 0:
            return False
        rows = (await conn.execute(newest_first(self.t.items, where, room, cap))).all()
        for (data,) in rows:
            if not gathered.take(data):
                return False
        return room is None or len(rows) < room

    def _latest_read(self, limited: bool, capped: bool) -> Select[bytes]:
        """The latest-items read, with or without `limit` and `cap`, built once each."""
        key = (limited, capped)
        if key not in self._latest:
            i = self.t.items
            where = on_branch(i, STORE, SESSION, BRANCH)
            limit: BindParameter[int] | None = bindparam("limit") if limited else None
            cap: BindParameter[int] | None = bindparam("cap") if capped else None
            self._latest[key] = newest_first(i, where, limit, cap)
        return self._latest[key]

    async def latest_in(
        self, session_id: str, branch: str, limit: int | None, max_bytes: int | None = None
    ) -> list[bytes]:
        now = wall_clock()
        query = self._latest_read(limit is not None, max_bytes is not None)
        bounds = {"limit": limit, "cap": max_bytes}
        params = {
            **self.db.keys(session_id, branch),
            **{k: v for k, v in bounds.items() if v is not None},
        }

        async def read(conn: AsyncConnection) -> list[bytes]:
            await self.db.require_branch(conn, session_id, branch, now)
            gathered = Gathered(max_bytes)
            if limit != 0 and await self.db.alive(conn, session_id, now):
                for (data,) in await _all(conn, query, params):
                    if not gathered.take(data):
                        break
            return gathered.oldest_first()

        return await self._connections.transact(read)

    async def pop_from(self, session_id: str, branch: str, check: Check | None) -> bytes | None:
        s, i, u = self.t.sessions, self.t.items, self.t.usage
        now = wall_clock()

        async def pop(conn: AsyncConnection) -> bytes | None:
            row = await self.db.lock(conn, session_id)
            await self.db.require_branch(conn, session_id, branch, now)
            if row is None or row.updated_at <= self.db.live_after(now):
                return None
            newest = (
                await conn.execute(
                    select(i.c.seq, i.c.data, i.c.turn)
                    .where(self.db.of(i, session_id), i.c.branch == branch)
                    .order_by(i.c.seq.desc())
                    .limit(1)
                )
            ).first()
            if newest is None:
                return None
            if check is not None:
                check(newest.data)
            await conn.execute(delete(i).where(self.db.of(i, session_id), i.c.seq == newest.seq))
            after = await self.db.newest(conn, session_id, branch)
            if after is None or after.turn != newest.turn:
                await conn.execute(
                    delete(u).where(
                        self.db.of(u, session_id), u.c.branch == branch, u.c.turn == newest.turn
                    )
                )
            await conn.execute(update(s).where(self.db.of(s, session_id)).values(updated_at=now))
            data: bytes = newest.data
            return data

        return await self._connections.transact(pop)

    async def clear(self, session_id: str) -> None:
        async def clear(conn: AsyncConnection) -> None:
            await self.db.lock(conn, session_id)
            await self._forget(conn, session_id, expired=False)

        await self._connections.transact(clear)

    async def branch_exists(self, session_id: str, branch: str) -> bool:
        async def exists(conn: AsyncConnection) -> bool:
            try:
                await self.db.require_branch(conn, session_id, branch, wall_clock())
            except BranchNotFound:
                return False
            return True

        return await self._connections.transact(exists)

    async def branches(self, session_id: str) -> list[BranchInfo]:
        i, s = self.t.items, self.t.sessions
        first = func.min(i.c.created_at)
        query = (
            select(
                i.c.branch,
                func.count(),
                func.sum(case((i.c.kind == "user", 1), else_=0)),
                first,
            )
            .join(s, and_(s.c.store == i.c.store, s.c.session_id == i.c.session_id))
            .where(
                self.db.of(i, session_id),
                s.c.updated_at > self.db.live_after(wall_clock()),
                ~i.c.branch.contains("/", autoescape=True),
            )
            .group_by(i.c.branch)
            .order_by(first, i.c.branch)
        )
        rows = await self._connections.transact(lambda conn: _all(conn, query))
        return [BranchInfo(r[0], int(r[1]), int(r[2]), float(r[3])) for r in rows]

    async def create_branch(self, session_id: str, source: str, turn: int, new: str) -> None:
        now = wall_clock()
        await self._connections.transact(
            lambda conn: structure.create_branch(self.db, conn, session_id, source, turn, new, now)
        )

    async def delete_branch(self, session_id: str, branch: str) -> None:
        now = wall_clock()
        await self._connections.transact(
            lambda conn: structure.delete_branch(self.db, conn, session_id, branch, now)
        )

    async def compact(
        self, session_id: str, branch: str, expected: Sequence[bytes], replacement: Items
    ) -> bool:
        now = wall_clock()
        return await self._connections.transact(
            lambda conn: structure.compact(
                self.db, conn, session_id, branch, expected, replacement, now
            )
        )

    async def full_history(
        self, session_id: str, branch: str, limit: int, max_bytes: int | None = None
    ) -> list[bytes]:
        i = self.t.items
        now = wall_clock()

        async def read(conn: AsyncConnection) -> list[bytes]:
            await self.db.require_branch(conn, session_id, branch, now)
            gathered = Gathered(max_bytes)
            if not await self.db.alive(conn, session_id, now):
                return []
            mine = self.db.of(i, session_id)
            live = [mine, i.c.branch == branch, i.c.kind != COMPACTED]
            if await self._gather(conn, live, limit, gathered):
                archive = [mine, i.c.branch == archive_of(branch), i.c.kind != COMPACTED]
                await self._gather(conn, archive, limit, gathered)
            return gathered.oldest_first()

        return await self._connections.transact(read)

    async def user_turns(self, session_id: str, branch: str) -> list[UserTurn]:
        i = self.t.items
        now = wall_clock()

        async def read(conn: AsyncConnection) -> list[UserTurn]:
            await self.db.require_branch(conn, session_id, branch, now)
            if not await self.db.alive(conn, session_id, now):
                return []
            query = (
                select(i.c.turn, i.c.data, i.c.created_at)
                .where(self.db.of(i, session_id), i.c.branch == branch, i.c.kind == "user")
                .order_by(i.c.turn)
            )
            return [UserTurn(int(r[0]), r[1], float(r[2])) for r in await _all(conn, query)]

        return await self._connections.transact(read)

    async def shapes(self, session_id: str, branch: str) -> list[ItemShape]:
        i = self.t.items
        now = wall_clock()

        async def read(conn: AsyncConnection) -> list[ItemShape]:
            await self.db.require_branch(conn, session_id, branch, now)
            if not await self.db.alive(conn, session_id, now):
                return []
            query = (
                select(i.c.turn, i.c.kind, i.c.tool)
                .where(self.db.of(i, session_id), i.c.branch == branch)
                .order_by(i.c.seq)
            )
            return [ItemShape(int(r[0]), r[1], r[2]) for r in await _all(conn, query)]

        return await self._connections.transact(read)

    async def record_usage(
        self, session_id: str, branch: str, turn: int | None, anchor: int | None, usage: Usage
    ) -> int | None:
        now = wall_clock()
        return await self._connections.transact(
            lambda conn: structure.record_usage(
                self.db, conn, session_id, branch, turn, anchor, usage, now
            )
        )

    async def usage(self, session_id: str, branch: str | None) -> list[TurnUsage]:
        u = self.t.usage
        now = wall_clock()

        async def read(conn: AsyncConnection) -> list[TurnUsage]:
            if not await self.db.alive(conn, session_id, now):
                return []
            query = select(
                u.c.branch,
                u.c.turn,
                u.c.requests,
                u.c.input_tokens,
                u.c.output_tokens,
                u.c.total_tokens,
                u.c.input_details,
                u.c.output_details,
            ).where(self.db.of(u, session_id))
            if branch is not None:
                query = query.where(u.c.branch == branch)
            rows = await _all(conn, query.order_by(u.c.branch, u.c.turn))
            return [
                TurnUsage(
                    r[0], int(r[1]), Usage(int(r[2]), int(r[3]), int(r[4]), int(r[5]), r[6], r[7])
                )
                for r in rows
            ]

        return await self._connections.transact(read)

    async def label(self, session_id: str, changes: LabelChanges, most: int) -> SessionInfo:
        now = wall_clock()

        async def forget_expired(conn: AsyncConnection, session_id: str) -> None:
            await self._forget(conn, session_id, expired=True)

        return await self._connections.transact(
            lambda conn: labels.label(self.db, conn, session_id, changes, most, now, forget_expired)
        )

    async def session_info(self, session_id: str) -> SessionInfo | None:
        now = wall_clock()
        return await self._connections.transact(
            lambda conn: labels.session_info(self.db, conn, session_id, now)
        )

    async def find_sessions(self, query: SessionQuery) -> list[SessionInfo]:
        now = wall_clock()
        return await self._connections.transact(
            lambda conn: labels.find_sessions(self.db, conn, query, now)
        )

    async def erase(self, session_id: str, idle_since: float | None = None) -> int | None:
        i, k = self.t.items, self.t.idempotency

        async def erase(conn: AsyncConnection) -> int | None:
            row = await self.db.lock(conn, session_id)
            if idle_since is not None and row is not None and row.updated_at > idle_since:
                return None
            held = (
                await conn.execute(select(func.count()).where(self.db.of(i, session_id)))
            ).scalar()
            await self._forget(conn, session_id, expired=True)
            await conn.execute(delete(k).where(self.db.of(k, session_id)))
            return int(held or 0)

        return await self._connections.transact(erase)

    def _subject(self, subject: str) -> ColumnElement[bool]:
        k = self.t.subject_keys
        return and_(k.c.store == self.store, k.c.subject == subject)

    async def subject_key(self, subject: str) -> bytes | None:
        query = select(self.t.subject_keys.c.wrapped).where(self._subject(subject))

        async def read(conn: AsyncConnection) -> bytes | None:
            return cast(bytes | None, (await conn.execute(query)).scalar_one_or_none())

        wrapped = await self._connections.transact(read)
        return None if wrapped is None else bytes(wrapped)

    async def keep_subject_key(self, subject: str, wrapped: bytes) -> bytes:
        k = self.t.subject_keys
        row = {"store": self.store, "subject": subject, "wrapped": wrapped}

        async def keep(conn: AsyncConnection) -> bytes | None:
            await conn.execute(insert_absent(conn, k, row))
            kept = await conn.execute(select(k.c.wrapped).where(self._subject(subject)))
            return cast(bytes | None, kept.scalar_one_or_none())

        kept = await self._connections.transact(keep)
        if kept is None:  # the racing key was forgotten in between
            return await self.keep_subject_key(subject, wrapped)
        return bytes(kept)

    async def replace_subject_key(self, subject: str, old: bytes, new: bytes) -> bool:
        k = self.t.subject_keys
        change = update(k).where(self._subject(subject), k.c.wrapped == old).values(wrapped=new)
        done = await self._connections.transact(lambda conn: conn.execute(change))
        return bool(done.rowcount)

    async def forget_subject_key(self, subject: str) -> bool:
        forget = delete(self.t.subject_keys).where(self._subject(subject))
        done = await self._connections.transact(lambda conn: conn.execute(forget))
        return bool(done.rowcount)

    async def subject_keys(self, cursor: str, limit: int) -> tuple[list[SubjectKey], str]:
        k = self.t.subject_keys
        query = (
            select(k.c.subject, k.c.wrapped)
            .where(k.c.store == self.store, k.c.subject > cursor)
            .order_by(k.c.subject)
            .limit(limit)
        )
        rows = await self._connections.transact(lambda conn: _all(conn, query))
        keys = [SubjectKey(subject, bytes(wrapped)) for subject, wrapped in rows]
        return keys, keys[-1].subject if len(keys) == limit else ""

    async def record_erasure(self, record: ErasureRecord) -> None:
        await self._connections.transact(lambda conn: labels.record_erasure(self.db, conn, record))

    async def erasures(self, limit: int) -> list[ErasureRecord]:
        return await self._connections.transact(lambda conn: labels.erasures(self.db, conn, limit))

    async def list_sessions(self, prefix: str, after: str | None, limit: int) -> list[str]:
        s = self.t.sessions
        query = (
            select(s.c.session_id)
            .where(
                s.c.store == self.store,
                s.c.session_id >= prefix,
                s.c.session_id > (after or ""),
                s.c.session_id < prefix + "\x7f",
                s.c.updated_at > self.db.live_after(wall_clock()),
            )
            .order_by(s.c.session_id)
            .limit(limit)
        )
        rows = await self._connections.transact(lambda conn: _all(conn, query))
        return [row[0] for row in rows]

    async def sweep(self) -> int:
        s, k = self.t.sessions, self.t.idempotency
        now = wall_clock()
        cutoff = self.db.live_after(now)

        async def sweep(conn: AsyncConnection) -> int:
            await conn.execute(delete(k).where(k.c.store == self.store, k.c.expires_at <= now))
            candidates = select(s.c.session_id).where(
                s.c.store == self.store, s.c.updated_at <= cutoff
            )
            ids = [
                r[0]
                for r in await _all(conn, candidates.order_by(s.c.session_id).limit(SWEEP_BATCH))
            ]
            swept = 0
            for session_id in ids:  # in id order, so two sweeping sidecars never deadlock
                row = await self.db.lock(conn, session_id)
                if row is not None and row.updated_at <= cutoff:
                    await self._forget(conn, session_id, expired=True)
                    swept += 1
            return swept

        return await self._connections.transact(sweep)

    async def rewrite(self, session_id: str, transform: Transform) -> int:
        i = self.t.items

        async def rewrite(conn: AsyncConnection) -> int:
            await self.db.lock(conn, session_id)
            rows = await _all(conn, select(i.c.seq, i.c.data).where(self.db.of(i, session_id)))
            changed = [(seq, new) for seq, data in rows if (new := transform(data)) is not None]
            for seq, new in changed:
                await conn.execute(
                    update(i)
                    .where(self.db.of(i, session_id), i.c.seq == seq)
                    .values(data=new, size=len(new))
                )
            return len(changed)

        return await self._connections.transact(rewrite)


async def _all(
    conn: AsyncConnection, query: Any, params: dict[str, Any] | None = None
) -> list[Any]:
    return list((await conn.execute(query, params)).all())
