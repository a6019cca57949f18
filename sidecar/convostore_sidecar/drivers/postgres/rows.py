"""The checks every transaction makes on a session's row, on the connection it runs on."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from ..base import MAIN, BranchNotFound


@dataclass(frozen=True)
class SessionRows:
    """A store's sessions in schema `s`, live for `ttl` seconds since their last write
    (for ever when None)."""

    s: str
    store: str
    ttl: float | None

    async def lock(self, conn: asyncpg.Connection, session_id: str) -> bool:
        """Lock the session's row; False when it does not exist or has expired."""
        expired = await conn.fetchval(
            f"SELECT ($3::float8 IS NOT NULL AND"
            f" updated_at <= now() - make_interval(secs => $3::float8))"
            f" FROM {self.s}.sessions WHERE store = $1 AND session_id = $2 FOR UPDATE",
            self.store,
            session_id,
            self.ttl,
        )
        return expired is False

    async def alive(self, conn: asyncpg.Connection, session_id: str) -> bool:
        alive: bool | None = await conn.fetchval(
            f"SELECT ($3::float8 IS NULL OR updated_at > now() - make_interval(secs => $3))"
            f" FROM {self.s}.sessions WHERE store = $1 AND session_id = $2",
            self.store,
            session_id,
            self.ttl,
        )
        return bool(alive)

    async def require_branch(self, conn: asyncpg.Connection, session_id: str, branch: str) -> None:
        if branch == MAIN:
            return
        live = await conn.fetchval(
            f"SELECT b.live FROM {self.s}.branches AS b"
            f" JOIN {self.s}.sessions AS s USING (store, session_id)"
            f" WHERE b.store = $1 AND b.session_id = $2 AND b.branch = $3"
            f" AND ($4::float8 IS NULL"
            f"  OR s.updated_at > now() - make_interval(secs => $4::float8))",
            self.store,
            session_id,
            branch,
            self.ttl,
        )
        if not live:
            raise BranchNotFound(branch)
