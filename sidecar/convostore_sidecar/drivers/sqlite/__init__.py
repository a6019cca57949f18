"""SQLite driver: the embedded default, one file in WAL mode.

Each operation is one function run on a dedicated thread that owns its connection: one
writer thread, whose transactions (`BEGIN IMMEDIATE`) make appends and pops atomic, and
one reader thread, so reads proceed while a write is in progress (WAL). Nothing touches
the file on the event loop: a stalled disk stalls those threads, not the sidecar.
Running a whole operation per thread hop, rather than one hop per statement, keeps a
turn's overhead small. Several sidecar processes may share one file: SQLite's file
locks serialize their writers and `busy_timeout` makes them wait instead of failing.

Items live in a table keyed by (store, session, seq), each with its branch, user turn,
kind and tool: the latest N of a branch are read backwards along (branch, seq), and a
branch's user turns along (branch, kind, turn), so a long session is never read whole
to return a few items or its turns. Branch ids (reserved forever, live or not) and
token usage per (branch, turn) have tables of their own. A compaction moves the items
it replaces to the branch's archive (a branch name with `/`) under fresh sequence
numbers, and gives their old numbers to the summary, which keeps the branch in order.
A file of schema version 1
gains the structure columns on first open; its items count as turn 0 of `main`.
"""

from .driver import SqliteDriver, open_driver
from .settings import Settings

__all__ = ["Settings", "SqliteDriver", "open_driver"]
