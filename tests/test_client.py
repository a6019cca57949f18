"""`SidecarSession` as agent code sees it: the SDK protocol, errors, URLs, event loops."""

from __future__ import annotations

import asyncio
import gc
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from agents.memory import Session, SessionSettings
from convostore import (
    NotFoundError,
    RequestRejectedError,
    SidecarSession,
    StoreUnavailableError,
)
from convostore.transport import Endpoint

from tests.servers import free_port
from tests.support import RunningSidecar, SidecarProcess


def test_sidecar_session_is_an_agents_sdk_session() -> None:
    session = SidecarSession("user_123", url="http://127.0.0.1:1")
    assert isinstance(session, Session)
    assert session.session_id == "user_123"
    assert session.session_settings == SessionSettings(), "as the SDK's sessions default it"


async def test_session_settings_limit_applies_unless_a_limit_is_given(
    sidecar: RunningSidecar,
) -> None:
    session = SidecarSession("s", url=sidecar.url, session_settings=SessionSettings(limit=2))
    await session.add_items([{"n": n} for n in range(5)])
    assert await session.get_items() == [{"n": 3}, {"n": 4}]
    assert await session.get_items(limit=4) == [{"n": n} for n in range(1, 5)]
    assert await session.get_items(limit=0) == []


async def test_add_items_with_no_items_sends_nothing(sidecar: RunningSidecar) -> None:
    session = SidecarSession("s", url=sidecar.url)
    await session.add_items([])
    assert await session.get_items() == []
    from convostore_sidecar.http.state import METRICS

    text = sidecar.app[METRICS].exposition().decode()
    assert 'method="POST"' not in text


async def test_clear_is_an_alias_of_clear_session(sidecar: RunningSidecar) -> None:
    session = SidecarSession("s", url=sidecar.url)
    await session.add_items([{"a": 1}])
    await session.clear()
    assert await session.get_items() == []


async def test_errors_are_typed_and_carry_the_server_code(sidecar: RunningSidecar) -> None:
    with pytest.raises(NotFoundError) as missing:
        await SidecarSession("s", store="nope", url=sidecar.url).get_items()
    assert missing.value.code == "store_not_found"
    assert missing.value.status == 404
    with pytest.raises(RequestRejectedError) as rejected:
        await SidecarSession("s", url=sidecar.url).add_items(["not an object"])
    assert rejected.value.code == "invalid_item"
    with pytest.raises(RequestRejectedError) as bad_id:
        await SidecarSession("bad id", url=sidecar.url).get_items()
    assert bad_id.value.code == "invalid_session_id"


async def test_unreachable_sidecar_raises_store_unavailable() -> None:
    session = SidecarSession("s", url=f"http://127.0.0.1:{free_port()}", retries=1)
    with pytest.raises(StoreUnavailableError) as error:
        await session.get_items()
    assert error.value.code == "sidecar_unreachable"


def test_url_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVOSTORE_URL", "unix:///var/run/convostore/sidecar.sock")
    assert Endpoint.parse(None) == Endpoint("http://localhost", "/var/run/convostore/sidecar.sock")
    monkeypatch.delenv("CONVOSTORE_URL")
    assert Endpoint.parse(None) == Endpoint("http://127.0.0.1:8790", None)
    with pytest.raises(ValueError, match="must be http"):
        Endpoint.parse("ftp://x")
    with pytest.raises(ValueError, match="names no socket path"):
        Endpoint.parse("unix://")


@pytest.mark.parametrize("turns", [0, -2, 1.5, "3", True])
def test_history_turns_must_be_a_positive_integer(turns: Any) -> None:
    with pytest.raises(ValueError, match="history_turns must be a positive integer"):
        SidecarSession("s", url="http://127.0.0.1:1", history_turns=turns)


def test_token_file_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("abc\n")
    monkeypatch.setenv("CONVOSTORE_TOKEN_FILE", str(token))
    session = SidecarSession("s", url="http://127.0.0.1:1")
    assert session._transport.token.value() == "abc"


def test_sessions_work_across_event_loops_without_leaks(
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess], tmp_path: Path
) -> None:
    proc = sidecar_process(
        {"stores": {"default": {"backend": "sqlite", "sqlite": {"path": str(tmp_path / "x.db")}}}}
    )
    proc.start()
    session = SidecarSession("loops", url=proc.url)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in range(15):
            asyncio.run(session.add_items([{"n": n}]))
        items = asyncio.run(session.get_items())
        gc.collect()
    assert items == [{"n": n} for n in range(15)]
    leaks = [w for w in caught if "Unclosed" in str(w.message) or "unclosed" in str(w.message)]
    assert leaks == []


def test_unix_socket_url(
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    socket_path = tmp_path / "run" / "sidecar.sock"
    proc = sidecar_process(
        {"stores": {"default": {"backend": "sqlite", "sqlite": {"path": str(tmp_path / "u.db")}}}}
    )
    proc.start("--socket", str(socket_path))
    assert oct(socket_path.stat().st_mode & 0o777) == oct(0o660)
    monkeypatch.setenv("CONVOSTORE_URL", f"unix://{socket_path}")
    session = SidecarSession("over-unix")
    asyncio.run(session.add_items([{"via": "socket"}]))
    assert asyncio.run(SidecarSession("over-unix", url=proc.url).get_items()) == [{"via": "socket"}]


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://127.0.0.1:8790", True),
        ("http://localhost:8790", True),
        ("http://[::1]:8790", True),
        ("https://sidecar.example.com", True),
        ("unix:///var/run/convostore/sidecar.sock", True),
        ("http://10.0.0.5:8790", False),
        ("http://sidecar.agents.svc:8790", False),
    ],
)
def test_the_token_never_goes_over_plain_http_beyond_loopback(url: str, allowed: bool) -> None:
    if allowed:
        SidecarSession("s", url=url, token="t0ken")
    else:
        with pytest.raises(ValueError, match="refusing to send the bearer token over plain HTTP"):
            SidecarSession("s", url=url, token="t0ken")
    SidecarSession("s", url=url)  # without a token there is nothing to leak
