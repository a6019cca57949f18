"""Session semantics every driver must share, checked through the real HTTP API.

Items are built with `subject.item(...)` and read back with `subject.values(...)`, so the
same test runs on drivers that keep any JSON (where they are the identity) and on the
`openai` driver, which keeps only the API's own item shapes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from convostore import SidecarStore

from tests.support import REDIS_CLUSTER, Subject, unique


async def test_append_keeps_order_across_batches(subject: Subject) -> None:
    session = subject.session()
    await session.add_items([subject.item(n=1), subject.item(n=2)])
    await session.add_items([subject.item(n=3)])
    assert subject.values(await session.get_items()) == [{"n": 1}, {"n": 2}, {"n": 3}]


async def test_limit_returns_latest_n_oldest_first(subject: Subject) -> None:
    session = subject.session()
    await session.add_items([subject.item(n=n) for n in range(10)])
    assert subject.values(await session.get_items(limit=3)) == [{"n": 7}, {"n": 8}, {"n": 9}]
    assert await session.get_items(limit=0) == []
    assert subject.values(await session.get_items(limit=50)) == [{"n": n} for n in range(10)]


async def test_unknown_session_reads_empty_and_pops_none(subject: Subject) -> None:
    session = subject.session()
    assert await session.get_items() == []
    assert await session.pop_item() is None


async def test_pop_returns_newest_then_older(subject: Subject) -> None:
    session = subject.session()
    await session.add_items([subject.item(n=1), subject.item(n=2)])
    assert subject.value(await session.pop_item()) == {"n": 2}
    assert subject.value(await session.pop_item()) == {"n": 1}
    assert await session.pop_item() is None
    await session.add_items([subject.item(n=3)])
    assert subject.values(await session.get_items()) == [{"n": 3}]


async def test_clear_forgets_items_and_the_session(subject: Subject) -> None:
    session, other = subject.session(), subject.session()
    await session.add_items([subject.item(n=1)])
    await other.add_items([subject.item(n=2)])
    await session.clear_session()
    assert await session.get_items() == []
    assert subject.values(await other.get_items()) == [{"n": 2}]
    ids = [sid async for sid in SidecarStore("conf", subject.sidecar.url).session_ids()]
    assert ids == [other.session_id]


async def test_list_sessions_pages_by_prefix_in_order(subject: Subject) -> None:
    wanted = sorted(f"user-{n:03d}" for n in range(23))
    for session_id in [*wanted, "other-1", "usex-1"]:
        await subject.session(session_id).add_items([subject.item(n=0)])
    store = SidecarStore("conf", subject.sidecar.url)
    assert [sid async for sid in store.session_ids("user-", page_size=10)] == wanted
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{subject.sidecar.url}/v1/stores/conf/sessions",
            params={"prefix": "user-", "limit": "10"},
        ) as resp,
    ):
        page = await resp.json()
    assert page["sessions"] == wanted[:10]
    assert page["next_cursor"]


async def test_idempotency_key_appends_once(subject: Subject) -> None:
    session = subject.session()
    await session.add_items([subject.item(n=1), subject.item(n=2)], idempotency_key="k-1")
    await session.add_items([subject.item(n=1), subject.item(n=2)], idempotency_key="k-1")
    await session.add_items([subject.item(n=3)], idempotency_key="k-2")
    assert subject.values(await session.get_items()) == [{"n": 1}, {"n": 2}, {"n": 3}]


async def test_idempotency_key_with_other_body_is_refused(subject: Subject) -> None:
    url = f"{subject.sidecar.url}/v1/stores/conf/sessions/{unique()}/items"
    headers = {"Idempotency-Key": "same"}
    first_body, other_body = {"items": [subject.item(n=1)]}, {"items": [subject.item(n=2)]}
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json=first_body, headers=headers) as first:
            assert (await first.json()).items() >= {"appended": 1, "replayed": False}.items()
        async with http.post(url, json=first_body, headers=headers) as again:
            assert (await again.json()) == {"appended": 1, "replayed": True}
        async with http.post(url, json=other_body, headers=headers) as other:
            assert other.status == 409
            assert (await other.json())["error"]["code"] == "idempotency_key_reused"
        async with http.get(url) as read:
            assert subject.values((await read.json())["items"]) == [{"n": 1}]


@pytest.mark.retention
async def test_idle_session_expires_after_ttl(make_subject: Callable[..., Any]) -> None:
    subject: Subject = await make_subject(ttl=1)
    session, fresh = subject.session(), subject.session()
    await session.add_items([{"n": 1}])
    await asyncio.sleep(1.3)
    await fresh.add_items([{"n": 9}])
    assert await session.get_items() == []
    assert await session.pop_item() is None
    ids = [sid async for sid in SidecarStore("conf", subject.sidecar.url).session_ids()]
    assert ids == [fresh.session_id]
    await session.add_items([{"n": 2}])
    assert await session.get_items() == [{"n": 2}]


@pytest.mark.retention
async def test_written_session_does_not_expire(make_subject: Callable[..., Any]) -> None:
    """Writes 0.5 s apart for 3 s keep a 2 s TTL from running out: each refreshes it, and
    each gap leaves 1.5 s to spare on a loaded machine."""
    subject: Subject = await make_subject(ttl=2)
    session = subject.session()
    for n in range(6):
        await session.add_items([{"n": n}])
        await asyncio.sleep(0.5)
    assert await session.get_items() == [{"n": n} for n in range(6)]


@pytest.mark.retention
async def test_sweep_removes_expired_sessions(make_subject: Callable[..., Any]) -> None:
    subject: Subject = await make_subject(ttl=1)
    session = subject.session()
    await session.add_items([{"n": 1}])
    await asyncio.sleep(1.3)
    swept = await subject.driver.sweep()
    natively = ("redis", REDIS_CLUSTER, "dapr")  # they expire sessions themselves
    assert swept == (0 if subject.backend in natively else 1)
    assert await session.get_items() == []


@pytest.mark.retention
async def test_max_items_trims_oldest_on_append(make_subject: Callable[..., Any]) -> None:
    subject: Subject = await make_subject(maxItems=5)
    session = subject.session()
    await session.add_items([{"n": n} for n in range(4)])
    await session.add_items([{"n": n} for n in range(4, 8)])
    assert await session.get_items() == [{"n": n} for n in range(3, 8)]


@pytest.mark.any_json
async def test_json_values_round_trip_exactly(subject: Subject) -> None:
    nested: dict[str, Any] = {"leaf": True}
    for depth in range(60):
        nested = {"level": depth, "child": [nested]}
    items: list[dict[str, Any]] = [
        {"text": 'héllo wörld 你好 🚀 \u202e rtl \u0000 nul \\ " quote', "emoji": "👩‍💻"},
        {"big": 123456789012345678901234567890, "neg": -(2**70), "f": 0.1, "e": 1e-300},
        {"floats": [1.0, -0.0, 2.5e300], "null": None, "empty": {}, "list": []},
        nested,
        {"key order": 1, "a": 2, "Z": 3, "é": 4},
    ]
    session = subject.session()
    await session.add_items(items)
    back = await session.get_items()
    assert back == items
    assert [list(item) for item in back] == [list(item) for item in items]
    assert back[1]["big"] == 123456789012345678901234567890
    assert isinstance(back[2]["floats"][0], float)


@pytest.mark.any_json
async def test_one_mebibyte_item_round_trips(subject: Subject) -> None:
    payload = "x" * ((1 << 20) - 64)
    session = subject.session()
    await session.add_items([{"blob": payload}])
    assert await session.get_items() == [{"blob": payload}]


async def test_concurrent_writers_lose_nothing_and_never_interleave(subject: Subject) -> None:
    session_id = unique()
    writers, batches, size = 12, 6, 5

    async def write(writer: int) -> None:
        session = subject.session(session_id)
        for batch in range(batches):
            await session.add_items([subject.item(w=writer, b=batch, i=i) for i in range(size)])

    await asyncio.gather(*(write(w) for w in range(writers)))
    items: list[Any] = subject.values(await subject.session(session_id).get_items())
    assert len(items) == writers * batches * size
    runs = [items[n : n + size] for n in range(0, len(items), size)]
    for run in runs:
        assert [(i["w"], i["b"], i["i"]) for i in run] == [
            (run[0]["w"], run[0]["b"], i) for i in range(size)
        ]
    for writer in range(writers):
        order = [i["b"] for i in items if i["w"] == writer and i["i"] == 0]
        assert order == list(range(batches))


async def test_concurrent_pops_never_return_the_same_item(subject: Subject) -> None:
    session_id = unique()
    await subject.session(session_id).add_items([subject.item(n=n) for n in range(120)])

    async def drain() -> list[int]:
        session, got = subject.session(session_id), []
        while (item := subject.value(await session.pop_item())) is not None:
            got.append(item["n"])
        return got

    results = await asyncio.gather(*(drain() for _ in range(8)))
    popped = [n for result in results for n in result]
    assert sorted(popped) == list(range(120))
    for result in results:
        assert result == sorted(result, reverse=True)


async def test_writers_and_poppers_together_account_for_every_item(subject: Subject) -> None:
    session_id = unique()
    popped: list[int] = []

    async def write(writer: int) -> None:
        session = subject.session(session_id)
        for n in range(20):
            await session.add_items([subject.item(n=writer * 1000 + n)])

    async def pop() -> None:
        session = subject.session(session_id)
        for _ in range(15):
            item = subject.value(await session.pop_item())
            if item is not None:
                popped.append(item["n"])

    await asyncio.gather(*(write(w) for w in range(4)), *(pop() for _ in range(4)))
    remaining: list[Any] = subject.values(await subject.session(session_id).get_items())
    assert sorted(popped + [i["n"] for i in remaining]) == sorted(
        w * 1000 + n for w in range(4) for n in range(20)
    )
    assert len(set(popped)) == len(popped)


def tool_turn(turn: int, calls: int) -> list[dict[str, Any]]:
    """One user turn: the user's message, `calls` tool calls each with its output, and
    the assistant's answer."""
    items: list[dict[str, Any]] = [{"role": "user", "content": f"question {turn}"}]
    for call in range(calls):
        call_id = f"call_{turn}_{call}"
        items += [
            {"type": "function_call", "call_id": call_id, "name": "lookup", "arguments": "{}"},
            {"type": "function_call_output", "call_id": call_id, "output": f"out {call_id}"},
        ]
    return [*items, {"role": "assistant", "content": f"answer {turn}"}]


