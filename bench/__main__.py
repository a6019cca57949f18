"""`python -m bench [--smoke]`: run every scenario, print the tables, write RESULTS.md."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bench.compaction import CompactionFigures, compaction_cost, render_compaction
from bench.harness import (
    Floor,
    SdkSessions,
    Servers,
    Sidecar,
    advanced_sessions,
    sidecar_factory,
)
from bench.scenarios import (
    Figures,
    SidecarCost,
    advanced,
    agent_turns,
    burst,
    fill,
    long_history,
    paced_load,
)
from tests.servers import PostgresServer

BACKENDS = ("sqlite", "redis", "postgres", "mariadb")
REPLICATION_ROUNDS = 3
SDK_NAMES = {
    "sqlite": "SQLiteSession",
    "redis": "RedisSession",
    "postgres": "SQLAlchemySession",
    "mariadb": "SQLAlchemySession",
}


@dataclass(frozen=True)
class Sizes:
    turns: int
    history: int
    repeat: int
    stored: int
    cold_starts: int
    advanced_turns: int
    per_turn: int
    paced_rate: float
    paced_seconds: float
    long_turns: int


FULL = Sizes(
    turns=3000,
    history=10_000,
    repeat=300,
    stored=100_000,
    cold_starts=5,
    advanced_turns=100,
    per_turn=10,
    paced_rate=1000,
    paced_seconds=10,
    long_turns=200,
)
SMOKE = Sizes(
    turns=40,
    history=200,
    repeat=5,
    stored=500,
    cold_starts=1,
    advanced_turns=6,
    per_turn=3,
    paced_rate=200,
    paced_seconds=1,
    long_turns=24,
)


async def redis_modes_cost(servers: Servers, sizes: Sizes) -> dict[tuple[str, int], Figures]:
    """Agent turns through the sidecar on one Redis and on a Redis Cluster (3 primaries,
    3 replicas, the same persistence), each answered at once and answered once a replica
    holds each append (`redis.waitReplicas: 1`): the four sidecars run side by side and
    take turns, in rounds, so the machine's noise falls on all; medians per mode."""
    modes = ("redis", "redis-replicated", "redis-cluster", "redis-cluster-replicated")
    servers.cluster.start()
    sidecars = {mode: Sidecar(servers.store(mode), servers.workdir) for mode in modes}
    rounds: dict[tuple[str, int], list[Figures]] = {}
    try:
        for sidecar in sidecars.values():
            sidecar.start()
        for tasks in (1, 8):
            for sidecar in sidecars.values():  # warm-up
                await agent_turns(sidecar_factory(sidecar.url), tasks, max(10, sizes.turns // 10))
            for _ in range(REPLICATION_ROUNDS):
                for mode, sidecar in sidecars.items():
                    figures = await agent_turns(
                        sidecar_factory(sidecar.url), tasks, sizes.turns // REPLICATION_ROUNDS
                    )
                    rounds.setdefault((mode, tasks), []).append(figures)
    finally:
        for sidecar in sidecars.values():
            sidecar.stop()
    return {key: median_figures(runs) for key, runs in rounds.items()}


async def standby_cost(servers: Servers, sizes: Sizes) -> dict[tuple[str, int], Figures]:
    """Agent turns through one sidecar on PostgreSQL with a streaming standby, each commit
    answered once local (an asynchronous standby, the default) and once the standby has
    it (`synchronous_standby_names`), switched on the primary between rounds."""
    standby = PostgresServer(standby_of=servers.postgres)
    standby.start()
    sidecar = Sidecar(servers.store("postgres"), servers.workdir)
    rounds: dict[tuple[str, int], list[Figures]] = {}
    try:
        await synchronous_standby(servers.postgres, False)
        sidecar.start()
        make = sidecar_factory(sidecar.url)
        for tasks in (1, 8):
            await agent_turns(make, tasks, max(10, sizes.turns // 10))  # warm-up
            for _ in range(REPLICATION_ROUNDS):
                for mode, synchronous in (("postgres", False), ("postgres-sync", True)):
                    await synchronous_standby(servers.postgres, synchronous)
                    figures = await agent_turns(make, tasks, sizes.turns // REPLICATION_ROUNDS)
                    rounds.setdefault((mode, tasks), []).append(figures)
    finally:
        sidecar.stop()
        await synchronous_standby(servers.postgres, False)
        standby.destroy()
    return {key: median_figures(runs) for key, runs in rounds.items()}


async def synchronous_standby(primary: PostgresServer, on: bool) -> None:
    """Make the primary's commits wait for its standby, or not, and return once the
    standby streams in that mode."""
    conn = await asyncpg.connect(primary.dsn)
    try:
        names = "'*'" if on else "''"
        await conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = {names}")
        await conn.execute("SELECT pg_reload_conf()")
        wanted = "sync" if on else "async"
        for _ in range(300):
            state = await conn.fetchval("SELECT sync_state FROM pg_stat_replication")
            if state == wanted:
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"the standby did not become {wanted} within 30 s")
    finally:
        await conn.close()


def median_figures(runs: list[Figures]) -> Figures:
    return Figures(
        ops_per_second=statistics.median(f.ops_per_second for f in runs),
        p50_ms=statistics.median(f.p50_ms for f in runs),
        p99_ms=statistics.median(f.p99_ms for f in runs),
        cpu_ms_per_op=statistics.median(f.cpu_ms_per_op for f in runs),
    )


@dataclass
class BackendResult:
    turns: dict[tuple[str, int], Figures]
    history: dict[str, dict[str, Figures]]
    bursts: dict[str, Figures]
    advanced: dict[str, dict[str, Figures]]
    cold_start_s: float
    idle_rss: int
    loaded_rss: int
    paced: SidecarCost


async def measure(backend: str, servers: Servers, sdk: SdkSessions, sizes: Sizes) -> BackendResult:
    sidecar = Sidecar(servers.store(backend), servers.workdir)
    cold = []
    for _ in range(sizes.cold_starts):
        cold.append(sidecar.start())
        sidecar.stop()
    sidecar.start()
    try:
        idle_rss = sidecar.rss_bytes()
        ours, theirs = sidecar_factory(sidecar.url), await sdk.factory(backend)
        turns: dict[tuple[str, int], Figures] = {}
        for tasks in (1, 8):
            for name, make in (("convostore", ours), ("sdk", theirs)):
                await agent_turns(make, tasks, max(10, sizes.turns // 10))  # warm-up
                turns[(name, tasks)] = await agent_turns(make, tasks, sizes.turns)
        history = {
            "convostore": await long_history(ours, sizes.history, sizes.repeat),
            "sdk": await long_history(theirs, sizes.history, sizes.repeat),
        }
        bursts = {
            "convostore": await burst(ours, sizes.repeat),
            "sdk": await burst(theirs, sizes.repeat),
        }
        paced = await paced_load(ours, sidecar.probe(), sizes.paced_rate, sizes.paced_seconds)
        ours_advanced, theirs_advanced = advanced_sessions(sidecar.url, servers.workdir)
        structure = {
            "convostore": await advanced(
                ours_advanced, sizes.advanced_turns, sizes.per_turn, sizes.repeat
            ),
            "sdk": await advanced(
                theirs_advanced, sizes.advanced_turns, sizes.per_turn, sizes.repeat
            ),
        }
        theirs_advanced.close()
        for n in range(sizes.stored // 1000 or 1):
            await fill(ours(f"memory-{n}"), min(1000, sizes.stored))
        loaded_rss = sidecar.rss_bytes()
    finally:
        sidecar.stop()
    return BackendResult(
        turns, history, bursts, structure, statistics.median(cold), idle_rss, loaded_rss, paced
    )


@dataclass
class FloorResult:
    """The hop alone (`bench/floor.py`): what the sidecar's figures are bounded by."""

    turns: dict[int, Figures]
    idle_rss: int
    paced: SidecarCost


async def measure_floor(servers: Servers, sizes: Sizes) -> FloorResult:
    floor = Floor(servers.workdir)
    floor.start()
    try:
        idle_rss = floor.rss_bytes()
        make = sidecar_factory(floor.url)
        turns = {}
        for tasks in (1, 8):
            await agent_turns(make, tasks, max(10, sizes.turns // 10))
            turns[tasks] = await agent_turns(make, tasks, sizes.turns)
        paced = await paced_load(make, floor.probe(), sizes.paced_rate, sizes.paced_seconds)
    finally:
        floor.stop()
    return FloorResult(turns, idle_rss, paced)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b else "—"


def render(
    results: dict[str, BackendResult],
    floor: FloorResult,
    replication: dict[tuple[str, int], Figures],
    compaction: dict[str, CompactionFigures],
    sizes: Sizes,
    command: str,
) -> str:
    out = [
        "# Benchmark results",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}",
        f"- machine: {os.cpu_count()} cores, {_cpu_model()}, Python {platform.python_version()}",
        f"- sizes: {sizes}",
        "- convostore = `SidecarSession` → sidecar process → backend; SDK = the Agents SDK's "
        "own session for that backend, used directly in the agent process. Same servers, "
        "same run, alternating. mariadb = the `sqlalchemy` backend on MariaDB "
        "(asyncmy), the SDK's `SQLAlchemySession` on the same server and driver.",
        "",
        "## (a) Agent turn: add_items(1 message) + get_items(limit=20), 64 sessions",
        "",
        "| backend | tasks | convostore turns/s | SDK turns/s | ratio | convostore p50 ms | "
        "SDK p50 ms | convostore p99 ms | SDK p99 ms | convostore agent CPU ms/turn | "
        "SDK CPU ms/turn | CPU ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for backend, r in results.items():
        for tasks in (1, 8):
            a, b = r.turns[("convostore", tasks)], r.turns[("sdk", tasks)]
            out.append(
                f"| {backend} ({SDK_NAMES[backend]}) | {tasks} | {a.ops_per_second:.0f} | "
                f"{b.ops_per_second:.0f} | {ratio(a.ops_per_second, b.ops_per_second)} | "
                f"{a.p50_ms:.2f} | {b.p50_ms:.2f} | {a.p99_ms:.2f} | {b.p99_ms:.2f} | "
                f"{a.cpu_ms_per_op:.3f} | {b.cpu_ms_per_op:.3f} | "
                f"{ratio(a.cpu_ms_per_op, b.cpu_ms_per_op)} |"
            )
    out += [
        "",
        "The hop alone, same client and load: `bench/floor.py`, a bare aiohttp server on "
        "uvloop answering from memory (no validation, storage, metrics or middleware).",
        "",
        "| tasks | turns/s | p50 ms | p99 ms | agent CPU ms/turn |",
        "|---|---|---|---|---|",
    ]
    for tasks, f in floor.turns.items():
        out.append(
            f"| {tasks} | {f.ops_per_second:.0f} | {f.p50_ms:.2f} | {f.p99_ms:.2f} | "
            f"{f.cpu_ms_per_op:.3f} |"
        )
    out += [
        "",
        f"## (b) Long history: {sizes.history:,}-item session",
        "",
        "| backend | who | latest-20 p50 ms (long) | latest-20 p50 ms (20 items) | long/short | "
        "all items p50 ms |",
        "|---|---|---|---|---|---|",
    ]
    for backend, r in results.items():
        for who, h in r.history.items():
            long, short = h["latest20_long"], h["latest20_short"]
            out.append(
                f"| {backend} | {who} | {long.p50_ms:.2f} | {short.p50_ms:.2f} | "
                f"{ratio(long.p50_ms, short.p50_ms)} | {h['all_long'].p50_ms:.1f} |"
            )
    out += [
        "",
        "## (c) Burst: add_items(50 items)",
        "",
        "| backend | convostore p50 ms | SDK p50 ms | convostore/SDK |",
        "|---|---|---|---|",
    ]
    for backend, r in results.items():
        a, b = r.bursts["convostore"], r.bursts["sdk"]
        out.append(f"| {backend} | {a.p50_ms:.2f} | {b.p50_ms:.2f} | {ratio(a.p50_ms, b.p50_ms)} |")
    out += [
        "",
        f"## (f) Advanced session: {sizes.advanced_turns} user turns of {sizes.per_turn} "
        "items, usage on each",
        "",
        "| backend | operation | convostore p50 ms | SDK AdvancedSQLiteSession p50 ms "
        "| convostore/SDK |",
        "|---|---|---|---|---|",
    ]
    for backend, r in results.items():
        for operation, a in r.advanced["convostore"].items():
            b = r.advanced["sdk"][operation]
            out.append(
                f"| {backend} | {operation} | {a.p50_ms:.2f} | {b.p50_ms:.2f} | "
                f"{ratio(a.p50_ms, b.p50_ms)} |"
            )
    out += [
        "",
        "## (d, e) The sidecar process",
        "",
        f"| backend | idle RSS MB | RSS after {sizes.stored:,} items MB "
        "| cold start to /readyz s |",
        "|---|---|---|---|",
    ]
    for backend, r in results.items():
        out.append(
            f"| {backend} | {r.idle_rss / 2**20:.1f} | {r.loaded_rss / 2**20:.1f} | "
            f"{r.cold_start_s:.2f} |"
        )
    out += [
        "",
        f"## (h) The sidecar's own cost at a paced {sizes.paced_rate:,.0f} requests/s",
        "",
        "Half appends of one ~250-byte message, half reads of the latest 20, 64 sessions, "
        f"for {sizes.paced_seconds:g} s through `SidecarSession`; CPU time and RSS of the "
        "sidecar process from /proc (Dapr's published figure for its Go sidecar: 0.48 "
        "vCPU and 23 MB per 1,000 requests/s).",
        "",
        "| backend | achieved requests/s | sidecar vCPU per 1,000 requests/s "
        "| sidecar RSS under load MB | idle RSS MB |",
        "|---|---|---|---|---|",
    ]
    rows = [(backend, r.paced, r.idle_rss) for backend, r in results.items()]
    for name, c, idle in [*rows, ("hop floor (bench/floor.py)", floor.paced, floor.idle_rss)]:
        out.append(
            f"| {name} | {c.requests_per_second:.0f} | {c.vcpu_per_1000_rps:.3f} | "
            f"{c.peak_rss / 2**20:.1f} | {idle / 2**20:.1f} |"
        )
    if ("redis", 1) in replication:
        out += [
            "",
            "## (g) Redis: what waiting for a replica costs (`redis.waitReplicas: 1`)",
            "",
            f"Two sidecars side by side, taking turns over {REPLICATION_ROUNDS} rounds; "
            "medians of the rounds.",
            "",
            *_side_by_side(
                replication, ("redis", "answered at once"), ("redis-replicated", "after WAIT")
            ),
        ]
    if ("postgres", 1) in replication:
        out += [
            "",
            "## (i) PostgreSQL: what a synchronous standby costs",
            "",
            "One sidecar, a primary and a streaming standby (both with `fsync=off`, so "
            "this is the wait for the standby, not for a disk); the primary's "
            "`synchronous_standby_names` switched between rounds "
            f"({REPLICATION_ROUNDS}, taking turns); medians of the rounds.",
            "",
            *_side_by_side(
                replication, ("postgres", "asynchronous"), ("postgres-sync", "synchronous")
            ),
        ]
    if ("redis-cluster", 1) in replication:
        out += [
            "",
            "## (j) Redis Cluster beside one Redis",
            "",
            "The same four sidecars as in (g), taking turns: one Redis, and a Redis "
            "Cluster of 3 primaries and 3 replicas on this machine (every node with the "
            "same `appendfsync always`), each answered at once and after WAIT.",
            "",
            *_side_by_side(replication, ("redis", "one Redis"), ("redis-cluster", "cluster")),
            "",
            *_side_by_side(
                replication,
                ("redis-cluster", "cluster, answered at once"),
                ("redis-cluster-replicated", "cluster, after WAIT"),
            ),
        ]
    if compaction:
        out += render_compaction(compaction, sizes.long_turns)
    out += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    rows_met = targets(results, floor)
    out += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in rows_met]
    notes = Path(__file__).parent / "NOTES.md"
    if notes.exists():
        out += ["", notes.read_text().rstrip()]
    return "\n".join(out) + "\n"


def _side_by_side(
    figures: dict[tuple[str, int], Figures], base: tuple[str, str], other: tuple[str, str]
) -> list[str]:
    """Turns in one mode (its key and label) against another, by task count."""
    (a_mode, a_label), (b_mode, b_label) = base, other
    out = [
        f"| tasks | {a_label} turns/s | {b_label} turns/s | ratio | {a_label} p50 ms | "
        f"{b_label} p50 ms |",
        "|---|---|---|---|---|---|",
    ]
    for tasks in (1, 8):
        a, b = figures[(a_mode, tasks)], figures[(b_mode, tasks)]
        out.append(
            f"| {tasks} | {a.ops_per_second:.0f} | {b.ops_per_second:.0f} | "
            f"{ratio(b.ops_per_second, a.ops_per_second)} | {a.p50_ms:.2f} | {b.p50_ms:.2f} |"
        )
    return out


def targets(results: dict[str, BackendResult], floor: FloorResult) -> list[tuple[str, str, bool]]:
    """Issue 17's targets, then the earlier ones that held; the hop floor measured in
    the same run is shown beside the figures it bounds."""
    rows = []
    for backend, r in results.items():
        most = 0.30 if backend in ("postgres", "mariadb") else 0.24
        vcpu = r.paced.vcpu_per_1000_rps
        rows.append(
            (
                f"{backend}: sidecar ≤ {most:.2f} vCPU per 1,000 requests/s",
                f"{vcpu:.3f} (hop floor {floor.paced.vcpu_per_1000_rps:.3f})",
                vcpu <= most,
            )
        )
    if "sqlite" in results:
        r = results["sqlite"]
        idle, loaded = r.idle_rss / 2**20, r.paced.peak_rss / 2**20
        floor_idle = floor.idle_rss / 2**20
        rows.append(
            (
                "sqlite: sidecar idle RSS ≤ 35 MB",
                f"{idle:.1f} MB (hop floor {floor_idle:.1f})",
                idle <= 35,
            )
        )
        rows.append(("sqlite: sidecar RSS under load ≤ 45 MB", f"{loaded:.1f} MB", loaded <= 45))
    for backend, r in results.items():
        a, b = r.turns[("convostore", 8)], r.turns[("sdk", 8)]
        need = 3.0 if backend == "postgres" else 1.5
        got = a.ops_per_second / b.ops_per_second
        rows.append(
            (f"{backend}: turns/s at 8 tasks ≥ {need:.1f}× SDK", f"{got:.2f}×", got >= need)
        )
    for backend in ("sqlite", "redis"):
        if backend in results:
            ours, sdk = (results[backend].turns[(who, 1)].p50_ms for who in ("convostore", "sdk"))
            rows.append(
                (
                    f"{backend}: p50 turn at 1 task ≤ SDK's ({sdk:.2f} ms)",
                    f"{ours:.2f} ms (hop floor {floor.turns[1].p50_ms:.2f})",
                    ours <= sdk,
                )
            )
    for backend, r in results.items():
        for tasks in (1, 8):
            cpu = r.turns[("convostore", tasks)].cpu_ms_per_op
            rows.append(
                (
                    f"{backend}: agent CPU per turn at {tasks} task(s) ≤ 0.30 ms",
                    f"{cpu:.3f} ms (hop floor {floor.turns[tasks].cpu_ms_per_op:.3f})",
                    cpu <= 0.30,
                )
            )
    for backend, r in results.items():
        h = r.history["convostore"]
        got = h["latest20_long"].p50_ms / h["latest20_short"].p50_ms
        rows.append((f"{backend}: latest-20 on long ≤ 2× on 20 items", f"{got:.2f}×", got <= 2.0))
    for backend, r in results.items():
        mb = r.idle_rss / 2**20
        rows.append((f"{backend}: sidecar idle RSS ≤ 60 MB", f"{mb:.1f} MB", mb <= 60))
        rows.append(
            (f"{backend}: cold start ≤ 1.5 s", f"{r.cold_start_s:.2f} s", r.cold_start_s <= 1.5)
        )
    return rows


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


async def run(
    sizes: Sizes, backends: tuple[str, ...]
) -> tuple[
    dict[str, BackendResult],
    FloorResult,
    dict[tuple[str, int], Figures],
    dict[str, CompactionFigures],
]:
    with Servers() as servers:
        sdk = SdkSessions(servers)
        try:
            floor = await measure_floor(servers, sizes)
            results = {b: await measure(b, servers, sdk, sizes) for b in backends}
        finally:
            await sdk.close()
        replication = await redis_modes_cost(servers, sizes) if "redis" in backends else {}
        if "postgres" in backends:
            replication.update(await standby_cost(servers, sizes))
        compaction = {
            b: await compaction_cost(servers, b, sizes.long_turns, sizes.repeat) for b in backends
        }
    return results, floor, replication, compaction


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks it runs")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--output", default=str(Path(__file__).parent / "RESULTS.md"))
    args = parser.parse_args()
    os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")
    sizes = SMOKE if args.smoke else FULL
    results, floor, replication, compaction = asyncio.run(
        run(sizes, tuple(args.backends.split(",")))
    )
    command = "python -m bench " + " ".join(sys.argv[1:])
    report = render(results, floor, replication, compaction, sizes, command)
    print(report)
    Path(args.output).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
