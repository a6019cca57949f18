"""The structure writes, each inside its caller's transaction with the session's row
locked: a branch forked and deleted, compaction's atomic replace, a turn's usage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from ..base import (
    COMPACTED,
    MAIN,
    BranchIdUsed,
    Items,
    TurnNotFound,
    Usage,
    archive_of,
    stored_at,
)
from .rows import SessionRows, upsert


async def create_branch(
    db: SessionRows,
    conn: AsyncConnection,
    session_id: str,
    source: str,
    turn: int,
    new: str,
    now: float,
) -> None:
    s, i, b = db.t.sessions, db.t.items, db.t.branches
    row = await db.lock(conn, session_id)
    await db.require_branch(conn, session_id, source, now)
    alive = row is not None and row.updated_at > db.live_after(now)
    start = (
        await conn.execute(
            select(i.c.seq).where(
                db.of(i, session_id),
                i.c.branch == source,
                i.c.kind == "user",
                i.c.turn == turn,
            )
        )
    ).scalar()
    if start is None or not alive:
        raise TurnNotFound(turn)
    taken = (
        await conn.execute(select(b.c.live).where(db.of(b, session_id), b.c.branch == new))
    ).first()
    if taken is not None or new == MAIN:
        raise BranchIdUsed(new)
    first = int(row.next_seq)
    copied = (
        await conn.execute(
            select(i.c.data, i.c.size, i.c.turn, i.c.kind, i.c.tool)
            .where(db.of(i, session_id), i.c.branch == source, i.c.seq < start)
            .order_by(i.c.seq)
        )
    ).all()
    key = {"store": db.store, "session_id": session_id}
    if copied:
        await conn.execute(
            insert(i),
            [
                {**key, "seq": first + n, "data": r.data, "size": r.size, "branch": new}
                | {"turn": r.turn, "kind": r.kind, "tool": r.tool, "created_at": now}
                for n, r in enumerate(copied)
            ],
        )
    await conn.execute(insert(b).values(**key, branch=new, live=True, created_at=now))
    await conn.execute(
        update(s).where(db.of(s, session_id)).values(next_seq=first + len(copied), updated_at=now)
    )


async def delete_branch(
    db: SessionRows, conn: AsyncConnection, session_id: str, branch: str, now: float
) -> None:
    b = db.t.branches
    gone = (branch, archive_of(branch))
    await db.lock(conn, session_id)
    await db.require_branch(conn, session_id, branch, now)
    for table in (db.t.items, db.t.usage):
        await conn.execute(delete(table).where(db.of(table, session_id), table.c.branch.in_(gone)))
    await conn.execute(
        update(b).where(db.of(b, session_id), b.c.branch == branch).values(live=False)
    )


async def compact(
    db: SessionRows,
    conn: AsyncConnection,
    session_id: str,
    branch: str,
    expected: Sequence[bytes],
    replacement: Items,
    now: float,
) -> bool:
    s, i = db.t.sessions, db.t.items
    row = await db.lock(conn, session_id)
    await db.require_branch(conn, session_id, branch, now)
    if row is None or row.updated_at <= db.live_after(now):
        return False
    oldest = (
        await conn.execute(
            select(i.c.seq, i.c.data, i.c.turn, i.c.kind)
            .where(db.of(i, session_id), i.c.branch == branch)
            .order_by(i.c.seq)
            .limit(len(expected))
        )
    ).all()
    if not oldest or [r.data for r in oldest] != list(expected):
        return False
    head = next((n for n, r in enumerate(oldest) if r.kind != COMPACTED), len(oldest))
    first = int(row.next_seq)
    mine = db.of(i, session_id)
    if head:
        await conn.execute(delete(i).where(mine, i.c.seq.in_([r.seq for r in oldest[:head]])))
    for offset, r in enumerate(oldest[head:]):
        await conn.execute(
            update(i)
            .where(mine, i.c.seq == r.seq)
            .values(seq=first + offset, branch=archive_of(branch))
        )
    seqs = [r.seq for r in oldest[: len(replacement)]]
    turn = oldest[-1].turn
    await conn.execute(
        insert(i),
        [
            {"store": db.store, "session_id": session_id, "seq": seq, "data": data}
            | {"size": len(data), "branch": branch, "turn": turn, "kind": COMPACTED, "tool": None}
            | {"created_at": now}
            for seq, data in zip(seqs, stored_at(replacement, seqs), strict=True)
        ],
    )
    await conn.execute(
        update(s)
        .where(db.of(s, session_id))
        .values(next_seq=first + len(oldest) - head, updated_at=now)
    )
    return True


async def record_usage(
    db: SessionRows,
    conn: AsyncConnection,
    session_id: str,
    branch: str,
    turn: int | None,
    anchor: int | None,
    usage: Usage,
    now: float,
) -> int | None:
    i = db.t.items
    row = await db.lock(conn, session_id)
    await db.require_branch(conn, session_id, branch, now)
    if row is None or row.updated_at <= db.live_after(now):
        return None
    at_turn, at_seq = turn, anchor
    if at_turn is None:
        newest = await db.newest(conn, session_id, branch)
        if newest is None:
            return None
        at_turn = int(newest.turn)
        at_seq = await db.turn_start(conn, session_id, branch, at_turn)
    present = (
        await conn.execute(
            select(i.c.seq).where(
                db.of(i, session_id),
                i.c.seq == at_seq,
                i.c.branch == branch,
                i.c.turn == at_turn,
            )
        )
    ).first()
    if present is None:
        return None
    key = {"store": db.store, "session_id": session_id, "branch": branch}
    await conn.execute(upsert(conn, db.t.usage, {**key, "turn": at_turn, **asdict(usage)}))
    return at_turn
