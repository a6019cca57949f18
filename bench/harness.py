"""What the scenarios run against: database servers, sidecar processes, and sessions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.servers import MariaDbServer, PostgresServer, RedisClusterNodes, RedisServer, free_port
from tests.support import make_sdk_tables_on_mysql

SessionFactory = Callable[[str], Any]


@dataclass(frozen=True)
class ProcessProbe:
    """Another process's resident set and CPU time, from /proc."""

    pid: int

    def rss(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        kb = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))
        return int(kb) * 1024

    def cpu_seconds(self) -> float:
        """User and system time; fields 14 and 15 of /proc/PID/stat, after the name."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Sidecar:
    """A `convostore sidecar` process with one store, `default`."""

    store: dict[str, Any]
    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    tree: Path | None = None
    """A checkout to run the sidecar from (see `bench.compare`), else this one."""
    migrated: bool = False
    """Whether the store's schema is migrated already (else `command` migrates it)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        config = self.workdir / f"sidecar-{self.port}.yaml"
        config.write_text(yaml.safe_dump({"stores": {"default": self.store}}))
        if self.store["backend"] in ("postgres", "sqlalchemy") and not self.migrated:
            # as the operator does
            subprocess.run(
                [sys.executable, "-m", "convostore", "migrate", "--config", str(config)],
                check=True,
                stdout=subprocess.DEVNULL,
                env=self._environment(),
            )
        return [
            sys.executable,
            "-m",
            "convostore",
            "sidecar",
            "--config",
            str(config),
            "--port",
            str(self.port),
            "--log-level",
            "WARNING",
        ]

    def start(self) -> float:
        """Start it and return the seconds until `/readyz` answered 200."""
        started = time.perf_counter()
        self.launch()
        self.wait_ready()
        return time.perf_counter() - started

    def launch(self) -> None:
        self.process = subprocess.Popen(self.command(), cwd=self.workdir, env=self._environment())

    def wait_ready(self) -> None:
        assert self.process is not None
        while True:
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError("the sidecar exited during start-up") from None
                time.sleep(0.002)

    def _environment(self) -> dict[str, str]:
        if self.tree is None:
            return dict(os.environ)
        parts = ("cli", "client", "sidecar", "operator", ".")
        return {**os.environ, "PYTHONPATH": os.pathsep.join(str(self.tree / p) for p in parts)}

    def rss_bytes(self) -> int:
        return self.probe().rss()

    def probe(self) -> ProcessProbe:
        assert self.process is not None
        return ProcessProbe(self.process.pid)

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)
            self.process = None


class Floor(Sidecar):
    """`bench.floor`: the same API answered from memory by a bare aiohttp server."""

    def __init__(self, workdir: Path) -> None:
        super().__init__({}, workdir)

    def command(self) -> list[str]:
        return [sys.executable, str(Path(__file__).with_name("floor.py")), str(self.port)]


class Servers:
    """Private Redis, PostgreSQL and MariaDB, shared by the sidecar and the SDK sessions."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="convostore-bench-"))
        self.redis = RedisServer()
        self.replica = RedisServer("--replicaof", "127.0.0.1", str(self.redis.port))
        self.cluster = RedisClusterNodes(appendfsync="always")
        """Started only by the section that compares it with one Redis."""
        self.postgres = PostgresServer()
        self.mariadb = MariaDbServer()
        """The `sqlalchemy` backend's, as `mariadb` in the tables."""

    def __enter__(self) -> Servers:
        self.redis.start()
        self.replica.start()
        self.postgres.start()
        self.mariadb.start()
        _wait_for_replica(self.redis.url)
        return self

    def __exit__(self, *exc: object) -> None:
        self.cluster.destroy()
        self.replica.destroy()
        self.redis.destroy()
        self.postgres.destroy()
        self.mariadb.destroy()

    def store(self, backend: str) -> dict[str, Any]:
        """The store's config; (f) makes one branch per repetition in a single session,
        past the default `limits.maxBranches`, which the bench therefore raises."""
        return {**self._backend(backend), "limits": {"maxBranches": 100_000}}

    def _backend(self, backend: str) -> dict[str, Any]:
        run = uuid.uuid4().hex[:8]
        if backend == "sqlite":
            return {"backend": "sqlite", "sqlite": {"path": str(self.workdir / f"cs-{run}.db")}}
        if backend == "redis":
            return {"backend": "redis", "redis": {"url": self.redis.url, "keyPrefix": f"b{run}"}}
        if backend.startswith("redis-"):
            where = (
                {"cluster": {"nodes": self.cluster.addresses[:2]}}
                if backend.startswith("redis-cluster")
                else {"url": self.redis.url}
            )
            replicas = 1 if backend.endswith("-replicated") else 0
            redis = {**where, "keyPrefix": f"b{run}", "waitReplicas": replicas}
            return {"backend": "redis", "redis": redis}
        if backend == "mariadb":
            url = self.mariadb.url()
            sqlalchemy = {"url": url, "tablePrefix": f"b{run}_", "poolMax": 16}
            return {"backend": "sqlalchemy", "sqlalchemy": sqlalchemy}
        return {
            "backend": "postgres",
            "postgres": {"dsn": self.postgres.dsn, "schema": f"b_{run}", "poolMax": 16},
        }


