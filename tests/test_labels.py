"""Labels on sessions and finding sessions by them, through the real client and the
sidecar's API, on every backend that keeps structure (behind encryption too): what is
set is what comes back, listings are newest first and page without repeating or
skipping a session while others write, and every malformed request is refused with a
clear code and changes nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from convostore import AdvancedSidecarSession, SidecarSession, SidecarStore
from convostore.errors import RequestRejectedError
from convostore_sidecar.config import parse_config
from convostore_sidecar.drivers.base import wall_clock
from convostore_sidecar.http.state import STORES
from convostore_sidecar.keyring import generate_key
from convostore_sidecar.sections import ConfigError

from tests.support import (
    POSTGRES_POOLED,
    REDIS_CLUSTER,
    RunningSidecar,
    StartSidecar,
    raw_contents,
    unique,
)

LABELLED = ("sqlite", "postgres", "redis", REDIS_CLUSTER, POSTGRES_POOLED, "sqlalchemy")
StoreConfig = Callable[..., dict[str, Any]]


@pytest.fixture(params=[*LABELLED, "sqlite-encrypted"])
async def sidecar_on(
    request: pytest.FixtureRequest, start_sidecar: StartSidecar, store_config: StoreConfig
) -> RunningSidecar:
    if request.param == "sqlite-encrypted":
        keys = {"keys": [{"id": "k1", "value": generate_key()}]}
        config = store_config("sqlite", encryption=keys)
    else:
        config = store_config(request.param)
    return await start_sidecar({"stores": {"chat": config}})


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def session(sidecar: RunningSidecar, session_id: str, **labels: str) -> SidecarSession:
    return SidecarSession(session_id, "chat", sidecar.url, metadata=labels or None)


async def found(sidecar: RunningSidecar, page_size: int = 100, **kwargs: Any) -> list[str]:
    store = SidecarStore("chat", sidecar.url)
    return [r["session_id"] async for r in store.find_sessions(page_size=page_size, **kwargs)]


async def test_metadata_round_trips_through_the_client(sidecar_on: RunningSidecar) -> None:
    tenant = unique("t")
    chat = session(sidecar_on, unique(), user_id="u-42", tenant=tenant)
    assert await chat.get_metadata() is None
    before = datetime.now(UTC) - timedelta(seconds=5)
    await chat.add_items([{"role": "user", "content": "hello"}])
    record = await chat.get_metadata()
    assert record is not None
    assert record["labels"] == {"tenant": tenant, "user_id": "u-42"}
    assert record["session_id"] == chat.session_id
    created = datetime.fromisoformat(record["created_at"])
    assert before < created <= datetime.fromisoformat(record["updated_at"])
    changed = await chat.set_metadata({"user_id": None, "plan": "free é ✓"})
    assert changed["labels"] == {"tenant": tenant, "plan": "free é ✓"}
    assert changed["created_at"] == record["created_at"]
    again = await SidecarSession(chat.session_id, "chat", sidecar_on.url).get_metadata()
    assert again == changed
    assert await chat.get_items() == [{"role": "user", "content": "hello"}]


async def test_a_clear_forgets_labels_and_the_client_sets_them_again(
    sidecar_on: RunningSidecar,
) -> None:
    tenant = unique("t")
    chat = session(sidecar_on, unique(), tenant=tenant)
    await chat.add_items([{"role": "user", "content": "a"}])
    assert await found(sidecar_on, labels={"tenant": tenant}) == [chat.session_id]
    await chat.clear_session()
    assert await chat.get_metadata() is None
    assert await found(sidecar_on, labels={"tenant": tenant}) == []
    await chat.add_items([{"role": "user", "content": "b"}])
    assert await found(sidecar_on, labels={"tenant": tenant}) == [chat.session_id]


async def test_listing_by_labels_is_newest_first_and_exact(sidecar_on: RunningSidecar) -> None:
    tenant = unique("t")
    made: list[tuple[str, str]] = []
    for n in range(9):
        user = "alice" if n % 3 else "bob"
        chat = session(sidecar_on, f"{tenant}-{n}", tenant=tenant, user_id=user)
        await chat.add_items([{"role": "user", "content": str(n)}])
        made.append((chat.session_id, user))
    unlabelled = session(sidecar_on, f"{tenant}-none")
    await unlabelled.add_items([{"role": "user", "content": "x"}])
    newest_first = [sid for sid, _ in reversed(made)]
    assert await found(sidecar_on, labels={"tenant": tenant}) == newest_first
    alice = [sid for sid, user in reversed(made) if user == "alice"]
    assert await found(sidecar_on, 2, labels={"tenant": tenant, "user_id": "alice"}) == alice
    assert await found(sidecar_on, labels={"user_id": "alice", "tenant": unique()}) == []
    everything = await found(sidecar_on, 3)
    assert everything[: len(made) + 1] == [unlabelled.session_id, *newest_first]


async def test_listing_by_time_bounds(sidecar_on: RunningSidecar) -> None:
    tenant = unique("t")
    first = session(sidecar_on, unique(), tenant=tenant)
    await first.add_items([{"role": "user", "content": "1"}])
    middle = datetime.fromisoformat((await first.get_metadata() or {})["created_at"])
    second = session(sidecar_on, unique(), tenant=tenant)
    await second.add_items([{"role": "user", "content": "2"}])
    labels = {"tenant": tenant}
    assert await found(sidecar_on, labels=labels, created_after=middle) == [second.session_id]
    later = middle + timedelta(microseconds=1)
    assert await found(sidecar_on, labels=labels, created_before=later) == [first.session_id]
    await first.add_items([{"role": "assistant", "content": "again"}])
    written = datetime.fromisoformat((await first.get_metadata() or {})["updated_at"])
    assert await found(
        sidecar_on, labels=labels, updated_after=written - timedelta(microseconds=1)
    ) == [first.session_id]
    assert await found(sidecar_on, labels=labels, created_after=middle, updated_before=written) == [
        second.session_id
    ]


async def test_paging_while_others_write_neither_repeats_nor_skips(
    sidecar_on: RunningSidecar,
) -> None:
    """Sessions made and written while a listing pages through: every session that
    existed when it began comes exactly once, in order; those made after come never."""
    tenant = unique("t")
    existing = []
    for n in range(12):
        chat = session(sidecar_on, f"{tenant}-{n:02}", tenant=tenant)
        await chat.add_items([{"role": "user", "content": str(n)}])
        existing.append(chat)
    seen: list[str] = []
    writers_done = asyncio.Event()

    async def write_meanwhile() -> None:
        for n, chat in enumerate(existing):
            await chat.add_items([{"role": "assistant", "content": "more"}])
            newcomer = session(sidecar_on, f"{tenant}-new-{n:02}", tenant=tenant)
            await newcomer.add_items([{"role": "user", "content": "late"}])
            await asyncio.sleep(0)
        writers_done.set()

    async def list_slowly() -> None:
        store = SidecarStore("chat", sidecar_on.url)
        async for record in store.find_sessions({"tenant": tenant}, page_size=2):
            if record["session_id"].startswith(f"{tenant}-new-"):
                continue  # made after the listing began: may or may not be seen
            seen.append(record["session_id"])
            await asyncio.sleep(0.01)

    await asyncio.gather(write_meanwhile(), list_slowly())
    assert writers_done.is_set()
    assert seen == [chat.session_id for chat in reversed(existing)]


async def test_a_sessions_labels_are_bounded(
    start_sidecar: StartSidecar, store_config: StoreConfig
) -> None:
    config = store_config("sqlite", labels={"allowed": ["user_id", "tenant"], "maxPerSession": 2})
    sidecar = await start_sidecar({"stores": {"chat": config}})
    chat = session(sidecar, unique(), user_id="u1")
    await chat.add_items([{"role": "user", "content": "x"}])
    with pytest.raises(RequestRejectedError) as refused:
        await chat.set_metadata({"plan": "free"})
    assert refused.value.code == "label_not_allowed"
    await chat.set_metadata({"tenant": "acme"})
    assert (await chat.get_metadata() or {})["labels"] == {"tenant": "acme", "user_id": "u1"}
    stranger = session(sidecar, unique(), user_id="u2", plan="free")
    with pytest.raises(RequestRejectedError) as refused:
        await stranger.add_items([{"role": "user", "content": "y"}])
    assert refused.value.code == "label_not_allowed"
    assert await stranger.get_metadata() is None
    assert await stranger.get_items() == []


async def test_too_many_labels_changes_nothing(sidecar_on: RunningSidecar) -> None:
    chat = session(sidecar_on, unique(), **{f"l{n}": "v" for n in range(16)})
    await chat.add_items([{"role": "user", "content": "x"}])
    before = await chat.get_metadata()
    with pytest.raises(RequestRejectedError) as refused:
        await chat.set_metadata({"one-more": "v", "l1": "changed"})
    assert (refused.value.code, refused.value.status) == ("too_many_labels", 409)
    assert await chat.get_metadata() == before


HOSTILE_BODIES: list[tuple[Any, str]] = [
    ({}, "invalid_body"),
    ({"labels": {}}, "invalid_labels"),
    ({"labels": []}, "invalid_labels"),
    ({"labels": {"user_id": "x"}, "extra": 1}, "invalid_body"),
    ({"labels": {"": "x"}}, "invalid_labels"),
    ({"labels": {"-lead": "x"}}, "invalid_labels"),
    ({"labels": {"a" * 64: "x"}}, "invalid_labels"),
    ({"labels": {"sp ace": "x"}}, "invalid_labels"),
    ({"labels": {"user_id": ""}}, "invalid_labels"),
    ({"labels": {"user_id": "x" * 257}}, "invalid_labels"),
    ({"labels": {"user_id": "a\x00b"}}, "invalid_labels"),
    ({"labels": {"user_id": "a\nb"}}, "invalid_labels"),
    ({"labels": {"user_id": "a\u2028b"}}, "invalid_labels"),
    ({"labels": {"user_id": 42}}, "invalid_labels"),
    ({"labels": {"user_id": {"$ne": None}}}, "invalid_labels"),
    ({"labels": {f"l{n}": "v" for n in range(17)}}, "invalid_labels"),
    ([1, 2], "invalid_body"),
]


@pytest.mark.parametrize(("body", "code"), HOSTILE_BODIES)
async def test_hostile_label_bodies_are_refused(
    sidecar: RunningSidecar, http: aiohttp.ClientSession, body: Any, code: str
) -> None:
    url = f"{sidecar.url}/v1/stores/default/sessions/{unique()}/metadata"
    async with http.patch(url, json=body) as resp:
        assert resp.status == 400, await resp.text()
        assert (await resp.json())["error"]["code"] == code
    async with http.get(url) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "session_not_found"


async def test_malformed_label_requests_are_refused(
    sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    url = f"{sidecar.url}/v1/stores/default/sessions/{unique()}/metadata"
    async with http.patch(url, data=b'{"labels": {"a": ', headers=JSON) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid_body"
    async with http.patch(url, data=b'{"labels": {"a": "b"}}') as resp:
        assert resp.status == 415
    async with http.patch(url, data=b"{" + b" " * (70 << 10) + b"}", headers=JSON) as resp:
        assert resp.status == 413
    bad_id = f"{sidecar.url}/v1/stores/default/sessions/a%20b/metadata"
    async with http.patch(bad_id, json={"labels": {"a": "b"}}) as resp:
        assert (await resp.json())["error"]["code"] == "invalid_session_id"
    async with http.get(url) as resp:
        assert resp.status == 404


JSON = {"Content-Type": "application/json"}
HOSTILE_QUERIES: list[tuple[str, str]] = [
    ("label=user_id", "invalid_labels"),
    ("label==x", "invalid_labels"),
    ("label=" + "&label=".join(f"n{n}=v" for n in range(65)), "invalid_labels"),
    ("label=user_id=a%00b", "invalid_labels"),
    ("label=" + "n" * 70 + "=v", "invalid_labels"),
    ("created_after=yesterday", "invalid_created_after"),
    ("created_before=2026-01-01T00:00:00", "invalid_created_before"),
    ("updated_after=1700000000", "invalid_updated_after"),
    ("limit=0", "invalid_limit"),
    ("limit=1001", "invalid_limit"),
    ("limit=-1", "invalid_limit"),
    ("cursor=abc", "invalid_cursor"),
    ("cursor=WzEsMl0", "invalid_cursor"),  # [1,2]: no session id
    ("cursor=WyJ4IiwiYSJd", "invalid_cursor"),  # ["x","a"]: no time
    ("cursor=" + "A" * 5000, "invalid_cursor"),
    ("prefix=a", "invalid_parameter"),
    ("limit=1&limit=2", "invalid_query"),
]


@pytest.mark.parametrize(("query", "code"), HOSTILE_QUERIES)
async def test_hostile_listing_queries_are_refused(
    sidecar: RunningSidecar, http: aiohttp.ClientSession, query: str, code: str
) -> None:
    url = f"{sidecar.url}/v1/stores/default/sessions:find?{query}"
    async with http.get(url) as resp:
        assert resp.status == 400, await resp.text()
        assert (await resp.json())["error"]["code"] == code


@pytest.mark.parametrize("backend", ["dapr", "openai"])
async def test_backends_without_structure_refuse_labels(
    start_sidecar: StartSidecar, store_config: StoreConfig, backend: str
) -> None:
    sidecar = await start_sidecar({"stores": {"chat": store_config(backend)}})
    chat = session(sidecar, unique(), user_id="u1")
    with pytest.raises(RequestRejectedError) as refused:
        await chat.add_items([{"role": "user", "content": "x"}])
    assert (refused.value.status, refused.value.code) == (501, "not_supported")
    assert f"the {backend} backend cannot keep labels" in refused.value.message
    assert await SidecarSession(chat.session_id, "chat", sidecar.url).get_items() == []
    with pytest.raises(RequestRejectedError) as refused:
        await found(sidecar, labels={"user_id": "u1"})
    assert refused.value.status == 501


async def test_erasing_a_subject_leaves_nothing_of_theirs(
    sidecar_on: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    """Every session of one person, with branches, usage, a compaction archive and
    idempotency records, erased by their label; another person's untouched."""
    subject, other, tenant = unique("subject"), unique("other"), unique("t")
    said = unique("said")
    chats = []
    for person in (subject, subject, other):
        chat = AdvancedSidecarSession(
            unique(), "chat", sidecar_on.url, metadata={"user_id": person, "tenant": tenant}
        )
        for n in (1, 2):
            await chat.add_items(
                [
                    {"role": "user", "content": f"{said} {person} q{n}"},
                    {"role": "assistant", "content": f"{said} {person} a{n}"},
                ],
                idempotency_key=f"key-{n}",
            )
        await chat.create_branch_from_turn(2, "alt")
        chats.append(chat)
    base = f"{sidecar_on.url}/v1/stores/chat/sessions/{chats[0].session_id}"
    usage = {"requests": 1, "input_tokens": 3, "output_tokens": 4, "total_tokens": 7}
    async with http.post(base + "/branches/main/usage", json=usage) as resp:
        assert resp.status == 200
    archived = {"items": [{"type": "compaction", "summary": "short"}]}
    async with http.post(base + "/items:archive?count=2", json=archived) as resp:
        assert resp.status == 200, await resp.text()
    before = await raw_contents(sidecar_on)
    assert subject.encode() in before
    assert other.encode() in before

    store = SidecarStore("chat", sidecar_on.url)
    erased = await store.erase({"user_id": subject, "tenant": tenant})
    assert erased == {"erased_sessions": 2, "erased_items": 2 * 4 + 2 * 2 + 1 - 2 + 2}

    for chat in chats[:2]:
        assert await chat.get_metadata() is None
        fresh = AdvancedSidecarSession(chat.session_id, "chat", sidecar_on.url)
        assert await fresh.get_items() == []
        assert await fresh.list_branches() == []
        assert await fresh.get_session_usage() is None
        await fresh.add_items([{"role": "user", "content": "new"}], idempotency_key="key-1")
        assert await fresh.get_items() == [{"role": "user", "content": "new"}], "key forgotten"
        await fresh.create_branch_from_turn(1, "alt")  # the branch id is free again
        await fresh.clear_session()
    assert await found(sidecar_on, labels={"user_id": subject}) == []
    assert await found(sidecar_on, labels={"tenant": tenant}) == [chats[2].session_id]
    survivor = await chats[2].get_items(branch_id="main")
    assert survivor[0] == {"role": "user", "content": f"{said} {other} q1"}
    assert len(survivor) == 4
    after = await raw_contents(sidecar_on)
    assert subject.encode() not in after
    assert other.encode() in after
    again = await store.erase({"user_id": subject, "tenant": tenant})
    assert again == {"erased_sessions": 0, "erased_items": 0}
    records = await store.erasures()
    assert [r["erased_sessions"] for r in records] == [0, 2]
    assert records[1]["label_names"] == ["tenant", "user_id"]
    assert subject not in json.dumps(records)
    assert subject.encode() not in await raw_contents(sidecar_on), "the records name no one"


