"""The tables, as SQLAlchemy Core declares them for every dialect, and their migration.

Item bytes are a binary column (`LONGBLOB` on MySQL and MariaDB, `bytea`, `BLOB`), never
JSON, which would reorder keys. Ids (stores, sessions, branches) are ASCII and compared
byte by byte (`ascii_bin`, `"C"`, SQLite's `BINARY`), so sessions list in byte order
and an index over them stays within MySQL's 3,072 bytes. Migrations are explicit
(`convostore migrate`, the operator), never run by a sidecar that serves: they take a
lock of the dialect's own (MySQL's `GET_LOCK`, PostgreSQL's advisory lock, SQLite's
write lock), so concurrent runs apply each step once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from sqlalchemy import (
    BigInteger,
    BindParameter,
    Boolean,
    Column,
    ColumnElement,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Select,
    String,
    Table,
    Text,
    func,
    select,
    text,
)
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

SCHEMA_VERSION = 1
LOCK_NAME = "convostore-migrate"
LOCK_ID = 0x636F6E766F  # the PostgreSQL driver's migration lock: one migration at a time
LOCK_WAIT = 60


def _id(length: int) -> String:
    """An ASCII id compared byte by byte, on every dialect."""
    return (
        String(length)
        .with_variant(
            mysql.VARCHAR(length, charset="ascii", collation="ascii_bin"), "mysql", "mariadb"
        )
        .with_variant(postgresql.VARCHAR(length, collation="C"), "postgresql")
    )


BYTES = LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
TEXT = Text().with_variant(mysql.TEXT(collation="utf8mb4_bin"), "mysql", "mariadb")
STORE, SESSION, BRANCH = _id(160), _id(1024), _id(160)
LABEL_NAME = _id(63)
LABEL_VALUE = String(256).with_variant(
    mysql.VARCHAR(256, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb"
)
"""Label values are text of up to 256 characters, compared exactly: an index over a
store, a name, a value and a session id stays within MySQL's 3,072 bytes."""
Id: TypeAlias = "str | BindParameter[str]"
Number: TypeAlias = "int | BindParameter[int]"
"""A value, or a parameter bound at execution (for a statement built once)."""
KIND_PREFIX = 64
"""Characters of an item's kind that MySQL indexes (kinds are unbounded text)."""


@dataclass(frozen=True)
class Tables:
    metadata: MetaData
    version: Table
    sessions: Table
    items: Table
    branches: Table
    usage: Table
    idempotency: Table
    labels: Table
    erasures: Table
    subject_keys: Table


def _table(name: str, metadata: MetaData, *parts: Column[Any] | Index) -> Table:
    """A table; on MySQL and MariaDB, InnoDB (row locks, crash safety) in utf8mb4."""
    return Table(name, metadata, *parts, mysql_engine="InnoDB", mysql_charset="utf8mb4")


def tables(prefix: str) -> Tables:
    m = MetaData()
    sessions = _table(
        f"{prefix}sessions",
        m,
        Column("store", STORE, primary_key=True),
        Column("session_id", SESSION, primary_key=True),
        Column("next_seq", BigInteger, nullable=False),
        Column("updated_at", Float(53), nullable=False),
        Column("created_at", Float(53), nullable=False),
        Index(f"{prefix}sessions_updated", "store", "updated_at"),
        Index(f"{prefix}sessions_created", "store", "created_at", "session_id"),
    )
    labels = _table(
        f"{prefix}labels",
        m,
        Column("store", STORE, primary_key=True),
        Column("session_id", SESSION, primary_key=True),
        Column("name", LABEL_NAME, primary_key=True),
        Column("value", LABEL_VALUE, nullable=False),
        Column("created_at", Float(53), nullable=False),
        Index(f"{prefix}labels_find", "store", "name", "value", "created_at", "session_id"),
    )
    items = _table(
        f"{prefix}items",
        m,
        Column("store", STORE, primary_key=True),
        Column("session_id", SESSION, primary_key=True),
        Column("seq", BigInteger, primary_key=True, autoincrement=False),
        Column("data", BYTES, nullable=False),
        Column("size", BigInteger, nullable=False),
        Column("branch", BRANCH, nullable=False),
        Column("turn", BigInteger, nullable=False),
        Column("kind", TEXT, nullable=False),
        Column("tool", TEXT),
        Column("created_at", Float(53), nullable=False),
        Index(f"{prefix}items_branch", "store", "session_id", "branch", "seq", "size"),
        Index(
            f"{prefix}items_kind",
            "store",
            "session_id",
            "branch",
            "kind",
            "turn",
            mysql_length={"kind": KIND_PREFIX},
            mariadb_length={"kind": KIND_PREFIX},
        ),
    )
    branches = _table(
        f"{prefix}branches",
        m,
        Column("store", STORE, primary_key=True),
        Column("session_id", SESSION, primary_key=True),
        Column("branch", BRANCH, primary_key=True),
        Column("live", Boolean, nullable=False),
        Column("created_at", Float(53), nullable=False),
    )
    usage = _table(
        f"{prefix}usage",
        m,
        Column("store", STORE, primary_key=True),
        Column("session_id", SESSION, primary_key=True),
        Column("branch", BRANCH, primary_key=True),
        Column("turn", BigInteger, primary_key=True, autoincrement=False),
        Column("requests", BigInteger, nullable=False),
        Column("input_tokens", BigInteger, nullable=False),
        Column("output_tokens", BigInteger, nullable=False),
        Column("total_tokens", BigInteger, nullable=False),
        Column("input_details", BYTES),
        Column("output_details", BYTES),
    )
    idempotency = _table(
        f"{prefix}idempotency",
        m,
        Column("store", STORE, primary_key=True),
        Column("session_id", SESSION, primary_key=True),
        Column("idempotency_key", _id(255), primary_key=True),
        Column("fingerprint", _id(255), nullable=False),
        Column("appended", Integer, nullable=False),
        Column("expires_at", Float(53), nullable=False),
        Index(f"{prefix}idempotency_expiry", "store", "expires_at"),
    )
    version = _table(
        f"{prefix}schema",
        m,
        Column("version", Integer, primary_key=True, autoincrement=False),
    )
    erasures = _table(
        f"{prefix}erasures",
        m,
        Column("store", STORE, primary_key=True),
        Column("erasure_id", _id(64), primary_key=True),
        Column("at", Float(53), nullable=False),
        Column("label_names", TEXT, nullable=False),
        Column("sessions", BigInteger, nullable=False),
        Column("items", BigInteger, nullable=False),
        Column("complete", Boolean, nullable=False),
        Index(f"{prefix}erasures_at", "store", "at"),
    )
    subject_keys = _table(
        f"{prefix}subject_keys",
        m,
        Column("store", STORE, primary_key=True),
        Column("subject", _id(64), primary_key=True),
        Column("wrapped", BYTES, nullable=False),
    )
    return Tables(
        m, version, sessions, items, branches, usage, idempotency, labels, erasures, subject_keys
    )


