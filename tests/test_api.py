"""Every endpoint and error path of the v1 API, on the embedded default."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
import yarl
from convostore import SidecarSession
from convostore_sidecar.http.middleware import SMALL_BODY, TokenCheck
from convostore_sidecar.http.state import IN_FLIGHT, STORES

from tests.servers import free_port
from tests.support import RunningSidecar, StartSidecar

ITEMS = "/v1/stores/default/sessions/{}/items"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def stored_items(sidecar: RunningSidecar, session_id: str) -> list[bytes]:
    result: list[bytes] = await sidecar.app[STORES].get("default").driver.latest(session_id, None)
    return result


async def error_of(resp: aiohttp.ClientResponse) -> tuple[int, str]:
    body = await resp.json()
    assert set(body) == {"error"}
    assert body["error"]["message"]
    return resp.status, body["error"]["code"]


async def test_append_then_read_then_pop_then_clear(
    sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    url = sidecar.url + ITEMS.format("u1")
    async with http.post(url, json={"items": [{"a": 1}, {"b": 2}]}) as resp:
        assert resp.status == 200
        assert await resp.json() == {"appended": 2, "replayed": False, "turn": 0, "anchor": 0}
    async with http.get(url, params={"limit": "1"}) as resp:
        assert await resp.json() == {"items": [{"b": 2}]}
    async with http.post(url + ":pop") as resp:
        assert await resp.json() == {"item": {"b": 2}}
    async with http.delete(sidecar.url + "/v1/stores/default/sessions/u1") as resp:
        assert resp.status == 204
    async with http.get(url) as resp:
        assert await resp.json() == {"items": []}
    async with http.post(url + ":pop") as resp:
        assert await resp.json() == {"item": None}


HOSTILE_IDS = [
    "..",
    ".",
    "a%2Fb",
    "..%2F..%2Fetc%2Fpasswd",
    "nul%00byte",
    "x" * 257,
    "caf%C3%A9",
    "space%20d",
    "semi;colon",
    "%F0%9F%98%80",
    "quote%22",
    "%2E%2E",
    "%2e",
]


@pytest.mark.parametrize("session_id", HOSTILE_IDS)
async def test_hostile_session_ids_are_refused_and_store_nothing(
    sidecar: RunningSidecar, http: aiohttp.ClientSession, session_id: str
) -> None:
    url = sidecar.url + ITEMS.format(session_id)
    refusals = {
        (400, "invalid_session_id"),
        (404, "not_found"),
        (405, "method_not_allowed"),  # "." and ".." are resolved away by URL normalization
    }
    async with http.post(url, json={"items": [{"a": 1}]}) as resp:
        assert await error_of(resp) in refusals
    async with http.get(url) as resp:
        assert await error_of(resp) in refusals
    assert [sid async for sid in _ids(sidecar)] == []


async def _ids(sidecar: RunningSidecar) -> AsyncIterator[str]:
    for sid in await sidecar.app[STORES].get("default").driver.list_sessions("", None, 100):
        yield sid


async def test_longest_allowed_session_id_works(
    sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    session_id = "A-z0.9_:@" * 28 + "abcd"
    assert len(session_id) == 256
    async with http.post(sidecar.url + ITEMS.format(session_id), json={"items": [{"a": 1}]}) as r:
        assert r.status == 200
    assert await stored_items(sidecar, session_id) == [b'{"a":1}']


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_body"),
        (b"", "invalid_body"),
        (b"\xff\xfe", "invalid_body"),
        (b"[]", "invalid_body"),
        (b'{"items": {}}', "invalid_body"),
        (b'{"items": []}', "invalid_body"),
        (b'{"items": [1]}', "invalid_item"),
        (b'{"items": ["text"]}', "invalid_item"),
        (b'{"items": [null]}', "invalid_item"),
        (b'{"items": [{"a": NaN}]}', "invalid_body"),
        (b'{"items": [{"a": Infinity}]}', "invalid_body"),
        (b'{"items": [{"a": 1}], "extra": true}', "invalid_body"),
        (b'{"items": [{"a": 1}]} trailing', "invalid_body"),
        (b'{"items": [{"a": 1}], "items": [{"b": 2}]}', "invalid_body"),
        (b'{"first": 1, "items": [{"a": 1}]}', "invalid_body"),
        (b'{"items": [{"a": 1},]}', "invalid_body"),
        (b'{"items": [{"a": 1}', "invalid_body"),
        (b'{"items" [{"a": 1}]}', "invalid_body"),
        (b'{"items": [{"a": 1}] "x"}', "invalid_body"),
        (b'{"items": [{"a": 1}]}}', "invalid_body"),
        (b"{}", "invalid_body"),
        (b"{", "invalid_body"),
        (b"[" * 100_000, "invalid_body"),
    ],
)
async def test_malformed_bodies_get_400_and_store_nothing(
    sidecar: RunningSidecar, http: aiohttp.ClientSession, body: bytes, code: str
) -> None:
    headers = {"Content-Type": "application/json"}
    async with http.post(sidecar.url + ITEMS.format("s"), data=body, headers=headers) as resp:
        assert await error_of(resp) == (400, code)
    assert await stored_items(sidecar, "s") == []


async def test_an_append_body_is_any_json_spelling_of_its_shape(
    sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    """Items are parsed one at a time, so the parser walks the outer object itself: every
    spelling JSON allows for it is accepted, as a whole-document parser would."""
    body = b' \r\n\t{ "\\u0069tems" :\n[ {"a" : [1, {}]} ,\t{"b":"\\u00e9"} ] }\n '
    headers = {"Content-Type": "application/json"}
    async with http.post(sidecar.url + ITEMS.format("s"), data=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
    assert await stored_items(sidecar, "s") == [b'{"a":[1,{}]}', '{"b":"é"}'.encode()]


async def test_non_json_content_type_is_refused(
    sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    body = json.dumps({"items": [{"a": 1}]})
    headers = {"Content-Type": "text/plain"}
    async with http.post(sidecar.url + ITEMS.format("s"), data=body, headers=headers) as resp:
        assert await error_of(resp) == (415, "unsupported_media_type")
    assert await stored_items(sidecar, "s") == []


async def test_over_limit_requests_get_413_and_store_nothing(
    start_sidecar: StartSidecar, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    limits = {"maxItemBytes": 100, "maxRequestBytes": 1000, "maxItemsPerRequest": 3}
    sidecar = await start_sidecar(
        {
            "stores": {
                "default": {
                    "backend": "sqlite",
                    "sqlite": {"path": str(tmp_path / "l.db")},
                    "limits": limits,
                }
            }
        }
    )
    url = sidecar.url + ITEMS.format("s")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"items": [{"x": "y" * 100}]}, "item_too_large"),
        ({"items": [{"n": n} for n in range(4)]}, "too_many_items"),
        ({"items": [{"x": "y" * 80}], "pad": "z" * 1000}, "request_too_large"),
    ]
    for body, code in cases:
        async with http.post(url, json=body) as resp:
            assert await error_of(resp) == (413, code)
    async with http.post(url, json={"items": [{"n": n} for n in range(3)]}) as resp:
        assert resp.status == 200
    assert len(await stored_items_of(sidecar, "s")) == 3


async def stored_items_of(sidecar: RunningSidecar, session_id: str) -> list[bytes]:
    return await stored_items(sidecar, session_id)


async def test_default_limits_refuse_an_item_over_one_mebibyte(
    sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    headers = {"Content-Type": "application/json"}
    body = io.BytesIO(json.dumps({"items": [{"blob": "x" * (1 << 20)}]}).encode())
    async with http.post(sidecar.url + ITEMS.format("s"), data=body, headers=headers) as resp:
        assert await error_of(resp) == (413, "item_too_large")
    too_big = b'{"items":[' + b",".join([b'{"b":"' + b"x" * 900_000 + b'"}'] * 10) + b"]}"
    async with http.post(
        sidecar.url + ITEMS.format("s"), data=io.BytesIO(too_big), headers=headers
    ) as resp:
        assert await error_of(resp) == (413, "request_too_large")
    assert await stored_items(sidecar, "s") == []


@pytest.mark.parametrize("limit", ["-1", "abc", "1.5", "", "1e3", " 1", "²", "٣", "+1"])
async def test_bad_limit_is_refused(
    sidecar: RunningSidecar, http: aiohttp.ClientSession, limit: str
) -> None:
    async with http.get(sidecar.url + ITEMS.format("s"), params={"limit": limit}) as resp:
        assert await error_of(resp) == (400, "invalid_limit")


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"turns": "-1"}, "invalid_turns"),
        ({"turns": "two"}, "invalid_turns"),
        ({"turns": "100001"}, "invalid_turns"),
        ({"turns": "²"}, "invalid_turns"),
        ({"turns": "2", "limit": "5"}, "invalid_limit"),
        ({"limit": "5", "whole_turns": "yes"}, "invalid_whole_turns"),
        ({"limit": "5", "whole_turns": "True"}, "invalid_whole_turns"),
    ],
)
async def test_bad_turn_reads_are_refused(
    sidecar: RunningSidecar, http: aiohttp.ClientSession, params: dict[str, str], code: str
) -> None:
    async with http.get(sidecar.url + ITEMS.format("s"), params=params) as resp:
        assert await error_of(resp) == (400, code)


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there", "ünïcode"])
async def test_bad_idempotency_key_is_refused(
    sidecar: RunningSidecar, http: aiohttp.ClientSession, key: str
) -> None:
    headers = {"Idempotency-Key": key}
    async with http.post(
        sidecar.url + ITEMS.format("s"), json={"items": [{"a": 1}]}, headers=headers
    ) as resp:
        assert await error_of(resp) == (400, "invalid_idempotency_key")
    assert await stored_items(sidecar, "s") == []


async def test_unknown_store_is_404_on_every_route(
    sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    base = sidecar.url + "/v1/stores/nope/sessions"
    calls = [
        ("GET", base + "/s/items"),
        ("POST", base + "/s/items"),
        ("POST", base + "/s/items:pop"),
        ("DELETE", base + "/s"),
        ("GET", base),
    ]
    for method, url in calls:
        async with http.request(method, url, json={"items": [{"a": 1}]}) as resp:
            assert await error_of(resp) == (404, "store_not_found")


async def test_unknown_route_and_method_are_json_errors(
    sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    async with http.get(sidecar.url + "/v2/anything") as resp:
        assert await error_of(resp) == (404, "not_found")
    async with http.put(sidecar.url + ITEMS.format("s")) as resp:
        assert await error_of(resp) == (405, "method_not_allowed")


@pytest.mark.parametrize("cursor", ["%%%", "bm90IHZhbGlkIGlkIQ", "////"])
async def test_bad_cursor_and_prefix_are_refused(
    sidecar: RunningSidecar, http: aiohttp.ClientSession, cursor: str
) -> None:
    url = sidecar.url + "/v1/stores/default/sessions"
    async with http.get(url, params={"cursor": cursor}) as resp:
        assert await error_of(resp) == (400, "invalid_cursor")
    async with http.get(url, params={"prefix": "../x"}) as resp:
        assert await error_of(resp) == (400, "invalid_prefix")
    async with http.get(url, params={"limit": "1001"}) as resp:
        assert await error_of(resp) == (400, "invalid_limit")


async def test_bearer_token_guards_the_api_but_not_probes(
    start_sidecar: StartSidecar, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    sidecar = await start_sidecar(
        {
            "auth": {"tokenFile": str(token_file)},
            "stores": {
                "default": {"backend": "sqlite", "sqlite": {"path": str(tmp_path / "a.db")}}
            },
        }
    )
    url = sidecar.url + ITEMS.format("s")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        async with http.post(url, json={"items": [{"a": 1}]}, headers=headers) as resp:
            assert await error_of(resp) == (401, "unauthorized")
    assert await stored_items(sidecar, "s") == []
    async with http.post(
        url, json={"items": [{"a": 1}]}, headers={"Authorization": "Bearer s3cret"}
    ) as resp:
        assert resp.status == 200
    for path in ("/healthz", "/readyz", "/metrics", "/v1/openapi.json"):
        async with http.get(sidecar.url + path) as resp:
            assert resp.status == 200, path
    token_file.write_text("rotated")
    async with http.get(url, headers={"Authorization": "Bearer rotated"}) as resp:
        assert resp.status == 200
    async with http.get(url, headers={"Authorization": "Bearer s3cret"}) as resp:
        assert resp.status == 200, "the replaced token stays valid for a grace period"
    token_file.write_text("again")
    async with http.get(url, headers={"Authorization": "Bearer again"}) as resp:
        assert resp.status == 200
    async with http.get(url, headers={"Authorization": "Bearer s3cret"}) as resp:
        assert resp.status == 401, "only the token just replaced keeps its grace"


async def test_a_client_reading_the_token_file_follows_its_rotation(
    start_sidecar: StartSidecar, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("first\n")
    sidecar = await start_sidecar(
        {
            "auth": {"tokenFile": str(token_file)},
            "stores": {
                "default": {"backend": "sqlite", "sqlite": {"path": str(tmp_path / "a.db")}}
            },
        }
    )
    session = SidecarSession("s", url=sidecar.url, token_file=str(token_file))
    await session.add_items([{"n": 1}])
    for token in ("second", "third"):  # two rotations: the first token is out of its grace
        replacement = tmp_path / "token.new"  # as the kubelet swaps a Secret volume's files
        replacement.write_text(f"{token}\n")
        replacement.replace(token_file)
        async with http.get(
            sidecar.url + "/v1/stores/default/sessions",
            headers={"Authorization": f"Bearer {token}"},
        ) as resp:
            assert resp.status == 200
    await session.add_items([{"n": 2}])
    assert await session.get_items() == [{"n": 1}, {"n": 2}]


def test_token_check_forgets_the_replaced_token_after_its_grace(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("old")
    check = TokenCheck(str(token_file), grace=0.0)
    token_file.write_text("new")
    assert check.accepts(b"new")
    assert not check.accepts(b"old")


async def test_metrics_count_requests_latency_and_items(
    sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    url = sidecar.url + ITEMS.format("m")
    async with http.post(url, json={"items": [{"a": 1}, {"a": 2}]}) as resp:
        assert resp.status == 200
    async with http.post(url, json={"items": [{"a": 1}]}, headers={"Idempotency-Key": "k"}):
        pass
    async with http.post(url, json={"items": [{"a": 1}]}, headers={"Idempotency-Key": "k"}):
        pass
    async with http.get(sidecar.url + "/v1/stores/ghost/sessions/m/items"):
        pass
    async with http.get(sidecar.url + "/metrics") as resp:
        text = await resp.text()
    route = "/v1/stores/{store}/sessions/{session_id}/items"
    assert 'convostore_items_appended_total{store="default"} 3.0' in text
    assert (
        f'convostore_requests_total{{method="POST",route="{route}",status="200",store="default"}}'
        " 3.0" in text
    )
    assert (
        f'convostore_request_duration_seconds_count{{route="{route}",store="default"}} 3.0' in text
    )
    assert 'store="unknown"' in text
    assert "ghost" not in text


async def test_readyz_reports_each_store(
    sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    async with http.get(sidecar.url + "/readyz") as resp:
        assert resp.status == 200
        assert await resp.json() == {"ready": True, "stores": {"default": "ok"}, "details": {}}
    async with http.get(sidecar.url + "/healthz") as resp:
        assert await resp.json() == {"status": "ok"}


async def test_openapi_document_matches_the_served_routes(
    sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    async with http.get(sidecar.url + "/v1/openapi.json") as resp:
        document = await resp.json()
    in_repo = Path(__file__).parents[1] / "sidecar/convostore_sidecar/openapi.yaml"
    assert document == yaml.safe_load(in_repo.read_text())
    documented = {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method != "parameters"
    }
    served = {
        (route.method, route.resource.canonical)
        for route in sidecar.app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    assert served == documented


async def test_readyz_tells_strangers_only_ready_or_not_and_checks_the_backend_sparingly(
    start_sidecar: StartSidecar, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret")
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    sidecar = await start_sidecar(
        {
            "auth": {"tokenFile": str(token_file)},
            "stores": {"chat": {"backend": "redis", "redis": {"url": unreachable}}},
        }
    )
    async with http.get(sidecar.url + "/readyz") as resp:
        assert resp.status == 503
        stranger = await resp.json()
    assert stranger == {"ready": False, "stores": {"chat": "unavailable"}}
    assert "127.0.0.1" not in json.dumps(stranger)
    async with http.get(
        sidecar.url + "/readyz", headers={"Authorization": "Bearer s3cret"}
    ) as resp:
        insider = await resp.json()
    assert insider["details"]["chat"].startswith("unavailable")

    pings = 0
    driver = sidecar.app[STORES].get("chat").driver
    real_ping = driver.ping

    async def counted_ping() -> None:
        nonlocal pings
        pings += 1
        await real_ping()

    async def probe() -> int:
        async with http.get(sidecar.url + "/readyz") as resp:
            return resp.status

    driver.ping = counted_ping  # type: ignore[method-assign]
    assert set(await asyncio.gather(*(probe() for _ in range(20)))) == {503}
    assert pings <= 1, f"{pings} backend checks for 20 probes"


@pytest.mark.parametrize(
    ("method", "path", "params", "body", "code", "says"),
    [
        ("GET", "/items", {"turns": "99999999999999999999"}, None, "invalid_turns", "from 0 to"),
        ("GET", "/items", {"limit": "-1"}, None, "invalid_limit", "non-negative integer"),
        (
            "POST",
            "/items",
            {},
            {"items": [{"a": 1}], "extra": 1},
            "invalid_body",
            "unknown field 'extra'",
        ),
        ("POST", "/items", {}, {"itemz": []}, "invalid_body", "unknown field 'itemz'"),
        ("LIST", "", {"limit": "0"}, None, "invalid_limit", "from 1 to 1000"),
        ("GET", "/items", [("limit", "1"), ("limit", "5")], None, "invalid_query", "'limit'"),
        ("READYZ", "", [("x", "1"), ("x", "2")], None, "invalid_query", "'x'"),
    ],
    ids=[
        "huge-limit",
        "negative-limit",
        "extra-field",
        "misspelt",
        "list-limit-0",
        "repeated",
        "repeated-on-an-open-path",
    ],
)
async def test_messages_name_the_real_problem(
    sidecar: RunningSidecar,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    params: Any,
    body: Any,
    code: str,
    says: str,
) -> None:
    url = sidecar.url + ITEMS.format("msgs").removesuffix("/items") + path
    if method == "LIST":
        method, url = "GET", sidecar.url + "/v1/stores/default/sessions"
    if method == "READYZ":  # a path that needs no token is held to the same rule
        method, url = "GET", sidecar.url + "/readyz"
    async with http.request(method, url, params=params, json=body) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["code"] == code
    assert says in error["message"]
    assert await stored_items(sidecar, "msgs") == []


async def slow_upload(
    url: str, length: int = 100
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An append whose body stops half way: it holds a request slot until it finishes."""
    target = yarl.URL(url)
    reader, writer = await asyncio.open_connection(target.host, target.port)
    writer.write(
        f"POST {target.raw_path} HTTP/1.1\r\nHost: sidecar\r\nConnection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n".encode()
        + b'{"items": ['
    )
    await writer.drain()
    return reader, writer


