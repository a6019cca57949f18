"""What the kubelet's probes cost an idle sidecar: an HTTP probe on the probe listener
(`--health-port`, as the operator injects it) beside an exec probe (`convostore probe`,
as it injected before), each run `PROBES` times, and the idle sidecar alone.

    python -m bench.probes

CPU is read from /proc: the sidecar's own for HTTP probes and for idling, the probe
processes' (this process's reaped children) for exec probes. The table scales the
figures to ten idle minutes with a liveness probe every 20 s, the injected period.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.harness import Sidecar
from tests.servers import free_port

PROBES = 30
IDLE_SECONDS = 30.0
PERIOD = 20.0
WINDOW = 600.0


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="convostore-probes-"))
    health = free_port()
    sidecar = Sidecar({"backend": "sqlite", "sqlite": {"path": str(workdir / "p.db")}}, workdir)
    command = [*sidecar.command(), "--health-port", str(health)]
    sidecar.process = subprocess.Popen(command, cwd=workdir)
    sidecar.wait_ready()
    probe = sidecar.probe()
    try:
        before = probe.cpu_seconds()
        time.sleep(IDLE_SECONDS)
        idle_per_second = (probe.cpu_seconds() - before) / IDLE_SECONDS

        before = probe.cpu_seconds()
        for _ in range(PROBES):
            with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=5):
                pass
        http = (probe.cpu_seconds() - before) / PROBES

        before = children_cpu()
        exec_probe = [sys.executable, "-m", "convostore", "probe", "--url", sidecar.url]
        for _ in range(PROBES):
            subprocess.run(exec_probe, check=True, stdout=subprocess.DEVNULL)
        spawned = (children_cpu() - before) / PROBES
    finally:
        sidecar.stop()
    probes = WINDOW / PERIOD
    idle = idle_per_second * WINDOW
    print(
        f"| probe | CPU per probe | CPU over {WINDOW / 60:g} idle minutes "
        f"(a probe every {PERIOD:g} s) |\n|---|---|---|\n"
        f"| HTTP on the probe listener | {http * 1000:.2f} ms | "
        f"{(idle + http * probes):.2f} s (idle {idle:.2f} s + probes {http * probes:.3f} s) |\n"
        f"| exec `convostore probe` | {spawned * 1000:.0f} ms | "
        f"{(idle + spawned * probes):.2f} s (idle {idle:.2f} s + probes {spawned * probes:.2f} s) |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
