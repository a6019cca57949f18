"""`convostore migrate` makes the PostgreSQL schema; serving sidecars only check it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.error import HTTPError

import asyncpg
import pytest
import yaml
from convostore import SidecarSession, SidecarStore, StoreUnavailableError
from convostore_sidecar.drivers.postgres.schema import SCHEMA_VERSION

from tests.support import SidecarProcess
from tests.test_outages import wait_until

Make = Callable[[dict[str, Any]], SidecarProcess]


def pg_config(dsn: str, schema: str) -> dict[str, Any]:
    return {
        "stores": {"audit": {"backend": "postgres", "postgres": {"dsn": dsn, "schema": schema}}}
    }


def write_config(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / f"migrate-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_migrate(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "convostore", "migrate", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=60)
    return process.returncode, out, err


def readiness(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except HTTPError as refused:
        return refused.code, json.loads(refused.read())


async def test_a_sidecar_waits_for_migrate_and_serves_once_it_ran(
    sidecar_process: Make, tmp_path: Path, postgres_dsn: str
) -> None:
    schema = "mig_" + uuid.uuid4().hex[:10]
    config = pg_config(postgres_dsn, schema)
    proc = sidecar_process(config)
    proc.start()
    session = SidecarSession("s", "audit", url=proc.url, retries=0)
    with pytest.raises(StoreUnavailableError) as refused:
        await session.get_items()
    assert (refused.value.status, refused.value.code) == (503, "backend_misconfigured")
    assert "has no convostore tables" in refused.value.message
    assert "convostore migrate" in refused.value.message
    assert readiness(proc.url)[0] == 503

    path = write_config(tmp_path, config)
    racing = [start_migrate(path) for _ in range(3)]
    outcomes = [finish(p) for p in racing]
    assert [code for code, _, _ in outcomes] == [0, 0, 0], outcomes
    said = sorted(out.strip() for _, out, _ in outcomes)
    store = f"store 'audit' (postgres): schema {schema!r}"
    current = f"{store} is at version {SCHEMA_VERSION}: nothing to do"
    assert said == [current, current, f"{store} migrated from version 0 to {SCHEMA_VERSION}"]

    async def ready() -> bool:
        return readiness(proc.url)[0] == 200

    await wait_until(ready)  # no restart needed
    await session.add_items([{"n": 1}])
    assert await session.get_items() == [{"n": 1}]


async def test_serving_needs_only_dml_rights(
    sidecar_process: Make, tmp_path: Path, postgres_dsn: str
) -> None:
    schema, role = "mig_" + uuid.uuid4().hex[:10], "app_" + uuid.uuid4().hex[:10]
    owner = await asyncpg.connect(postgres_dsn)
    try:
        await owner.execute(f"CREATE ROLE {role} LOGIN")
        app_dsn = postgres_dsn.replace("://postgres@", f"://{role}@")
        code, _, err = finish(start_migrate(write_config(tmp_path, pg_config(app_dsn, schema))))
        assert code == 1
        assert "permission denied" in err
        assert err.count("\n") == 1, "one line, no traceback"
        assert (
            finish(start_migrate(write_config(tmp_path, pg_config(postgres_dsn, schema))))[0] == 0
        )
        await owner.execute(
            f"GRANT USAGE ON SCHEMA {schema} TO {role};"
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role};"
            f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {schema} TO {role};"
        )
        proc = sidecar_process(pg_config(app_dsn, schema))
        proc.start()
        session = SidecarSession("s", "audit", url=proc.url)
        await session.add_items([{"role": "user", "content": "hi"}, {"n": 2}])
        assert await session.pop_item() == {"n": 2}
        assert await session.get_items() == [{"role": "user", "content": "hi"}]
        await session.clear_session()
        assert await session.get_items() == []
        ddl = await owner.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND query ILIKE '%CREATE%'",
            role,
        )
        assert ddl == 0
    finally:
        await owner.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await owner.execute(f"DROP ROLE IF EXISTS {role}")
        await owner.close()


async def test_migrating_a_current_schema_takes_no_table_lock(
    tmp_path: Path, postgres_dsn: str
) -> None:
    """A migration that changes nothing (the operator runs one at every reconcile) must
    not wait behind, or stall, the reads of serving sidecars."""
    schema = "mig_" + uuid.uuid4().hex[:10]
    path = write_config(tmp_path, pg_config(postgres_dsn, schema))
    assert finish(start_migrate(path))[0] == 0
    reader = await asyncpg.connect(postgres_dsn)
    try:
        async with reader.transaction():
            await reader.execute(f"LOCK TABLE {schema}.items IN ACCESS SHARE MODE")
            code, out, err = await asyncio.wait_for(
                asyncio.to_thread(finish, start_migrate(path)), 30
            )
        assert (code, err) == (0, "")
        assert "nothing to do" in out
    finally:
        await reader.close()


async def test_a_schema_newer_than_the_sidecar_is_refused_by_both(
    sidecar_process: Make, tmp_path: Path, postgres_dsn: str
) -> None:
    schema = "mig_" + uuid.uuid4().hex[:10]
    config = pg_config(postgres_dsn, schema)
    path = write_config(tmp_path, config)
    assert finish(start_migrate(path))[0] == 0
    owner = await asyncpg.connect(postgres_dsn)
    try:
        await owner.execute(f"INSERT INTO {schema}.schema_version (version) VALUES (99)")
    finally:
        await owner.close()
    code, _, err = finish(start_migrate(path))
    assert code == 1
    assert "version 99, newer than this sidecar's" in err
    proc = sidecar_process(config)
    proc.start()
    status, body = readiness(proc.url)
    assert status == 503
    assert body["stores"] == {"audit": "unavailable"}


async def test_a_version_2_schema_migrates_and_its_sessions_are_found(
    sidecar_process: Make, tmp_path: Path, postgres_dsn: str
) -> None:
    """Version 2 had no creation times and no labels: `migrate` adds them, each session
    taken as made at its last write, and keeps every item."""
    schema = "mig_" + uuid.uuid4().hex[:10]
    config = pg_config(postgres_dsn, schema)
    path = write_config(tmp_path, config)
    assert finish(start_migrate(path))[0] == 0
    proc = sidecar_process(config)
    proc.start()
    await SidecarSession("old", "audit", url=proc.url).add_items([{"n": 1}])
    proc.stop()
    conn = await asyncpg.connect(postgres_dsn)
    try:  # back to what version 2 had
        await conn.execute(
            f"DROP TABLE {schema}.session_labels; ALTER TABLE {schema}.sessions DROP COLUMN"
            f" created_at; UPDATE {schema}.sessions SET updated_at = '2030-01-02T03:04:05Z';"
            f" DELETE FROM {schema}.schema_version; INSERT INTO {schema}.schema_version"
            " (version) VALUES (2)"
        )
    finally:
        await conn.close()
    code, out, _ = finish(start_migrate(path))
    assert code == 0
    assert f"migrated from version 2 to {SCHEMA_VERSION}" in out
    proc.start()
    session = SidecarSession("old", "audit", url=proc.url)
    assert await session.get_items() == [{"n": 1}]
    record = await session.set_metadata({"user_id": "u1"})
    assert record["created_at"] == "2030-01-02T03:04:05Z"
    listed = SidecarStore("audit", proc.url).find_sessions({"user_id": "u1"})
    assert [r["session_id"] async for r in listed] == ["old"]
