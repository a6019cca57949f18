"""The sidecar stays within the memory limit the operator gives its container, whatever
valid requests arrive at once (`requests.maxBufferedBytes`, items parsed one by one)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from convostore_operator.inject import SIDECAR_MEMORY_LIMIT
from convostore_sidecar.compaction.compactor import MOST_PARSED_BYTES
from convostore_sidecar.config import Limits, RequestLimits
from convostore_sidecar.http.listener import LONGEST_HEADER, MOST_HEADERS
from convostore_sidecar.http.middleware import SMALL_BODY

from tests.compaction_support import compaction_config
from tests.openai_standin import OpenAIStandIn
from tests.support import SidecarProcess

LIMITS = Limits()


def mebibytes(quantity: str) -> int:
    assert quantity.endswith("Mi")
    return int(quantity.removesuffix("Mi")) << 20


def worst_item() -> bytes:
    """Within the item limit, the most memory per byte once parsed: empty objects, each
    a 64-byte dict for 3 bytes of JSON, in text held 4 bytes per character because one
    character is outside the Basic Multilingual Plane."""
    head, tail = '{"t":"🙂","a":['.encode(), b"]}"
    count = (LIMITS.max_item_bytes - len(head) - len(tail)) // 3
    item = head + b",".join([b"{}"] * count) + tail
    assert len(item) <= LIMITS.max_item_bytes
    return item


def worst_body() -> bytes:
    item = worst_item()
    count = (LIMITS.max_request_bytes - 16) // (len(item) + 1)
    body = b'{"items":[' + b",".join([item] * count) + b"]}"
    assert len(body) <= LIMITS.max_request_bytes
    return body


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmHWM in /proc status")


async def test_the_worst_valid_requests_at_once_stay_under_the_container_limit(
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess], tmp_path: Path
) -> None:
    store = {
        "backend": "sqlite",
        "sqlite": {"path": str(tmp_path / "m.db")},
        "limits": {"maxReadBytes": LIMITS.max_request_bytes},  # to read each body back whole
    }
    proc = sidecar_process({"stores": {"default": store}})
    proc.start()
    assert proc.process is not None
    body = worst_body()
    headers = {"Content-Type": "application/json"}

    async def append(http: aiohttp.ClientSession, n: int) -> tuple[int, str]:
        url = f"{proc.url}/v1/stores/default/sessions/s{n}/items"
        async with http.post(url, data=io.BytesIO(body), headers=headers) as resp:
            answer = await resp.json()
            return resp.status, answer.get("error", {}).get("code", "")

    async with aiohttp.ClientSession() as http:
        outcomes = await asyncio.gather(*(append(http, n) for n in range(12)))
        accepted = [n for n, (status, _) in enumerate(outcomes) if status == 200]
        assert accepted, outcomes
        assert {o for o in outcomes if o[0] != 200} <= {(503, "overloaded")}
        for n in accepted:
            async with http.get(f"{proc.url}/v1/stores/default/sessions/s{n}/items") as resp:
                assert (await resp.read()).count(b'"t":"') == body.count(b'"t":"')
    peak, limit = peak_rss(proc.process.pid), mebibytes(SIDECAR_MEMORY_LIMIT)
    assert peak < limit, f"peak RSS {peak >> 20} MiB, container limit {limit >> 20} MiB"


CUT = b"(connection reset)"


async def held_headers(port: int, count: int, size: int) -> bytes:
    """Open a connection, send a request line and `count` headers of `size` bytes with
    no token and never end them; what the sidecar answered (b"" while it waits)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = asyncio.create_task(reader.read(200))
    try:
        writer.write(b"POST /v1/stores/default/sessions/s/items HTTP/1.1\r\nHost: x\r\n")
        for n in range(count):
            writer.write(b"X-Pad-%d: " % n + b"a" * size + b"\r\n")
            await writer.drain()
    except ConnectionError:
        pass  # answered and closed before every header was sent
    try:
        return await asyncio.wait_for(answer, 0.5)
    except TimeoutError:
        return b""
    except ConnectionError:
        return CUT  # reset or broken while sending: the answer, if any, was lost with it
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_headers_before_the_token_cannot_take_the_sidecar_past_its_limit(
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess], tmp_path: Path
) -> None:
    """Strangers (no token) holding as many connections as the sidecar accepts, each
    with the most header bytes it allows; and connections that try more: answered 400
    at the first header over the limit."""
    token = tmp_path / "token"
    token.write_text("t" * 32)
    store = {"backend": "sqlite", "sqlite": {"path": str(tmp_path / "h.db")}}
    proc = sidecar_process({"stores": {"default": store}})
    proc.start("--token-file", str(token))
    assert proc.process is not None
    oversized = await asyncio.gather(*(held_headers(proc.port, 128, 64 << 10) for _ in range(20)))
    assert all(a[:12] in (b"HTTP/1.0 400", b"HTTP/1.1 400") or a == CUT for a in oversized)
    held = [
        asyncio.create_task(held_headers(proc.port, MOST_HEADERS - 2, LONGEST_HEADER - 20))
        for _ in range(RequestLimits.max_connections - 8)
    ]
    assert await asyncio.gather(*held) == [b""] * len(held), "a connection within bounds was cut"
    peak, limit = peak_rss(proc.process.pid), mebibytes(SIDECAR_MEMORY_LIMIT)
    assert peak < limit, f"peak RSS {peak >> 20} MiB, container limit {limit >> 20} MiB"


