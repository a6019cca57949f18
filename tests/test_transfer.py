"""Export and import lose nothing: a labelled conversation with tool calls, usage per turn,
a branch and a compaction goes SQLite → PostgreSQL → Redis → SQLite through `convostore sessions
export` and `import`, and every read the API offers answers the same on each store;
each store's export is the same file."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from agents import Agent, Runner
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call
from agents.usage import Usage
from convostore import AdvancedSidecarSession, SidecarSession
from convostore_cli import transfer

from tests.compaction_support import compaction_config
from tests.openai_standin import OpenAIStandIn
from tests.support import SidecarProcess, lookup_weather
from tests.test_process import run_cli

SESSIONS = ("trip", "notes")


def turn_steps(turn: int) -> list[ModelStep]:
    """Odd turns call the weather tool before answering; each step reports its usage."""
    used = Usage(requests=1, input_tokens=10 * turn, output_tokens=turn, total_tokens=11 * turn)
    steps = []
    if turn % 2:
        call = function_call("lookup_weather", {"city": f"city {turn}"}, call_id=f"c{turn}")
        steps.append(ModelStep(output=[call], usage=used))
    steps.append(ModelStep(output=[assistant_message(f"answer {turn}")], usage=used))
    return steps


async def converse(url: str) -> None:
    """Four turns on `main` with usage, a branch from turn 3 with two turns of its own,
    a compaction of `main`; and a second session of plain items."""
    model = ScriptedModel([step for turn in range(1, 7) for step in turn_steps(turn)])
    agent = Agent(name="planner", model=model, tools=[lookup_weather])
    session = AdvancedSidecarSession("trip", url=url, metadata={"user_id": "ada", "tier": "é"})
    questions = ["Oslo in May?", "And Bergen?", "Trains?", "Hotels?"]
    for question in questions:
        await session.store_run_usage(await Runner.run(agent, question, session=session))
    await session.create_branch_from_turn(3, "by-boat")
    for question in ("Ferries?", "Fjords?"):
        await session.store_run_usage(await Runner.run(agent, question, session=session))
    await session.switch_to_branch("main")
    await session.run_compaction({"force": True})
    assert session.last_compaction is not None
    assert session.last_compaction["compacted"], session.last_compaction
    await SidecarSession("notes", url=url).add_items([{"note": n} for n in range(3)])


async def every_read(url: str) -> dict[str, Any]:
    """What each read of the API answers, timestamps set aside."""
    reads: dict[str, Any] = {}
    async with aiohttp.ClientSession() as http:
        for session_id in SESSIONS:
            base = f"{url}/v1/stores/default/sessions/{session_id}"
            branches = (await get(http, base + "/branches"))["branches"]
            # listed in the order their items were written, which an import cannot keep
            listed = sorted(branches, key=lambda b: b["branch_id"])
            reads[f"{session_id} branches"] = [without_time(b) for b in listed]
            reads[f"{session_id} usage"] = await get(http, base + "/usage")
            reads[f"{session_id} labels"] = (await get(http, base + "/metadata"))["labels"]
            for branch in [b["branch_id"] for b in branches] or ["main"]:
                where = f"{session_id}@{branch}"
                one = f"{base}/branches/{branch}"
                reads[f"{where} live"] = await get(http, f"{base}/items?branch={branch}")
                full = f"{base}/items?branch={branch}&view=full"
                reads[f"{where} full"] = await get(http, full)
                turns = (await get(http, one + "/turns"))["turns"]
                reads[f"{where} turns"] = [without_time(t) for t in turns]
                found = (await get(http, one + "/turns?containing=bergen"))["turns"]
                reads[f"{where} search"] = [without_time(t) for t in found]
                reads[f"{where} shape"] = await get(http, one + "/shape")
                reads[f"{where} turn usage"] = await get(http, one + "/usage")
    return reads


async def get(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as answer:
        assert answer.status == 200, await answer.text()
        return await answer.json()


def without_time(value: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in value.items() if k != "created_at"}


async def test_sessions_move_across_backends_with_everything_they_hold(
    store_config: Callable[..., dict[str, Any]],
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
    openai_api: OpenAIStandIn,
    openai_key_file: Path,
    tmp_path: Path,
) -> None:
    # compacted when the test says so: the Runner's own requests would chain from the
    # scripted model's response ids, which the stand-in never served
    compaction = compaction_config(
        openai_api, openai_key_file, keepRecentTurns=1, trigger={"items": 1000}
    )
    stores = [
        store_config("sqlite", compaction=compaction),
        store_config("postgres"),
        store_config("redis"),
        store_config("sqlite", sqlite={"path": str(tmp_path / "back.db")}),
    ]
    sidecars = []
    for store in stores:
        sidecar = sidecar_process({"stores": {"default": store}})
        sidecar.start()
        sidecars.append(sidecar)
    await converse(sidecars[0].url)
    said = await every_read(sidecars[0].url)
    assert len(said["trip@main full"]["items"]) > len(said["trip@main live"]["items"])
    assert [b["branch_id"] for b in said["trip branches"]] == ["by-boat", "main"]

    exports: list[str] = []
    for source, target in itertools.pairwise(sidecars):
        exported = tmp_path / f"from-{len(exports)}.jsonl"
        command = ["sessions", "--url", source.url, "export", "-o", str(exported)]
        assert run_cli(*command).returncode == 0
        exports.append(exported.read_text())
        imported = run_cli("sessions", "--url", target.url, "import", str(exported))
        assert imported.returncode == 0, imported.stderr
        assert "branches" in imported.stderr
        assert "1 compactions restored" in imported.stderr
        assert await every_read(target.url) == said

    assert exports[1] == exports[2] == exports[0]
    kinds = [set(json.loads(line)) - {"session_id", "branch"} for line in exports[0].splitlines()]
    assert {"usage", "turn"} in kinds
    assert {"archive"} in kinds
    assert {"labels"} in kinds
    assert said["trip labels"] == {"tier": "é", "user_id": "ada"}
    assert said["notes labels"] == {}
    assert set() in kinds

    again = run_cli("sessions", "--url", sidecars[1].url, "import", str(tmp_path / "from-0.jsonl"))
    assert again.returncode == 0, again.stderr
    assert again.stderr.startswith("imported 0 items; "), again.stderr
    assert await every_read(sidecars[1].url) == said, "a second import writes nothing"
    shown = run_cli("sessions", "--url", sidecars[3].url, "show", "trip", "--branch", "by-boat")
    assert json.loads(shown.stdout) == said["trip@by-boat live"]["items"]


async def test_restoring_an_archive_refuses_what_it_cannot_do_and_changes_nothing(
    store_config: Callable[..., dict[str, Any]],
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
) -> None:
    sidecar = sidecar_process(
        {"stores": {"default": store_config("sqlite"), "kv": store_config("dapr")}}
    )
    sidecar.start()
    items = [{"role": "user", "content": "a"}, {"n": 1}, {"n": 2}]
    await SidecarSession("s", url=sidecar.url).add_items(items)
    base = f"{sidecar.url}/v1/stores/default/sessions/s/items:archive"
    summary = {"items": [{"type": "compaction", "summary": "x"}]}
    cases = [
        ("", summary, 400, "invalid_count"),
        ("?count=0", summary, 400, "invalid_count"),
        ("?count=x", summary, 400, "invalid_count"),
        ("?count=1", {"items": [{}, {}]}, 409, "summary_too_long"),
        ("?count=99999999999", summary, 409, "history_too_long"),
        ("?count=1", {"items": [1]}, 400, "invalid_item"),
        ("?count=1", {"things": []}, 400, "invalid_body"),
        ("?count=4", summary, 409, "too_few_items"),
        ("?count=1&branch=nope", summary, 404, "branch_not_found"),
    ]
    async with aiohttp.ClientSession() as http:
        for query, body, status, code in cases:
            async with http.post(base + query, json=body) as answer:
                assert (answer.status, (await answer.json())["error"]["code"]) == (status, code)
        async with http.post(base + "?count=1", data=b"{}") as answer:
            assert answer.status == 415
        kv = f"{sidecar.url}/v1/stores/kv/sessions/s/items:archive?count=1"
        async with http.post(kv, json=summary) as answer:
            assert (await answer.json())["error"]["code"] == "not_supported"
        assert await SidecarSession("s", url=sidecar.url).get_items() == items
        async with http.post(base + "?count=2", json=summary) as answer:
            assert await answer.json() == {"archived": 2, "items": 1}
    live = await SidecarSession("s", url=sidecar.url).get_items()
    assert live == [summary["items"][0], {"n": 2}]
    assert await SidecarSession("s", url=sidecar.url).get_full_items() == items


async def test_an_export_stops_rather_than_leave_items_out(
    store_config: Callable[..., dict[str, Any]],
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
) -> None:
    """A session longer than one read of the sidecar (`limits.maxReadItems`) would be cut
    to its newest items: the export fails, naming it, instead of writing part of it."""
    store = store_config("sqlite", limits={"maxReadItems": 5})
    sidecar = sidecar_process({"stores": {"default": store}})
    sidecar.start()
    await SidecarSession("short", url=sidecar.url).add_items([{"n": n} for n in range(5)])
    await SidecarSession("long", url=sidecar.url).add_items([{"n": n} for n in range(8)])
    exported = run_cli("sessions", "--url", sidecar.url, "export")
    assert exported.returncode == 1
    assert exported.stderr.startswith("convostore: session 'long' (branch 'main') holds more")
    assert "limits.maxReadItems" in exported.stderr


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ('{"session_id": "a", "labels": {}}', "'labels' must be a non-empty object"),
        ('{"session_id": "a", "labels": ["user_id"]}', "'labels' must be a non-empty object"),
        ('{"session_id": "a", "labels": {"user_id": 42}}', "'labels' must map names to string"),
        ('{"session_id": "a", "branch": "b", "labels": {"u": "1"}}', "not a record"),
    ],
)
def test_malformed_label_records_stop_an_import_before_it_writes(line: str, why: str) -> None:
    text = '{"convostore_export": 2}\n{"session_id": "a", "item": {"n": 1}}\n' + line + "\n"
    with pytest.raises(ValueError, match="line 3: ") as refused:
        transfer.parse(text)
    assert why in str(refused.value)


def test_an_import_halves_a_batch_until_the_sidecar_takes_it(
    store_config: Callable[..., dict[str, Any]],
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
    tmp_path: Path,
) -> None:
    """A store whose requests are small (`limits.maxRequestBytes`) refuses a batch of
    the import as too large: the import sends it in halves, and a re-run still skips
    every half it wrote."""
    limits = {"maxRequestBytes": 4096, "maxItemBytes": 1024}
    source = sidecar_process({"stores": {"default": store_config("sqlite")}})
    source.start()
    items = [{"role": "user", "content": f"{n} " + "x" * 500} for n in range(20)]
    asyncio.run(SidecarSession("long", url=source.url).add_items(items))
    exported = run_cli("sessions", "--url", source.url, "export")
    assert exported.returncode == 0, exported.stderr
    small = {"path": str(tmp_path / "small.db")}
    target = sidecar_process(
        {"stores": {"default": store_config("sqlite", sqlite=small, limits=limits)}}
    )
    target.start()
    for said in ("imported 20 items", "imported 0 items; 20 were imported before"):
        imported = run_cli("sessions", "--url", target.url, "import", "-", stdin=exported.stdout)
        assert imported.returncode == 0, imported.stderr
        assert imported.stderr.startswith(said), imported.stderr
        assert asyncio.run(SidecarSession("long", url=target.url).get_items()) == items
