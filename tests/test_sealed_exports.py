"""Exports of a subject's items are sealed by their store: they import back into it with
everything they held, nowhere else, and not at all once the subject is erased. Against
the sidecar entrypoint and the `convostore` command, on every backend that keeps labels."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from agents import Agent, Runner
from agents.testing import ModelStep, ScriptedModel, assistant_message
from agents.usage import Usage
from convostore import AdvancedSidecarSession, SidecarSession, SidecarStore
from convostore_sidecar.keyring import generate_key

from tests.support import POSTGRES_POOLED, REDIS_CLUSTER, SidecarProcess, unique
from tests.test_process import run_cli

LABELLED = ("sqlite", "postgres", "redis", REDIS_CLUSTER, POSTGRES_POOLED, "sqlalchemy")
KEY = {"id": "k1", "value": generate_key()}
SEALING = {"keys": [KEY], "subjectLabel": "user_id"}
StoreConfig = Callable[..., dict[str, Any]]
StartProcess = Callable[[dict[str, Any]], SidecarProcess]


def started(sidecar_process: StartProcess, stores: dict[str, Any]) -> SidecarProcess:
    sidecar = sidecar_process({"stores": stores})
    sidecar.start()
    return sidecar


async def converse(url: str, person: str) -> AdvancedSidecarSession:
    """Two turns with usage on `main` and one on a branch from turn 2, each saying a
    secret of the person's."""

    def step(n: int) -> ModelStep:
        used = Usage(requests=1, input_tokens=10 * n, output_tokens=n, total_tokens=11 * n)
        return ModelStep(output=[assistant_message(f"{person} secret answer {n}")], usage=used)

    agent = Agent(name="a", model=ScriptedModel([step(n) for n in range(1, 4)]))
    labels = {"user_id": person, "topic": "trip"}
    session = AdvancedSidecarSession(unique(), "chat", url, metadata=labels)
    for n in (1, 2):
        result = await Runner.run(agent, f"{person} secret question {n}", session=session)
        await session.store_run_usage(result)
    await session.create_branch_from_turn(2, "alt")
    result = await Runner.run(agent, f"{person} secret question 3", session=session)
    await session.store_run_usage(result)
    return session


async def reads(url: str, session_id: str) -> dict[str, Any]:
    """Every view of the session the API gives, timestamps aside."""
    base = f"{url}/v1/stores/chat/sessions/{session_id}"
    said: dict[str, Any] = {}
    async with aiohttp.ClientSession() as http:
        for branch in ("main", "alt"):
            for view in ("live", "full"):
                said[f"{branch} {view}"] = await get(
                    http, f"{base}/items?branch={branch}&view={view}"
                )
            said[f"{branch} usage"] = await get(http, f"{base}/branches/{branch}/usage")
        said["labels"] = (await get(http, base + "/metadata"))["labels"]
    return said


