"""The `openai` backend against the Conversations API stand-in, always through the real
`openai` client: side by side with the Agents SDK's own `OpenAIConversationsSession`, the
durable session → conversation map, failures, and what the config refuses."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from agents import Agent, OpenAIConversationsSession, Runner
from agents.testing import ScriptedModel, assistant_message, function_call
from convostore import SidecarSession, SidecarStore
from convostore.errors import NotFoundError, RequestRejectedError, StoreUnavailableError
from convostore_sidecar.config import parse_config
from convostore_sidecar.sections import ConfigError
from convostore_sidecar.stores import Store
from openai import AsyncOpenAI

from tests.openai_standin import OpenAIStandIn
from tests.support import (
    RunningSidecar,
    SidecarProcess,
    StartSidecar,
    lookup_weather,
    migrate,
    unique,
)

StoreConfig = Callable[..., dict[str, Any]]
CONVERSATIONS = "/v1/conversations"
WRONG_KEY = "sk-proj-wrongwrongwrong9876"


def without_ids(items: Any) -> Any:
    """Items with the ids the API assigned set aside (they differ between conversations)."""
    if isinstance(items, list):
        return [without_ids(item) for item in items]
    if isinstance(items, dict):
        return {k: v for k, v in items.items() if k != "id"}
    return items


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {
        "id": "__fake_id__",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


TOOL_ITEMS = [
    {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": "{}"},
    {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
]


@pytest.fixture
async def sdk_client(openai_api: OpenAIStandIn) -> AsyncIterator[AsyncOpenAI]:
    client = AsyncOpenAI(api_key=openai_api.api_key, base_url=openai_api.base_url, max_retries=0)
    async with client:
        yield client


@pytest.fixture
async def chat(start_sidecar: StartSidecar, store_config: StoreConfig) -> RunningSidecar:
    return await start_sidecar({"stores": {"chat": store_config("openai")}})


async def post(url: str, body: Any, key: str | None = None) -> tuple[int, Any, Any]:
    headers = {"Idempotency-Key": key} if key else {}
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as r:
        return r.status, await r.json(), r.headers


async def apply(session: Any, op: str, arg: Any) -> Any:
    """One session call; the answer of a read or a pop, None for a write."""
    if op == "get":
        return await session.get_items(arg)
    if op == "pop":
        return await session.pop_item()
    if op == "add":
        await session.add_items(arg)
    else:
        await session.clear_session()
    return None


async def test_every_operation_matches_the_sdks_own_session(
    chat: RunningSidecar, sdk_client: AsyncOpenAI
) -> None:
    theirs = OpenAIConversationsSession(openai_client=sdk_client)
    ours = SidecarSession(unique(), "chat", url=chat.url)
    script: list[tuple[str, Any]] = [
        ("add", [user("hi"), assistant("hello")]),
        ("add", [user(f"m{n}") for n in range(45)]),
        ("add", TOOL_ITEMS),
        ("get", None),
        ("get", 3),
        ("get", 0),
        ("get", 500),
        ("pop", None),
        ("pop", None),
        ("get", 4),
        ("clear", None),
        ("get", None),
        ("pop", None),
        ("add", [user("again")]),
        ("get", None),
    ]
    for op, arg in script:
        answers: list[Any] = []
        for session in (theirs, ours):
            answers.append(await apply(session, op, arg))
            answers.append(await session.get_items())
        assert without_ids(answers[:2]) == without_ids(answers[2:]), (op, arg)
    assert without_ids(await ours.get_items()) == [
        {
            "type": "message",
            "role": "user",
            "status": "completed",
            "content": [{"type": "input_text", "text": "again"}],
        }
    ]


async def agent_conversation(session: Any) -> tuple[list[Any], list[Any], list[Any]]:
    """Three turns, one with a tool call: outputs, what the model saw, what was kept."""
    model = ScriptedModel(
        [
            [assistant_message("Hi Ada")],
            [function_call("lookup_weather", {"city": "Oslo"}, call_id="call_1")],
            [assistant_message("It is sunny in Oslo")],
            [assistant_message("Your name is Ada")],
        ]
    )
    agent = Agent(name="assistant", model=model, tools=[lookup_weather])
    outputs = [
        (await Runner.run(agent, text, session=session)).final_output
        for text in ("My name is Ada", "Weather in Oslo?", "What is my name?")
    ]
    seen = [without_ids(call.input) for call in model.calls]
    return outputs, seen, without_ids(await session.get_items())


async def test_agent_conversation_matches_the_sdks_own_session(
    chat: RunningSidecar, sdk_client: AsyncOpenAI, openai_api: OpenAIStandIn
) -> None:
    theirs = await agent_conversation(OpenAIConversationsSession(openai_client=sdk_client))
    ours = await agent_conversation(SidecarSession("ada", "chat", url=chat.url))
    assert ours == theirs
    outputs, seen, kept = ours
    assert outputs == ["Hi Ada", "It is sunny in Oslo", "Your name is Ada"]
    assert [item["type"] for item in kept] == [
        "message",
        "message",
        "message",
        "function_call",
        "function_call_output",
        "message",
        "message",
        "message",
    ]
    assert len(seen[-1]) == 7
    assert len(openai_api.conversations) == 2


async def test_appends_go_in_requests_of_at_most_20_in_order(
    chat: RunningSidecar, openai_api: OpenAIStandIn
) -> None:
    session = SidecarSession(unique(), "chat", url=chat.url)
    await session.add_items([user(f"m{n}") for n in range(45)])
    posts = [r for r in openai_api.requests if r.method == "POST" and r.path.endswith("/items")]
    [conversation] = openai_api.conversations.values()
    assert [item["content"][0]["text"] for item in conversation.items] == [
        f"m{n}" for n in range(45)
    ]
    assert len(posts) == 3


async def test_restarted_sidecar_finds_the_same_conversation(
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
    store_config: StoreConfig,
    openai_api: OpenAIStandIn,
) -> None:
    process = sidecar_process({"stores": {"chat": store_config("openai")}})
    process.start()
    session = SidecarSession("user-1", "chat", url=process.url)
    await session.add_items([user("one"), user("two")])
    assert process.stop() == 0
    process.start()
    await session.add_items([user("three")])
    texts = [item["content"][0]["text"] for item in await session.get_items()]
    assert texts == ["one", "two", "three"]
    assert len(openai_api.conversations) == 1
    ids = [sid async for sid in SidecarStore("chat", process.url).session_ids()]
    assert ids == ["user-1"]


@pytest.mark.parametrize("mapping", ["redis", "postgres"])
async def test_replicas_sharing_a_map_agree_on_one_conversation(
    mapping: str,
    request: pytest.FixtureRequest,
    start_sidecar: StartSidecar,
    store_config: StoreConfig,
    openai_api: OpenAIStandIn,
) -> None:
    if mapping == "redis":
        shared = {"redis": {"url": request.getfixturevalue("redis_url"), "keyPrefix": unique()}}
    else:
        dsn = request.getfixturevalue("postgres_dsn")
        shared = {"postgres": {"dsn": dsn, "schema": "m_" + uuid.uuid4().hex[:12]}}
    config = store_config("openai")
    config["openai"]["mapping"] = {"backend": mapping, **shared}
    migrate({"stores": {"chat": config}})
    replicas = [await start_sidecar({"stores": {"chat": config}}) for _ in range(2)]
    session_id = unique()

    async def first_append(n: int) -> None:
        await SidecarSession(session_id, "chat", url=replicas[n % 2].url).add_items([user(f"{n}")])

    await asyncio.gather(*(first_append(n) for n in range(10)))
    creates = [r for r in openai_api.requests if (r.method, r.path) == ("POST", CONVERSATIONS)]
    assert len(creates) > 1, "the first appends did not race"
    [conversation] = openai_api.conversations.values()
    assert sorted(int(i["content"][0]["text"]) for i in conversation.items) == list(range(10))
    for replica in replicas:
        items = await SidecarSession(session_id, "chat", url=replica.url).get_items()
        assert [item["id"] for item in items] == [item["id"] for item in conversation.items]


async def test_a_conversation_marked_for_the_store_is_used_as_it_is(
    chat: RunningSidecar, sdk_client: AsyncOpenAI, openai_api: OpenAIStandIn
) -> None:
    conversation = await sdk_client.conversations.create(
        items=[cast(Any, user("from elsewhere"))], metadata={"convostore_store": "chat"}
    )
    ours = SidecarSession(conversation.id, "chat", url=chat.url)
    theirs = OpenAIConversationsSession(conversation_id=conversation.id, openai_client=sdk_client)
    assert await ours.get_items() == await theirs.get_items()
    await ours.add_items([user("from convostore")])
    items: list[Any] = await theirs.get_items()
    assert [item["content"][0]["text"] for item in items] == ["from elsewhere", "from convostore"]
    assert [sid async for sid in SidecarStore("chat", chat.url).session_ids()] == []
    await ours.clear_session()
    assert conversation.id not in openai_api.conversations


async def test_a_foreign_conversation_id_is_not_found_and_left_alone(
    chat: RunningSidecar, sdk_client: AsyncOpenAI, openai_api: OpenAIStandIn
) -> None:
    """Another team's conversation, or another store's: its id is no key to it."""
    foreign = await sdk_client.conversations.create(items=[cast(Any, user("private"))])
    elsewhere = await sdk_client.conversations.create(
        items=[cast(Any, user("other store"))], metadata={"convostore_store": "audit"}
    )
    for conversation in (foreign, elsewhere):
        session = SidecarSession(conversation.id, "chat", url=chat.url, retries=0)
        for call in (
            session.get_items(),
            session.add_items([user("injected")]),
            session.pop_item(),
            session.clear_session(),
        ):
            with pytest.raises(NotFoundError) as refused:
                await call
            assert refused.value.code == "conversation_not_found"
        assert len(openai_api.items_of(conversation.id)) == 1, "nothing read, added or deleted"


async def test_a_foreign_conversation_is_refused_with_the_setting_that_adopts_it(
    chat: RunningSidecar, sdk_client: AsyncOpenAI
) -> None:
    foreign = await sdk_client.conversations.create(items=[cast(Any, user("theirs"))])
    with pytest.raises(NotFoundError) as refused:
        await SidecarSession(foreign.id, "chat", url=chat.url, retries=0).get_items()
    assert "openai.adoptConversations: true" in refused.value.message


@pytest.fixture
async def adopting(start_sidecar: StartSidecar, store_config: StoreConfig) -> RunningSidecar:
    """Two stores that adopt conversations no store marked: `chat` and `audit`."""
    stores = {name: store_config("openai") for name in ("chat", "audit")}
    for store in stores.values():
        store["openai"]["adoptConversations"] = True
    return await start_sidecar({"stores": stores})


async def test_a_conversation_the_sdk_made_is_continued_once_adopted(
    adopting: RunningSidecar, sdk_client: AsyncOpenAI, openai_api: OpenAIStandIn
) -> None:
    """`OpenAIConversationsSession(conversation_id=...)` swapped for a `SidecarSession`
    on a store that adopts: the same items, continued; the conversation is marked for
    that store on first use, so another store cannot reach it; after a clear, the id
    goes on with a new conversation, as the SDK's session goes on after its clear."""
    theirs = OpenAIConversationsSession(openai_client=sdk_client)
    await theirs.add_items([cast(Any, user("said through the SDK"))])
    [conversation] = list(openai_api.conversations)
    ours = SidecarSession(conversation, "chat", url=adopting.url)
    assert await ours.get_items() == await theirs.get_items()
    await ours.add_items([user("said through convostore")])
    items: list[Any] = await theirs.get_items()
    said = [item["content"][0]["text"] for item in items]
    assert said == ["said through the SDK", "said through convostore"]
    assert openai_api.conversations[conversation].metadata == {"convostore_store": "chat"}
    with pytest.raises(NotFoundError):
        await SidecarSession(conversation, "audit", url=adopting.url, retries=0).get_items()

    await ours.clear_session()
    assert conversation not in openai_api.conversations
    assert await ours.get_items() == []
    await ours.add_items([user("after the clear")])
    [after] = [cid for cid in openai_api.conversations if cid != conversation]
    assert [i["content"][0]["text"] for i in await ours.get_items()] == ["after the clear"]
    assert openai_api.conversations[after].metadata["convostore_store"] == "chat"


