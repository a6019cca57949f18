"""Reads stop at the store's byte cap (`limits.maxReadBytes`) on every driver, behind
encryption at rest too, where the cap counts the plaintext the client gets: the answer
holds the newest items that fit, says it was cut, and a read that fits is whole."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from tests.support import POSTGRES_POOLED, REDIS_CLUSTER, Subject

CAP, ITEM = 4096, 1024
STRUCTURED = ("sqlite", "redis", "postgres", REDIS_CLUSTER, POSTGRES_POOLED, "sqlalchemy")


async def read(subject: Subject, session_id: str, **params: str) -> dict[str, Any]:
    url = f"{subject.sidecar.url}/v1/stores/conf/sessions/{session_id}/items"
    async with aiohttp.ClientSession() as http, http.get(url, params=params) as resp:
        assert resp.status == 200, await resp.text()
        document: dict[str, Any] = await resp.json()
    return document


def size(items: list[Any]) -> int:
    return sum(len(orjson.dumps(item)) for item in items)


async def test_a_read_holds_the_newest_items_within_the_byte_cap(
    make_subject: Any,
) -> None:
    subject: Subject = await make_subject(limits={"maxReadBytes": CAP, "maxItemBytes": ITEM})
    session = subject.session()
    fields = [{"n": n, "pad": "x" * (97 * n % 400)} for n in range(40)]
    for start in range(0, len(fields), 10):
        await session.add_items([subject.item(**f) for f in fields[start : start + 10]])

    answer = await read(subject, session.session_id)
    items = answer["items"]
    assert answer.get("truncated") is True
    assert 0 < len(items) < len(fields)
    assert subject.values(items) == fields[-len(items) :]  # the newest, in order
    assert size(items) <= CAP
    views = [{"limit": "1000"}] + ([{"view": "full"}] if subject.backend in STRUCTURED else [])
    for params in views:
        assert await read(subject, session.session_id, **params) == answer, params
    assert (await read(subject, session.session_id, limit="3"))["items"] == items[-3:]

    for item in reversed(items):  # what is left out is the next item, which would not fit
        assert await session.pop_item() == item
    next_older = (await read(subject, session.session_id, limit="1"))["items"]
    assert subject.values(next_older) == [fields[-len(items) - 1]]
    assert size(items) + size(next_older) > CAP


async def test_a_short_session_is_read_whole_under_the_byte_cap(make_subject: Any) -> None:
    subject: Subject = await make_subject(limits={"maxReadBytes": CAP, "maxItemBytes": ITEM})
    session = subject.session()
    fields = [{"n": n, "pad": "y" * 200} for n in range(5)]
    await session.add_items([subject.item(**f) for f in fields])
    answer = await read(subject, session.session_id)
    assert subject.values(answer["items"]) == fields
    assert "truncated" not in answer