async def test_an_erasure_goes_on_where_it_stopped(
    sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    subject = unique("subject")
    for n in range(105):  # more than one page of the erasure's batches
        chat = SidecarSession(f"{subject}-{n}", url=sidecar.url, metadata={"user_id": subject})
        await chat.add_items([{"role": "user", "content": "x"}])
    url = f"{sidecar.url}/v1/stores/default/sessions:erase"
    async with http.post(url, json={"labels": {"user_id": subject}}) as resp:
        first = await resp.json()
    assert first["complete"] is True
    assert first["erased_sessions"] == 105
    async with http.post(url, json={"labels": {"user_id": subject}}) as resp:
        again = await resp.json()
    assert (again["erased_sessions"], again["erased_items"], again["complete"]) == (0, 0, True)
    records = await SidecarStore("default", sidecar.url).erasures()
    assert [r["erased_sessions"] for r in records] == [0, 105]
    assert [r["erasure_id"] for r in records] == [again["erasure_id"], first["erasure_id"]]
    assert records[1]["label_names"] == ["user_id"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({}, "invalid_body"),
        ({"labels": {}}, "invalid_labels"),
        ({"labels": {"user_id": None}}, "invalid_labels"),
        ({"labels": {"user_id": ""}}, "invalid_labels"),
        ({"labels": {"user_id": "x"}, "all": True}, "invalid_body"),
        ({"labels": "user_id=x"}, "invalid_labels"),
    ],
)
async def test_hostile_erasures_are_refused_and_erase_nothing(
    sidecar: RunningSidecar, http: aiohttp.ClientSession, body: Any, code: str
) -> None:
    chat = SidecarSession(unique(), url=sidecar.url, metadata={"user_id": "x"})
    await chat.add_items([{"role": "user", "content": "kept"}])
    async with http.post(f"{sidecar.url}/v1/stores/default/sessions:erase", json=body) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == code
    assert await chat.get_items() == [{"role": "user", "content": "kept"}]