async def test_a_conversation_with_no_room_for_the_marker_is_not_adopted(
    adopting: RunningSidecar, sdk_client: AsyncOpenAI, openai_api: OpenAIStandIn
) -> None:
    full = {f"k{n}": "v" for n in range(16)}
    made = await sdk_client.conversations.create(items=[cast(Any, user("x"))], metadata=full)
    with pytest.raises(RequestRejectedError) as refused:
        await SidecarSession(made.id, "chat", url=adopting.url, retries=0).get_items()
    assert (refused.value.status, refused.value.code) == (409, "conversation_not_adoptable")
    assert openai_api.conversations[made.id].metadata == full


async def test_rate_limits_and_server_errors_are_retried(
    chat: RunningSidecar, openai_api: OpenAIStandIn
) -> None:
    session = SidecarSession(unique(), "chat", url=chat.url, retries=0)
    await session.add_items([user("first")])
    before = len(openai_api.requests)
    openai_api.fail(429)
    openai_api.fail(500)
    await session.add_items([user("second")])
    assert len(openai_api.requests) - before == 3
    assert [i["content"][0]["text"] for i in await session.get_items()] == ["first", "second"]


async def test_errors_past_the_retries_are_503_and_change_nothing(
    start_sidecar: StartSidecar, store_config: StoreConfig, openai_api: OpenAIStandIn
) -> None:
    config = store_config("openai")
    config["openai"]["maxRetries"] = 1
    sidecar = await start_sidecar({"stores": {"chat": config}})
    session = SidecarSession(unique(), "chat", url=sidecar.url, retries=0)
    await session.add_items([user("kept")])
    openai_api.fail(500, times=2)
    url = f"{sidecar.url}/v1/stores/chat/sessions/{session.session_id}/items"
    status, body, headers = await post(url, {"items": [user("lost")]})
    assert (status, body["error"]["code"]) == (503, "backend_unavailable")
    assert "store 'chat'" in body["error"]["message"]
    assert headers["Retry-After"]
    assert [i["content"][0]["text"] for i in await session.get_items()] == ["kept"]


