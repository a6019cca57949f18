"""The structure calls over HTTP: refusals with clear codes that change nothing, on every
backend that keeps structure, and 501 on those that do not."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import yarl
from convostore import AdvancedSidecarSession
from convostore.errors import RequestRejectedError

from tests.support import POSTGRES_POOLED, REDIS_CLUSTER, RunningSidecar, StartSidecar, unique

STRUCTURED = ("sqlite", "postgres", "redis", REDIS_CLUSTER, POSTGRES_POOLED, "sqlalchemy")
StoreConfig = Callable[..., dict[str, Any]]


@pytest.fixture(params=STRUCTURED)
async def sidecar_on(
    request: pytest.FixtureRequest, start_sidecar: StartSidecar, store_config: StoreConfig
) -> RunningSidecar:
    return await start_sidecar({"stores": {"chat": store_config(request.param)}})


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class Session:
    """One session's URLs, and what it holds, read through the API."""

    def __init__(self, http: aiohttp.ClientSession, sidecar: RunningSidecar) -> None:
        self.http = http
        self.url = f"{sidecar.url}/v1/stores/chat/sessions/{unique()}"

    async def call(self, method: str, path: str = "", **kwargs: Any) -> tuple[int, Any]:
        async with self.http.request(method, self.url + path, **kwargs) as resp:
            return resp.status, (await resp.json() if resp.status != 204 else None)

    async def state(self) -> Any:
        """Everything a refused call could have changed."""
        return [
            await self.call("GET", "/items"),
            await self.call("GET", "/branches"),
            await self.call("GET", "/usage"),
            await self.call("GET", "/branches/main/turns"),
        ]

    async def fill(self) -> None:
        for n in (1, 2):
            items = [{"role": "user", "content": f"q{n}"}, {"role": "assistant", "content": "a"}]
            assert (await self.call("POST", "/items", json={"items": items}))[0] == 200
        body = {"from_branch": "main", "turn": 2, "branch_id": "alt"}
        assert (await self.call("POST", "/branches", json=body))[0] == 201
        usage = {"requests": 1, "input_tokens": 3, "output_tokens": 4, "total_tokens": 7}
        assert await self.call("POST", "/branches/main/usage", json=usage) == (200, {"turn": 2})


UNKNOWN_BRANCH = [
    ("GET", "/items?branch=nope", None),
    ("POST", "/items?branch=nope", {"items": [{"role": "user", "content": "x"}]}),
    ("POST", "/items:pop?branch=nope", None),
    ("GET", "/branches/nope", None),
    ("DELETE", "/branches/nope", None),
    ("GET", "/branches/nope/turns", None),
    ("GET", "/branches/nope/shape", None),
    ("GET", "/branches/nope/usage", None),
    (
        "POST",
        "/branches/nope/usage",
        {"requests": 1, "input_tokens": 1, "output_tokens": 1, "total_tokens": 2},
    ),
    ("POST", "/branches", {"from_branch": "nope", "turn": 1}),
]


@pytest.mark.parametrize(("method", "path", "body"), UNKNOWN_BRANCH)
async def test_an_unknown_branch_is_404_and_changes_nothing(
    sidecar_on: RunningSidecar,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    body: Any,
) -> None:
    session = Session(http, sidecar_on)
    await session.fill()
    before = await session.state()
    status, answer = await session.call(method, path, json=body)
    assert (status, answer["error"]["code"]) == (404, "branch_not_found")
    assert "'nope'" in answer["error"]["message"]
    assert await session.state() == before


