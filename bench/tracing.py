"""What tracing costs a turn: a sidecar with no OTLP endpoint beside one exporting every
span to a collector, on each backend, in one run.

    python -m bench.tracing [--turns 500] [--backends ...] [--out FILE]

Each `convostore sidecar` process takes the same turns one at a time through
`SidecarSession` (an append of one message, then a read of the latest 20), made inside
an agent's OpenTelemetry span, so the client sends `traceparent` every time. With
tracing on, the sidecar makes a server span per request and a span per backend call
and exports them all (`OTEL_TRACES_SAMPLER` unset: every trace sampled) to an OTLP/HTTP
receiver on this machine. The table gives the turn's median time and the sidecar's CPU
per turn, and their ratios to the sidecar with tracing off.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

from convostore import SidecarSession
from opentelemetry.sdk.trace import TracerProvider

from bench import report
from bench.harness import Servers, Sidecar
from bench.scenarios import MESSAGE
from tests.support import otlp_receiver

BACKENDS = ("sqlite", "postgres", "redis")
MODES = ("off", "on")


async def turns(sidecar: Sidecar, count: int) -> tuple[float, float]:
    """Median ms per turn, and the sidecar's CPU ms per turn."""
    tracer = TracerProvider().get_tracer("the agent")
    session = SidecarSession("bench", url=sidecar.url)
    await session.add_items([MESSAGE] * 20)
    probe = sidecar.probe()
    took: list[float] = []
    cpu = probe.cpu_seconds()
    for _ in range(count):
        with tracer.start_as_current_span("agent turn"):
            started = time.perf_counter()
            await session.add_items([MESSAGE])
            await session.get_items(limit=20)
            took.append(time.perf_counter() - started)
    spent = probe.cpu_seconds() - cpu
    return statistics.median(took) * 1000, spent / count * 1000


async def run(servers: Servers, backends: list[str], count: int) -> str:
    rows = [
        "| backend | tracing | turn p50 ms | × off | sidecar CPU ms per turn | × off | spans |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    async with otlp_receiver() as collector:
        for backend in backends:
            figures: dict[str, tuple[float, float, int]] = {}
            for mode in MODES:
                if mode == "on":
                    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = collector.url
                sidecar = Sidecar(servers.store(backend), servers.workdir)
                try:
                    sidecar.start()
                finally:
                    os.environ.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
                before = len(collector.spans)
                try:
                    latency, cpu = await turns(sidecar, count)
                finally:  # it exports what is still batched to this loop's collector
                    await asyncio.to_thread(sidecar.stop)
                figures[mode] = (latency, cpu, len(collector.spans) - before)
            latency0, cpu0, _ = figures["off"]
            for mode, (latency, cpu, spans) in figures.items():
                cpu_ratio = f"{cpu / cpu0:.2f}×" if cpu0 else "n/a"  # under one clock tick
                rows.append(
                    f"| {backend} | {mode} | {latency:.2f} | {latency / latency0:.2f}× "
                    f"| {cpu:.2f} | {cpu_ratio} | {spans} |"
                )
    return "\n".join(rows) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing", description=__doc__)
    parser.add_argument("--turns", type=int, default=500)
    report.add_options(parser, BACKENDS)
    args = parser.parse_args()
    backends = report.chosen_backends(parser, args, BACKENDS)
    with Servers() as servers:
        table = asyncio.run(run(servers, backends, args.turns))
    return report.publish(report.one_run(parser, table), args.out)


if __name__ == "__main__":
    sys.exit(main())
