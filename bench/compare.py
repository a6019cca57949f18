"""`python -m bench.compare REV`: the sidecar at git revision REV and at this checkout,
side by side in one run, for before/after figures of a change.

REV is checked out into a temporary worktree and its sidecar runs from there; both
sidecars serve the same servers and take turns in rounds, beside the SDK's own session,
for (a) agent turns at 1 and 8 tasks and (h) the paced load. Medians of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.__main__ import BACKENDS, FULL, SMOKE, Sizes, median_figures
from bench.harness import SdkSessions, Servers, Sidecar, sidecar_factory
from bench.scenarios import Figures, agent_turns, paced_load

ROUNDS = 3
HERE = Path(__file__).resolve().parents[1]


async def compare(
    backend: str, servers: Servers, sdk: SdkSessions, before: Path, sizes: Sizes
) -> list[str]:
    sidecars = {
        "before": Sidecar(servers.store(backend), servers.workdir, tree=before),
        "after": Sidecar(servers.store(backend), servers.workdir),
    }
    for sidecar in sidecars.values():
        sidecar.start()
    try:
        makers = {name: sidecar_factory(s.url) for name, s in sidecars.items()}
        makers["sdk"] = await sdk.factory(backend)
        idle = {name: s.rss_bytes() / 2**20 for name, s in sidecars.items()}
        turns: dict[tuple[str, int], list[Figures]] = {}
        vcpu: dict[str, list[float]] = {name: [] for name in sidecars}
        for _ in range(ROUNDS):
            for tasks in (1, 8):
                for name, make in makers.items():
                    figures = await agent_turns(make, tasks, max(10, sizes.turns // ROUNDS))
                    turns.setdefault((name, tasks), []).append(figures)
            for name, s in sidecars.items():
                cost = await paced_load(
                    makers[name], s.probe(), sizes.paced_rate, sizes.paced_seconds / ROUNDS
                )
                vcpu[name].append(cost.vcpu_per_1000_rps)
    finally:
        for sidecar in sidecars.values():
            sidecar.stop()
    t = {key: median_figures(runs) for key, runs in turns.items()}
    rows = []
    for tasks in (1, 8):
        b, a, sdk_figures = (t[(name, tasks)] for name in ("before", "after", "sdk"))
        rows += [
            f"| {backend} | turns/s at {tasks} task(s) | {b.ops_per_second:.0f} "
            f"| {a.ops_per_second:.0f} | {sdk_figures.ops_per_second:.0f} |",
            f"| {backend} | p50 ms at {tasks} task(s) | {b.p50_ms:.2f} | {a.p50_ms:.2f} "
            f"| {sdk_figures.p50_ms:.2f} |",
            f"| {backend} | agent CPU ms/turn at {tasks} task(s) | {b.cpu_ms_per_op:.3f} "
            f"| {a.cpu_ms_per_op:.3f} | {sdk_figures.cpu_ms_per_op:.3f} |",
        ]
    rows += [
        f"| {backend} | sidecar vCPU per 1,000 req/s | {statistics.median(vcpu['before']):.3f} "
        f"| {statistics.median(vcpu['after']):.3f} | — |",
        f"| {backend} | sidecar idle RSS MB | {idle['before']:.1f} | {idle['after']:.1f} | — |",
    ]
    return rows


async def run(before: Path, revision: str, backends: tuple[str, ...], sizes: Sizes) -> str:
    out = [
        f"| backend | figure | before ({revision}) | after (this checkout) | SDK |",
        "|---|---|---|---|---|",
    ]
    with Servers() as servers:
        sdk = SdkSessions(servers)
        try:
            for backend in backends:
                out += await compare(backend, servers, sdk, before, sizes)
        finally:
            await sdk.close()
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__)
    parser.add_argument("revision", help="the git revision to measure against")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks it runs")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else FULL
    os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")
    with tempfile.TemporaryDirectory(prefix="convostore-before-") as scratch:
        before = Path(scratch) / "tree"
        git = ["git", "-C", str(HERE)]
        subprocess.run(
            [*git, "worktree", "add", "--detach", str(before), args.revision], check=True
        )
        try:
            backends = tuple(args.backends.split(","))
            print(asyncio.run(run(before, args.revision, backends, sizes)))
        finally:
            subprocess.run([*git, "worktree", "remove", "--force", str(before)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