async def test_an_erased_persons_words_leave_the_sqlite_file_itself(
    start_sidecar: StartSidecar, store_config: StoreConfig, tmp_path: Path
) -> None:
    """Not only the rows: the file's pages and its write-ahead log no longer hold a byte
    of what was erased (a copy of the file taken before still does)."""
    config = store_config("sqlite")
    sidecar = await start_sidecar({"stores": {"chat": config}})
    subject, other = unique("subject"), unique("other")
    for person in (subject, other):
        for n in range(3):
            chat = session(sidecar, f"{person}-{n}", user_id=person)
            long_words = [{"role": "user", "content": f"{person} says {n} " * 200}]
            await chat.add_items(long_words * 5)
    database = Path(config["sqlite"]["path"])

    def file_bytes() -> bytes:
        wal = database.with_name(database.name + "-wal")
        return database.read_bytes() + (wal.read_bytes() if wal.exists() else b"")

    backup = tmp_path / "before-erasure.db"
    backup.write_bytes(file_bytes())
    assert subject.encode() in file_bytes()
    erased = await SidecarStore("chat", sidecar.url).erase({"user_id": subject})
    assert erased == {"erased_sessions": 3, "erased_items": 15}
    after = file_bytes()
    assert subject.encode() not in after
    assert other.encode() in after
    assert subject.encode() in backup.read_bytes(), "what the README says remains"
    assert len(await SidecarSession(f"{other}-0", "chat", sidecar.url).get_items()) == 5


