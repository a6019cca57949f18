"""A `sqlalchemy` store's settings, and what its URL says (dialect, hosts, TLS)."""

from __future__ import annotations

import re
import ssl as ssl_module
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from ...sections import is_loopback_host

if TYPE_CHECKING:
    from ...sections import Section

PREFIX = re.compile(r"[a-z_][a-z0-9_]{0,40}")
TESTED = {
    "mysql": "MariaDB 10.11 (tested); MySQL 8 (the same SQL, not tested here)",
    "mariadb": "MariaDB 10.11 (tested)",
    "postgresql": "PostgreSQL (tested)",
    "sqlite": "SQLite (tested)",
}
"""The dialects this backend was written for; any other SQLAlchemy asyncio dialect
should work, untested."""
TLS_MODES = ("disable", "verify-ca", "verify-full")


@dataclass(frozen=True)
class Settings:
    url: str = ""
    """`dialect+driver://user@host:port/database` as SQLAlchemy takes it; the password
    goes in `passwordFile` (or the whole URL in `urlFile`, a Secret's key)."""
    url_file: str | None = None
    password_file: str | None = None
    table_prefix: str = "convostore_"
    """The tables' names start with it: several stores' tables can share a database."""
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_mode: str | None = None
    """Unset: verified against the system's CAs (or `caFile`) beyond loopback, plain on
    loopback; `disable` sends the password unencrypted and must be asked for."""
    pool_max: int = 4
    """Connections per sidecar at most (see the PostgreSQL store's `poolMax`)."""
    idle_timeout: float = 30.0
    """After this long without a call, the sidecar closes its idle connections."""
    connect_timeout: float = 2.0
    statement_timeout: float = 5.0
    """How long a statement, or a wait for another writer's lock, may take."""

    @classmethod
    def parse(cls, s: Section) -> Settings:
        url, url_file = s.string("url"), s.string("urlFile")
        if (url is None) == (url_file is None):
            s.fail("url", "give exactly one of url and urlFile (a file holding the URL)")
        tls = s.section("tls")
        settings = cls(
            url=url or "",
            url_file=url_file,
            password_file=s.string("passwordFile"),
            table_prefix=s.string("tablePrefix", cls.table_prefix, pattern=PREFIX),
            ca_file=tls.string("caFile"),
            cert_file=tls.string("certFile"),
            key_file=tls.string("keyFile"),
            tls_mode=tls.choice("mode", TLS_MODES) if tls.has("mode") else None,
            pool_max=s.integer("poolMax", cls.pool_max, low=1, high=1000),
            idle_timeout=s.duration("idleTimeout", cls.idle_timeout, low=0.1, high=86_400),
            connect_timeout=s.duration("connectTimeout", cls.connect_timeout, low=0.1, high=60),
            statement_timeout=s.duration(
                "statementTimeout", cls.statement_timeout, low=0.01, high=3600
            ),
        )
        tls.done()
        if url is not None:
            problem = url_problem(url)
            if problem:
                s.fail("url", problem)
        if settings.tls_mode == "disable" and settings.ca_file:
            s.fail("tls.caFile", "verifies the server, which tls.mode: disable turns off")
        if bool(settings.cert_file) != bool(settings.key_file):
            s.fail("tls", "certFile and keyFile go together")
        return settings

    def target(self) -> URL:
        """The URL to connect to, with the password from its file; read at each new
        engine, so a rotated Secret is picked up when the idle pool is closed."""
        text = self.url or Path(str(self.url_file)).read_text("utf-8").strip()
        problem = url_problem(text)
        if problem:
            raise ValueError(f"urlFile {self.url_file!r}: {problem}")
        url = make_url(text)
        if self.password_file:
            url = url.set(password=Path(self.password_file).read_text("utf-8").strip())
        return url

    def ssl(self, url: URL) -> ssl_module.SSLContext | None:
        """TLS for the connections: verified (hostname too unless `verify-ca`) against
        `tls.caFile` or the system's CAs, which is the default beyond loopback; none on
        loopback or with `tls.mode: disable`."""
        host = url.host or ""
        if url.get_backend_name() == "sqlite" or self.tls_mode == "disable":
            return None
        if self.tls_mode is None and not self.ca_file and (not host or is_loopback_host(host)):
            return None
        context = ssl_module.create_default_context(cafile=self.ca_file)
        if self.tls_mode == "verify-ca":
            context.check_hostname = False
        if self.cert_file and self.key_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def connect_args(self, url: URL) -> dict[str, Any]:
        """What the dialect's DBAPI connect() takes for timeouts and TLS."""
        backend, context = url.get_backend_name(), self.ssl(url)
        if backend == "sqlite":
            return {"timeout": self.statement_timeout, "isolation_level": None}
        if backend == "postgresql":
            return {"timeout": self.connect_timeout, "ssl": context or False}
        args: dict[str, Any] = {"connect_timeout": self.connect_timeout}
        if context is not None:
            args["ssl"] = context
        return args


def url_problem(text: str) -> str | None:
    """Why a URL cannot name this store's database, or None."""
    try:
        url = make_url(text)
    except ArgumentError:
        return "is not a URL SQLAlchemy reads (dialect+driver://user@host:port/database)"
    if "+" not in url.drivername:
        return (
            f"names no driver: an asyncio one is needed, such as mysql+asyncmy, "
            f"postgresql+asyncpg or sqlite+aiosqlite (got {url.drivername!r})"
        )
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        return "must name a database file: an in-memory SQLite database is not shared"
    return None
