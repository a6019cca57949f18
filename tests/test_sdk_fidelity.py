"""What a user switching from the SDK's own session classes sees: `session_settings`
kept as the SDK keeps them, `close()` and `ping()`, and the SDK's own `EncryptedSession`
with its keys, on SQLite, PostgreSQL and Redis."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, cast

import pytest
from agents import Agent, Runner
from agents.extensions.memory import EncryptedSession as SdkEncryptedSession
from agents.memory import SessionSettings
from agents.testing import ScriptedModel, assistant_message
from convostore import AdvancedSidecarSession, EncryptedSession, SessionClosedError, SidecarSession
from convostore_sidecar.keyring import generate_key
from cryptography.fernet import Fernet

from tests.support import StartSidecar, unique

SESSION_CLASSES = [SidecarSession, AdvancedSidecarSession]


@pytest.fixture(params=["sqlite", "postgres", "redis"])
async def url(
    request: pytest.FixtureRequest,
    start_sidecar: StartSidecar,
    store_config: Callable[..., dict[str, Any]],
) -> str:
    sidecar = await start_sidecar({"stores": {"default": store_config(request.param)}})
    return sidecar.url


@pytest.mark.parametrize("cls", SESSION_CLASSES)
async def test_session_settings_are_coerced_as_the_sdk_does(
    cls: type[SidecarSession], url: str
) -> None:
    assert cls(unique(), url=url).session_settings == SessionSettings()
    session = cls(unique(), url=url, session_settings={"limit": 2})
    assert session.session_settings == SessionSettings(limit=2)
    await session.add_items([{"role": "user", "content": str(n)} for n in range(5)])
    assert [item["content"] for item in await session.get_items()] == ["3", "4"]
    assert len(await session.get_items(limit=4)) == 4, "an explicit limit wins"
    model = ScriptedModel([[assistant_message("ok")]])
    await Runner.run(Agent(name="a", model=model), "hello", session=session)
    given: Any = model.calls[0].input
    assert [item["content"] for item in given] == ["3", "4", "hello"], "the latest 2, then input"
    with pytest.raises(TypeError, match="Unknown session settings: limitt"):
        cls(unique(), url=url, session_settings={"limitt": 1})


@pytest.mark.parametrize("cls", SESSION_CLASSES)
async def test_close_and_ping_as_the_sdks_sessions_have_them(
    cls: type[SidecarSession], url: str
) -> None:
    session = cls(unique(), url=url)
    assert await session.ping() is True
    await session.add_items([{"role": "user", "content": "hi"}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        session.close()  # as with SQLiteSession: not awaited, and no warning
    with pytest.raises(SessionClosedError):
        await session.get_items()
    with pytest.raises(SessionClosedError):
        await session.add_items([{"role": "user", "content": "again"}])
    other = cls(session.session_id, url=url)
    await other.close()  # as with RedisSession
    kept: list[Any] = await cls(session.session_id, url=url).get_items()
    assert [item["content"] for item in kept] == ["hi"]
    assert await SidecarSession("x", url="http://127.0.0.1:9").ping() is False


async def test_the_sdks_encrypted_session_keeps_its_keys_over_a_sidecar(url: str) -> None:
    """The one-line migration for a team on the SDK's EncryptedSession: keep it, and
    give it a SidecarSession as the underlying session; its Fernet keys keep working and
    the sidecar holds only ciphertext."""
    key = Fernet.generate_key().decode()
    session_id = unique()
    inner = SidecarSession(session_id, url=url)
    sealed = SdkEncryptedSession(session_id, cast(Any, inner), key)  # typed for its own ABC
    await sealed.add_items([cast(Any, {"role": "user", "content": "secret plan"})])
    reopened = SdkEncryptedSession(session_id, cast(Any, SidecarSession(session_id, url=url)), key)
    read: list[Any] = await reopened.get_items()
    assert [item["content"] for item in read] == ["secret plan"]
    stored = await inner.get_items()
    assert "secret plan" not in repr(stored)


async def test_a_branch_cleared_away_by_another_object_falls_back_to_main(url: str) -> None:
    session_id = unique()
    a = AdvancedSidecarSession(session_id, url=url)
    await a.add_items([user("q1"), {"role": "assistant", "content": "a1"}, user("q2")])
    await a.create_branch_from_turn(2, "stale")
    assert ("stale", True) in [(x["branch_id"], x["is_current"]) for x in await a.list_branches()]
    b = AdvancedSidecarSession(session_id, url=url)
    await b.clear_session()
    await b.add_items([user("fresh")])

    assert [i["content"] for i in await a.get_items()] == ["fresh"]
    assert [t["content"] for t in await a.get_conversation_turns()] == ["fresh"]
    await a.add_items([{"role": "assistant", "content": "on main"}])
    assert [i["content"] for i in await b.get_items()] == ["fresh", "on main"]
    popped = await a.pop_item()
    assert popped is not None
    assert popped["content"] == "on main"
    branches = await a.list_branches()
    assert [(x["branch_id"], x["is_current"]) for x in branches] == [("main", True)]


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


async def test_branches_list_in_the_order_they_were_made(url: str) -> None:
    """The README's stated difference: made within one second, `zeta` then `alpha` list
    in that order (the SDK would put `alpha` first)."""
    session = AdvancedSidecarSession(unique(), url=url)
    await session.add_items([user("q1"), {"role": "assistant", "content": "a1"}, user("q2")])
    for name in ("zeta", "alpha"):
        await session.switch_to_branch("main")
        await session.create_branch_from_turn(2, name)
    listed = [b["branch_id"] for b in await session.list_branches()]
    assert listed == ["main", "zeta", "alpha"]


@pytest.mark.parametrize(
    "make",
    [
        lambda url: SidecarSession(unique(), url=url),
        lambda url: AdvancedSidecarSession(unique(), url=url),
        lambda url: EncryptedSession(SidecarSession(unique(), url=url), generate_key()),
    ],
    ids=["SidecarSession", "AdvancedSidecarSession", "EncryptedSession"],
)
async def test_every_session_class_closes_on_leaving_async_with(
    make: Callable[[str], Any], url: str
) -> None:
    """The SDK's `async with DaprSession.from_address(...) as session:` pattern: the
    session works inside the block and is closed after it, with a `RuntimeError`."""
    async with make(url) as session:
        await session.add_items([{"role": "user", "content": "hi"}])
        assert await session.get_items() == [{"role": "user", "content": "hi"}]
    with pytest.raises(RuntimeError) as closed:
        await session.get_items()
    assert isinstance(closed.value, SessionClosedError)