@pytest.mark.parametrize("backend", LABELLED)
async def test_a_retention_class_expires_its_idle_sessions_and_no_other(
    start_sidecar: StartSidecar, store_config: StoreConfig, backend: str
) -> None:
    classes = {"label": "plan", "classes": {"free": "1s", "paid": "30d"}}
    config = store_config(backend, sweepInterval=0.1, labels={"retention": classes})
    sidecar = await start_sidecar({"stores": {"chat": config}})
    free = session(sidecar, unique(), plan="free")
    paid = session(sidecar, unique(), plan="paid")
    plain = session(sidecar, unique())
    for chat in (free, paid, plain):
        await chat.add_items([{"role": "user", "content": "hello"}])
    driver: Any = sidecar.app[STORES].get("chat").driver
    kept = await driver.erase(paid.session_id, idle_since=wall_clock() - 3600)
    assert kept is None, "written since: an erasure by idleness leaves it"
    deadline = asyncio.get_running_loop().time() + 30
    while await free.get_metadata() is not None:
        assert asyncio.get_running_loop().time() < deadline, "the free session was never swept"
        await asyncio.sleep(0.05)
    assert await SidecarSession(free.session_id, "chat", sidecar.url).get_items() == []
    for chat in (paid, plain):
        assert await chat.get_items() == [{"role": "user", "content": "hello"}]
    assert (await paid.get_metadata() or {})["labels"] == {"plan": "paid"}


@pytest.mark.parametrize(
    ("retention", "message"),
    [
        ({"classes": {"free": "7d"}}, "name the label"),
        ({"label": "plan"}, "map each class"),
        ({"label": "bad name", "classes": {"free": "7d"}}, "label name"),
        ({"label": "plan", "classes": {"free": "soon"}}, "must be a duration"),
        ({"label": "plan", "classes": {"free": "0s"}}, "must be a duration"),
        ({"label": "plan", "classes": {"a\nb": "7d"}}, "without control characters"),
        ({"label": "plan", "classes": {"free": "7d"}, "extra": 1}, "extra"),
    ],
)
def test_malformed_retention_classes_are_refused_naming_the_field(
    retention: dict[str, Any], message: str
) -> None:
    store = {"backend": "sqlite", "labels": {"retention": retention}}
    with pytest.raises(ConfigError) as refused:
        parse_config({"stores": {"chat": store}})
    assert "labels.retention" in str(refused.value)
    assert message in str(refused.value)
