"""Finding sessions by label as a store grows: a small store and a large one side by
side, in one run, on each backend.

    python -m bench.listing [--sessions 1000000] [--small 10000] [--backends ...] [--out FILE]

Each store is filled straight into its backend, in bulk, with rows and keys as the
sidecar writes them (a million sessions through the API would take most of an hour):
session `i` is made at one-millisecond steps, belongs to user `u<i mod users>` (ten
sessions per user) and tenant `t<i mod 10>`. A `convostore sidecar` process serves
each store; every listing is a real `GET .../sessions:find` over HTTP, timed as the
median of `--repeat` calls: a user's sessions (ten of them), a tenant's first page
(100 of a tenth of the store), a user's within their tenant (found from the user's ten,
not the tenant's many), the store's first page, and a tenant's page after
five pages of cursor. The ratio large/small says whether a listing reads an index
or the store.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, cast

import aiohttp
import asyncpg
import redis.asyncio as aioredis
import sqlalchemy
from sqlalchemy.ext.asyncio import create_async_engine

from bench import report
from bench.harness import Servers, Sidecar

BACKENDS = ("sqlite", "postgres", "redis", "mariadb")
BASE_TIME = 1_700_000_000.0
TENANTS = 10
PER_USER = 10
QUERIES: dict[str, Callable[[int], list[tuple[str, str]]]] = {
    "a user's sessions": lambda n: [("label", f"user_id=u{(n // 2) % max(1, n // PER_USER)}")],
    "a tenant's first page": lambda n: [("label", "tenant=t3")],
    "a user within a tenant": lambda n: [("label", "tenant=t3"), ("label", "user_id=u3")],
    "the store's first page": lambda n: [],
}
DEEP_PAGES = 5


def session_rows(count: int) -> list[tuple[str, float, str, str]]:
    users = max(1, count // PER_USER)
    return [
        (f"s{i:08d}", BASE_TIME + i / 1000, f"u{i % users}", f"t{i % TENANTS}")
        for i in range(count)
    ]


async def fill(backend: str, store: dict[str, Any], count: int) -> None:
    """The store as the sidecar would have written `count` labelled sessions."""
    rows = session_rows(count)
    if backend == "sqlite":
        with sqlite3.connect(store["sqlite"]["path"]) as conn:
            conn.executemany(
                "INSERT INTO convostore_sessions VALUES ('default', ?, 0, ?, ?)",
                [(sid, at, at) for sid, at, _, _ in rows],
            )
            conn.executemany(
                "INSERT INTO convostore_labels VALUES ('default', ?, ?, ?, ?)",
                [
                    (sid, n, v, at)
                    for sid, at, u, t in rows
                    for n, v in (("user_id", u), ("tenant", t))
                ],
            )
            conn.execute("ANALYZE")
    elif backend == "postgres":
        await _fill_postgres(store["postgres"], rows)
    elif backend == "redis":
        await _fill_redis(store["redis"], rows)
    else:
        await _fill_sqlalchemy(store["sqlalchemy"], count)


async def _fill_postgres(settings: dict[str, Any], rows: list[tuple[str, float, str, str]]) -> None:
    s = settings["schema"]
    conn = await asyncpg.connect(settings["dsn"])
    try:
        stamps = [(sid, _instant(at)) for sid, at, _, _ in rows]
        await conn.copy_records_to_table(
            "sessions",
            schema_name=s,
            columns=["store", "session_id", "next_seq", "updated_at", "created_at"],
            records=[("default", sid, 0, when, when) for sid, when in stamps],
        )
        labels = [
            ("default", sid, name, value, _instant(at))
            for sid, at, u, t in rows
            for name, value in (("user_id", u), ("tenant", t))
        ]
        await conn.copy_records_to_table(
            "session_labels",
            schema_name=s,
            columns=["store", "session_id", "name", "value", "created_at"],
            records=labels,
        )
        await conn.execute(f"ANALYZE {s}.sessions; ANALYZE {s}.session_labels")
    finally:
        await conn.close()


def _instant(seconds: float) -> Any:
    import datetime

    return datetime.datetime.fromtimestamp(seconds, datetime.UTC)


async def _fill_redis(settings: dict[str, Any], rows: list[tuple[str, float, str, str]]) -> None:
    prefix = settings["keyPrefix"]
    client = aioredis.Redis.from_url(settings["url"])
    try:
        for start in range(0, len(rows), 10_000):
            async with client.pipeline(transaction=False) as pipe:
                for sid, at, user, tenant in rows[start : start + 10_000]:
                    about = {"created": f"{at:.6f}", "updated": f"{at:.6f}"}
                    about |= {"l:user_id": user, "l:tenant": tenant}
                    pipe.hset(f"{prefix}:{{{sid}}}:about", mapping=cast(Any, about))
                    pipe.zadd(f"{prefix}:created", {sid: at})
                    pipe.zadd(f"{prefix}:label:user_id={user}", {sid: at})
                    pipe.zadd(f"{prefix}:label:tenant={tenant}", {sid: at})
                await pipe.execute()
    finally:
        await client.aclose()


async def _fill_sqlalchemy(settings: dict[str, Any], count: int) -> None:
    """Made by MariaDB itself from its sequence engine: sent row by row, a million
    sessions would take longer than the rest of the run."""
    prefix, users = settings["tablePrefix"], max(1, count // PER_USER)
    engine = create_async_engine(settings["url"])
    made = f"{BASE_TIME} + seq / 1000"
    sid = "CONCAT('s', LPAD(seq, 8, '0'))"
    try:
        async with engine.begin() as conn:
            await conn.execute(
                sqlalchemy.text(
                    f"INSERT INTO {prefix}sessions (store, session_id, next_seq, updated_at,"
                    f" created_at) SELECT 'default', {sid}, 0, {made}, {made}"
                    f" FROM seq_0_to_{count - 1}"
                )
            )
            for name, value in (
                ("user_id", f"CONCAT('u', seq MOD {users})"),
                ("tenant", f"CONCAT('t', seq MOD {TENANTS})"),
            ):
                await conn.execute(
                    sqlalchemy.text(
                        f"INSERT INTO {prefix}labels (store, session_id, name, value, created_at)"
                        f" SELECT 'default', {sid}, '{name}', {value}, {made}"
                        f" FROM seq_0_to_{count - 1}"
                    )
                )
            await conn.execute(sqlalchemy.text(f"ANALYZE TABLE {prefix}sessions, {prefix}labels"))
    finally:
        await engine.dispose()


async def timed(
    http: aiohttp.ClientSession, url: str, params: list[tuple[str, str]], repeat: int
) -> tuple[float, int]:
    """Median milliseconds of `repeat` listings, and how many sessions the page held."""
    took, held = [], 0
    async with http.get(url, params=params) as resp:  # warm: connections, caches
        await resp.read()
    for _ in range(repeat):
        started = time.perf_counter()
        async with http.get(url, params=params) as resp:
            page = await resp.json()
            assert resp.status == 200, page
        took.append((time.perf_counter() - started) * 1000)
        held = len(page["sessions"])
    return statistics.median(took), held


async def deep_page(http: aiohttp.ClientSession, url: str, repeat: int) -> tuple[float, int]:
    """The tenant's page after `DEEP_PAGES` pages, reached by cursor, then timed."""
    params = [("label", "tenant=t3")]
    cursor = None
    for _ in range(DEEP_PAGES):
        async with http.get(url, params=params + ([("cursor", cursor)] if cursor else [])) as r:
            cursor = (await r.json())["next_cursor"]
        if cursor is None:
            break
    return await timed(http, url, params + ([("cursor", cursor)] if cursor else []), repeat)


