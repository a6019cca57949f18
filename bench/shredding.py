"""What sealing each subject's items under a key of their own costs, beside a store key
and beside no encryption, on each backend, in one run.

    python -m bench.shredding [--repeat 300] [--sessions 20] [--backends ...] [--out FILE]

Three `convostore sidecar` processes per backend, one store each: in clear, encrypted
under the store key, and encrypted with `subjectLabel: user_id` (every session labelled,
one subject per session). Each takes the same calls, one at a time through
`SidecarSession`: an append of one message, and a read of the latest 20 items, cycling
over `--sessions` sessions. A subject's append reads the session's labels and the
subject's wrapped key before it writes (so an erasure anywhere counts at once), and a
read of a subject's items reads that key; the ratios say what those reads cost.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from convostore import SidecarSession
from convostore_sidecar.keyring import generate_key

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


async def medians(url: str, sessions: int, repeat: int) -> tuple[float, float]:
    """Median milliseconds of an append and of a latest-20 read."""
    pool = [
        SidecarSession(f"s{n}", url=url, metadata={"user_id": f"u{n}"}) for n in range(sessions)
    ]
    for session in pool:
        await session.add_items([MESSAGE] * 20)
    appends, reads = [], []
    for n in range(repeat):
        session = pool[n % sessions]
        started = time.perf_counter()
        await session.add_items([MESSAGE])
        appended = time.perf_counter()
        await session.get_items(limit=20)
        appends.append(appended - started)
        reads.append(time.perf_counter() - appended)
    return statistics.median(appends) * 1000, statistics.median(reads) * 1000


async def run(servers: Servers, backends: list[str], sessions: int, repeat: int) -> str:
    rows = [
        "| backend | store | append p50 ms | × clear | read p50 ms | × clear |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for backend in backends:
        figures: dict[str, tuple[float, float]] = {}
        for mode in MODES:
            sidecar = Sidecar({**servers.store(backend), **encryption(mode)}, servers.workdir)
            sidecar.start()
            try:
                figures[mode] = await medians(sidecar.url, sessions, repeat)
            finally:
                sidecar.stop()
        append0, read0 = figures["clear"]
        for mode, (append, read) in figures.items():
            rows.append(
                f"| {backend} | {mode} | {append:.2f} | {append / append0:.2f}× "
                f"| {read:.2f} | {read / read0:.2f}× |"
            )
    return "\n".join(rows) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.shredding", description=__doc__)
    parser.add_argument("--repeat", type=int, default=300)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}; choose from {', '.join(BACKENDS)}")
    command = "python -m bench.shredding " + " ".join(sys.argv[1:])
    with Servers() as servers:
        table = asyncio.run(run(servers, backends, args.sessions, args.repeat))
    report = f"`{command.strip()}`, in one run:\n\n{table}"
    print(report)
    if args.out:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