def _wait_for_replica(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 30
    try:
        while client.info("replication").get("slave0", {}).get("state") != "online":
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis replica did not come online")
            time.sleep(0.05)
    finally:
        client.close()


class SdkSessions:
    """The Agents SDK's own sessions on the same servers, one shared client per backend."""

    def __init__(self, servers: Servers) -> None:
        self.servers = servers
        self._closers: list[Callable[[], Any]] = []

    async def factory(self, backend: str) -> SessionFactory:
        run = uuid.uuid4().hex[:8]
        if backend == "sqlite":
            from agents.memory import SQLiteSession

            path = self.servers.workdir / f"sdk-{run}.db"
            return lambda sid: SQLiteSession(sid, path)
        if backend == "redis":
            import redis.asyncio as aioredis
            from agents.extensions.memory import RedisSession

            client = aioredis.Redis.from_url(self.servers.redis.url)
            self._closers.append(client.aclose)
            return lambda sid: RedisSession(sid, redis_client=client, key_prefix=f"sdk{run}")
        from agents.extensions.memory import SQLAlchemySession
        from sqlalchemy.ext.asyncio import create_async_engine

        if backend == "mariadb":
            url = self.servers.mariadb.url()
        else:
            url = self.servers.postgres.dsn.replace("postgresql://", "postgresql+asyncpg://")
        engine = create_async_engine(url, pool_size=16)
        self._closers.append(engine.dispose)
        sessions, messages = f"s_{run}", f"m_{run}"
        if backend == "mariadb":  # its create_tables cannot make them there
            await make_sdk_tables_on_mysql(engine, sessions, messages)
        first = SQLAlchemySession(
            "warmup",
            engine=engine,
            create_tables=True,
            sessions_table=sessions,
            messages_table=messages,
        )
        await first.get_items()
        return lambda sid: SQLAlchemySession(
            sid, engine=engine, sessions_table=sessions, messages_table=messages
        )

    async def close(self) -> None:
        for close in self._closers:
            await close()


def sidecar_factory(url: str) -> SessionFactory:
    from convostore import SidecarSession

    return lambda sid: SidecarSession(sid, url=url)


def advanced_sessions(url: str, workdir: Path) -> tuple[Any, Any]:
    """The same advanced session twice: `AdvancedSidecarSession` on the sidecar, and the
    Agents SDK's `AdvancedSQLiteSession` (its only advanced session) on a file."""
    from agents.extensions.memory import AdvancedSQLiteSession
    from convostore import AdvancedSidecarSession

    run = uuid.uuid4().hex[:8]
    theirs = AdvancedSQLiteSession(
        session_id=f"advanced-{run}", db_path=workdir / f"sdk-adv-{run}.db", create_tables=True
    )
    return AdvancedSidecarSession(f"advanced-{run}", url=url), theirs


def cpu_seconds() -> float:
    """CPU time of this process (the agent's side), user and system, every thread."""
    return time.process_time()