def labels(items: list[Any]) -> list[str]:
    """What each item is: the user's question, a call or output by id, an answer."""
    out = []
    for item in items:
        if item.get("role") == "user":
            content = item["content"]
            out.append(content if isinstance(content, str) else content[0]["text"])
        elif item.get("role") == "assistant":
            out.append("answer")
        else:
            out.append(f"{item['type']} {item['call_id']}")
    return out


async def test_reads_by_turns_and_whole_turn_limits_never_split_a_call(subject: Subject) -> None:
    session = subject.session()
    for turn, calls in ((1, 1), (2, 0), (3, 2)):
        await session.add_items(tool_turn(turn, calls))
    everything = labels(await session.get_items())
    assert len(everything) == 12
    url = f"{subject.sidecar.url}/v1/stores/conf/sessions/{session.session_id}/items"

    async def read(**params: str) -> list[str]:
        async with aiohttp.ClientSession() as http, http.get(url, params=params) as resp:
            assert resp.status == 200, await resp.text()
            return labels((await resp.json())["items"])

    assert await read(turns="1") == everything[6:]
    assert await read(turns="2") == everything[4:]
    assert await read(turns="9") == everything
    assert await read(turns="0") == []
    assert (await read(limit="4"))[0] == "function_call_output call_3_0"
    assert await read(limit="4", whole_turns="true") == everything[6:]
    assert await read(limit="7", whole_turns="true") == everything[4:]
    assert await read(limit="6", whole_turns="true") == everything[6:]
    assert await read(limit="50", whole_turns="true") == everything
    assert await read(limit="0", whole_turns="true") == []
    url = url.replace(session.session_id, unique())
    assert await read(turns="3") == []
    assert await read(limit="3", whole_turns="true") == []


