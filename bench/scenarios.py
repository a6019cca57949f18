"""The measured workloads. Each returns plain numbers; `__main__` turns them into tables."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from bench.harness import ProcessProbe, SessionFactory, cpu_seconds

MESSAGE = {"role": "user", "content": "x" * 200, "type": "message"}  # about 250 bytes


@dataclass
class Figures:
    ops_per_second: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_op: float


def _figures(latencies: list[float], wall: float, cpu: float) -> Figures:
    ordered = sorted(latencies)
    return Figures(
        ops_per_second=len(ordered) / wall,
        p50_ms=statistics.median(ordered) * 1000,
        p99_ms=ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        cpu_ms_per_op=cpu / len(ordered) * 1000,
    )


async def agent_turns(make: SessionFactory, tasks: int, turns: int, sessions: int = 64) -> Figures:
    """(a) One turn: append one message, then read the latest 20, over `sessions` sessions."""
    pool = [make(f"turn-{n}") for n in range(sessions)]
    for session in pool:
        await session.add_items([MESSAGE])
    latencies: list[float] = []
    counter = iter(range(turns))

    async def worker() -> None:
        for n in counter:
            session = pool[n % sessions]
            started = time.perf_counter()
            await session.add_items([MESSAGE])
            await session.get_items(limit=20)
            latencies.append(time.perf_counter() - started)

    cpu, wall = cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return _figures(latencies, time.perf_counter() - wall, cpu_seconds() - cpu)


async def timed(call: Any, repeat: int) -> Figures:
    latencies: list[float] = []
    cpu, wall = cpu_seconds(), time.perf_counter()
    for _ in range(repeat):
        started = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - started)
    return _figures(latencies, time.perf_counter() - wall, cpu_seconds() - cpu)


async def fill(session: Any, count: int, batch: int = 1000) -> None:
    for start in range(0, count, batch):
        await session.add_items(
            [{**MESSAGE, "n": n} for n in range(start, min(count, start + batch))]
        )


async def long_history(make: SessionFactory, items: int, repeat: int) -> dict[str, Figures]:
    """(b) latest-20 and the whole history of a long session, and latest-20 of a short one."""
    long, short = make("long-history"), make("short-history")
    await fill(long, items)
    await fill(short, 20)
    return {
        "latest20_long": await timed(lambda: long.get_items(limit=20), repeat),
        "latest20_short": await timed(lambda: short.get_items(limit=20), repeat),
        "all_long": await timed(long.get_items, max(1, repeat // 20)),
    }


async def burst(make: SessionFactory, repeat: int) -> Figures:
    """(c) One append of 50 items."""
    session = make("burst")
    batch = [{**MESSAGE, "n": n} for n in range(50)]
    return await timed(lambda: session.add_items(batch), repeat)


async def advanced(session: Any, turns: int, per_turn: int, repeat: int) -> dict[str, Figures]:
    """(f) On a session of `turns` user turns with usage on each: a branch from its middle
    turn (copying half the session), and the reads of usage and turns."""
    from agents.usage import Usage

    run = SimpleNamespace(
        context_wrapper=SimpleNamespace(
            usage=Usage(requests=1, input_tokens=100, output_tokens=50, total_tokens=150)
        )
    )
    answers = [{"role": "assistant", "content": "x" * 200}] * (per_turn - 1)
    for turn in range(turns):
        await session.add_items([{"role": "user", "content": f"question {turn}"}, *answers])
        await session.store_run_usage(run)
    made = iter(range(repeat))

    async def branch() -> None:
        await session.create_branch_from_turn(turns // 2, f"b{next(made)}")
        await session.switch_to_branch("main")

    return {
        "branch from the middle turn": await timed(branch, repeat),
        "get_session_usage": await timed(session.get_session_usage, repeat),
        "get_turn_usage": await timed(session.get_turn_usage, repeat),
        "get_conversation_turns": await timed(session.get_conversation_turns, repeat),
    }


@dataclass
class SidecarCost:
    """What the sidecar process spent serving a paced load."""

    requests_per_second: float
    vcpu_per_1000_rps: float
    peak_rss: int


async def paced_load(
    make: SessionFactory, process: ProcessProbe, rate: float, seconds: float, sessions: int = 64
) -> SidecarCost:
    """(h) Requests at a fixed rate, half appends of one ~250-byte message and half reads
    of the latest 20, over `sessions` sessions; the sidecar's CPU time and RSS are read
    from /proc, so the figure is the sidecar's own cost, not the load generator's."""
    pool = [make(f"paced-{n}") for n in range(sessions)]
    for session in pool:
        await session.add_items([MESSAGE])
    total = int(rate * seconds)
    in_flight: set[asyncio.Task[Any]] = set()
    peak_rss = process.rss()
    cpu_before, started = process.cpu_seconds(), time.perf_counter()
    for n in range(total):
        delay = started + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        session = pool[(n // 2) % sessions]
        call = session.add_items([MESSAGE]) if n % 2 == 0 else session.get_items(limit=20)
        task = asyncio.ensure_future(call)
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        if n % 200 == 0:
            peak_rss = max(peak_rss, process.rss())
    await asyncio.gather(*in_flight)
    wall = time.perf_counter() - started
    cpu = process.cpu_seconds() - cpu_before
    achieved = total / wall
    return SidecarCost(achieved, cpu / wall * 1000 / achieved, max(peak_rss, process.rss()))
