"""What the database says, by dialect, as the driver reports it: a cause that may pass
(503 naming it), the store's own settings refused, or a deadlock worth one more try."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.exc import DBAPIError, InterfaceError, InternalError, OperationalError

from ..base import Cause

MISCONFIGURED = "misconfigured"
RETRY = "retry"
"""A deadlock or serialization failure, or a row two first writes to one session both
inserted: the transaction is rolled back whole, so running it again is safe (and the
second run finds the row)."""


@dataclass(frozen=True)
class Codes:
    causes: dict[object, Cause]
    misconfigured: frozenset[object]
    retry: frozenset[object]


MYSQL = Codes(
    causes={
        1040: Cause.TOO_MANY_CONNECTIONS,  # max_connections
        1203: Cause.TOO_MANY_CONNECTIONS,  # the user's max_user_connections
        1205: Cause.LOCK_TIMEOUT,  # innodb_lock_wait_timeout
        1290: Cause.READ_ONLY,  # --read-only (a replica, or a primary being demoted)
        1836: Cause.READ_ONLY,
        1792: Cause.READ_ONLY,  # a read-only transaction
        1021: Cause.DISK_FULL,
        1114: Cause.DISK_FULL,  # the table is full: its tablespace cannot grow
        1037: Cause.OUT_OF_MEMORY,
        1038: Cause.OUT_OF_MEMORY,
        1041: Cause.OUT_OF_MEMORY,
    },
    misconfigured=frozenset(
        {
            1044,  # no access to the database
            1045,  # the user or password is refused
            1049,  # no such database
            1142,  # a statement the user may not run
            1143,  # a column the user may not use
            1146,  # a table is gone
        }
    ),
    retry=frozenset({1213, 1062}),  # deadlock, duplicate key
)
POSTGRESQL = Codes(
    causes={
        "53300": Cause.TOO_MANY_CONNECTIONS,
        "55P03": Cause.LOCK_TIMEOUT,
        "25006": Cause.READ_ONLY,
        "53100": Cause.DISK_FULL,
        "53200": Cause.OUT_OF_MEMORY,
    },
    misconfigured=frozenset({"3D000", "28000", "28P01", "42501", "3F000", "42P01"}),
    retry=frozenset({"40P01", "40001", "23505"}),
)
SQLITE = Codes(
    causes={5: Cause.LOCK_TIMEOUT, 6: Cause.LOCK_TIMEOUT, 13: Cause.DISK_FULL, 8: Cause.READ_ONLY},
    misconfigured=frozenset({14}),  # the file cannot be opened
    retry=frozenset({19}),  # a constraint (the duplicate key)
)
BY_DIALECT = {"mysql": MYSQL, "mariadb": MYSQL, "postgresql": POSTGRESQL, "sqlite": SQLITE}


def code_of(dialect: str, error: DBAPIError) -> object:
    """The database's own code: PostgreSQL's SQLSTATE, SQLite's primary result code,
    else (MySQL, MariaDB) the server's error number."""
    orig = error.orig
    if dialect == "postgresql":
        return getattr(orig, "sqlstate", None)
    if dialect == "sqlite":
        code = getattr(orig, "sqlite_errorcode", None)
        return code & 0xFF if isinstance(code, int) else None
    args = getattr(orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def classify(dialect: str, error: DBAPIError) -> Cause | str | None:
    """`RETRY`, `MISCONFIGURED`, the cause of a refusal or outage, or None for an error
    that is no backend's fault (a bug: it propagates)."""
    codes = BY_DIALECT.get(dialect, MYSQL)
    code = code_of(dialect, error)
    if code in codes.retry:
        return RETRY
    if code in codes.misconfigured:
        return MISCONFIGURED
    if code in codes.causes:
        return codes.causes[code]
    if error.connection_invalidated or isinstance(
        error, OperationalError | InterfaceError | InternalError
    ):
        return Cause.UNAVAILABLE
    return None
