"""Sessions' labels and records: set in the transaction that locks the session's row,
found along the `labels_find` and `sessions_created` indexes (see `drivers/finding`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from ..base import (
    ERASURES_KEPT,
    ErasureRecord,
    LabelChanges,
    SessionInfo,
    SessionQuery,
    TooManyLabels,
    erasure_of,
)
from ..finding import COUNT_CAP, fewest_first
from .rows import SessionRows, upsert

Forget = Callable[[AsyncConnection, str], Awaitable[None]]
"""Forget an expired session whole, in the transaction."""


async def label(
    db: SessionRows,
    conn: AsyncConnection,
    session_id: str,
    changes: LabelChanges,
    most: int,
    now: float,
    forget_expired: Forget,
) -> SessionInfo:
    s, labels = db.t.sessions, db.t.labels
    row = await db.lock(conn, session_id)
    if row is not None and row.updated_at <= db.live_after(now):
        await forget_expired(conn, session_id)
        row = None
    if row is None:  # a concurrent first write makes this a duplicate: run again
        created = now
        values = {"store": db.store, "session_id": session_id}
        await conn.execute(insert(s).values(**values, next_seq=0, updated_at=now, created_at=now))
    else:
        created = row.created_at
        await conn.execute(update(s).where(db.of(s, session_id)).values(updated_at=now))
    for name, value in changes.items():
        if value is None:
            await conn.execute(
                delete(labels).where(db.of(labels, session_id), labels.c.name == name)
            )
        else:
            entry = {"store": db.store, "session_id": session_id, "name": name}
            await conn.execute(
                upsert(conn, labels, {**entry, "value": value, "created_at": created})
            )
    found = (await labels_of(db, conn, [session_id]))[session_id]
    if len(found) > most:
        raise TooManyLabels(most)
    return SessionInfo(session_id, created, now, found)


async def labels_of(
    db: SessionRows, conn: AsyncConnection, session_ids: Sequence[str]
) -> dict[str, dict[str, str]]:
    labels = db.t.labels
    found: dict[str, dict[str, str]] = {session_id: {} for session_id in session_ids}
    rows = await conn.execute(
        select(labels.c.session_id, labels.c.name, labels.c.value).where(
            labels.c.store == db.store, labels.c.session_id.in_(list(session_ids))
        )
    )
    for session_id, name, value in rows:
        found[session_id][name] = value
    return found


async def session_info(
    db: SessionRows, conn: AsyncConnection, session_id: str, now: float
) -> SessionInfo | None:
    s = db.t.sessions
    row = (
        await conn.execute(
            select(s.c.created_at, s.c.updated_at).where(
                db.of(s, session_id), s.c.updated_at > db.live_after(now)
            )
        )
    ).first()
    if row is None:
        return None
    found = (await labels_of(db, conn, [session_id]))[session_id]
    return SessionInfo(session_id, row.created_at, row.updated_at, found)


async def find_sessions(
    db: SessionRows, conn: AsyncConnection, query: SessionQuery, now: float
) -> list[SessionInfo]:
    s, labels = db.t.sessions, db.t.labels
    joined: Any
    if len(query.labels) > 1:
        counts = [await _count(db, conn, *label) for label in query.labels.items()]
        query = fewest_first(query, counts)
    if query.labels:
        (name, value), *others = query.labels.items()
        f = labels.alias("f")
        created, session = f.c.created_at, f.c.session_id
        joined = f.join(s, and_(s.c.store == f.c.store, s.c.session_id == f.c.session_id))
        where: list[ColumnElement[bool]] = [
            f.c.store == db.store,
            f.c.name == name,
            f.c.value == value,
        ]
    else:
        others = []
        created, session, joined = s.c.created_at, s.c.session_id, s
        where = [s.c.store == db.store]
    where.append(s.c.updated_at > db.live_after(now))
    if query.cursor is not None:
        at, last = query.cursor
        where.append(or_(created < at, and_(created == at, session < last)))
    for column, bound, after in (
        (created, query.created_after, True),
        (created, query.created_before, False),
        (s.c.updated_at, query.updated_after, True),
        (s.c.updated_at, query.updated_before, False),
    ):
        if bound is not None:
            where.append(column > bound if after else column < bound)
    for name, value in others:  # a scalar subquery: a probe per row, never a join
        o = labels.alias()
        carried = select(o.c.value).where(
            o.c.store == s.c.store, o.c.session_id == s.c.session_id, o.c.name == name
        )
        where.append(carried.scalar_subquery() == value)
    statement = (
        select(s.c.session_id, created, s.c.updated_at)
        .select_from(joined)
        .where(*where)
        .order_by(created.desc(), session.desc())
        .limit(query.limit)
    )
    rows = (await conn.execute(statement)).all()
    found = await labels_of(db, conn, [row[0] for row in rows]) if rows else {}
    return [SessionInfo(sid, at, updated, found[sid]) for sid, at, updated in rows]


async def _count(db: SessionRows, conn: AsyncConnection, name: str, value: str) -> int:
    labels = db.t.labels
    carrying = (
        select(labels.c.session_id)
        .where(labels.c.store == db.store, labels.c.name == name, labels.c.value == value)
        .limit(COUNT_CAP)
        .subquery()
    )
    return int((await conn.execute(select(func.count()).select_from(carrying))).scalar() or 0)


async def record_erasure(db: SessionRows, conn: AsyncConnection, record: ErasureRecord) -> None:
    e = db.t.erasures
    values = {
        "store": db.store,
        "erasure_id": record.erasure_id,
        "at": record.at,
        "label_names": ",".join(record.label_names),
        "sessions": record.sessions,
        "items": record.items,
        "complete": record.complete,
    }
    await conn.execute(insert(e).values(values))
    oldest_kept = (
        await conn.execute(
            select(e.c.at)
            .where(e.c.store == db.store)
            .order_by(e.c.at.desc())
            .limit(1)
            .offset(ERASURES_KEPT - 1)
        )
    ).scalar()
    if oldest_kept is not None:
        await conn.execute(delete(e).where(e.c.store == db.store, e.c.at < oldest_kept))


async def erasures(db: SessionRows, conn: AsyncConnection, limit: int) -> list[ErasureRecord]:
    e = db.t.erasures
    rows = await conn.execute(
        select(e.c.erasure_id, e.c.at, e.c.label_names, e.c.sessions, e.c["items"], e.c.complete)
        .where(e.c.store == db.store)
        .order_by(e.c.at.desc())
        .limit(limit)
    )
    return [erasure_of(*row) for row in rows]
