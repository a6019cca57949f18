"""The container engine the image tests run on: Docker, driven through its CLI as a user
drives it, with the images `scripts/build-images.sh` makes, on a base built from Debian's
packages (`--base local`), since no registry can be reached from this machine.

`scripts/test.sh` installs and starts the engine; `images()` builds the images of the
working tree once per test session (the engine's layer cache makes a rebuild of an
unchanged tree take seconds).
"""

from __future__ import annotations

import asyncio
import fcntl
import shutil
import socket
import struct
import subprocess
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.chart.tools import ROOT
from tests.servers import require

REPOSITORY, TAG = "convostore-test", "dev"
SIDECAR_IMAGE = f"{REPOSITORY}-sidecar:{TAG}"
OPERATOR_IMAGE = f"{REPOSITORY}:{TAG}"
LOCAL_BASE = "convostore-base:bookworm"
"""The base `scripts/build-images.sh --base local` builds on."""
LABEL = "convostore.test=1"
"""On every container and volume a test makes, so a crashed run's leftovers can be found."""


BRIDGE_NAME = '{{index .Options "com.docker.network.bridge.name"}}'
SIOCGIFADDR = 0x8915


class EngineError(RuntimeError):
    """A `docker` command failed; the message carries what it printed."""


def docker(*args: str, timeout: float = 120) -> str:
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise EngineError(f"docker {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout.strip()


def engine_runs() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        docker("info", "--format", "{{.ServerVersion}}", timeout=20)
    except (EngineError, subprocess.TimeoutExpired):
        return False
    return True


_built = False


def images() -> None:
    """Builds the sidecar and operator images from this tree, once per process; xdist
    workers take turns through a lock file, the second finding the layers cached."""
    global _built
    if _built:
        return
    if not engine_runs():
        require("A Docker engine")
    with Path("/tmp/convostore-test-images.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        command = ["bash", "scripts/build-images.sh", "--base", "local"]
        command += ["--repository", REPOSITORY, "--tag", TAG]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise EngineError(f"building the images failed:\n{result.stdout}\n{result.stderr}")
    _built = True


def bridge_gateway() -> str:
    """The host's address on the engine's default network, where containers reach the
    host: the address of the network's bridge interface (the network's own record of
    its gateway is empty on some engines)."""
    bridge = docker("network", "inspect", "bridge", "--format", BRIDGE_NAME)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("256s", bridge.encode()[:15])
        return socket.inet_ntoa(fcntl.ioctl(sock.fileno(), SIOCGIFADDR, request)[20:24])


@dataclass
class Container:
    name: str

    @classmethod
    def run(cls, image: str, *command: str, options: tuple[str, ...] = ()) -> Container:
        """`docker run --detach` with these options; the command follows the image's
        entrypoint, as a pod's `args` do."""
        name = f"convostore-test-{uuid.uuid4().hex[:10]}"
        docker("run", "--detach", "--name", name, "--label", LABEL, *options, image, *command)
        return cls(name)

    def inspect(self, template: str) -> str:
        return docker("inspect", "--format", template, self.name)

    @property
    def ip(self) -> str:
        return self.inspect("{{.NetworkSettings.IPAddress}}")

    @property
    def running(self) -> bool:
        return self.inspect("{{.State.Running}}") == "true"

    @property
    def host_pid(self) -> int:
        return int(self.inspect("{{.State.Pid}}"))

    def logs(self) -> str:
        result = subprocess.run(
            ["docker", "logs", self.name], capture_output=True, text=True, check=False
        )
        return result.stdout + result.stderr

    def start(self) -> None:
        """Starts a stopped container again, as the kubelet restarts one in its pod."""
        docker("start", self.name)

    def kill(self, signal: str) -> None:
        docker("kill", "--signal", signal, self.name)

    async def wait(self) -> int:
        """The exit code, once the container has stopped."""
        process = await asyncio.create_subprocess_exec(
            "docker", "wait", self.name, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, err = await process.communicate()
        if process.returncode != 0:
            raise EngineError(f"docker wait {self.name}: {err.decode().strip()}")
        return int(out)

    def memory_reader(self) -> Callable[[], int]:
        """A reader of the memory charged to the container as `docker stats` counts it
        (the cgroup's usage less the page cache it could drop); the cgroup is found once,
        so sampling it runs no `docker` command."""
        container = self.inspect("{{.Id}}")
        v1 = Path("/sys/fs/cgroup/memory/docker") / container
        if v1.exists():
            usage, inactive = v1 / "memory.usage_in_bytes", "total_inactive_file"
            cgroup = v1
        else:
            cgroup = Path("/sys/fs/cgroup/system.slice") / f"docker-{container}.scope"
            usage, inactive = cgroup / "memory.current", "inactive_file"

        def read() -> int:
            lines = (cgroup / "memory.stat").read_text().splitlines()
            stat = dict(line.split() for line in lines)
            return int(usage.read_text()) - int(stat.get(inactive, 0))

        return read

    def remove(self) -> None:
        subprocess.run(["docker", "rm", "--force", "--volumes", self.name], capture_output=True)


def volume(*options: str) -> str:
    """A named volume (`--opt` values from `options`), shared by the containers that mount it."""
    name = f"convostore-test-{uuid.uuid4().hex[:10]}"
    opts = [arg for option in options for arg in ("--opt", option)]
    docker("volume", "create", "--label", LABEL, *opts, name)
    return name


def remove_volume(name: str) -> None:
    subprocess.run(["docker", "volume", "rm", "--force", name], capture_output=True)


class Pod:
    """A pod manifest run as the kubelet runs it, on the engine: a pause container holds
    the network namespace every container joins (one loopback, one address); an emptyDir
    is a host directory, world-writable as the kubelet makes it, or with `medium: Memory`
    a tmpfs volume; a Secret volume is a read-only directory of the Secret's files;
    `downward` holds the values of the downward API (`metadata.name`, ...)."""

    def __init__(
        self,
        manifest: dict[str, Any],
        secrets: dict[str, dict[str, bytes]],
        downward: dict[str, str] | None = None,
    ) -> None:
        self.spec = manifest["spec"]
        self.secrets = secrets
        self.downward = downward or {}
        self.sources: dict[str, str] = {}
        self.volumes: list[str] = []
        self.containers: list[Container] = []
        self.workdir = Path(tempfile.mkdtemp(prefix="convostore-pod-"))
        self.pause = Container.run(
            SIDECAR_IMAGE, "infinity", options=("--entrypoint", "sleep", "--network", "bridge")
        )
        self.containers.append(self.pause)
        for item in self.spec.get("volumes", []):
            self.sources[item["name"]] = self._volume(item)

    def _volume(self, item: dict[str, Any]) -> str:
        if "secret" in item:
            directory = self.workdir / item["name"]
            directory.mkdir(mode=0o755)
            for name, data in self.secrets[item["secret"]["secretName"]].items():
                (directory / name).write_bytes(data)
                (directory / name).chmod(0o644)
            return f"type=bind,src={directory}"
        if item["emptyDir"].get("medium") == "Memory":
            name = volume("type=tmpfs", "device=tmpfs", "o=size=1m,mode=1777")
            self.volumes.append(name)
            return f"type=volume,src={name}"
        directory = self.workdir / item["name"]
        directory.mkdir()
        directory.chmod(0o1777)
        return f"type=bind,src={directory}"

    @property
    def ip(self) -> str:
        return self.pause.ip

    def host_directory(self, volume_name: str) -> Path:
        """Where one of the pod's volumes is on the host (as root sees it)."""
        source = dict(part.split("=", 1) for part in self.sources[volume_name].split(","))
        if source["type"] == "bind":
            return Path(source["src"])
        return Path(docker("volume", "inspect", "--format", "{{.Mountpoint}}", source["src"]))

    def options(self, container: dict[str, Any]) -> list[str]:
        """`docker run` options for a container spec of this pod."""
        options = ["--network", f"container:{self.pause.name}"]
        for mount in container.get("volumeMounts", []):
            target = f"{self.sources[mount['name']]},dst={mount['mountPath']}"
            options += ["--mount", target + (",readonly" if mount.get("readOnly") else "")]
        for item in container.get("env", []):
            value = item.get("value") or self.downward[item["valueFrom"]["fieldRef"]["fieldPath"]]
            options += ["--env", f"{item['name']}={value}"]
        context = container.get("securityContext", {})
        if "runAsUser" in context:
            options += ["--user", f"{context['runAsUser']}:{context.get('runAsGroup', 0)}"]
        if context.get("runAsNonRoot"):
            assert context.get("runAsUser", 0) != 0, "the kubelet refuses root here"
        if context.get("readOnlyRootFilesystem"):
            options.append("--read-only")
        for capability in context.get("capabilities", {}).get("drop", []):
            options += ["--cap-drop", capability]
        if context.get("allowPrivilegeEscalation") is False:
            options += ["--security-opt", "no-new-privileges"]
        memory = container.get("resources", {}).get("limits", {}).get("memory")
        if memory:
            options += ["--memory", memory.replace("Mi", "m").replace("Gi", "g")]
        if container.get("command"):
            options += ["--entrypoint", container["command"][0]]
        return options

    def run(self, container: dict[str, Any], image: str) -> Container:
        """Starts one of the pod's containers (from `image`: the manifest's names images
        that are not here)."""
        args = [*container.get("command", [])[1:], *container.get("args", [])]
        started = Container.run(image, *args, options=tuple(self.options(container)))
        self.containers.append(started)
        return started

    def close(self) -> None:
        for container in reversed(self.containers):
            container.remove()
        for name in self.volumes:
            remove_volume(name)
        shutil.rmtree(self.workdir, ignore_errors=True)