def on_branch(items: Table, store: Id, session_id: Id, branch: Id) -> list[ColumnElement[bool]]:
    return [items.c.store == store, items.c.session_id == session_id, items.c.branch == branch]


def newest_first(
    items: Table,
    where: Sequence[ColumnElement[bool]],
    limit: Number | None,
    max_bytes: Number | None,
) -> Select[bytes]:
    """Items newest first, along the (store, session, branch, seq, size) index: the
    newest `limit`, and of those, with `max_bytes`, only as far as the first whose bytes
    take the total past it. The running total is summed by the database over the stored
    `size` column, from the index alone; as it grows with age, what fits is every item
    from one seq on, which the read then takes by range, so no item's bytes are read
    (or sent) beyond the cap. How every read of the latest items goes; the read-pattern
    test explains it."""
    newest = select(items.c.data).where(*where).order_by(items.c.seq.desc())
    if limit is not None:
        newest = newest.limit(limit)
    if max_bytes is None:
        return newest
    sizes = select(items.c.seq, items.c.size).where(*where).order_by(items.c.seq.desc())
    page = (sizes if limit is None else sizes.limit(limit)).subquery()
    total = func.sum(page.c.size).over(order_by=page.c.seq.desc(), rows=(None, 0))
    summed = select(page.c.seq, (total - page.c.size).label("before")).subquery()
    oldest = select(func.min(summed.c.seq)).where(summed.c.before <= max_bytes)
    return newest.where(items.c.seq >= oldest.scalar_subquery())


class SchemaProblem(Exception):
    """The database's tables are missing or newer than this sidecar's."""


async def installed_version(conn: AsyncConnection, t: Tables) -> int | None:
    exists = await conn.run_sync(lambda sync: sync.dialect.has_table(sync, t.version.name))
    if not exists:
        return None
    return (await conn.execute(select(t.version.c.version))).scalar()


def version_problem(version: int | None) -> str | None:
    if version is None:
        return "the store's tables are missing: run `convostore migrate` (or let the operator)"
    if version > SCHEMA_VERSION:
        return (
            f"the store's tables are at version {version}, newer than this sidecar's "
            f"({SCHEMA_VERSION}): upgrade the sidecar"
        )
    return None


async def migrate(conn: AsyncConnection, t: Tables) -> str:
    """Make the tables (under the dialect's lock, in `conn`'s session); one line saying
    what was done."""
    dialect = conn.dialect.name
    if dialect in ("mysql", "mariadb"):
        got = (
            await conn.execute(text("SELECT GET_LOCK(:n, :w)"), {"n": LOCK_NAME, "w": LOCK_WAIT})
        ).scalar()
        if got != 1:
            raise SchemaProblem(f"another migration held the lock for {LOCK_WAIT}s")
    elif dialect == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": LOCK_ID})
    try:
        found = await installed_version(conn, t)
        if found is not None and found > SCHEMA_VERSION:
            raise SchemaProblem(version_problem(found) or "")
        if found == SCHEMA_VERSION:
            return f"tables at version {SCHEMA_VERSION}, nothing to do"
        await conn.run_sync(t.metadata.create_all)
        await conn.execute(t.version.insert().values(version=SCHEMA_VERSION))
        return f"tables made at version {SCHEMA_VERSION}"
    finally:
        if dialect in ("mysql", "mariadb"):
            await conn.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": LOCK_NAME})
