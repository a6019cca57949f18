"""PostgreSQL driver: a sessions table and an items table keyed by (store, session, seq).

Appends and pops lock the session's row first (`SELECT ... FOR UPDATE`), so operations
on one session are serialized and sequence numbers follow commit order: concurrent
batches never interleave or reorder, and two pops never return the same item. An append
is one call of the schema's `append` function, which runs that whole transaction on the
server in one round trip. The latest N items are read backwards along the items'
primary key. Item bytes are `bytea`,
never `jsonb`, which would reorder keys and rewrite numbers.

Each item also carries its branch, user turn, kind and tool; a branch's latest items
are read along (branch, seq) and its user turns along (branch, kind, turn). Branch ids
(reserved forever) and usage per (branch, turn) have tables of their own. Structure
calls lock the session's row like appends do, so a branch is copied whole while writers
wait, and usage is written only if the turn it was captured for still exists.

The schema is made by `convostore migrate` (see `schema.py`), never by a sidecar
serving requests, which only checks its version; a version 1 schema gains the structure
columns in place (its items count as turn 0 of `main`). The pool is made lazily: a
sidecar starts while its database is down and recovers when it returns.
Expired sessions are swept in batches by whichever sidecar holds the sweep lock.
"""

from .driver import PostgresDriver, open_driver
from .settings import Settings

__all__ = ["PostgresDriver", "Settings", "open_driver"]
