"""A fleet, not a pod: N sidecar processes, each with a paced agent of its own, against one
Redis and one PostgreSQL, the latter both direct and through PgBouncer in transaction
mode. Per route and N: memory (per pod and in total), the backend's connections while
busy and once idle, each turn's latency (p50, p99) and the errors the agents saw.

    python -m bench.fleet [--pods 10,50,100] [--busy 20] [--out bench/RESULTS.md]

Each agent's turn is what the Runner does with a session: read the whole history, then
append the user message and the answer. Agents start spread over one period and take a
turn every `PERIOD` seconds. The stores close idle connections after `IDLE` seconds
(`idleTimeout`, shortened from 30 s so that the idle figure is read sooner).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from bench.harness import ProcessProbe, Sidecar
from tests.servers import PgBouncer, PostgresServer, RedisServer, free_port
from tests.support import migrate

PERIOD = 2.0
IDLE = 5.0
POOL_SIZE = 20
"""PgBouncer's `default_pool_size`: the server connections it opens at most."""
ROUTES = ("redis", "postgres", "postgres-pgbouncer")
MESSAGE = {"role": "user", "content": "what is the weather in Paris? " * 8}
ANSWER = {"role": "assistant", "content": "sunny, 21 degrees, light wind from the west " * 4}


@dataclass
class FleetFigures:
    route: str
    pods: int
    turns: int
    errors: int
    p50_ms: float
    p99_ms: float
    rss_per_pod_mib: float
    rss_total_mib: float
    vcpu_per_pod: float
    """The sidecars' CPU while busy, per pod, in vCPUs (1.0: one core all the time)."""
    busy_connections: int
    idle_connections: int


class Backends:
    """One Redis, one PostgreSQL, and PgBouncer in transaction mode in front of it."""

    def __init__(self) -> None:
        self.redis = RedisServer()
        self.postgres = PostgresServer()
        self.pgbouncer: PgBouncer | None = None

    def __enter__(self) -> Backends:
        self.redis.start()
        self.postgres.start()
        self.pgbouncer = PgBouncer(("127.0.0.1", self.postgres.port), pool_size=POOL_SIZE)
        self.pgbouncer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pgbouncer is not None:
            self.pgbouncer.destroy()
        self.redis.destroy()
        self.postgres.destroy()

    def store(self, route: str, run: str) -> dict[str, Any]:
        if route == "redis":
            redis = {"url": self.redis.url, "keyPrefix": run, "idleTimeout": IDLE}
            return {"backend": "redis", "redis": redis}
        postgres: dict[str, Any] = {"dsn": self.postgres.dsn, "schema": run, "idleTimeout": IDLE}
        if route == "postgres-pgbouncer":
            assert self.pgbouncer is not None
            postgres = {
                **postgres,
                "dsn": self.pgbouncer.dsn,
                "transactionPooler": True,
                "directDsn": self.postgres.dsn,
            }
        return {"backend": "postgres", "postgres": postgres}

    async def watch(self) -> None:
        """Connect the watchers first: a fleet may leave no connection to spare."""
        self._watch_redis = aioredis.Redis.from_url(self.redis.url, max_connections=1)
        await self._watch_redis.ping()
        self._watch_postgres = await asyncpg.connect(self.postgres.dsn)

    async def unwatch(self) -> None:
        await self._watch_redis.aclose()
        await self._watch_postgres.close()

    async def forget_pooled(self) -> None:
        """Close what PgBouncer keeps to PostgreSQL (its server connections outlive the
        fleet that used them), so that the next route starts from none."""
        await self._watch_postgres.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )

    async def connections(self, route: str) -> int:
        """The backend's client connections other than the watcher's: for PostgreSQL,
        the server's own (behind PgBouncer, the pooler's server connections)."""
        if route == "redis":
            info = await self._watch_redis.info("clients")
            return int(info["connected_clients"]) - 1
        count = await self._watch_postgres.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
        return int(count)


@contextmanager
def fleet(store: dict[str, Any], pods: int, workdir: Path) -> Iterator[list[Sidecar]]:
    """`pods` sidecar processes serving the same store, as a Deployment's replicas do."""
    ports: set[int] = set()
    while len(ports) < pods:  # the kernel may hand out a free port twice
        ports.add(free_port())
    sidecars = [Sidecar(store, workdir, port=port, migrated=True) for port in ports]
    try:
        for sidecar in sidecars:  # all start at once, as a rollout's pods do
            sidecar.launch()
        for sidecar in sidecars:
            sidecar.wait_ready()
        if any(s.process is None or s.process.poll() is not None for s in sidecars):
            raise RuntimeError("a sidecar exited during start-up (its port was taken?)")
        yield sidecars
    finally:
        for sidecar in sidecars:
            sidecar.stop()


