"""The SQLite file's tables and indexes, and the statements the reads use."""

from __future__ import annotations

SCHEMA_VERSION = 3
SCHEMA = """
CREATE TABLE IF NOT EXISTS convostore_schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS convostore_sessions (
    store TEXT NOT NULL, session_id TEXT NOT NULL,
    next_seq INTEGER NOT NULL, updated_at REAL NOT NULL, created_at REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (store, session_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS convostore_sessions_updated
    ON convostore_sessions (store, updated_at);
CREATE TABLE IF NOT EXISTS convostore_erasures (
    store TEXT NOT NULL, erasure_id TEXT NOT NULL, at REAL NOT NULL, label_names TEXT NOT NULL,
    sessions INTEGER NOT NULL, items INTEGER NOT NULL, complete INTEGER NOT NULL,
    PRIMARY KEY (store, erasure_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS convostore_erasures_at ON convostore_erasures (store, at);
CREATE TABLE IF NOT EXISTS convostore_subject_keys (
    store TEXT NOT NULL, subject TEXT NOT NULL, wrapped BLOB NOT NULL,
    PRIMARY KEY (store, subject)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS convostore_labels (
    store TEXT NOT NULL, session_id TEXT NOT NULL, name TEXT NOT NULL, value TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (store, session_id, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS convostore_items (
    store TEXT NOT NULL, session_id TEXT NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL,
    branch TEXT NOT NULL DEFAULT 'main', turn INTEGER NOT NULL DEFAULT 0,
    kind TEXT NOT NULL DEFAULT 'other', tool TEXT, created_at REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (store, session_id, seq)
);
CREATE TABLE IF NOT EXISTS convostore_idempotency (
    store TEXT NOT NULL, session_id TEXT NOT NULL, key TEXT NOT NULL,
    fingerprint TEXT NOT NULL, appended INTEGER NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (store, session_id, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS convostore_branches (
    store TEXT NOT NULL, session_id TEXT NOT NULL, branch TEXT NOT NULL,
    live INTEGER NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (store, session_id, branch)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS convostore_usage (
    store TEXT NOT NULL, session_id TEXT NOT NULL, branch TEXT NOT NULL, turn INTEGER NOT NULL,
    requests INTEGER NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
    total_tokens INTEGER NOT NULL, input_details BLOB, output_details BLOB,
    PRIMARY KEY (store, session_id, branch, turn)
) WITHOUT ROWID;
"""
# What schema version 1 lacks: its items gain these columns, then the indexes follow.
# Version 2's sessions gain their creation time (taken as their last write's).
STRUCTURE_COLUMNS = (
    "branch TEXT NOT NULL DEFAULT 'main'",
    "turn INTEGER NOT NULL DEFAULT 0",
    "kind TEXT NOT NULL DEFAULT 'other'",
    "tool TEXT",
    "created_at REAL NOT NULL DEFAULT 0",
)
SESSION_CREATED = "created_at REAL NOT NULL DEFAULT 0"
INDEXES = """
CREATE INDEX IF NOT EXISTS convostore_sessions_created
    ON convostore_sessions (store, created_at, session_id);
CREATE INDEX IF NOT EXISTS convostore_labels_find
    ON convostore_labels (store, name, value, created_at, session_id);
CREATE INDEX IF NOT EXISTS convostore_items_branch
    ON convostore_items (store, session_id, branch, seq);
CREATE INDEX IF NOT EXISTS convostore_items_kind
    ON convostore_items (store, session_id, branch, kind, turn);
"""

LATEST_SQL = """
SELECT i.data FROM convostore_items AS i JOIN convostore_sessions AS s
  ON s.store = i.store AND s.session_id = i.session_id
WHERE i.store = ? AND i.session_id = ? AND i.branch = ? AND s.updated_at > ?
ORDER BY i.seq DESC LIMIT ?
"""
USER_TURNS_SQL = """
SELECT turn, data, created_at FROM convostore_items
WHERE store = ? AND session_id = ? AND branch = ? AND kind = 'user' ORDER BY turn
"""
USAGE_SQL = """
SELECT branch, turn, requests, input_tokens, output_tokens, total_tokens, input_details,
       output_details
FROM convostore_usage WHERE store = ? AND session_id = ? AND (? IS NULL OR branch = ?)
ORDER BY branch, turn
"""
NEWEST_SQL = """
SELECT seq, turn FROM convostore_items WHERE store = ? AND session_id = ? AND branch = ?
ORDER BY seq DESC LIMIT 1
"""
