"""The sidecar's own cost per request beside the floor of its stack, in one run.

    python -m bench.cost [--rounds 3] [--rate 1000] [--seconds 10] [--out FILE]

For each round, the hop floor (`bench/floor.py`, a bare aiohttp server answering from
memory) and one sidecar per backend take the same paced load in turn (`paced_load`:
half appends, half latest-20 reads through `SidecarSession`); each process's CPU and
idle RSS are read from /proc. The table gives medians of the rounds and the ratios to
the floor that issue 29 bounds: CPU per request at most twice the floor, idle RSS at most
the floor + 5 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from dataclasses import dataclass

from bench import report
from bench.harness import Floor, Servers, Sidecar, sidecar_factory
from bench.scenarios import paced_load

BACKENDS = ("sqlite", "redis", "postgres")
CPU_BOUND = 2.0
RSS_ALLOWANCE_MB = 5.0


@dataclass
class Round:
    vcpu_per_1000_rps: float
    idle_rss_mb: float


async def one_round(process: Sidecar, rate: float, seconds: float) -> Round:
    process.start()
    try:
        idle = process.rss_bytes() / 2**20
        cost = await paced_load(sidecar_factory(process.url), process.probe(), rate, seconds)
    finally:
        process.stop()
    return Round(cost.vcpu_per_1000_rps, idle)


async def measure(
    servers: Servers, rounds: int, rate: float, seconds: float
) -> dict[str, list[Round]]:
    figures: dict[str, list[Round]] = {name: [] for name in ("floor", *BACKENDS)}
    for _ in range(rounds):
        figures["floor"].append(await one_round(Floor(servers.workdir), rate, seconds))
        for backend in BACKENDS:
            sidecar = Sidecar(servers.store(backend), servers.workdir)
            figures[backend].append(await one_round(sidecar, rate, seconds))
    return figures


def render(figures: dict[str, list[Round]], command: str) -> str:
    def median_cpu(name: str) -> float:
        return statistics.median(r.vcpu_per_1000_rps for r in figures[name])

    def median_rss(name: str) -> float:
        return statistics.median(r.idle_rss_mb for r in figures[name])

    floor_cpu, floor_rss = median_cpu("floor"), median_rss("floor")
    lines = [
        f"`{command}`: medians of {len(figures['floor'])} rounds, floor and sidecars in turn.",
        "",
        "| process | vCPU per 1,000 requests/s | × floor | CPU met (≤ 2×) "
        "| idle RSS MB | − floor MB | RSS met (≤ +5 MB) |",
        "|---|---|---|---|---|---|---|",
        f"| hop floor (bench/floor.py) | {floor_cpu:.3f} | 1.00× | — | {floor_rss:.1f} | 0.0 | — |",
    ]
    for backend in BACKENDS:
        cpu, rss = median_cpu(backend), median_rss(backend)
        # judged as shown, so the table never contradicts itself at a rounding edge
        times, extra = round(cpu / floor_cpu, 2), round(rss - floor_rss, 1)
        lines.append(
            f"| {backend} | {cpu:.3f} | {times:.2f}× | {_met(times <= CPU_BOUND)} "
            f"| {rss:.1f} | {extra:+.1f} | {_met(extra <= RSS_ALLOWANCE_MB)} |"
        )
    return "\n".join(lines) + "\n"


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cost", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--seconds", type=float, default=10)
    report.add_options(parser, None)
    args = parser.parse_args()
    with Servers() as servers:
        figures = asyncio.run(measure(servers, args.rounds, args.rate, args.seconds))
    return report.publish(render(figures, report.invocation(parser)), args.out)


if __name__ == "__main__":
    sys.exit(main())