async def test_compacting_a_history_too_large_to_parse_is_refused_within_the_limit(
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
    tmp_path: Path,
    openai_api: OpenAIStandIn,
    openai_key_file: Path,
) -> None:
    """A session of 21 items of the worst 1 MiB each (once 800 MiB when compacted, with
    the sidecar deaf meanwhile) is answered `history_too_large` without being parsed; a
    history within the bound still compacts, and the sidecar stays within its limit."""
    compaction = compaction_config(openai_api, openai_key_file, keepRecentTurns=0)
    store = {"backend": "sqlite", "sqlite": {"path": str(tmp_path / "c.db")}}
    proc = sidecar_process({"stores": {"default": {**store, "compaction": compaction}}})
    proc.start()
    assert proc.process is not None
    item = worst_item()
    sizes = {"large": MOST_PARSED_BYTES // len(item) + 5, "within": 2}
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        for session, count in sizes.items():
            items = f"{proc.url}/v1/stores/default/sessions/{session}/items"
            question = b'{"items":[{"role":"user","content":"q"}]}'
            async with http.post(items, data=question, headers=headers) as resp:
                assert resp.status == 200
            for _ in range(count):
                body = io.BytesIO(b'{"items":[' + item + b"]}")
                async with http.post(items, data=body, headers=headers) as resp:
                    assert resp.status == 200
        outcomes = {}
        for session in sizes:
            url = f"{proc.url}/v1/stores/default/sessions/{session}/items:compact"
            async with http.post(url, json={"force": True}) as resp:
                assert resp.status == 200, await resp.text()
                outcomes[session] = await resp.json()
    assert outcomes["large"]["reason"] == "history_too_large"
    assert outcomes["within"]["compacted"] is True, outcomes["within"]
    peak, limit = peak_rss(proc.process.pid), mebibytes(SIDECAR_MEMORY_LIMIT)
    assert peak < limit, f"peak RSS {peak >> 20} MiB, container limit {limit >> 20} MiB"


async def test_slow_large_uploads_never_starve_an_ordinary_turn(
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess], tmp_path: Path
) -> None:
    """Three uploads declare the largest body a request may have and send a byte, taking
    the whole body budget until their body timeout; a turn's append still gets in."""
    store = {"backend": "sqlite", "sqlite": {"path": str(tmp_path / "s.db")}}
    proc = sidecar_process({"stores": {"default": store}})
    proc.start()
    size = LIMITS.max_request_bytes
    assert 3 * size >= RequestLimits.max_buffered_bytes
    stalled = []
    for n in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", proc.port)
        writer.write(
            b"POST /v1/stores/default/sessions/big%d/items HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n{" % (n, size)
        )
        await writer.drain()
        stalled.append((reader, writer))
    try:
        async with aiohttp.ClientSession() as http:
            url = f"{proc.url}/v1/stores/default/sessions/medium/items"
            medium = {"items": [{"blob": "x" * (SMALL_BODY * 2)}]}
            deadline = asyncio.get_running_loop().time() + 10
            while True:  # until the three are being read: a larger body is turned away
                async with http.post(url, json=medium) as resp:
                    if resp.status == 503:
                        break
                assert asyncio.get_running_loop().time() < deadline, "the budget was free"
                await asyncio.sleep(0.05)
            url = f"{proc.url}/v1/stores/default/sessions/turn/items"
            turn = {"items": [{"role": "user", "content": "hello " * 1000}]}
            async with http.post(url, json=turn) as resp:
                assert resp.status == 200, await resp.text()
    finally:
        for _, writer in stalled:
            writer.close()


