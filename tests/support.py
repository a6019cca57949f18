"""Helpers shared by the tests: unique names, running sidecars in-process and as processes."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import inspect
import json
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import asyncpg
import yaml
from agents import function_tool
from agents.extensions.memory import SQLAlchemySession
from aiohttp import web
from aiohttp.test_utils import TestServer
from convostore import SidecarSession
from convostore_sidecar.config import parse_config
from convostore_sidecar.drivers import BACKENDS as DECLARED
from convostore_sidecar.drivers.sqlalchemy.tables import tables
from convostore_sidecar.http.state import STORES
from convostore_sidecar.migrate import migrate_store
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from sqlalchemy import String, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tests.servers import free_port

BACKENDS = tuple(DECLARED)
REDIS_CLUSTER = "redis-cluster"
"""The Redis driver on a Redis Cluster: the conformance suite runs it as a backend."""
POSTGRES_POOLED = "postgres-pgbouncer"
"""The PostgreSQL driver through PgBouncer in transaction mode, as Kubernetes operators
put it in front of PostgreSQL: the conformance suite runs it as a backend."""
SQLALCHEMY_POSTGRES = "sqlalchemy-postgres"
SQLALCHEMY_SQLITE = "sqlalchemy-sqlite"
"""The `sqlalchemy` driver on PostgreSQL and on SQLite (its own backend name runs it on
MariaDB): the conformance suite runs each as a backend."""
LACKS = {
    name: frozenset(c for c in ("retention", "encryption") if not backend.has(c))
    | (frozenset() if backend.exact_json else {"any_json"})
    for name, backend in DECLARED.items()
}
"""What a backend cannot do, by the conformance marker (or `encryption`) that needs it,
as its driver declares it."""


def direct_dsn(store: dict[str, Any]) -> str:
    """Where a test reaches a postgres store's database itself: past the pooler, if any."""
    settings: dict[str, str] = store["postgres"]
    return settings.get("directDsn", settings["dsn"])


async def sqlalchemy_items(store: dict[str, Any], session_id: str) -> list[tuple[int, bytes]]:
    """A session's stored (seq, bytes) in a `sqlalchemy` store's own table, oldest first."""
    settings = store["sqlalchemy"]
    items = tables(settings["tablePrefix"]).items
    engine = create_async_engine(settings["url"])
    try:
        async with engine.connect() as conn:
            query = select(items.c.seq, items.c.data).where(items.c.session_id == session_id)
            rows = (await conn.execute(query.order_by(items.c.seq))).all()
    finally:
        await engine.dispose()
    return [(int(seq), bytes(data)) for seq, data in rows]


async def overwrite_sqlalchemy_items(
    store: dict[str, Any], session_id: str, data: dict[int, bytes]
) -> None:
    """Put other bytes in place of stored items (by seq), as someone with write access
    to the database could."""
    settings = store["sqlalchemy"]
    items = tables(settings["tablePrefix"]).items
    engine = create_async_engine(settings["url"])
    try:
        async with engine.begin() as conn:
            for seq, value in data.items():
                mine = (items.c.session_id == session_id) & (items.c.seq == seq)
                await conn.execute(update(items).where(mine).values(data=value))
    finally:
        await engine.dispose()


def migrate(config: dict[str, Any]) -> None:
    """What `convostore migrate` (or the operator) does before sidecars serve the
    config's stores; callable from a running event loop."""

    async def run() -> None:
        for store in parse_config(config).stores.values():
            await migrate_store(store)

    with ThreadPoolExecutor(1) as thread:
        thread.submit(asyncio.run, run()).result()


def backends_with(*capabilities: str) -> tuple[str, ...]:
    return tuple(b for b in BACKENDS if not LACKS.get(b, frozenset()) & set(capabilities))


@function_tool
def lookup_weather(city: str) -> str:
    """Weather for a city: the tool the scripted agents in the tests call."""
    return f"sunny in {city}"


def unique(prefix: str = "s") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class RunningSidecar:
    def __init__(self, server: TestServer) -> None:
        self.server = server
        self.app: web.Application = server.app
        self.url = str(server.make_url("")).rstrip("/")


StartSidecar = Callable[..., Awaitable[RunningSidecar]]


@dataclass
class Subject:
    """A sidecar serving one store `conf` on the backend under test."""

    backend: str
    sidecar: RunningSidecar
    store_config: dict[str, Any]

    def session(self, session_id: str | None = None) -> SidecarSession:
        return SidecarSession(session_id or unique(), "conf", url=self.sidecar.url)

    def item(self, **fields: Any) -> dict[str, Any]:
        """An item carrying `fields`, in a shape the backend accepts: any JSON object,
        or for `openai` a user message whose text is the fields as JSON."""
        if self.backend == "openai":
            return {"role": "user", "content": json.dumps(fields)}
        return fields

    def value(self, item: dict[str, Any] | None) -> dict[str, Any] | None:
        """The fields an item read back carries (`openai` stores a message item)."""
        if item is None or self.backend != "openai":
            return item
        assert item["type"] == "message", item
        assert item["id"].startswith("msg_"), item
        fields: dict[str, Any] = json.loads(item["content"][0]["text"])
        return fields

    def values(self, items: list[Any]) -> list[dict[str, Any] | None]:
        return [self.value(item) for item in items]

    @property
    def driver(self) -> Any:
        from convostore_sidecar.http.state import STORES

        return self.sidecar.app[STORES].get("conf").driver


