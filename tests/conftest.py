"""Shared fixtures: real database servers and real sidecars (in-process or as a process)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp.test_utils import TestServer
from convostore_sidecar.config import parse_config
from convostore_sidecar.http.app import build_app

from tests.dapr_standin import DaprStandIn
from tests.openai_standin import OpenAIStandIn
from tests.servers import (
    MariaDbServer,
    PgBouncer,
    PostgresServer,
    RedisClusterNodes,
    RedisServer,
    free_port,
)
from tests.support import (
    POSTGRES_POOLED,
    REDIS_CLUSTER,
    SQLALCHEMY_POSTGRES,
    SQLALCHEMY_SQLITE,
    RunningSidecar,
    SidecarProcess,
    StartSidecar,
    migrate,
    unique,
)

os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    server = RedisServer()
    server.start()
    yield server.url
    server.destroy()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterNodes]:
    cluster = RedisClusterNodes()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    if os.environ.get("POSTGRES_DSN"):
        yield os.environ["POSTGRES_DSN"]
        return
    server = PostgresServer()
    server.start()
    yield server.dsn
    server.destroy()


@pytest.fixture(scope="session")
def pgbouncer_dsn(postgres_dsn: str) -> Iterator[str]:
    """PgBouncer in transaction mode in front of the test PostgreSQL server."""
    upstream = urlsplit(postgres_dsn)
    pooler = PgBouncer((upstream.hostname or "127.0.0.1", upstream.port or 5432))
    pooler.start()
    yield pooler.dsn.rsplit("/", 1)[0] + upstream.path
    pooler.destroy()


@pytest.fixture(scope="session")
def mariadb() -> Iterator[MariaDbServer]:
    server = MariaDbServer()
    server.start()
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def dapr_runtime(redis_url: str) -> Iterator[DaprStandIn]:
    runtime = DaprStandIn(redis_url)
    runtime.start()
    yield runtime
    runtime.stop()


@pytest.fixture
def openai_api() -> Iterator[OpenAIStandIn]:
    """The Conversations API stand-in, fresh for each test."""
    api = OpenAIStandIn()
    api.start()
    yield api
    api.shutdown()


@pytest.fixture
def openai_key_file(tmp_path: Path, openai_api: OpenAIStandIn) -> Path:
    path = tmp_path / "openai-api-key"
    path.write_text(openai_api.api_key + "\n")
    return path


@pytest.fixture
def store_config(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., dict[str, Any]]:
    """Builds one store's config for a backend, isolated from every other test."""

    def make(backend: str, **extra: Any) -> dict[str, Any]:
        config: dict[str, Any] = {"backend": backend}
        if backend == "sqlite":
            config["sqlite"] = {"path": str(tmp_path / "convostore.db")}
        elif backend == "redis":
            config["redis"] = {
                "url": request.getfixturevalue("redis_url"),
                "keyPrefix": unique("test"),
            }
        elif backend == REDIS_CLUSTER:
            config["backend"] = "redis"
            config["redis"] = {
                "cluster": {"nodes": request.getfixturevalue("redis_cluster").addresses[:2]},
                "keyPrefix": unique("test"),
            }
        elif backend == POSTGRES_POOLED:
            config["backend"] = "postgres"
            config["postgres"] = {
                "dsn": request.getfixturevalue("pgbouncer_dsn"),
                "transactionPooler": True,
                "directDsn": request.getfixturevalue("postgres_dsn"),
                "schema": "t_" + uuid.uuid4().hex[:12],
            }
            migrate({"stores": {"schema": config}})
        elif backend == "dapr":
            runtime = request.getfixturevalue("dapr_runtime")
            config["dapr"] = {
                "stateStore": "statestore",
                "keyPrefix": unique("test"),
                **runtime.endpoints,
            }
        elif backend == "postgres":
            config["postgres"] = {
                "dsn": request.getfixturevalue("postgres_dsn"),
                "schema": "t_" + uuid.uuid4().hex[:12],
            }
            migrate({"stores": {"schema": config}})
        elif backend in ("sqlalchemy", SQLALCHEMY_POSTGRES, SQLALCHEMY_SQLITE):
            config["backend"] = "sqlalchemy"
            config["sqlalchemy"] = {
                "url": sqlalchemy_url(backend, request, tmp_path),
                "tablePrefix": "t" + uuid.uuid4().hex[:12] + "_",
            }
            migrate({"stores": {"schema": config}})
        elif backend == "openai":
            config["openai"] = {
                "baseURL": request.getfixturevalue("openai_api").base_url,
                "apiKeyFile": str(request.getfixturevalue("openai_key_file")),
                "mapping": {"sqlite": {"path": str(tmp_path / "openai-map.db")}},
            }
        config.update(extra)
        return config

    return make


def sqlalchemy_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The `sqlalchemy` backend's database: MariaDB, or PostgreSQL or SQLite through it."""
    if backend == SQLALCHEMY_SQLITE:
        return f"sqlite+aiosqlite:///{tmp_path / 'sqlalchemy.db'}"
    if backend == SQLALCHEMY_POSTGRES:
        dsn = urlsplit(str(request.getfixturevalue("postgres_dsn")))
        return dsn._replace(scheme="postgresql+asyncpg").geturl()
    return str(request.getfixturevalue("mariadb").url())


@pytest.fixture
async def start_sidecar() -> AsyncIterator[StartSidecar]:
    """Starts the real aiohttp app on a loopback port in this test's event loop."""
    servers: list[TestServer] = []

    async def start(config: dict[str, Any]) -> RunningSidecar:
        server = TestServer(build_app(parse_config(config)), host="127.0.0.1", port=free_port())
        await server.start_server()
        servers.append(server)
        return RunningSidecar(server)

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def sidecar(start_sidecar: StartSidecar, tmp_path: Path) -> RunningSidecar:
    """The default set-up: one store `default` on SQLite."""
    return await start_sidecar(
        {"stores": {"default": {"backend": "sqlite", "sqlite": {"path": str(tmp_path / "c.db")}}}}
    )


@pytest.fixture
def sidecar_process(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], SidecarProcess]]:
    started: list[SidecarProcess] = []

    def make(config: dict[str, Any]) -> SidecarProcess:
        proc = SidecarProcess(config, tmp_path)
        started.append(proc)
        return proc

    yield make
    for proc in started:
        if proc.process is not None:
            proc.process.kill()
            proc.process.wait()
            proc.close_log()
