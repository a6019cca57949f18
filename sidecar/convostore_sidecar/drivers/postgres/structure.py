"""The structure writes: forking and deleting branches, compaction's atomic replace, usage.

Each is one transaction that locks the session's row first, as appends do: a branch is
copied whole while writers wait, a compaction replaces exactly the items it read, and
usage is written only if the turn it was captured for still exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple

import asyncpg

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
from .rows import SessionRows


async def create_branch(
    conn: asyncpg.Connection, rows: SessionRows, session_id: str, source: str, turn: int, new: str
) -> None:
    s, store = rows.s, rows.store
    async with conn.transaction():
        alive = await rows.lock(conn, session_id)
        await rows.require_branch(conn, session_id, source)
        start = None
        if alive:
            start = await conn.fetchval(
                f"SELECT seq FROM {s}.items WHERE store = $1 AND session_id = $2"
                f" AND branch = $3 AND kind = 'user' AND turn = $4",
                store,
                session_id,
                source,
                turn,
            )
        if start is None:
            raise TurnNotFound(turn)
        taken = await conn.fetchval(
            f"SELECT 1 FROM {s}.branches WHERE store = $1 AND session_id = $2 AND branch = $3",
            store,
            session_id,
            new,
        )
        if taken or new == MAIN:
            raise BranchIdUsed(new)
        copied = await conn.execute(
            f"INSERT INTO {s}.items (store, session_id, seq, data, branch, turn, kind, tool)"
            f" SELECT store, session_id,"
            f"  (SELECT next_seq FROM {s}.sessions WHERE store = $1 AND session_id = $2)"
            f"  + row_number() OVER (ORDER BY seq) - 1, data, $4, turn, kind, tool"
            f" FROM {s}.items WHERE store = $1 AND session_id = $2 AND branch = $3"
            f" AND seq < $5",
            store,
            session_id,
            source,
            new,
            start,
        )
        await conn.execute(
            f"INSERT INTO {s}.branches VALUES ($1, $2, $3, true, now())", store, session_id, new
        )
        await conn.execute(
            f"UPDATE {s}.sessions SET next_seq = next_seq + $3, updated_at = now()"
            f" WHERE store = $1 AND session_id = $2",
            store,
            session_id,
            int(copied.split()[-1]),
        )


async def delete_branch(
    conn: asyncpg.Connection, rows: SessionRows, session_id: str, branch: str
) -> None:
    key = (rows.store, session_id, branch)
    async with conn.transaction():
        await rows.lock(conn, session_id)
        await rows.require_branch(conn, session_id, branch)
        for table in ("items", "usage"):
            await conn.execute(
                f"DELETE FROM {rows.s}.{table} WHERE store = $1 AND session_id = $2"
                f" AND branch IN ($3, $4)",
                *key,
                archive_of(branch),
            )
        await conn.execute(
            f"UPDATE {rows.s}.branches SET live = false"
            f" WHERE store = $1 AND session_id = $2 AND branch = $3",
            *key,
        )


async def compact(
    conn: asyncpg.Connection,
    rows: SessionRows,
    session_id: str,
    branch: str,
    expected: Sequence[bytes],
    replacement: Items,
) -> bool:
    """Replace the branch's first items, if they are still `expected`, with `replacement`;
    the replaced ones move to the branch's archive (summaries placed before dropped)."""
    s, key = rows.s, (rows.store, session_id)
    async with conn.transaction():
        alive = await rows.lock(conn, session_id)
        await rows.require_branch(conn, session_id, branch)
        found = await conn.fetch(
            f"SELECT seq, data, turn, kind FROM {s}.items WHERE store = $1"
            f" AND session_id = $2 AND branch = $3 ORDER BY seq LIMIT $4",
            *key,
            branch,
            len(expected),
        )
        if not alive or not found or [row["data"] for row in found] != list(expected):
            return False
        head = next((i for i, row in enumerate(found) if row["kind"] != COMPACTED), len(found))
        seqs = [row["seq"] for row in found]
        first = await conn.fetchval(
            f"UPDATE {s}.sessions SET next_seq = next_seq + $3, updated_at = now()"
            f" WHERE store = $1 AND session_id = $2 RETURNING next_seq - $3",
            *key,
            len(found) - head,
        )
        await conn.execute(
            f"DELETE FROM {s}.items WHERE store = $1 AND session_id = $2"
            f" AND seq = ANY($3::bigint[])",
            *key,
            seqs[:head],
        )
        await conn.execute(
            f"UPDATE {s}.items AS i SET seq = m.new, branch = $3"
            f" FROM unnest($4::bigint[], $5::bigint[]) AS m(old, new)"
            f" WHERE i.store = $1 AND i.session_id = $2 AND i.seq = m.old",
            *key,
            archive_of(branch),
            seqs[head:],
            list(range(first, first + len(found) - head)),
        )
        placed = seqs[: len(replacement)]
        await conn.execute(
            f"INSERT INTO {s}.items (store, session_id, seq, data, branch, turn, kind)"
            f" SELECT $1, $2, m.seq, m.data, $3, $4, $5"
            f" FROM unnest($6::bigint[], $7::bytea[]) AS m(seq, data)",
            *key,
            branch,
            found[-1]["turn"],
            COMPACTED,
            placed,
            stored_at(replacement, placed),
        )
        return True


async def record_usage(
    conn: asyncpg.Connection,
    rows: SessionRows,
    session_id: str,
    branch: str,
    turn: int | None,
    anchor: int | None,
    usage: Usage,
) -> int | None:
    """Usage for `turn` (the branch's newest turn when None), if the item that began it
    (`anchor`) is still there; the turn written, or None."""
    s, store = rows.s, rows.store
    async with conn.transaction():
        alive = await rows.lock(conn, session_id)
        await rows.require_branch(conn, session_id, branch)
        if not alive:
            return None
        target, start = turn, anchor
        if target is None:
            target = await conn.fetchval(
                f"SELECT turn FROM {s}.items WHERE store = $1 AND session_id = $2"
                f" AND branch = $3 ORDER BY seq DESC LIMIT 1",
                store,
                session_id,
                branch,
            )
            if target is None:
                return None
            start = await conn.fetchval(
                f"SELECT {s}.turn_start($1, $2, $3, $4)", store, session_id, branch, target
            )
        present = await conn.fetchval(
            f"SELECT 1 FROM {s}.items WHERE store = $1 AND session_id = $2"
            f" AND seq = $3 AND branch = $4 AND turn = $5",
            store,
            session_id,
            start,
            branch,
            target,
        )
        if not present:
            return None
        await conn.execute(
            f"INSERT INTO {s}.usage VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
            f" ON CONFLICT (store, session_id, branch, turn) DO UPDATE SET"
            f" requests = EXCLUDED.requests, input_tokens = EXCLUDED.input_tokens,"
            f" output_tokens = EXCLUDED.output_tokens, total_tokens = EXCLUDED.total_tokens,"
            f" input_details = EXCLUDED.input_details,"
            f" output_details = EXCLUDED.output_details",
            store,
            session_id,
            branch,
            target,
            *astuple(usage),
        )
        return int(target)
