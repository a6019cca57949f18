"""The images as they run: their sizes, and the sidecar container as the operator injects
it (`inject()`'s manifest run by `tests.containers.Pod`: its user, read-only root, memory
limit and volumes, an embedded SQLite store) beside the same sidecar as a process from
the virtual environment: seconds from start to ready, and memory idle, under load and
after it.

    python -m bench.containers [--starts 5] [--agents 20] [--busy 20] [--out FILE]

The container's memory is what the engine counts against its limit (the memory cgroup's
usage less the page cache it can drop: `docker stats`'s figure); the process's is its
RSS. Load is `agents` agents taking turns back to back for `busy` seconds over the unix
socket (a turn: read the history, append a message and its answer).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convostore import SidecarSession
from convostore_operator.inject import SOCKET_URL, TOKEN_FILE, StoreMount, inject
from convostore_operator.render import render

from bench.harness import Sidecar
from tests.containers import LOCAL_BASE, OPERATOR_IMAGE, SIDECAR_IMAGE, Pod, docker, images

STORE = {"backend": "sqlite"}
MESSAGE = {"role": "user", "content": "what is the weather in Paris? " * 8}


@dataclass
class Footprint:
    start_seconds: list[float]
    idle: int
    loaded: int
    after: int
    turns: int


def sampled_peak(read: Callable[[], int], stop: threading.Event) -> Callable[[], int]:
    """Samples `read` every 50 ms on a thread until `stop`; returns a getter of the peak."""
    peak = [read()]

    def sample() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], read())

    def result() -> int:
        thread.join()
        return peak[0]

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    return result


@dataclass(frozen=True)
class Target:
    url: str
    store: str
    token_file: str | None = None


async def load(target: Target, agents: int, busy: float) -> int:
    sessions = [
        SidecarSession(f"agent-{n}", target.store, url=target.url, token_file=target.token_file)
        for n in range(agents)
    ]
    until = time.monotonic() + busy

    async def agent(session: SidecarSession) -> int:
        turns = 0
        while time.monotonic() < until:
            await session.get_items()
            await session.add_items([MESSAGE, {"role": "assistant", "content": "Sunny."}])
            turns += 1
        return turns

    return sum(await asyncio.gather(*map(agent, sessions)))


def measured(
    memory: Callable[[], int], target: Target, agents: int, busy: float
) -> tuple[int, int, int, int]:
    """(idle, peak under load, after load) memory and the turns taken."""
    time.sleep(2)
    idle = memory()
    stop = threading.Event()
    peak = sampled_peak(memory, stop)
    turns = asyncio.run(load(target, agents, busy))
    stop.set()
    loaded = peak()
    time.sleep(2)
    return idle, loaded, memory(), turns


def sidecar_pod() -> tuple[dict[str, Any], dict[str, dict[str, bytes]]]:
    """An agent pod as the webhook patches it for one embedded SQLite store, and the
    store's config Secret as the operator renders it."""
    manifest: dict[str, Any] = {
        "metadata": {"annotations": {"convostore.dev/inject": "true"}},
        "spec": {"containers": [{"name": "agent", "image": "agent:1"}]},
    }
    inject(manifest, [StoreMount("chat", "bench", embedded=True)], SIDECAR_IMAGE)
    return manifest, {"chat-convostore": render("chat", STORE, {}).secret_data()}


@contextmanager
def running_pod() -> Iterator[tuple[Pod, float]]:
    """The injected sidecar in its pod; the seconds from `docker run` to its startup
    probe's first 200."""
    manifest, secrets = sidecar_pod()
    [spec] = manifest["spec"]["initContainers"]
    pod = Pod(manifest, secrets)
    try:
        began = time.perf_counter()
        pod.run(spec, SIDECAR_IMAGE)
        probe = spec["startupProbe"]["httpGet"]
        wait_for(f"http://{pod.ip}:{probe['port']}{probe['path']}")
        yield pod, time.perf_counter() - began
    finally:
        pod.close()


def wait_for(url: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.002)


def container_footprint(starts: int, agents: int, busy: float) -> Footprint:
    seconds = []
    for _ in range(starts - 1):
        with running_pod() as (_, took):
            seconds.append(took)
    with running_pod() as (pod, took):
        seconds.append(took)
        sidecar = pod.containers[-1]
        socket = pod.host_directory("convostore-socket") / Path(SOCKET_URL).name
        token = pod.host_directory("convostore-token") / Path(TOKEN_FILE).name
        target = Target(f"unix://{socket}", "chat", str(token))
        figures = measured(sidecar.memory_reader(), target, agents, busy)
    return Footprint(seconds, *figures)


def process_footprint(starts: int, agents: int, busy: float) -> Footprint:
    workdir = Path(tempfile.mkdtemp(prefix="convostore-bench-"))
    seconds = []
    for n in range(starts):
        store = {"backend": "sqlite", "sqlite": {"path": str(workdir / f"{n}.db")}}
        sidecar = Sidecar(store, workdir)
        seconds.append(sidecar.start())
        if n < starts - 1:
            sidecar.stop()
    try:
        figures = measured(sidecar.rss_bytes, Target(sidecar.url, "default"), agents, busy)
    finally:
        sidecar.stop()
    return Footprint(seconds, *figures)


def image_sizes() -> dict[str, int]:
    return {
        image: int(docker("image", "inspect", "--format", "{{.Size}}", image))
        for image in (LOCAL_BASE, SIDECAR_IMAGE, OPERATOR_IMAGE)
    }


def render_table(
    sizes: dict[str, int], container: Footprint, process: Footprint, command: str
) -> str:
    mb = 1024 * 1024
    base = sizes[LOCAL_BASE]
    lines = [
        "## The images and the sidecar container",
        "",
        f"`{command}`",
        "",
        "| image | size | over the base |",
        "|---|---:|---:|",
    ]
    for image, size in sizes.items():
        lines.append(f"| `{image}` | {size / 1e6:.0f} MB | {(size - base) / 1e6:.0f} MB |")
    lines += [
        "",
        "| sidecar | start to ready (median) | memory idle | under load (peak) | after | turns |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, figures in (("container, as injected", container), ("process (venv)", process)):
        lines.append(
            f"| {name} | {statistics.median(figures.start_seconds):.2f} s "
            f"| {figures.idle / mb:.1f} MiB | {figures.loaded / mb:.1f} MiB "
            f"| {figures.after / mb:.1f} MiB | {figures.turns} |"
        )
    ratio = statistics.median(container.start_seconds) / statistics.median(process.start_seconds)
    lines += ["", f"Container start over process start: {ratio:.2f}x.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.containers")
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--busy", type=float, default=20.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    images()
    container = container_footprint(args.starts, args.agents, args.busy)
    process = process_footprint(args.starts, args.agents, args.busy)
    command = " ".join(["python -m bench.containers", *sys.argv[1:]])
    table = render_table(image_sizes(), container, process, command)
    print(table)
    if args.out:
        with args.out.open("a") as out:
            out.write("\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
