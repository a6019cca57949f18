"""The `sqlalchemy` backend on MariaDB when the database fails or refuses: every refusal
a 503 naming its cause, never a 500 or a hang, and nothing acknowledged lost or doubled.

Each refusal is provoked for real on a MariaDB of this module's own: a server stopped,
killed and frozen (`SIGSTOP`) under a writer; a row lock held past
`innodb_lock_wait_timeout`; `max_connections` reached; `read_only` set (as on a replica,
or a primary being demoted); a deadlock between two transactions; a wrong password.
The sidecar serves as a non-root user with the documented grants (DML only), its
password read from a file, as a pod would; the tables are made by `convostore migrate`
as a user that may create them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from convostore import SidecarSession, StoreUnavailableError
from convostore_sidecar.drivers.base import Cause
from convostore_sidecar.drivers.sqlalchemy.errors import RETRY, classify
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from tests.servers import MariaDbServer
from tests.support import SidecarProcess, unique
from tests.test_outages import wait_until

Start = Callable[[dict[str, Any]], SidecarProcess]
GRANTS = "SELECT, INSERT, UPDATE, DELETE"
"""What a serving user needs on the store's tables (`docs/configuration.md`)."""
FEWEST_CONNECTIONS = 10
"""The least `max_connections` MariaDB accepts."""


@pytest.fixture(scope="module")
def server() -> Iterator[MariaDbServer]:
    db = MariaDbServer()
    db.start()
    db.sql(
        "CREATE USER 'app'@'127.0.0.1' IDENTIFIED BY 'app-secret';"
        f" GRANT {GRANTS} ON convostore.* TO 'app'@'127.0.0.1'"
    )
    yield db
    db.destroy()


@pytest.fixture
def store(server: MariaDbServer, tmp_path: Path) -> dict[str, Any]:
    """A store served as `app`, its tables made by root with `convostore migrate`."""
    prefix = "f" + unique("")[1:].replace("-", "") + "_"
    root = {"backend": "sqlalchemy", "sqlalchemy": {"url": server.url(), "tablePrefix": prefix}}
    made = migrate(tmp_path, root)
    assert "tables made at version 1" in made.stdout, made
    password = tmp_path / "password"
    password.write_text("app-secret\n")
    return {
        "backend": "sqlalchemy",
        "sqlalchemy": {
            "url": server.url(user="app"),
            "passwordFile": str(password),
            "tablePrefix": prefix,
            "statementTimeout": "1s",
            "connectTimeout": "1s",
        },
    }


@pytest.fixture
def sidecar(sidecar_process: Start, store: dict[str, Any]) -> SidecarProcess:
    process = sidecar_process({"stores": {"chat": store}})
    process.start()
    return process