async def test_an_unreachable_api_is_503_and_not_ready(
    chat: RunningSidecar, openai_api: OpenAIStandIn
) -> None:
    session = SidecarSession(unique(), "chat", url=chat.url, retries=0)
    await session.add_items([user("before")])
    openai_api.stop()
    with pytest.raises(StoreUnavailableError) as caught:
        await session.get_items()
    assert caught.value.code == "backend_unavailable"
    async with aiohttp.ClientSession() as http, http.get(f"{chat.url}/readyz") as ready:
        assert ready.status == 503
        assert (await ready.json())["stores"]["chat"] == "unavailable"
    openai_api.start()
    await session.add_items([user("after")])
    assert [i["content"][0]["text"] for i in await session.get_items()] == ["before", "after"]


@pytest.fixture
def wrong_key(openai_key_file: Path) -> None:
    openai_key_file.write_text(WRONG_KEY)


@pytest.mark.usefixtures("wrong_key")
async def test_a_rejected_key_names_the_store_and_never_shows_the_key(
    start_sidecar: StartSidecar, store_config: StoreConfig
) -> None:
    sidecar = await start_sidecar({"stores": {"chat": store_config("openai")}})
    session = SidecarSession(unique(), "chat", url=sidecar.url, retries=0)
    with pytest.raises(StoreUnavailableError) as caught:
        await session.add_items([user("hello")])
    error = caught.value
    assert (error.status, error.code) == (500, "backend_auth_failed")
    assert "store 'chat'" in error.message
    assert "Incorrect API key provided" in error.message
    assert "9876" not in error.message
    assert "wrong" not in error.message
    async with aiohttp.ClientSession() as http, http.get(f"{sidecar.url}/readyz") as ready:
        status = (await ready.json())["details"]["chat"]
    assert "refused the sidecar's API key" in status
    assert "9876" not in status


