"""Sessions' labels and records in PostgreSQL: set in one transaction that locks the
session's row, found along the `session_labels_find` and `sessions_created` indexes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg

from ..base import (
    ERASURES_KEPT,
    ErasureRecord,
    LabelChanges,
    SessionInfo,
    SessionQuery,
    TooManyLabels,
    erasure_of,
)
from ..finding import Bind, Dialect, count_sql, fewest_first, find_sql
from .rows import SessionRows

EPOCH = "extract(epoch from {})::float8"


def _instant(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


async def label(
    conn: asyncpg.Connection, rows: SessionRows, session_id: str, changes: LabelChanges, most: int
) -> SessionInfo:
    s, store = rows.s, rows.store
    async with conn.transaction():
        await conn.execute(
            f"INSERT INTO {s}.sessions VALUES ($1, $2, 0, now()) ON CONFLICT DO NOTHING",
            store,
            session_id,
        )
        if not await rows.lock(conn, session_id):  # expired: begins again, empty
            await conn.execute(
                f"DELETE FROM {s}.sessions WHERE store = $1 AND session_id = $2",
                store,
                session_id,
            )
            await conn.execute(
                f"DELETE FROM {s}.branches WHERE store = $1 AND session_id = $2",
                store,
                session_id,
            )
            await conn.execute(
                f"INSERT INTO {s}.sessions VALUES ($1, $2, 0, now())", store, session_id
            )
        row = await conn.fetchrow(
            f"UPDATE {s}.sessions SET updated_at = now() WHERE store = $1 AND session_id = $2"
            f" RETURNING created_at, {EPOCH.format('created_at')} AS created,"
            f" {EPOCH.format('updated_at')} AS updated",
            store,
            session_id,
        )
        removed = [name for name, value in changes.items() if value is None]
        await conn.execute(
            f"DELETE FROM {s}.session_labels WHERE store = $1 AND session_id = $2"
            " AND name = ANY($3::text[])",
            store,
            session_id,
            removed,
        )
        added = [(name, value) for name, value in changes.items() if value is not None]
        await conn.executemany(
            f"INSERT INTO {s}.session_labels AS l VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT (store, session_id, name) DO UPDATE SET value = EXCLUDED.value",
            [(store, session_id, name, value, row["created_at"]) for name, value in added],
        )
        labels = (await labels_of(conn, rows, [session_id]))[session_id]
        if len(labels) > most:
            raise TooManyLabels(most)
    return SessionInfo(session_id, row["created"], row["updated"], labels)


async def labels_of(
    conn: asyncpg.Connection, rows: SessionRows, session_ids: Sequence[str]
) -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {session_id: {} for session_id in session_ids}
    for session_id, name, value in await conn.fetch(
        f"SELECT session_id, name, value FROM {rows.s}.session_labels"
        " WHERE store = $1 AND session_id = ANY($2::text[])",
        rows.store,
        list(session_ids),
    ):
        found[session_id][name] = value
    return found


async def session_info(
    conn: asyncpg.Connection, rows: SessionRows, session_id: str
) -> SessionInfo | None:
    row = await conn.fetchrow(
        f"SELECT {EPOCH.format('created_at')}, {EPOCH.format('updated_at')}"
        f" FROM {rows.s}.sessions WHERE store = $1 AND session_id = $2"
        " AND ($3::float8 IS NULL OR updated_at > now() - make_interval(secs => $3::float8))",
        rows.store,
        session_id,
        rows.ttl,
    )
    if row is None:
        return None
    labels = (await labels_of(conn, rows, [session_id]))[session_id]
    return SessionInfo(session_id, row[0], row[1], labels)


async def find_sessions(
    conn: asyncpg.Connection, rows: SessionRows, query: SessionQuery
) -> list[SessionInfo]:
    params: list[object] = []

    def bind(value: object) -> str:
        params.append(value)
        return f"${len(params)}"

    def alive(bind: Bind) -> str:
        ttl = bind(rows.ttl)
        return f"s.updated_at > now() - make_interval(secs => {ttl}::float8)"

    dialect = Dialect(f"{rows.s}.sessions", f"{rows.s}.session_labels", EPOCH, _instant)
    if len(query.labels) > 1:
        counts = [await _count(conn, dialect, rows.store, *label) for label in query.labels.items()]
        query = fewest_first(query, counts)
    sql = find_sql(query, dialect, bind, rows.store, None if rows.ttl is None else alive)
    async with conn.transaction():
        found = await conn.fetch(sql, *params)
        labels = await labels_of(conn, rows, [row[0] for row in found])
    return [SessionInfo(sid, created, updated, labels[sid]) for sid, created, updated in found]


async def _count(conn: asyncpg.Connection, d: Dialect, store: str, name: str, value: str) -> int:
    params: list[object] = []

    def bind(param: object) -> str:
        params.append(param)
        return f"${len(params)}"

    return int(await conn.fetchval(count_sql(d, bind, store, name, value), *params))


async def record_erasure(
    conn: asyncpg.Connection, rows: SessionRows, record: ErasureRecord
) -> None:
    s = rows.s
    async with conn.transaction():
        await conn.execute(
            f"INSERT INTO {s}.erasures VALUES ($1, $2, $3, $4, $5, $6, $7)",
            rows.store,
            record.erasure_id,
            _instant(record.at),
            ",".join(record.label_names),
            record.sessions,
            record.items,
            record.complete,
        )
        await conn.execute(
            f"DELETE FROM {s}.erasures WHERE store = $1 AND at < (SELECT at FROM {s}.erasures"
            " WHERE store = $1 ORDER BY at DESC LIMIT 1 OFFSET $2)",
            rows.store,
            ERASURES_KEPT - 1,
        )


async def erasures(conn: asyncpg.Connection, rows: SessionRows, limit: int) -> list[ErasureRecord]:
    found = await conn.fetch(
        f"SELECT erasure_id, {EPOCH.format('at')}, label_names, sessions, items, complete"
        f" FROM {rows.s}.erasures WHERE store = $1 ORDER BY at DESC LIMIT $2",
        rows.store,
        limit,
    )
    return [erasure_of(*row) for row in found]
