"""The PostgreSQL schema and its migrations.

Migrations run once, explicitly: `convostore migrate --config FILE`, or the operator
when it reconciles a store. A serving sidecar never runs DDL: `ALTER TABLE` takes an
ACCESS EXCLUSIVE lock that stalls every read behind it, and creating tables needs
rights a serving role should not have. A sidecar only reads the version (one cheap
query, once per pool) and, until it matches, answers 503 `backend_misconfigured`
saying to migrate. Migrations hold an advisory lock, so concurrent runs apply each step
once, and record their version in `schema_version`; at the current version a run
changes nothing and takes no table lock.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

SCHEMA_VERSION = 4
NO_BRANCH = "CVB01"  # SQLSTATE the append function raises for a branch that is not live
MIGRATION_LOCK = 0x636F6E766F  # "convo": one advisory lock id for every migration

DDL = """
CREATE TABLE IF NOT EXISTS {s}.schema_version (
    version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS {s}.sessions (
    store text NOT NULL, session_id text NOT NULL,
    next_seq bigint NOT NULL, updated_at timestamptz NOT NULL,
    PRIMARY KEY (store, session_id));
CREATE INDEX IF NOT EXISTS sessions_updated ON {s}.sessions (store, updated_at);
ALTER TABLE {s}.sessions ADD COLUMN IF NOT EXISTS created_at timestamptz;
UPDATE {s}.sessions SET created_at = updated_at WHERE created_at IS NULL;
ALTER TABLE {s}.sessions ALTER COLUMN created_at SET DEFAULT now(),
    ALTER COLUMN created_at SET NOT NULL;
CREATE INDEX IF NOT EXISTS sessions_created
    ON {s}.sessions (store, created_at, session_id);
CREATE TABLE IF NOT EXISTS {s}.erasures (
    store text NOT NULL, erasure_id text NOT NULL, at timestamptz NOT NULL,
    label_names text NOT NULL, sessions bigint NOT NULL, items bigint NOT NULL,
    complete boolean NOT NULL,
    PRIMARY KEY (store, erasure_id));
CREATE INDEX IF NOT EXISTS erasures_at ON {s}.erasures (store, at);
CREATE TABLE IF NOT EXISTS {s}.subject_keys (
    store text NOT NULL, subject text NOT NULL, wrapped bytea NOT NULL,
    PRIMARY KEY (store, subject));
CREATE TABLE IF NOT EXISTS {s}.session_labels (
    store text NOT NULL, session_id text NOT NULL, name text NOT NULL, value text NOT NULL,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (store, session_id, name),
    FOREIGN KEY (store, session_id) REFERENCES {s}.sessions ON DELETE CASCADE);
CREATE INDEX IF NOT EXISTS session_labels_find
    ON {s}.session_labels (store, name, value, created_at, session_id);
CREATE TABLE IF NOT EXISTS {s}.items (
    store text NOT NULL, session_id text NOT NULL, seq bigint NOT NULL, data bytea NOT NULL,
    PRIMARY KEY (store, session_id, seq),
    FOREIGN KEY (store, session_id) REFERENCES {s}.sessions ON DELETE CASCADE);
ALTER TABLE {s}.items
    ADD COLUMN IF NOT EXISTS branch text NOT NULL DEFAULT 'main',
    ADD COLUMN IF NOT EXISTS turn bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS kind text NOT NULL DEFAULT 'other',
    ADD COLUMN IF NOT EXISTS tool text,
    ADD COLUMN IF NOT EXISTS created_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX IF NOT EXISTS items_branch ON {s}.items (store, session_id, branch, seq);
CREATE INDEX IF NOT EXISTS items_kind ON {s}.items (store, session_id, branch, kind, turn);
CREATE TABLE IF NOT EXISTS {s}.branches (
    store text NOT NULL, session_id text NOT NULL, branch text NOT NULL,
    live boolean NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (store, session_id, branch));
CREATE TABLE IF NOT EXISTS {s}.usage (
    store text NOT NULL, session_id text NOT NULL, branch text NOT NULL, turn bigint NOT NULL,
    requests bigint NOT NULL, input_tokens bigint NOT NULL, output_tokens bigint NOT NULL,
    total_tokens bigint NOT NULL, input_details bytea, output_details bytea,
    PRIMARY KEY (store, session_id, branch, turn),
    FOREIGN KEY (store, session_id) REFERENCES {s}.sessions ON DELETE CASCADE);
CREATE TABLE IF NOT EXISTS {s}.idempotency_keys (
    store text NOT NULL, session_id text NOT NULL, key text NOT NULL,
    fingerprint text NOT NULL, appended integer NOT NULL, expires_at timestamptz NOT NULL,
    PRIMARY KEY (store, session_id, key));
CREATE INDEX IF NOT EXISTS idempotency_expiry ON {s}.idempotency_keys (store, expires_at);
DROP FUNCTION IF EXISTS {s}.append(text, text, bytea[], text, text, float8, float8, bigint);
CREATE OR REPLACE FUNCTION {s}.turn_start(
    p_store text, p_session text, p_branch text, p_turn bigint
) RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN p_turn = 0 THEN
        (SELECT i.seq FROM {s}.items AS i WHERE i.store = p_store AND i.session_id = p_session
            AND i.branch = p_branch ORDER BY i.seq LIMIT 1)
    ELSE
        (SELECT i.seq FROM {s}.items AS i WHERE i.store = p_store AND i.session_id = p_session
            AND i.branch = p_branch AND i.kind = 'user' AND i.turn = p_turn)
    END
$$;
CREATE OR REPLACE FUNCTION {s}.append(
    p_store text, p_session text, p_items bytea[], p_key text, p_fingerprint text,
    p_key_ttl float8, p_ttl float8, p_max_items bigint,
    p_branch text, p_kinds text[], p_tools text[]
) RETURNS TABLE (replayed boolean, fingerprint text, appended integer, turn bigint, anchor bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_next bigint;
    v_expired boolean;
    v_turn bigint;
    v_last_user bigint;
BEGIN
    IF p_key IS NOT NULL THEN
        INSERT INTO {s}.idempotency_keys AS k VALUES (
            p_store, p_session, p_key, p_fingerprint, cardinality(p_items),
            now() + make_interval(secs => p_key_ttl))
        ON CONFLICT (store, session_id, key) DO UPDATE
            SET fingerprint = EXCLUDED.fingerprint, appended = EXCLUDED.appended,
                expires_at = EXCLUDED.expires_at
            WHERE k.expires_at <= now();
        IF NOT FOUND THEN
            RETURN QUERY SELECT true, k.fingerprint, k.appended, NULL::bigint, NULL::bigint
                FROM {s}.idempotency_keys AS k
                WHERE k.store = p_store AND k.session_id = p_session AND k.key = p_key;
            RETURN;
        END IF;
    END IF;
    INSERT INTO {s}.sessions VALUES (p_store, p_session, 0, now()) ON CONFLICT DO NOTHING;
    SELECT s.next_seq, (p_ttl IS NOT NULL AND s.updated_at <= now() - make_interval(secs => p_ttl))
        INTO v_next, v_expired
        FROM {s}.sessions AS s WHERE s.store = p_store AND s.session_id = p_session FOR UPDATE;
    IF v_expired THEN
        DELETE FROM {s}.items AS i WHERE i.store = p_store AND i.session_id = p_session;
        DELETE FROM {s}.usage AS u WHERE u.store = p_store AND u.session_id = p_session;
        DELETE FROM {s}.branches AS b WHERE b.store = p_store AND b.session_id = p_session;
        DELETE FROM {s}.session_labels AS l
            WHERE l.store = p_store AND l.session_id = p_session;
        UPDATE {s}.sessions AS s SET created_at = now()
            WHERE s.store = p_store AND s.session_id = p_session;
    END IF;
    IF p_branch <> 'main' AND NOT EXISTS (SELECT 1 FROM {s}.branches AS b
            WHERE b.store = p_store AND b.session_id = p_session AND b.branch = p_branch
            AND b.live) THEN
        RAISE EXCEPTION USING ERRCODE = '{no_branch}', MESSAGE = p_branch;
    END IF;
    SELECT coalesce((SELECT i.turn FROM {s}.items AS i WHERE i.store = p_store
        AND i.session_id = p_session AND i.branch = p_branch ORDER BY i.seq DESC LIMIT 1), 0)
        INTO v_turn;
    INSERT INTO {s}.items (store, session_id, seq, data, branch, turn, kind, tool)
        SELECT p_store, p_session, v_next + t.ord - 1, t.data, p_branch,
            v_turn + count(*) FILTER (WHERE t.kind = 'user') OVER (ORDER BY t.ord),
            t.kind, t.tool
        FROM unnest(p_items, p_kinds, p_tools) WITH ORDINALITY AS t(data, kind, tool, ord);
    SELECT max(t.ord) INTO v_last_user
        FROM unnest(p_kinds) WITH ORDINALITY AS t(kind, ord) WHERE t.kind = 'user';
    v_turn := v_turn + (SELECT count(*) FROM unnest(p_kinds) AS k WHERE k = 'user');
    UPDATE {s}.sessions AS s SET next_seq = v_next + cardinality(p_items), updated_at = now()
        WHERE s.store = p_store AND s.session_id = p_session;
    IF p_max_items IS NOT NULL THEN
        DELETE FROM {s}.items AS i WHERE i.store = p_store AND i.session_id = p_session
            AND i.branch = p_branch AND i.seq < (SELECT j.seq FROM {s}.items AS j
                WHERE j.store = p_store AND j.session_id = p_session AND j.branch = p_branch
                ORDER BY j.seq DESC LIMIT 1 OFFSET p_max_items - 1);
    END IF;
    RETURN QUERY SELECT false, NULL::text, cardinality(p_items), v_turn,
        CASE WHEN v_last_user IS NOT NULL THEN v_next + v_last_user - 1
        ELSE {s}.turn_start(p_store, p_session, p_branch, v_turn) END;
END $$;
INSERT INTO {s}.schema_version (version) VALUES ({v}) ON CONFLICT DO NOTHING;
"""


@dataclass(frozen=True)
class Migration:
    schema: str
    before: int
    after: int

    def __str__(self) -> str:
        if self.before == self.after:
            return f"schema {self.schema!r} is at version {self.after}: nothing to do"
        return f"schema {self.schema!r} migrated from version {self.before} to {self.after}"


class SchemaTooNew(Exception):
    """The database was migrated by a newer convostore than this one."""


async def installed_version(conn: asyncpg.Connection, schema: str) -> int:
    """0 when the schema holds no convostore tables yet."""
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{schema}.schema_version")
    if not exists:
        return 0
    version = await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {schema}.schema_version")
    return int(version)


def version_problem(schema: str, version: int) -> str | None:
    """Why a sidecar cannot serve from this schema yet, or None."""
    if version == SCHEMA_VERSION:
        return None
    if version > SCHEMA_VERSION:
        return (
            f"schema {schema!r} is at version {version}, newer than this sidecar's "
            f"({SCHEMA_VERSION}): upgrade the sidecar"
        )
    found = "has no convostore tables" if version == 0 else f"is at version {version}"
    return (
        f"schema {schema!r} {found}; this sidecar needs version {SCHEMA_VERSION}: run "
        "`convostore migrate --config <this config>` (the operator runs it when it "
        "reconciles the store)"
    )


async def migrate(conn: asyncpg.Connection, schema: str) -> Migration:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        before = await installed_version(conn, schema)
        if before > SCHEMA_VERSION:
            raise SchemaTooNew(version_problem(schema, before))
        if before < SCHEMA_VERSION:
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            await conn.execute(DDL.format(s=schema, v=SCHEMA_VERSION, no_branch=NO_BRANCH))
    return Migration(schema, before, SCHEMA_VERSION)