REFUSED = [
    ("POST", "/branches", {"turn": 7}, 409, "turn_not_found"),
    ("POST", "/branches", {"turn": 0}, 409, "turn_not_found"),
    ("POST", "/branches", {"containing": "zebra"}, 409, "turn_not_found"),
    ("POST", "/branches", {"turn": 1, "branch_id": "alt"}, 409, "branch_id_used"),
    ("POST", "/branches", {"turn": 1, "branch_id": "main"}, 409, "branch_id_used"),
    ("POST", "/branches", {"turn": -1}, 400, "invalid_body"),
    ("POST", "/branches", {"turn": "1"}, 400, "invalid_body"),
    ("POST", "/branches", {"turn": True}, 400, "invalid_body"),
    ("POST", "/branches", {"turn": 1, "containing": "q"}, 400, "invalid_body"),
    ("POST", "/branches", {}, 400, "invalid_body"),
    ("POST", "/branches", {"turn": 1, "extra": 1}, 400, "invalid_body"),
    ("POST", "/branches", {"turn": 1, "from_branch": {}}, 400, "invalid_branch_id"),
    ("POST", "/branches", {"containing": "q", "from_branch": 7}, 400, "invalid_branch_id"),
    ("POST", "/branches", {"containing": ""}, 400, "invalid_body"),
    ("POST", "/branches", {"containing": "x" * 1001}, 400, "invalid_body"),
    ("POST", "/branches", {"turn": 1, "branch_id": "a b"}, 400, "invalid_branch_id"),
    ("POST", "/branches", {"turn": 1, "branch_id": "x" * 129}, 400, "invalid_branch_id"),
    ("POST", "/branches", {"turn": 1, "branch_id": ".."}, 400, "invalid_branch_id"),
    ("POST", "/branches", {"turn": 1, "branch_id": 5}, 400, "invalid_branch_id"),
    ("POST", "/branches", ["turn", 1], 400, "invalid_body"),
    ("DELETE", "/branches/main", None, 409, "cannot_delete_main"),
    ("DELETE", "/branches/alt?current=alt", None, 409, "branch_is_current"),
    ("DELETE", "/branches/alt?current=alt&force=maybe", None, 400, "invalid_force"),
    ("DELETE", "/branches/alt?current=a%20b", None, 400, "invalid_branch_id"),
    ("GET", "/items?branch=a%2Fb", None, 400, "invalid_branch_id"),
    ("GET", "/items?branch=", None, 400, "invalid_branch_id"),
    ("GET", "/branches/main/turns?containing=", None, 400, "invalid_containing"),
    ("POST", "/branches/main/usage", {"requests": 1}, 400, "invalid_body"),
    (
        "POST",
        "/branches/main/usage",
        {"requests": -1, "input_tokens": 1, "output_tokens": 1, "total_tokens": 1},
        400,
        "invalid_body",
    ),
    (
        "POST",
        "/branches/main/usage",
        {"requests": 1, "input_tokens": 2**63, "output_tokens": 1, "total_tokens": 1},
        400,
        "invalid_body",
    ),
    (
        "POST",
        "/branches/main/usage",
        {"turn": 1, "requests": 1, "input_tokens": 1, "output_tokens": 1, "total_tokens": 1},
        400,
        "invalid_body",
    ),
    (
        "POST",
        "/branches/main/usage",
        {
            "requests": 1,
            "input_tokens": 1,
            "output_tokens": 1,
            "total_tokens": 1,
            "input_tokens_details": [1],
        },
        400,
        "invalid_body",
    ),
    (
        "POST",
        "/branches/main/usage",
        {"requests": 1, "input_tokens": 1, "output_tokens": 1, "total_tokens": 1, "cost": 3},
        400,
        "invalid_body",
    ),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "code"), REFUSED)
async def test_bad_structure_calls_are_refused_with_a_clear_code_and_change_nothing(
    sidecar_on: RunningSidecar,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    body: Any,
    status: int,
    code: str,
) -> None:
    session = Session(http, sidecar_on)
    await session.fill()
    before = await session.state()
    answer_status, answer = await session.call(method, path, json=body)
    assert (answer_status, answer["error"]["code"]) == (status, code)
    assert await session.state() == before