async def measure(sidecar: Sidecar, count: int, repeat: int) -> dict[str, tuple[float, int]]:
    url = f"{sidecar.url}/v1/stores/default/sessions:find"
    async with aiohttp.ClientSession() as http:
        figures = {name: await timed(http, url, q(count), repeat) for name, q in QUERIES.items()}
        figures[f"a tenant's page {DEEP_PAGES + 1}"] = await deep_page(http, url, repeat)
    return figures


async def run(servers: Servers, backends: list[str], sizes: list[int], repeat: int) -> str:
    results: dict[tuple[str, int], dict[str, tuple[float, int]]] = {}
    for backend in backends:
        for count in sizes:
            sidecar = Sidecar(servers.store(backend), servers.workdir)
            sidecar.start()  # makes (or migrates) the tables
            try:
                started = time.perf_counter()
                await fill(backend, sidecar.store, count)
                print(f"{backend}: {count:,} sessions in {time.perf_counter() - started:.0f} s")
                results[(backend, count)] = await measure(sidecar, count, repeat)
            finally:
                sidecar.stop()
    return render(results, backends, sizes)


def render(
    results: dict[tuple[str, int], dict[str, tuple[float, int]]],
    backends: list[str],
    sizes: list[int],
) -> str:
    small, large = sizes
    lines = [
        f"| backend | listing | ms at {small:,} sessions | ms at {large:,} | × "
        "| sessions in the page |",
        "|---|---|---|---|---|---|",
    ]
    for backend in backends:
        for name, (at_large, held) in results[(backend, large)].items():
            at_small = results[(backend, small)][name][0]
            lines.append(
                f"| {backend} | {name} | {at_small:.2f} | {at_large:.2f} "
                f"| {at_large / at_small:.2f}× | {held} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.listing", description=__doc__)
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=30)
    report.add_options(parser, BACKENDS)
    args = parser.parse_args()
    backends = report.chosen_backends(parser, args, BACKENDS)
    with Servers() as servers:
        table = asyncio.run(run(servers, backends, [args.small, args.sessions], args.repeat))
    return report.publish(report.one_run(parser, table), args.out)


if __name__ == "__main__":
    sys.exit(main())