class SidecarProcess:
    """`convostore sidecar` run as a real process, as in a pod. Its log goes to a file:
    a pipe nobody reads fills up, and the sidecar would then stop in mid-write."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        name = f"sidecar-{uuid.uuid4().hex[:6]}"
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"{name}.log"
        self._log: TextIO | None = None
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[str] | None = None

    def start(self, *extra: str) -> None:
        self._log = self.log_path.open("a")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "convostore",
                "sidecar",
                "--config",
                str(self.config_path),
                "--port",
                str(self.port),
                *extra,
            ],
            cwd=self.workdir,
            stderr=self._log,
            text=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sidecar exited: {self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("sidecar did not start")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        code = self.process.wait(timeout=30)
        self.close_log()
        self.process = None
        return code

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


class Lure:
    """A TCP listener standing in for an attacker's server, or an internal service an
    attacker points the operator at: it counts who connects and keeps every byte they
    send, answering `reply` to each chunk (nothing by default)."""

    def __init__(self, reply: bytes = b"") -> None:
        self.reply = reply
        self.received = bytearray()
        self.connections = 0
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Lure:
        self.server = await asyncio.start_server(self._caught, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _caught(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(4096):
                self.received += chunk
                writer.write(self.reply)
        writer.close()

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def eventually(check: Callable[[], Any], within: float = 20.0) -> Any:
    """Poll `check` (a function, or a coroutine function) until it returns something
    truthy (and return that)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await result
        except (KeyError, AssertionError):
            result = None
        if result:
            return result
        assert asyncio.get_running_loop().time() < deadline, "the condition was never met"
        await asyncio.sleep(0.1)


async def make_sdk_tables_on_mysql(
    engine: AsyncEngine,
    sessions_table: str = "agent_sessions",
    messages_table: str = "agent_messages",
) -> None:
    """The Agents SDK's `SQLAlchemySession` tables, made as a MySQL or MariaDB user has
    to: its `create_tables=True` asks for `VARCHAR` without a length, which both refuse."""
    session = SQLAlchemySession(
        "tables", engine=engine, sessions_table=sessions_table, messages_table=messages_table
    )
    for table in (session._sessions, session._messages):
        for column in table.columns:
            if isinstance(column.type, String) and column.type.length is None:
                column.type.length = 255
    async with engine.begin() as conn:
        await conn.run_sync(session._metadata.create_all)


async def raw_contents(sidecar: RunningSidecar) -> bytes:
    """Everything the store's backend holds for it, as the database returns it: every
    row of every table, every key's name and value."""
    driver: Any = sidecar.app[STORES].get("chat").driver
    while hasattr(driver, "inner"):  # within encryption and instrumentation
        driver = driver.inner
    kind = type(driver).__name__
    if kind == "SqliteDriver":
        path = driver._writer._settings.path
        with sqlite3.connect(path) as conn:
            tables = [
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            ]
            rows = [repr(conn.execute(f"SELECT * FROM {t}").fetchall()) for t in tables]
        return "".join(rows).encode()
    if kind == "PostgresDriver":
        conn = await asyncpg.connect(driver.settings.dsn)
        try:
            tables = await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = $1", driver.settings.schema
            )
            rows = [
                repr(await conn.fetch(f"SELECT * FROM {driver.settings.schema}.{t[0]}"))
                for t in tables
            ]
        finally:
            await conn.close()
        return "".join(rows).encode()
    if kind == "SqlAlchemyDriver":
        engine = await driver._connections._get_engine()
        async with engine.connect() as conn:
            rows = [
                repr((await conn.execute(table.select())).all())
                for table in driver.t.metadata.sorted_tables
            ]
        return "".join(rows).encode()
    assert kind == "RedisDriver"
    found = []
    async for key in driver.client.scan_iter(match=driver.prefix + "*"):
        found.append(key)
        kind_of = (await driver.client.type(key)).decode()
        if kind_of == "list":
            found += await driver.client.lrange(key, 0, -1)
        elif kind_of == "hash":
            for field, value in (await driver.client.hgetall(key)).items():
                found += [field, value]
        elif kind_of == "zset":
            found += await driver.client.zrange(key, 0, -1)
        elif kind_of == "string":
            found.append(await driver.client.get(key))
    return b"".join(found)


@dataclass
class Receiver:
    url: str
    spans: list[Span] = field(default_factory=list)
    resources: list[dict[str, Any]] = field(default_factory=list)
    """The resource attributes of each export (`service.name`, ...)."""


def attributes(holder: Any) -> dict[str, Any]:
    """A span's or a resource's attributes, as plain values."""
    found: dict[str, Any] = {}
    for attribute in holder.attributes:
        value = attribute.value
        found[attribute.key] = getattr(value, value.WhichOneof("value") or "string_value")
    return found


@contextlib.asynccontextmanager
async def otlp_receiver() -> AsyncIterator[Receiver]:
    """An OTLP/HTTP receiver on a loopback port: decodes each export as a collector
    would, and keeps the spans."""
    got = Receiver("")

    async def traces(request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        for resource_spans in export.resource_spans:
            got.resources.append(attributes(resource_spans.resource))
            for scope_spans in resource_spans.scope_spans:
                got.spans.extend(scope_spans.spans)
        answer = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=answer, content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    got.url = str(server.make_url("")).rstrip("/")
    try:
        yield got
    finally:  # a failed test's receiver closes too, not when collected in a later test
        await server.close()