async def test_oversized_and_malformed_bodies_are_refused(
    sidecar_on: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    session = Session(http, sidecar_on)
    await session.fill()
    before = await session.state()
    huge = b'{"turn": 1, "branch_id": "' + b"x" * (70 << 10) + b'"}'
    headers = {"Content-Type": "application/json"}
    assert (await session.call("POST", "/branches", data=huge, headers=headers))[0] == 413
    status, answer = await session.call("POST", "/branches", data=b"{turn", headers=headers)
    assert (status, answer["error"]["code"]) == (400, "invalid_body")
    status, answer = await session.call("POST", "/branches", data=b"turn=1")
    assert (status, answer["error"]["code"]) == (415, "unsupported_media_type")
    assert await session.state() == before


async def test_one_of_two_racing_creations_of_an_id_wins(
    sidecar_on: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    session = Session(http, sidecar_on)
    await session.fill()
    body = {"turn": 2, "branch_id": "raced"}
    answers = await asyncio.gather(
        *(session.call("POST", "/branches", json=body) for _ in range(6))
    )
    assert sorted(status for status, _ in answers) == [201] + [409] * 5
    _, items = await session.call("GET", "/items?branch=raced")
    assert [item["content"] for item in items["items"]] == ["q1", "a"]


async def test_a_branch_is_copied_whole_while_writers_append(
    sidecar_on: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    session = Session(http, sidecar_on)
    await session.fill()

    async def write(n: int) -> None:
        batch = [{"role": "user", "content": f"w{n}"}, {"role": "assistant", "content": f"r{n}"}]
        assert (await session.call("POST", "/items", json={"items": batch}))[0] == 200

    async def branch(n: int) -> tuple[int, Any]:
        return await session.call("POST", "/branches", json={"turn": 2 + n, "branch_id": f"b{n}"})

    await asyncio.gather(*(write(n) for n in range(10)))
    writers = asyncio.gather(*(write(n) for n in range(10, 20)))
    created = await asyncio.gather(*(branch(n) for n in range(8)))
    await writers
    main = (await session.call("GET", "/items"))[1]["items"]
    for status, answer in created:
        assert status == 201
        copy = (await session.call("GET", f"/items?branch={answer['branch_id']}"))[1]["items"]
        assert copy == main[: len(copy)]
        assert copy[-1]["role"] == "assistant"
        assert len(copy) == 2 * (answer["turn"] - 1)


@pytest.mark.parametrize("backend", ["dapr", "openai"])
async def test_backends_without_structure_answer_501_naming_the_backend(
    backend: str, start_sidecar: StartSidecar, store_config: StoreConfig
) -> None:
    sidecar = await start_sidecar({"stores": {"chat": store_config(backend)}})
    url = f"{sidecar.url}/v1/stores/chat/sessions/{unique()}"
    item = {"role": "user", "content": "hello"}
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/items", json={"items": [item]}) as resp:
            assert resp.status == 200
        for method, path in [
            ("GET", "/items?branch=alt"),
            ("POST", "/items:pop?branch=alt"),
            ("GET", "/branches"),
            ("POST", "/branches"),
            ("GET", "/branches/main/turns"),
            ("GET", "/usage"),
            ("POST", "/items:compact"),
            ("GET", "/items?view=full"),
        ]:
            body = {"turn": 1} if method == "POST" and path == "/branches" else None
            async with http.request(method, url + path, json=body) as resp:
                answer = await resp.json()
                assert (resp.status, answer["error"]["code"]) == (501, "not_supported"), path
                assert f"the {backend} backend" in answer["error"]["message"]
        async with http.get(url + "/items?turns=1") as resp:
            assert len((await resp.json())["items"]) == 1
    advanced = AdvancedSidecarSession(url.rsplit("/", 1)[1], "chat", url=sidecar.url)
    with pytest.raises(RequestRejectedError) as refused:
        await advanced.list_branches()
    assert (refused.value.status, refused.value.code) == (501, "not_supported")


@pytest.mark.parametrize("backend", STRUCTURED)
@pytest.mark.parametrize("swept", [False, True], ids=["lazily", "swept"])
async def test_an_expired_session_takes_its_branches_usage_and_reserved_ids_along(
    backend: str,
    swept: bool,
    start_sidecar: StartSidecar,
    store_config: StoreConfig,
    http: aiohttp.ClientSession,
) -> None:
    sidecar = await start_sidecar({"stores": {"chat": store_config(backend, ttl=1)}})
    session = Session(http, sidecar)
    await session.fill()
    await asyncio.sleep(1.3)
    if swept:
        from convostore_sidecar.http.state import STORES

        await sidecar.app[STORES].get("chat").driver.sweep()
    status, answer = await session.call("GET", "/branches/alt")
    assert (status, answer["error"]["code"]) == (404, "branch_not_found")
    assert await session.call("GET", "/usage") == (200, {"usage": None})
    assert await session.call("GET", "/branches") == (200, {"branches": []})
    item = {"role": "user", "content": "again"}
    assert (await session.call("POST", "/items", json={"items": [item]}))[0] == 200
    status, answer = await session.call("POST", "/items?branch=alt", json={"items": [item]})
    assert (status, answer["error"]["code"]) == (404, "branch_not_found")
    body = {"turn": 1, "branch_id": "alt"}
    assert (await session.call("POST", "/branches", json=body))[0] == 201


async def test_a_body_arriving_in_pieces_is_read_whole(
    sidecar_on: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    """A structure call whose body comes in two TCP segments, as any client may send it."""
    session = Session(http, sidecar_on)
    await session.fill()
    body = json.dumps({"from_branch": "main", "turn": 2, "branch_id": "pieces"}).encode()
    url = yarl.URL(session.url + "/branches")
    reader, writer = await asyncio.open_connection(url.host, url.port)
    head = (
        f"POST {url.raw_path_qs} HTTP/1.1\r\nHost: {url.host}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    writer.write(head + body[:10])
    await writer.drain()
    await asyncio.sleep(0.2)  # the second segment comes later
    writer.write(body[10:])
    await writer.drain()
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 201"), answer[:200]


@pytest.mark.parametrize("backend", STRUCTURED)
async def test_branches_per_session_are_capped(
    backend: str, start_sidecar: StartSidecar, store_config: StoreConfig
) -> None:
    config = store_config(backend, limits={"maxBranches": 2})
    sidecar = await start_sidecar({"stores": {"chat": config}})
    async with aiohttp.ClientSession() as http:
        session = Session(http, sidecar)
        await session.fill()  # main and alt hold items
        body = {"from_branch": "main", "turn": 2, "branch_id": "third"}
        status, answer = await session.call("POST", "/branches", json=body)
        assert (status, answer["error"]["code"]) == (409, "too_many_branches")
        assert "limits.maxBranches" in answer["error"]["message"]
        assert (await session.call("GET", "/branches/third"))[0] == 404
        assert (await session.call("DELETE", "/branches/alt"))[0] == 204
        assert (await session.call("POST", "/branches", json=body))[0] == 201
