"""(k) Compaction on a long conversation: the same scripted conversation (a tool call
every other turn) through the real Runner, on one sidecar whose store compacts (the
SDK's default trigger) and one whose store does not, one after the other in one run; the
model's `responses.compact` is the tests' stand-in answering at once, so what compaction
adds is convostore's own work (a real model call adds its own seconds on top)."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass

from agents import Agent, Runner
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call
from convostore import SidecarSession

from bench.harness import Servers, Sidecar
from bench.scenarios import Figures, timed
from tests.openai_standin import OpenAIStandIn
from tests.support import lookup_weather


@dataclass
class Side:
    """One sidecar's conversation: the last turn's model input, reads of the history,
    and each turn's latency, split by whether the turn compacted."""

    input_items: int
    input_bytes: int
    get_items: Figures
    plain_turns_ms: list[float]
    compacting_turns_ms: list[float]


@dataclass
class CompactionFigures:
    plain: Side
    compacting: Side
    compactions: int


def _steps(turns: int) -> list[ModelStep]:
    steps: list[ModelStep] = []
    for turn in range(turns):
        if turn % 2 == 0:
            call = function_call("lookup_weather", {"city": f"city {turn}"}, call_id=f"c{turn}")
            steps.append(ModelStep(output=[call], response_id=f"resp_{turn}_tool"))
        answer = assistant_message(f"answer {turn}: " + "x" * 200)
        steps.append(ModelStep(output=[answer], response_id=f"resp_{turn}"))
    return steps


async def _converse(url: str, turns: int, repeat: int, api: OpenAIStandIn) -> Side:
    session = SidecarSession("long", url=url)
    steps = _steps(turns + 1)
    api.remember_responses(steps)  # compaction chains from them
    model = ScriptedModel(steps)
    agent = Agent(name="assistant", model=model, tools=[lookup_weather])
    quiet: list[float] = []
    compacting: list[float] = []
    for turn in range(turns):
        before = session.last_compaction
        started = time.perf_counter()
        await Runner.run(agent, f"question {turn}: " + "y" * 200, session=session)
        elapsed = (time.perf_counter() - started) * 1000
        outcome = session.last_compaction
        compacted = outcome is not None and outcome is not before and outcome["compacted"]
        (compacting if compacted else quiet).append(elapsed)
    reads = await timed(session.get_items, repeat)
    calls = len(model.calls)
    await Runner.run(agent, "one more question", session=session)
    next_input = model.calls[calls].input
    size = len(json.dumps(next_input).encode())
    return Side(len(next_input), size, reads, quiet, compacting)


async def compaction_cost(
    servers: Servers, backend: str, turns: int, repeat: int
) -> CompactionFigures:
    api = OpenAIStandIn()
    api.start()
    key = servers.workdir / "openai-key"
    key.write_text(api.api_key)
    compaction = {"apiKeyFile": str(key), "baseURL": api.base_url, "maxRetries": 0}
    plain = Sidecar(servers.store(backend), servers.workdir)
    compacting = Sidecar({**servers.store(backend), "compaction": compaction}, servers.workdir)
    try:
        plain.start()
        compacting.start()
        ours = await _converse(compacting.url, turns, repeat, api)
        theirs = await _converse(plain.url, turns, repeat, api)
    finally:
        plain.stop()
        compacting.stop()
        api.shutdown()
    return CompactionFigures(theirs, ours, len(api.compact_bodies))


def render_compaction(figures: dict[str, CompactionFigures], turns: int) -> list[str]:
    out = [
        "",
        f"## (k) Compaction on a {turns}-turn conversation",
        "",
        __doc__.split("\n\n")[0].replace("\n", " ").removeprefix("(k) ").strip() if __doc__ else "",
        "",
        "| backend | next turn's input: items, KiB (plain → compacting) | get_items p50 ms "
        "(plain → compacting) | faster | compactions | turn p50 ms: plain; compacting, "
        "turns without / with one | added by a compaction ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for backend, f in figures.items():
        plain = statistics.median(f.plain.plain_turns_ms)
        quiet = statistics.median(f.compacting.plain_turns_ms)
        loud = statistics.median(f.compacting.compacting_turns_ms or [float("nan")])
        out.append(
            f"| {backend} | {f.plain.input_items}, {f.plain.input_bytes / 1024:.1f} → "
            f"{f.compacting.input_items}, {f.compacting.input_bytes / 1024:.1f} | "
            f"{f.plain.get_items.p50_ms:.2f} → {f.compacting.get_items.p50_ms:.2f} | "
            f"{f.plain.get_items.p50_ms / f.compacting.get_items.p50_ms:.1f}× | "
            f"{f.compactions} | {plain:.1f}; {quiet:.1f} / {loud:.1f} | {loud - quiet:.1f} |"
        )
    return out