async def test_an_item_the_api_refuses_is_400_with_its_message(chat: RunningSidecar) -> None:
    session = SidecarSession(unique(), "chat", url=chat.url)
    await session.add_items([user("kept")])
    url = f"{chat.url}/v1/stores/chat/sessions/{session.session_id}/items"
    status, body, _ = await post(url, {"items": [{"type": "bogus", "x": 1}]})
    assert (status, body["error"]["code"]) == (400, "backend_rejected")
    assert "Invalid value for 'items[0].type'" in body["error"]["message"]
    assert [i["content"][0]["text"] for i in await session.get_items()] == ["kept"]


async def test_a_retried_long_append_resumes_instead_of_repeating(
    start_sidecar: StartSidecar, store_config: StoreConfig, openai_api: OpenAIStandIn
) -> None:
    config = store_config("openai")
    config["openai"]["maxRetries"] = 0
    sidecar = await start_sidecar({"stores": {"chat": config}})
    session_id = unique()
    url = f"{sidecar.url}/v1/stores/chat/sessions/{session_id}/items"
    body = {"items": [user(f"m{n}") for n in range(45)]}
    openai_api.fail(500, after=2)  # the conversation and the first 20 items go through
    status, _, _ = await post(url, body, key="k-45")
    assert status == 503
    [conversation] = openai_api.conversations.values()
    assert len(conversation.items) == 20
    status, resumed, _ = await post(url, body, key="k-45")
    assert (status, resumed) == (200, {"appended": 45, "replayed": False})
    status, again, _ = await post(url, body, key="k-45")
    assert (status, again) == (200, {"appended": 45, "replayed": True})
    texts = [item["content"][0]["text"] for item in conversation.items]
    assert texts == [f"m{n}" for n in range(45)]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"ttl": "1h"}, "field 'ttl': the openai backend cannot honour it"),
        ({"maxItems": 10}, "field 'maxItems': the openai backend cannot honour it"),
        ({"encryption": {"keys": []}}, "field 'encryption': the openai backend cannot"),
    ],
)
def test_settings_the_api_cannot_honour_are_refused(
    store_config: StoreConfig, extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"stores": {"chat": store_config("openai", **extra)}})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"apiKeyFile": None}, "field 'openai.apiKeyFile': is required"),
        ({"baseURL": "ftp://x"}, "field 'openai.baseURL': must be https://"),
        ({"baseURL": "http://api.example.com/v1"}, "http:// only to a loopback address"),
        ({"baseURL": "http://10.0.0.7:8080/v1"}, "http:// only to a loopback address"),
        ({"baseURL": ""}, "field 'openai.baseURL': must be a non-empty string"),
        ({"maxRetries": 99}, "field 'openai.maxRetries': must be an integer from 0 to 10"),
        ({"timeout": "forever"}, "field 'openai.timeout': must be a duration"),
        ({"mapping": {"backend": "dapr"}}, "field 'openai.mapping.backend': must be one of"),
        ({"mapping": {"backend": "redis", "redis": {"url": "http://x"}}}, "mapping.redis.url"),
        ({"organisation": "org"}, "unknown field(s) 'organisation'"),
    ],
)
def test_malformed_openai_settings_are_refused_by_name(
    store_config: StoreConfig, change: dict[str, Any], message: str
) -> None:
    config = store_config("openai")
    config["openai"].update(change)
    config["openai"] = {k: v for k, v in config["openai"].items() if v is not None}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config({"stores": {"chat": config}})


def test_an_unreadable_key_file_fails_the_start_naming_the_store(
    store_config: StoreConfig, tmp_path: Path
) -> None:
    config = store_config("openai")
    config["openai"]["apiKeyFile"] = str(tmp_path / "missing")
    parsed = parse_config({"stores": {"chat": config}})
    with pytest.raises(RuntimeError, match="store 'chat': cannot read the OpenAI API key file"):
        Store.open(parsed.stores["chat"])