def migrate(tmp_path: Path, store: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """`convostore migrate` run on the store, as the operator or a user runs it."""
    config = tmp_path / f"{unique('migrate')}.yaml"
    config.write_text(yaml.safe_dump({"stores": {"chat": store}}))
    return subprocess.run(
        [sys.executable, "-m", "convostore", "migrate", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@contextlib.asynccontextmanager
async def connection(server: MariaDbServer) -> AsyncIterator[Any]:
    engine = create_async_engine(server.url())
    try:
        async with engine.connect() as conn:
            yield conn
    finally:
        await engine.dispose()


async def answer(process: SidecarProcess, session_id: str) -> tuple[int, str, str]:
    """The sidecar's own answer to one append (status, code, message), with no retry."""
    url = f"{process.url}/v1/stores/chat/sessions/{session_id}/items"
    async with aiohttp.ClientSession() as http, http.post(url, json={"items": [{"n": 1}]}) as resp:
        body = await resp.json()
        if resp.status == 200:
            return 200, "", ""
        if body["error"]["code"] != "backend_misconfigured":  # retrying would not help
            assert resp.headers["Retry-After"] == "1"
        return resp.status, body["error"]["code"], body["error"]["message"]


async def test_the_serving_user_needs_dml_only_and_cannot_migrate(
    store: dict[str, Any], sidecar: SidecarProcess, tmp_path: Path
) -> None:
    session = SidecarSession(unique(), "chat", url=sidecar.url)
    await session.add_items([{"n": 1}])
    assert await session.get_items() == [{"n": 1}]
    again = migrate(tmp_path, store)
    assert again.returncode == 0, "at this version nothing is to do, so no DDL is tried"
    assert "nothing to do" in again.stdout
    fresh = {**store, "sqlalchemy": {**store["sqlalchemy"], "tablePrefix": "fresh_"}}
    refused = migrate(tmp_path, fresh)
    assert refused.returncode == 1
    assert "1142" in refused.stderr, "CREATE refused to the serving user"
    assert "app-secret" not in refused.stderr + refused.stdout


@pytest.mark.parametrize("how", ["stopped", "killed"])
async def test_acknowledged_appends_survive_the_server_going_away_exactly_once(
    server: MariaDbServer, sidecar: SidecarProcess, how: str
) -> None:
    session = SidecarSession(unique(), "chat", url=sidecar.url, retries=2)
    acknowledged: list[int] = []
    failures: list[StoreUnavailableError] = []
    writing = True

    async def writer() -> None:
        n = 0
        while writing:
            try:
                await session.add_items([{"n": n}])
                acknowledged.append(n)
            except StoreUnavailableError as exc:
                failures.append(exc)
                await asyncio.sleep(0.05)
            n += 1

    task = asyncio.create_task(writer())
    await wait_until(lambda: _at_least(acknowledged, 20))
    await asyncio.to_thread(server.stop, how == "killed")
    await wait_until(lambda: _at_least(failures, 3))
    assert (await answer(sidecar, unique()))[:2] == (503, Cause.UNAVAILABLE.value)
    before = len(acknowledged)
    await asyncio.to_thread(server.start)
    await wait_until(lambda: _at_least(acknowledged, before + 20))
    writing = False
    await task
    assert {f.code for f in failures} == {Cause.UNAVAILABLE.value}
    present = [item["n"] for item in await session.get_items()]
    assert len(present) == len(set(present)), "an item was stored twice"
    assert present == sorted(present)
    assert set(acknowledged) <= set(present)


async def _at_least(values: list[Any], count: int) -> bool:
    return len(values) >= count


async def test_a_frozen_server_is_answered_within_the_deadline_not_waited_on(
    server: MariaDbServer, sidecar: SidecarProcess
) -> None:
    session_id = unique()
    assert (await answer(sidecar, session_id))[0] == 200
    assert server.process is not None
    pid = int((server.dir / "pid").read_text())
    os.kill(pid, signal.SIGSTOP)
    try:
        status, code, _ = await asyncio.wait_for(answer(sidecar, session_id), timeout=30)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert (status, code) == (503, Cause.UNAVAILABLE.value)
    await wait_until(lambda: _appends(sidecar, session_id))


async def _appends(process: SidecarProcess, session_id: str) -> bool:
    return (await answer(process, session_id))[0] == 200


async def test_a_row_lock_held_too_long_answers_lock_timeout(
    server: MariaDbServer, store: dict[str, Any], sidecar: SidecarProcess
) -> None:
    session_id = unique()
    assert (await answer(sidecar, session_id))[0] == 200
    sessions = store["sqlalchemy"]["tablePrefix"] + "sessions"
    async with connection(server) as holder:
        await holder.execute(
            text(f"SELECT * FROM {sessions} WHERE session_id = :s FOR UPDATE"), {"s": session_id}
        )
        status, code, message = await answer(sidecar, session_id)
        await holder.rollback()
    assert (status, code) == (503, Cause.LOCK_TIMEOUT.value)
    assert "lock" in message
    assert (await answer(sidecar, session_id))[0] == 200, "answers again once the lock is gone"


async def test_max_connections_reached_answers_too_many_connections(
    server: MariaDbServer, store: dict[str, Any], sidecar_process: Start
) -> None:
    """The server's connections (10 at least, on MariaDB) are all taken before the
    sidecar makes its first."""
    server.sql(f"SET GLOBAL max_connections = {FEWEST_CONNECTIONS}")
    engine = create_async_engine(
        server.url(user="app").replace("app@", "app:app-secret@"), pool_size=FEWEST_CONNECTIONS
    )
    held = []
    try:
        for _ in range(FEWEST_CONNECTIONS):
            held.append(await engine.connect())
            await held[-1].execute(text("SELECT 1"))
        process = sidecar_process({"stores": {"chat": store}})
        process.start()
        status, code, message = await answer(process, unique())
    finally:
        for conn in held:
            await conn.close()
        await engine.dispose()
        server.sql("SET GLOBAL max_connections = 500")
    assert (status, code) == (503, Cause.TOO_MANY_CONNECTIONS.value)
    assert "no connection to spare" in message
    await wait_until(lambda: _appends(process, unique()))


async def test_a_read_only_server_answers_read_only_and_reads_still_work(
    server: MariaDbServer, sidecar: SidecarProcess
) -> None:
    session_id = unique()
    assert (await answer(sidecar, session_id))[0] == 200
    server.sql("SET GLOBAL read_only = 1")
    try:
        status, code, _ = await answer(sidecar, session_id)
        items = await SidecarSession(session_id, "chat", url=sidecar.url).get_items()
    finally:
        server.sql("SET GLOBAL read_only = 0")
    assert (status, code) == (503, Cause.READ_ONLY.value)
    assert items == [{"n": 1}]


async def test_a_wrong_password_says_the_settings_are_refused_and_is_not_ready(
    store: dict[str, Any], sidecar_process: Start, tmp_path: Path
) -> None:
    await asyncio.to_thread(Path(store["sqlalchemy"]["passwordFile"]).write_text, "not-it\n")
    process = sidecar_process({"stores": {"chat": store}})
    process.start()
    status, code, message = await answer(process, unique())
    assert (status, code) == (503, "backend_misconfigured")
    assert "1045" in message
    assert "not-it" not in process.log_path.read_text()
    async with aiohttp.ClientSession() as http, http.get(process.url + "/readyz") as resp:
        assert resp.status == 503
        assert "refuses the store's settings" in (await resp.json())["details"]["chat"]


async def test_a_deadlock_is_run_again_and_reported_by_cause_if_it_persists(
    server: MariaDbServer,
) -> None:
    """InnoDB's own deadlock error, provoked between two transactions, is one the driver
    runs again (the database rolled it back whole); past its attempts it is a 503
    naming a lock, never a 500."""
    async with connection(server) as a, connection(server) as b:
        for conn in (a, b):
            await conn.execute(text("SET SESSION innodb_lock_wait_timeout = 10"))
        await a.execute(text("CREATE TABLE IF NOT EXISTS deadlock (n INT PRIMARY KEY)"))
        await a.execute(text("INSERT IGNORE INTO deadlock VALUES (1), (2)"))
        await a.commit()
        await a.execute(text("UPDATE deadlock SET n = n WHERE n = 1"))
        await b.execute(text("UPDATE deadlock SET n = n WHERE n = 2"))
        blocked = asyncio.ensure_future(a.execute(text("UPDATE deadlock SET n = n WHERE n = 2")))
        await asyncio.sleep(0.2)
        with pytest.raises(DBAPIError) as victim:
            await b.execute(text("UPDATE deadlock SET n = n WHERE n = 1"))
        await blocked
    assert classify("mysql", victim.value) == RETRY
