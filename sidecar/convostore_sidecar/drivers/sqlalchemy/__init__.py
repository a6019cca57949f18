"""The `sqlalchemy` driver: MySQL, MariaDB, PostgreSQL, SQLite and any database with a
SQLAlchemy asyncio dialect, through SQLAlchemy Core (not the ORM), configured by a URL
as the Agents SDK's `SQLAlchemySession.from_url` is.

The tables mirror the PostgreSQL driver's (sessions, items with their branch, turn,
kind and tool, branches, usage, idempotency keys; see `tables.py`), and so do the
guarantees: every write locks its session's row first, so batches never interleave and
two pops never take the same item; item bytes are stored as given. The logic runs in
the sidecar (several statements per call, one transaction), not in the database, so
the same code serves every dialect.
"""

from .driver import SqlAlchemyDriver, open_driver
from .settings import Settings

__all__ = ["Settings", "SqlAlchemyDriver", "open_driver"]
