"""What sealing each subject's items under a key of their own costs, beside a store key
and beside no encryption, on each backend, in one run.

    python -m bench.shredding [--repeat 300] [--sessions 20] [--backends ...] [--out FILE]

Three `convostore sidecar` processes per backend, one store each: in clear, encrypted
under the store key, and encrypted with `subjectLabel: user_id` (every session labelled,
one subject per session). Each takes the same calls, one at a time through
`SidecarSession`: an append of one message, and a read of the latest 20 items, cycling
over `--sessions` sessions. A subject's append reads the session's labels and the
subject's wrapped key before it writes (so an erasure anywhere counts at once), and a
read of a subject's items reads that key; the ratios say what those reads cost. The
same read as an export makes it (`sealed=true`: a subject's items sealed for the file)
is timed beside that read plain, each over plain HTTP, one after the other: the last
column is the median of their ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from typing import Any

import aiohttp
from convostore import SidecarSession
from convostore_sidecar.keyring import generate_key

from bench import report
from bench.harness import Servers, Sidecar
from bench.scenarios import MESSAGE

BACKENDS = ("sqlite", "postgres", "redis")
MODES = ("clear", "store key", "subject keys")


def encryption(mode: str) -> dict[str, Any]:
    if mode == "clear":
        return {}
    keys: dict[str, Any] = {"keys": [{"id": "k1", "value": generate_key()}]}
    if mode == "subject keys":
        keys["subjectLabel"] = "user_id"
    return {"encryption": keys}


async def medians(url: str, sessions: int, repeat: int) -> tuple[float, float, float]:
    """Median milliseconds of an append and of a latest-20 read, and the median ratio
    of that read sealed for an export to the same read plain (both over plain HTTP)."""
    pool = [
        SidecarSession(f"s{n}", url=url, metadata={"user_id": f"u{n}"}) for n in range(sessions)
    ]
    for session in pool:
        await session.add_items([MESSAGE] * 20)
    appends, reads, exports = [], [], []
    async with aiohttp.ClientSession() as http:
        for n in range(repeat):
            session = pool[n % sessions]
            started = time.perf_counter()
            await session.add_items([MESSAGE])
            appended = time.perf_counter()
            await session.get_items(limit=20)
            read = time.perf_counter()
            items = f"{url}/v1/stores/default/sessions/{session.session_id}/items"
            plain = await timed_get(http, items, {"limit": "20"})
            sealed = await timed_get(http, items, {"limit": "20", "sealed": "true"})
            appends.append(appended - started)
            reads.append(read - appended)
            exports.append(sealed / plain)
    return median_ms(appends), median_ms(reads), statistics.median(exports)


async def timed_get(http: aiohttp.ClientSession, url: str, params: dict[str, str]) -> float:
    """Seconds for a read of 20 items over plain HTTP."""
    started = time.perf_counter()
    async with http.get(url, params=params) as answer:
        assert answer.status == 200, await answer.text()
        assert len((await answer.json())["items"]) == 20
    return time.perf_counter() - started


def median_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1000


async def run(servers: Servers, backends: list[str], sessions: int, repeat: int) -> str:
    rows = [
        "| backend | store | append p50 ms | × clear | read p50 ms | × clear "
        "| sealed read × plain |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for backend in backends:
        figures: dict[str, tuple[float, float, float]] = {}
        for mode in MODES:
            sidecar = Sidecar({**servers.store(backend), **encryption(mode)}, servers.workdir)
            sidecar.start()
            try:
                figures[mode] = await medians(sidecar.url, sessions, repeat)
            finally:
                sidecar.stop()
        append0, read0, _ = figures["clear"]
        for mode, (append, read, sealed) in figures.items():
            rows.append(
                f"| {backend} | {mode} | {append:.2f} | {append / append0:.2f}× "
                f"| {read:.2f} | {read / read0:.2f}× | {sealed:.2f}× |"
            )
    return "\n".join(rows) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.shredding", description=__doc__)
    parser.add_argument("--repeat", type=int, default=300)
    parser.add_argument("--sessions", type=int, default=20)
    report.add_options(parser, BACKENDS)
    args = parser.parse_args()
    backends = report.chosen_backends(parser, args, BACKENDS)
    with Servers() as servers:
        table = asyncio.run(run(servers, backends, args.sessions, args.repeat))
    return report.publish(report.one_run(parser, table), args.out)


if __name__ == "__main__":
    sys.exit(main())
