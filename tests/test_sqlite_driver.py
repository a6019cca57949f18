"""The SQLite driver's own machinery: group commit on the writer, reads off the loop.

The conformance suite checks what every driver answers; these tests pin down what only
this one does to answer cheaply, with real SQLite files and the real writer thread.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from convostore_sidecar.config import parse_config
from convostore_sidecar.drivers.base import (
    MAIN,
    BackendUnavailable,
    BranchNotFound,
    Idempotency,
    Meta,
)
from convostore_sidecar.drivers.sqlite import SqliteDriver

MESSAGE = Meta()


def item(n: int) -> bytes:
    return b'{"n":%d}' % n


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "groups.db"


async def open_driver(path: Path, **sqlite: Any) -> SqliteDriver:
    config = parse_config(
        {"stores": {"s": {"backend": "sqlite", "sqlite": {"path": str(path), **sqlite}}}}
    )
    driver = SqliteDriver(config.stores["s"])
    await driver.open()
    return driver


@pytest.fixture
async def driver(path: Path) -> AsyncIterator[SqliteDriver]:
    opened = await open_driver(path)
    yield opened
    await opened.close()


async def append(driver: SqliteDriver, session: str, *numbers: int, **kw: Any) -> Any:
    items = [item(n) for n in numbers]
    return await driver.append_to(session, MAIN, items, [MESSAGE] * len(items), kw.get("key"))


def hold_writer(driver: SqliteDriver) -> tuple[asyncio.Task[object], threading.Event]:
    """A transaction that keeps the writer busy until the event is set, so that what
    arrives meanwhile waits and commits as one group."""
    release = threading.Event()
    held = asyncio.ensure_future(driver._writer.transact(lambda conn: release.wait(10)))
    return held, release


def record_groups(driver: SqliteDriver) -> list[int]:
    sizes: list[int] = []
    commit = driver._writer._commit

    def recording(group: list[Callable[[sqlite3.Connection], object]]) -> Any:
        sizes.append(len(group))
        return commit(group)

    driver._writer._commit = recording  # type: ignore[method-assign]
    return sizes


async def test_a_group_commits_each_transaction_alone_or_not_at_all(
    driver: SqliteDriver,
) -> None:
    sizes = record_groups(driver)
    held, release = hold_writer(driver)

    def writes_then_fails(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO convostore_items (store, session_id, seq, data) VALUES (?, ?, 0, ?)",
            (driver.store, "broken", b"{}"),
        )
        raise ValueError("this transaction fails after writing")

    key = Idempotency("k-1", "fp", 60)
    calls = [
        append(driver, "a", 1, 2),
        driver._writer.transact(writes_then_fails),
        driver.append_to("c", "no-such-branch", [item(9)], [MESSAGE], None),
        append(driver, "a", 3, key=key),
        append(driver, "a", 3, key=key),
        append(driver, "b", 4),
    ]
    tasks = [asyncio.ensure_future(call) for call in calls]
    await asyncio.sleep(0)  # every task has queued its transaction behind the held one
    release.set()
    await held
    outcomes: list[Any] = await asyncio.gather(*tasks, return_exceptions=True)

    assert sizes == [1, len(calls)]
    assert outcomes[0].appended == 2
    assert isinstance(outcomes[1], ValueError)
    assert isinstance(outcomes[2], BranchNotFound)
    assert (outcomes[3].replayed, outcomes[4].replayed) == (False, True)
    assert await driver.latest_in("a", MAIN, None) == [item(1), item(2), item(3)]
    assert await driver.latest_in("b", MAIN, None) == [item(4)]
    assert await driver.latest_in("broken", MAIN, None) == []
    assert await driver.latest_in("c", MAIN, None) == []


async def test_a_group_that_cannot_commit_fails_every_caller_and_writes_nothing(
    path: Path,
) -> None:
    driver = await open_driver(path, busyTimeout=0.1)
    try:
        await append(driver, "a", 1)
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            outcomes = await asyncio.gather(
                *(append(driver, "a", n) for n in range(2, 6)), return_exceptions=True
            )
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert all(isinstance(o, BackendUnavailable) for o in outcomes), outcomes
        assert await driver.latest_in("a", MAIN, None) == [item(1)]
        await append(driver, "a", 2)
        assert await driver.latest_in("a", MAIN, 20) == [item(1), item(2)]
    finally:
        await driver.close()


async def test_many_writers_lose_nothing_and_keep_each_batch_whole(driver: SqliteDriver) -> None:
    sizes = record_groups(driver)

    async def writer(w: int) -> None:
        for batch in range(20):
            first = (w * 100 + batch) * 3
            await append(driver, "shared", first, first + 1, first + 2)

    await asyncio.gather(*(writer(w) for w in range(8)))

    stored = await driver.latest_in("shared", MAIN, None)
    assert len(stored) == 8 * 20 * 3
    numbers = [int(data[5:-1]) for data in stored]
    for start in range(0, len(numbers), 3):
        assert numbers[start : start + 3] == list(range(numbers[start], numbers[start] + 3))
    assert sorted(numbers) == sorted(
        (w * 100 + b) * 3 + i for w in range(8) for b in range(20) for i in range(3)
    )
    assert max(sizes) > 1, "writers arriving together never shared a commit"


async def test_no_read_runs_on_the_event_loop(driver: SqliteDriver) -> None:
    """A read can block on the disk (a stalled one blocks even for pages in the page
    cache, as taking a WAL read lock writes to shared memory): never on the loop."""
    await append(driver, "a", *range(5))
    loop_thread = threading.current_thread()
    seen: list[bool] = []
    run = driver._reader.run

    async def spy(fn: Callable[[sqlite3.Connection], Any]) -> Any:
        def wrapped(conn: sqlite3.Connection) -> Any:
            seen.append(threading.current_thread() is loop_thread)
            return fn(conn)

        return await run(wrapped)

    driver._reader.run = spy  # type: ignore[method-assign]
    assert len(await driver.latest_in("a", MAIN, 2)) == 2
    assert len(await driver.latest_in("a", MAIN, None)) == 5
    assert seen == [False, False]