async def get(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as answer:
        assert answer.status == 200, await answer.text()
        return await answer.json()


def export(sidecar: SidecarProcess, path: Path, *extra: str) -> list[dict[str, Any]]:
    done = run_cli(
        "sessions", "--url", sidecar.url, "--store", "chat", "export", "-o", str(path), *extra
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("backend", LABELLED)
async def test_an_export_seals_a_subjects_items_for_their_store_alone(
    backend: str, store_config: StoreConfig, sidecar_process: StartProcess, tmp_path: Path
) -> None:
    sidecar = started(sidecar_process, {"chat": store_config(backend, encryption=SEALING)})
    alice = unique("alice")
    chat = await converse(sidecar.url, alice)
    anyone = SidecarSession(unique(), "chat", sidecar.url, metadata={"topic": "trip"})
    await anyone.add_items([{"role": "user", "content": "nobody's words"}])
    kept = SidecarSession(unique(), "chat", sidecar.url, metadata={"user_id": alice})
    await kept.add_items([{"role": "user", "content": "kept"}])
    said = await reads(sidecar.url, chat.session_id)
    assert len(said["main usage"]["turns"]) == 2

    path = tmp_path / "sealed.jsonl"
    records = export(sidecar, path)
    text = path.read_text()
    assert "secret" not in text, "a subject's words left the store in clear"
    assert "nobody's words" in text  # a session with no subject is no one's to seal
    mine = [r for r in records if r.get("session_id") == chat.session_id]
    assert mine[0] == {"session_id": chat.session_id, "labels": {"user_id": alice, "topic": "trip"}}
    items = [r["item"] for r in mine if "item" in r]
    assert {item["type"] for item in items} == {"convostore.sealed"}
    assert [r["turn"] for r in mine if "usage" in r and "branch" not in r] == [1, 2]
    plain = export(sidecar, tmp_path / "plain.jsonl", "--plaintext")
    plain_main = [
        r["item"] for r in plain if r.get("session_id") == chat.session_id and "item" in r
    ]
    assert plain_main[: len(said["main full"]["items"])] == said["main full"]["items"]

    store = SidecarStore("chat", sidecar.url)
    assert (await store.erase({"topic": "trip"}))["erased_sessions"] == 2  # alice's key stays
    assert await chat.get_items(branch_id="main") == []
    imported = run_cli("sessions", "--url", sidecar.url, "--store", "chat", "import", str(path))
    assert imported.returncode == 0, imported.stderr
    assert await reads(sidecar.url, chat.session_id) == said
    assert await anyone.get_items() == [{"role": "user", "content": "nobody's words"}]
    again = run_cli("sessions", "--url", sidecar.url, "--store", "chat", "import", str(path))
    assert again.returncode == 0, again.stderr
    assert again.stderr.startswith("imported 0 items; "), again.stderr
    assert await reads(sidecar.url, chat.session_id) == said

    assert (await store.erase({"user_id": alice}))["erased_sessions"] == 2
    refused = run_cli("sessions", "--url", sidecar.url, "--store", "chat", "import", str(path))
    assert refused.returncode == 1
    assert "': subject_erased: " in refused.stderr, refused.stderr
    assert [r async for r in store.find_sessions({"user_id": alice})] == []
    assert await chat.get_items(branch_id="main") == []


async def sealed_items(http: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = (await get(http, url + "/items?sealed=true"))["items"]
    return items


def altered(text: str) -> str:
    raw = bytearray(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    raw[-1] ^= 1
    return base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")


async def test_sealed_items_that_do_not_belong_are_refused_and_change_nothing(
    store_config: StoreConfig, sidecar_process: StartProcess, tmp_path: Path
) -> None:
    small = {"maxItemBytes": 2048}
    other_db = {"path": str(tmp_path / "other.db")}
    plain_db = {"path": str(tmp_path / "plain.db")}
    sidecar = started(
        sidecar_process,
        {
            "chat": store_config("sqlite", encryption=SEALING, limits=small),
            "other": store_config("sqlite", encryption=SEALING, sqlite=other_db),
            "plain": store_config("sqlite", sqlite=plain_db),
        },
    )
    alice, bob = unique("alice"), unique("bob")
    said = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    sessions = {}
    for store, session_id, labels in (
        ("chat", alice, {"user_id": alice}),
        ("chat", bob, {"user_id": bob}),
        ("chat", "nobody", None),
        ("other", alice, {"user_id": alice}),
        ("plain", alice, None),
    ):
        session = SidecarSession(session_id, store, sidecar.url, metadata=labels)
        await session.add_items(said)
        sessions[(store, session_id)] = session
    base = f"{sidecar.url}/v1/stores"

    async with aiohttp.ClientSession() as http:
        user, assistant = await sealed_items(http, f"{base}/chat/sessions/{alice}")
        assert user["opens_turn"] is True
        assert "opens_turn" not in assistant
        assert await sealed_items(http, f"{base}/plain/sessions/{alice}") == said
        assert await sealed_items(http, f"{base}/chat/sessions/nobody") == said
        mine = f"{base}/chat/sessions/{alice}/items"
        assert await sealed_items(http, f"{base}/chat/sessions/{alice}") == [user, assistant]

        malformed: list[tuple[dict[str, Any], int, str]] = [
            ({"type": "convostore.sealed"}, 400, "invalid_item"),
            ({**user, "subject": "XYZ"}, 400, "invalid_item"),
            ({**user, "subject": user["subject"].upper()}, 400, "invalid_item"),
            ({**user, "subject": 7}, 400, "invalid_item"),
            ({**user, "sealed": "!!!"}, 400, "invalid_item"),
            ({**user, "sealed": user["sealed"] + "="}, 400, "invalid_item"),
            ({**user, "sealed": ""}, 400, "invalid_item"),
            ({**user, "sealed": "AAAA"}, 400, "invalid_item"),
            ({**user, "sealed": 12}, 400, "invalid_item"),
            ({**user, "opens_turn": False}, 400, "invalid_item"),
            ({**user, "opens_turn": "yes"}, 400, "invalid_item"),
            ({**user, "role": "user"}, 400, "invalid_item"),
            ({**user, "sealed": "A" * 5000}, 413, "item_too_large"),
            ({**user, "sealed": altered(user["sealed"])}, 409, "sealed_elsewhere"),
            ({**assistant, "opens_turn": True}, 409, "sealed_elsewhere"),
            ({**user, "subject": "0" * 32}, 409, "sealed_elsewhere"),
        ]
        for item, status, code in malformed:
            for path in (mine, mine + ":archive?count=1"):
                async with http.post(path, json={"items": [item]}) as answer:
                    body = await answer.json()
                    assert (answer.status, body["error"]["code"]) == (status, code), (item, body)
        elsewhere = [
            (f"{base}/chat/sessions/{bob}/items", "sealed_elsewhere"),  # another subject's
            (f"{base}/other/sessions/{alice}/items", "sealed_elsewhere"),  # another store's
            (f"{base}/plain/sessions/{alice}/items", "sealed_elsewhere"),  # seals no one's
            (f"{base}/chat/sessions/nobody/items", "subject_required"),
        ]
        for url, code in elsewhere:
            async with http.post(url, json={"items": [user]}) as answer:
                assert (answer.status, (await answer.json())["error"]["code"]) == (409, code)
        for query in (
            "sealed=maybe",
            "sealed=true&turns=1",
            "sealed=true&limit=1&whole_turns=true",
        ):
            async with http.get(f"{mine}?{query}") as answer:
                assert (answer.status, (await answer.json())["error"]["code"]) == (
                    400,
                    "invalid_sealed",
                )
        for session in sessions.values():
            assert await session.get_items() == said, "a refused item changed a session"

        async with http.post(mine, json={"items": [user, assistant]}) as answer:
            assert answer.status == 200, await answer.text()
            assert (await answer.json())["turn"] == 2
    assert await sessions[("chat", alice)].get_items() == said + said