def large_items(count: int) -> list[dict[str, str]]:
    pad = LIMITS.max_item_bytes - 64
    return [{"n": str(n), "pad": chr(ord("a") + n % 26) * pad} for n in range(count)]


async def fill(http: aiohttp.ClientSession, url: str, items: list[dict[str, str]]) -> None:
    for start in range(0, len(items), 7):  # 7 items of 1 MiB: within one request's 8 MiB
        body = io.BytesIO(orjson.dumps({"items": items[start : start + 7]}))
        headers = {"Content-Type": "application/json"}
        async with http.post(url, data=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()


@pytest.mark.parametrize("backend", ["sqlite", "redis", "postgres", "sqlalchemy"])
async def test_concurrent_unbounded_reads_of_large_items_stay_under_the_container_limit(
    backend: str,
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
    store_config: Callable[..., dict[str, Any]],
) -> None:
    """Sixteen reads at once, without `limit`, of a session of 56 items of 1 MiB: each
    answer stops at `limits.maxReadBytes`, and the reads wait their turn for
    `requests.maxBufferedReadBytes`, so none fails and the process stays within its
    container's limit (2,194 MiB before reads had a byte cap and a budget)."""
    proc = sidecar_process({"stores": {"default": store_config(backend)}})
    proc.start()
    assert proc.process is not None
    url = f"{proc.url}/v1/stores/default/sessions/large/items"
    items = large_items(56)
    fits = LIMITS.max_read_bytes // len(orjson.dumps(items[0]))

    async def read(http: aiohttp.ClientSession) -> tuple[int, list[str], bool]:
        async with http.get(url) as resp:
            document = orjson.loads(await resp.read())
            assert resp.status == 200, document
            return resp.status, [i["n"] for i in document["items"]], document["truncated"]

    async with aiohttp.ClientSession() as http:
        await fill(http, url, items)
        answers = await asyncio.gather(*(read(http) for _ in range(16)))
    newest = [item["n"] for item in items[-fits:]]
    assert answers == [(200, newest, True)] * 16
    peak, limit = peak_rss(proc.process.pid), mebibytes(SIDECAR_MEMORY_LIMIT)
    assert peak < limit, f"peak RSS {peak >> 20} MiB, container limit {limit >> 20} MiB"


async def test_an_answer_the_client_does_not_take_is_cut_and_frees_its_budget(
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess], tmp_path: Path
) -> None:
    """A client that asks for a large answer and reads none of it: after `bodyTimeout`
    its connection is cut, and the budget it held serves the next read (the budget here
    holds one read at a time)."""
    limits = {"maxReadBytes": 16 << 20}
    store = {"backend": "sqlite", "sqlite": {"path": str(tmp_path / "s.db")}, "limits": limits}
    budget = (16 << 20) + LIMITS.max_item_bytes
    requests = {"maxBufferedReadBytes": budget, "bodyTimeout": "2s"}
    proc = sidecar_process({"stores": {"default": store}, "requests": requests})
    proc.start()
    path = "/v1/stores/default/sessions/large/items"
    async with aiohttp.ClientSession() as http:
        await fill(http, proc.url + path, large_items(16))
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", proc.port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        try:
            deadline = time.monotonic() + 30
            while "did not take its answer" not in proc.log_path.read_text():
                assert time.monotonic() < deadline, "the stalled answer was never cut"
                await asyncio.sleep(0.1)
            async with http.get(proc.url + path, params={"limit": "1"}) as resp:
                assert resp.status == 200
                assert [i["n"] for i in (await resp.json())["items"]] == ["15"]
            received = await asyncio.to_thread(drain, sock)
        finally:
            sock.close()
    assert received < 16 << 20, "the stalled client was sent its whole answer"


def drain(sock: socket.socket) -> int:
    """Bytes readable from a socket the peer has cut, until it says so."""
    sock.setblocking(True)
    sock.settimeout(10)
    total = 0
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(1 << 16):
            total += len(chunk)
    return total
