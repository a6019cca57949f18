"""A full or a stalled disk under the SQLite store: the sidecar keeps answering.

A full disk is a small tmpfs: appends are refused as `backend_disk_full`, and the store
says so on `/readyz`. A stalled disk is an ext4 file system of its own (a loop-mounted
image) that the test freezes with `fsfreeze`, as a hung volume would be: writes and even
reads (SQLite takes its WAL read lock in shared memory on that file system) block in the
kernel. The sidecar must go on answering `/healthz`, answer each call within its
deadline, and store a write that was left hanging exactly once when retried after the
thaw.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.servers import require
from tests.support import SidecarProcess, eventually

TOOLS = ("mkfs.ext4", "fsfreeze", "mount", "umount")
BUSY_TIMEOUT = 1.0
DEADLINE = BUSY_TIMEOUT + 5.0  # the driver's DEADLINE_MARGIN
ANSWERED_WITHIN = DEADLINE + 10.0  # generous: only a hang fails


def need_mounts() -> None:
    if os.geteuid() != 0 or not all(shutil.which(tool) for tool in TOOLS):
        require("root with mkfs.ext4, fsfreeze and mount")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A directory on a 2 MiB file system of its own."""
    need_mounts()
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture
def freezable(tmp_path: Path) -> Iterator[Path]:
    """A directory on a file system of its own, thawed and unmounted afterwards."""
    need_mounts()
    image, mount = tmp_path / "disk.img", tmp_path / "mnt"
    mount.mkdir()
    with image.open("wb") as out:
        out.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["fsfreeze", "-u", str(mount)], check=False, capture_output=True)
        subprocess.run(["umount", str(mount)], check=True)


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any], key: str) -> int:
    headers = {"Idempotency-Key": key}
    async with http.post(url, json=body, headers=headers) as resp:
        return resp.status


async def freeze(path: Path, frozen: bool) -> None:
    flag = "-f" if frozen else "-u"
    await asyncio.to_thread(subprocess.run, ["fsfreeze", flag, str(path)], check=True)


async def read_status(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url) as resp:
        return resp.status


def stuck_on_the_disk(
    http: aiohttp.ClientSession, items: str
) -> tuple[asyncio.Task[int], asyncio.Task[int]]:
    """An append (key `k2`) and a read sent while the disk is frozen: both wait on it."""
    hanging = asyncio.create_task(post(http, items, {"items": [{"n": 2}]}, "k2"))
    return hanging, asyncio.create_task(read_status(http, items + "?limit=1"))


async def test_a_frozen_disk_stalls_no_answer_and_loses_no_write(
    freezable: Path, sidecar_process: Callable[[dict[str, Any]], SidecarProcess]
) -> None:
    store = {
        "backend": "sqlite",
        "sqlite": {"path": str(freezable / "chat.db"), "busyTimeout": f"{BUSY_TIMEOUT:g}s"},
    }
    process = sidecar_process({"stores": {"chat": store}})
    process.start()
    items = f"{process.url}/v1/stores/chat/sessions/s/items"
    async with aiohttp.ClientSession() as http:
        assert await post(http, items, {"items": [{"n": 1}]}, "k1") == 200
        await freeze(freezable, True)
        try:
            hanging, reading = stuck_on_the_disk(http, items)
            for _ in range(5):  # the loop is free while a read and a write wait on the disk
                async with asyncio.timeout(5), http.get(f"{process.url}/healthz") as health:
                    assert health.status == 200
                await asyncio.sleep(0.2)
            async with asyncio.timeout(ANSWERED_WITHIN):
                assert await hanging == 503
                assert await reading in (200, 503)
        finally:
            await freeze(freezable, False)
        for _ in range(100):  # the writer first finishes the group the freeze held up
            if await post(http, items, {"items": [{"n": 2}]}, "k2") == 200:
                break
            await asyncio.sleep(0.2)
        async with http.get(items) as read:
            assert [item["n"] for item in (await read.json())["items"]] == [1, 2]