async def test_past_its_capacity_a_sidecar_turns_calls_away_and_stalled_bodies_time_out(
    start_sidecar: StartSidecar, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    sidecar = await start_sidecar(
        {
            "requests": {"maxConcurrent": 2, "bodyTimeout": 1},
            "stores": {
                "default": {"backend": "sqlite", "sqlite": {"path": str(tmp_path / "c.db")}}
            },
        }
    )
    url = sidecar.url + ITEMS.format("busy")
    stalled = [await slow_upload(url) for _ in range(2)]
    await wait_for_in_flight(sidecar, 2)
    async with http.get(url) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert (await resp.json())["error"]["code"] == "overloaded"
    async with http.get(sidecar.url + "/healthz") as resp:
        assert resp.status == 200, "probes always get in"
    for reader, writer in stalled:  # cut off by the body deadline, with an answer
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        answer = await reader.readexactly(length)
        writer.close()
        assert head.startswith(b"HTTP/1.1 408")
        assert json.loads(answer)["error"]["code"] == "body_timeout"
    async with http.get(url) as resp:
        assert resp.status == 200
    assert await stored_items(sidecar, "busy") == []


async def test_bodies_past_the_buffer_budget_are_turned_away_until_it_frees(
    start_sidecar: StartSidecar, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    budget = 2 * SMALL_BODY
    sidecar = await start_sidecar(
        {
            "requests": {"maxBufferedBytes": budget, "bodyTimeout": 1},
            "stores": {
                "default": {
                    "backend": "sqlite",
                    "sqlite": {"path": str(tmp_path / "c.db")},
                    "limits": {"maxRequestBytes": budget},
                }
            },
        }
    )
    url = sidecar.url + ITEMS.format("budget")
    reader, writer = await slow_upload(url, length=budget)
    await wait_for_in_flight(sidecar, 1)
    larger = {"items": [{"a": "x" * SMALL_BODY}]}
    async with http.post(url, json=larger) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        error = (await resp.json())["error"]
    assert error["code"] == "overloaded"
    assert f"requests.maxBufferedBytes ({budget})" in error["message"]
    async with http.post(url, json={"items": [{"a": 0}]}) as resp:
        assert resp.status == 200, "a small body has a pool of its own"
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 408")
    writer.close()
    async with http.post(url, json={"items": [{"a": 1}]}) as resp:
        assert resp.status == 200, "the stalled body's bytes were given back"
    assert await stored_items(sidecar, "budget") == [b'{"a":0}', b'{"a":1}']


async def wait_for_in_flight(sidecar: RunningSidecar, count: int) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while sidecar.app[IN_FLIGHT].count < count:
        assert asyncio.get_running_loop().time() < deadline, "the uploads never started"
        await asyncio.sleep(0.02)


async def test_reads_are_capped_at_max_read_items_and_say_so(
    start_sidecar: StartSidecar,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = {"backend": "sqlite", "sqlite": {"path": str(tmp_path / "r.db")}}
    sidecar = await start_sidecar({"stores": {"default": {**store, "limits": {"maxReadItems": 5}}}})
    items = [{"role": "user", "content": "q1"}, *({"n": n} for n in range(4))]
    items += [{"role": "user", "content": "q2"}, {"n": 4}, {"n": 5}]
    session = SidecarSession("long", url=sidecar.url)
    await session.add_items(items)
    asked: list[int | None] = []
    real_latest = sidecar.app[STORES].get("default").latest

    async def counted(
        session_id: str, branch: str, limit: int | None, max_bytes: int | None = None
    ) -> list[bytes]:
        asked.append(limit)
        return await real_latest(session_id, branch, limit, max_bytes)

    sidecar.app[STORES].get("default").latest = counted  # type: ignore[method-assign]
    url = sidecar.url + ITEMS.format("long")
    for params, expected, truncated in [
        ({}, items[-5:], True),
        ({"limit": "3"}, items[-3:], False),
        ({"limit": "5"}, items[-5:], False),
        ({"limit": "100"}, items[-5:], True),
        ({"turns": "2"}, items[-3:], True),  # cut at the cap, then at a turn's start
        ({"limit": "4", "whole_turns": "true"}, items[-3:], True),
    ]:
        async with http.get(url, params=params) as resp:
            document = await resp.json()
        assert document["items"] == expected, params
        assert document.get("truncated", False) is truncated, params
    assert max(n for n in asked if n is not None) == 6, "never more than the cap + 1 read"
    assert None not in asked
    with caplog.at_level(logging.WARNING, logger="convostore"):
        assert await session.get_items() == items[-5:]
    assert "only the latest 5 came back" in caplog.text


async def test_reads_by_turns_cut_at_max_read_bytes_still_start_at_a_turn(
    start_sidecar: StartSidecar, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The byte cap cuts a read by turns or widened to whole turns as the item cap does:
    the newest items that fit, from the first user message among them, marked truncated."""
    store = {"backend": "sqlite", "sqlite": {"path": str(tmp_path / "b.db")}}
    limits = {"maxReadBytes": 2048, "maxItemBytes": 1024}
    sidecar = await start_sidecar({"stores": {"default": {**store, "limits": limits}}})
    pad = "p" * 340  # a turn of 1,125 bytes: two pass the cap
    items: list[dict[str, Any]] = []
    for turn in range(4):
        items.append({"role": "user", "content": f"q{turn}"})
        items += [{"turn": turn, "n": n, "pad": pad} for n in range(3)]
    await SidecarSession("bytes", url=sidecar.url).add_items(items)
    url = sidecar.url + ITEMS.format("bytes")
    last_turn = items[-4:]
    for params, expected, truncated in [
        ({"turns": "1"}, last_turn, False),
        ({"turns": "3"}, last_turn, True),  # the cap cuts turn 2; the answer starts at turn 3
        ({"limit": "6", "whole_turns": "true"}, last_turn, True),
        ({}, items[-6:], True),  # a plain read is cut at the cap, wherever it falls
    ]:
        async with http.get(url, params=params) as resp:
            document = await resp.json()
        assert document["items"] == expected, params
        assert document.get("truncated", False) is truncated, params