async def agent(url: str, pod: int, until: float, latencies: list[float]) -> int:
    """Turns every `PERIOD` seconds until `until`; returns the errors it saw."""
    from convostore import SidecarSession

    session = SidecarSession(f"pod-{pod}", url=url, retries=0)
    errors = 0
    await asyncio.sleep(PERIOD * pod / 97 % PERIOD)  # spread over one period
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            await session.get_items()
            await session.add_items([MESSAGE, ANSWER])
            latencies.append(time.monotonic() - started)
        except Exception:  # every failure counts, whatever its kind
            errors += 1
        await asyncio.sleep(max(0.0, started + PERIOD - time.monotonic()))
    return errors


async def measure(backends: Backends, route: str, pods: int, busy: float) -> FleetFigures:
    run = f"f{pods}_{route.replace('-', '_')}_{int(time.time())}"
    store = backends.store(route, run)
    workdir = Path(tempfile.mkdtemp(prefix="convostore-fleet-"))
    if store["backend"] == "postgres":
        migrate({"stores": {"default": store}})
    with fleet({**store, "limits": {"maxReadItems": 10_000}}, pods, workdir) as sidecars:
        probes = [ProcessProbe(s.probe().pid) for s in sidecars]
        latencies: list[float] = []
        until = time.monotonic() + busy
        agents = [agent(s.url, n, until, latencies) for n, s in enumerate(sidecars)]
        busiest, peak_rss = 0, [p.rss() for p in probes]
        cpu_before, started = sum(p.cpu_seconds() for p in probes), time.monotonic()
        running = asyncio.gather(*agents)
        while not running.done():
            busiest = max(busiest, await backends.connections(route))
            peak_rss = [max(old, p.rss()) for old, p in zip(peak_rss, probes, strict=True)]
            await asyncio.sleep(0.5)
        errors = sum(await running)
        cpu = sum(p.cpu_seconds() for p in probes) - cpu_before
        vcpu_per_pod = cpu / (time.monotonic() - started) / pods
        deadline = time.monotonic() + IDLE * 3
        idle = await backends.connections(route)
        while idle and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            idle = await backends.connections(route)
    await backends.forget_pooled()
    ordered = sorted(latencies)
    return FleetFigures(
        route=route,
        pods=pods,
        turns=len(latencies),
        errors=errors,
        p50_ms=statistics.median(ordered) * 1000 if ordered else float("nan"),
        p99_ms=ordered[int(len(ordered) * 0.99)] * 1000 if ordered else float("nan"),
        rss_per_pod_mib=statistics.median(peak_rss) / 2**20,
        rss_total_mib=sum(peak_rss) / 2**20,
        vcpu_per_pod=vcpu_per_pod,
        busy_connections=busiest,
        idle_connections=idle,
    )


def render(figures: list[FleetFigures], command: str) -> str:
    lines = [
        f"### Fleet ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"`{command}`: one agent per pod, a turn (read all, append 2 items) every "
        f"{PERIOD:g} s; `idleTimeout` {IDLE:g} s; PgBouncer `default_pool_size` {POOL_SIZE}.",
        "",
        "| route | pods | turns | errors | p50 ms | p99 ms | RSS per pod MiB (peak) "
        "| RSS total MiB | vCPU per pod | backend connections busy | idle |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {f.route} | {f.pods} | {f.turns} | {f.errors} | {f.p50_ms:.1f} | {f.p99_ms:.1f} "
        f"| {f.rss_per_pod_mib:.1f} | {f.rss_total_mib:.0f} | {f.vcpu_per_pod:.4f} "
        f"| {f.busy_connections} "
        f"| {f.idle_connections} |"
        for f in figures
    ]
    return "\n".join(lines) + "\n"


async def run(pods: list[int], busy: float, routes: tuple[str, ...]) -> list[FleetFigures]:
    with Backends() as backends:
        await backends.watch()
        try:
            return [
                await measure(backends, route, count, busy) for count in pods for route in routes
            ]
        finally:
            await backends.unwatch()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__)
    parser.add_argument("--pods", default="10,50,100", help="fleet sizes, comma-separated")
    parser.add_argument("--busy", type=float, default=20.0, help="seconds of turns per size")
    parser.add_argument("--routes", default=",".join(ROUTES))
    parser.add_argument("--out", help="append the table to this file")
    args = parser.parse_args()
    sizes = [int(n) for n in args.pods.split(",")]
    figures = asyncio.run(run(sizes, args.busy, tuple(args.routes.split(","))))
    table = render(figures, "python -m bench.fleet " + " ".join(sys.argv[1:]))
    print(table)
    if args.out:
        with Path(args.out).open("a") as out:
            out.write("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