async def test_a_full_disk_answers_that_it_is_and_keeps_what_it_acknowledged(
    small_disk: Path, sidecar_process: Callable[[dict[str, Any]], SidecarProcess]
) -> None:
    store = {"backend": "sqlite", "sqlite": {"path": str(small_disk / "chat.db")}}
    process = sidecar_process({"stores": {"chat": store}})
    process.start()
    items = f"{process.url}/v1/stores/chat/sessions/s/items"
    acknowledged = 0
    async with aiohttp.ClientSession() as http:
        for n in range(200):
            body = {"items": [{"n": n, "pad": "x" * (32 << 10)}]}
            async with http.post(items, json=body, headers={"Idempotency-Key": f"k{n}"}) as resp:
                if resp.status != 200:
                    refusal = (resp.status, (await resp.json())["error"])
                    break
                acknowledged += 1
        else:
            pytest.fail("2 MiB never filled up")
        assert refusal[0] == 503
        assert refusal[1]["code"] == "backend_disk_full"
        assert "out of disk space" in refusal[1]["message"]
        async with http.get(f"{process.url}/readyz") as ready:
            assert ready.status == 503
            assert (await ready.json())["stores"]["chat"] == "writes_failing"
        async with http.get(items) as read:
            stored = [item["n"] for item in (await read.json())["items"]]
    assert stored == list(range(acknowledged)), "every acknowledged append is there"


def threads_in_the_kernel(pid: int) -> int:
    """Threads of `pid` in uninterruptible sleep: waiting on the frozen file system."""
    count = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            if (task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "D":
                count += 1
    return count


async def refused(port: int) -> bool:
    """Whether the port takes no connection (one caught in the closing listener's
    backlog is reset rather than refused)."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    writer.close()
    return False


async def test_sigterm_on_a_frozen_disk_stops_serving_at_once_and_exits_at_the_thaw(
    freezable: Path, sidecar_process: Callable[[dict[str, Any]], SidecarProcess]
) -> None:
    """With a write and a read stuck in the kernel, SIGTERM still closes the listeners at
    once and each call in flight is answered by its deadline; the process ends, exit 0,
    as soon as the disk lets its stuck thread go (no process can end before that), and
    the write left hanging is stored at most once."""
    store = {
        "backend": "sqlite",
        "sqlite": {"path": str(freezable / "chat.db"), "busyTimeout": f"{BUSY_TIMEOUT:g}s"},
    }
    config = {"stores": {"chat": store}}
    process = sidecar_process(config)
    process.start()
    assert process.process is not None
    pid, items = process.process.pid, f"{process.url}/v1/stores/chat/sessions/s/items"
    async with aiohttp.ClientSession() as http:
        assert await post(http, items, {"items": [{"n": 1}]}, "k1") == 200
        await freeze(freezable, True)
        try:
            hanging, reading = stuck_on_the_disk(http, items)
            await eventually(lambda: threads_in_the_kernel(pid), within=30)
            process.process.send_signal(signal.SIGTERM)
            await eventually(lambda: refused(process.port), within=5)
            async with asyncio.timeout(ANSWERED_WITHIN):
                assert await hanging == 503
                assert await reading in (200, 503)
            assert process.process.poll() is None, "gone while a thread is in the kernel"
        finally:
            await freeze(freezable, False)
        assert await asyncio.to_thread(process.process.wait, 30) == 0
    process.close_log()
    again = sidecar_process(config)
    again.start()
    async with aiohttp.ClientSession() as http:
        assert (
            await post(
                http, again.url + items.removeprefix(process.url), {"items": [{"n": 2}]}, "k2"
            )
            == 200
        )
        async with http.get(again.url + "/v1/stores/chat/sessions/s/items") as read:
            assert [item["n"] for item in (await read.json())["items"]] == [1, 2]