async def test_one_store_name_in_two_namespaces_shares_nothing(
    backend: str,
    at_rest: dict[str, Any],
    start_sidecar: Any,
    store_config: Callable[..., dict[str, Any]],
) -> None:
    """The same store config (same backend, same keyPrefix or schema or file) rendered
    for two namespaces: two stores that never see each other's sessions."""
    config = store_config(backend, **at_rest)
    team_a = await start_sidecar({"stores": {"conf": {**config, "scope": "team-a"}}})
    team_b = await start_sidecar({"stores": {"conf": {**config, "scope": "team-b"}}})
    a = Subject(backend, team_a, config)
    b = Subject(backend, team_b, config)
    session_id = unique()
    await a.session(session_id).add_items([a.item(who="a")])
    await b.session(session_id).add_items([b.item(who="b")])
    assert a.values(await a.session(session_id).get_items()) == [{"who": "a"}]
    assert b.values(await b.session(session_id).get_items()) == [{"who": "b"}]
    await b.session(session_id).clear_session()
    assert a.values(await a.session(session_id).get_items()) == [{"who": "a"}]
    listed = [sid async for sid in SidecarStore("conf", team_a.url).session_ids()]
    assert listed == [session_id]


@pytest.mark.any_json
async def test_a_lone_surrogate_is_stored_as_the_sdks_sessions_store_it(subject: Subject) -> None:
    """`"\\ud800"` is valid JSON and the SDK's own sessions keep it; so does the store."""
    session = subject.session()
    await session.add_items([{"text": "broken \ud800 pair", "ok": "fine"}])
    assert await session.get_items() == [{"text": "broken \ud800 pair", "ok": "fine"}]


async def test_a_number_beyond_a_double_is_refused_not_changed(subject: Subject) -> None:
    url = f"{subject.sidecar.url}/v1/stores/conf/sessions/{unique()}/items"
    async with aiohttp.ClientSession() as http:
        async with http.post(
            url, data=b'{"items":[{"f":1e400}]}', headers={"Content-Type": "application/json"}
        ) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
        async with http.get(url) as resp:
            assert (await resp.json())["items"] == []
    assert error["code"] == "invalid_body"
    assert "1e400" in error["message"]
