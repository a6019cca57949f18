"""The checks every transaction makes on a session's row: its lock, whether it is alive,
whether a branch is live, where the newest item and a turn's start are.

The statements every append and read runs are built once, with bound parameters
(`STORE`, `SESSION`, `BRANCH`): SQLAlchemy then reuses their compiled form rather than
building and keying a new expression per call, which was a quarter of the sidecar's CPU
on this backend."""

from __future__ import annotations

from typing import Any

from sqlalchemy import BindParameter, ColumnElement, Table, and_, bindparam, select
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from ..base import MAIN, BranchNotFound, Retention
from .tables import Tables

# not the columns' names, which an UPDATE's SET clause keeps for itself
STORE: BindParameter[str] = bindparam("b_store")
SESSION: BindParameter[str] = bindparam("b_session")
BRANCH: BindParameter[str] = bindparam("b_branch")


class SessionRows:
    """One store's rows in the tables, as each operation's transaction reads them."""

    def __init__(self, t: Tables, store: str, retention: Retention) -> None:
        self.t, self.store, self.retention = t, store, retention
        s, i = t.sessions, t.items
        row = (s.c.store == STORE, s.c.session_id == SESSION)
        self._lock = (
            select(s.c.next_seq, s.c.updated_at, s.c.created_at).where(*row).with_for_update()
        )
        self._updated = select(s.c.updated_at).where(*row)
        self._newest = (
            select(i.c.seq, i.c.turn)
            .where(i.c.store == STORE, i.c.session_id == SESSION, i.c.branch == BRANCH)
            .order_by(i.c.seq.desc())
            .limit(1)
        )

    def keys(self, session_id: str, branch: str | None = None) -> dict[str, str]:
        """The values of `STORE`, `SESSION` and (given) `BRANCH`."""
        keys = {"b_store": self.store, "b_session": session_id}
        return keys if branch is None else {**keys, "b_branch": branch}

    def live_after(self, now: float) -> float:
        """Sessions written after this moment have not expired: without a TTL, the epoch
        (a finite bound, which every dialect can compare with)."""
        ttl = self.retention.ttl_seconds
        return now - ttl if ttl else 0.0

    def of(self, table: Table, session_id: str) -> ColumnElement[bool]:
        return and_(table.c.store == self.store, table.c.session_id == session_id)

    async def lock(self, conn: AsyncConnection, session_id: str) -> Any:
        """The session's row (next sequence number, last write, creation), locked until
        commit."""
        return (await conn.execute(self._lock, self.keys(session_id))).first()

    async def alive(self, conn: AsyncConnection, session_id: str, now: float) -> bool:
        updated = (await conn.execute(self._updated, self.keys(session_id))).scalar()
        return updated is not None and updated > self.live_after(now)

    async def require_branch(
        self, conn: AsyncConnection, session_id: str, branch: str, now: float
    ) -> None:
        if branch == MAIN:
            return
        b, s = self.t.branches, self.t.sessions
        live = (
            await conn.execute(
                select(b.c.live)
                .join(s, and_(s.c.store == b.c.store, s.c.session_id == b.c.session_id))
                .where(
                    self.of(b, session_id),
                    b.c.branch == branch,
                    b.c.live.is_(True),
                    s.c.updated_at > self.live_after(now),
                )
            )
        ).first()
        if live is None:
            raise BranchNotFound(branch)

    async def newest(self, conn: AsyncConnection, session_id: str, branch: str) -> Any:
        return (await conn.execute(self._newest, self.keys(session_id, branch))).first()

    async def turn_start(
        self, conn: AsyncConnection, session_id: str, branch: str, turn: int
    ) -> int | None:
        """The sequence number of the turn's first item: its user message, or for turn 0
        (items before any user message) the branch's first item."""
        i = self.t.items
        query = select(i.c.seq).where(self.of(i, session_id), i.c.branch == branch)
        if turn == 0:
            query = query.order_by(i.c.seq).limit(1)
        else:
            query = query.where(i.c.kind == "user", i.c.turn == turn)
        seq = (await conn.execute(query)).scalar()
        return None if seq is None else int(seq)


def upsert(conn: AsyncConnection, table: Table, row: dict[str, Any]) -> Any:
    """Insert `row`, or overwrite the row with its primary key, in the dialect's own
    statement."""
    keys = [c.name for c in table.primary_key.columns]
    dialect = conn.dialect.name
    if dialect in ("mysql", "mariadb"):
        mine = mysql.insert(table).values(row)
        return mine.on_duplicate_key_update({c: mine.inserted[c] for c in row if c not in keys})
    module = postgresql if dialect == "postgresql" else sqlite
    other = module.insert(table).values(row)
    return other.on_conflict_do_update(
        index_elements=keys, set_={c: other.excluded[c] for c in row if c not in keys}
    )


def insert_absent(conn: AsyncConnection, table: Table, row: dict[str, Any]) -> Any:
    """Insert `row` unless a row with its primary key is there, in the dialect's own
    statement (so a racing insert is no error)."""
    if conn.dialect.name in ("mysql", "mariadb"):
        mine = mysql.insert(table).values(row)
        first = table.primary_key.columns.values()[0].name
        return mine.on_duplicate_key_update({first: mine.inserted[first]})
    module = postgresql if conn.dialect.name == "postgresql" else sqlite
    return module.insert(table).values(row).on_conflict_do_nothing()
