"""A PostgreSQL store's settings, and what its DSN says (hosts, TLS mode)."""

from __future__ import annotations

import re
import ssl as ssl_module
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from ...sections import is_loopback_host

if TYPE_CHECKING:
    from ...sections import Section


IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")


@dataclass(frozen=True)
class Settings:
    dsn: str = "postgresql://localhost/postgres"
    password_file: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    schema: str = "convostore"
    pool_min: int = 0
    """Connections kept open however idle the sidecar is: none, by default."""
    pool_max: int = 4
    """Connections per sidecar at most: one pod's agent rarely has more calls at once,
    and in a fleet every pod's connections add up on the server (or the pooler)."""
    idle_timeout: float = 30.0
    """A connection no call has used for this long is closed, so an idle sidecar holds
    none."""
    connect_timeout: float = 2.0
    statement_timeout: float = 5.0
    synchronous_commit: str | None = None
    """The sessions' `synchronous_commit`; unset, the server's (`on`: with a synchronous
    standby configured, a commit returns once the standby has it)."""
    transaction_pooler: bool = False
    """The DSN reaches PostgreSQL through a pooler in transaction mode (PgBouncer,
    CloudNativePG's `Pooler`): each call then runs in a transaction of its own, its
    settings `SET LOCAL`, with no prepared statement kept and no session state."""
    direct_dsn: str | None = None
    """A DSN straight to PostgreSQL, for migrations (`convostore migrate`, the operator),
    which take a session-level lock that no pooler in transaction mode would keep."""

    @classmethod
    def parse(cls, s: Section) -> Settings:
        dsn = s.string("dsn")
        if dsn is None:
            s.fail("dsn", "is required (postgresql://user@host:port/database)")
        if not dsn.startswith(("postgresql://", "postgres://")):
            s.fail("dsn", "must start with postgresql:// (the password may go in passwordFile)")
        tls = s.section("tls")
        settings = cls(
            dsn=dsn,
            password_file=s.string("passwordFile"),
            ca_file=tls.string("caFile"),
            cert_file=tls.string("certFile"),
            key_file=tls.string("keyFile"),
            schema=s.string("schema", cls.schema, pattern=IDENTIFIER),
            pool_min=s.integer("poolMin", cls.pool_min, low=0, high=100),
            pool_max=s.integer("poolMax", cls.pool_max, low=1, high=1000),
            idle_timeout=s.duration("idleTimeout", cls.idle_timeout, low=0.1, high=86_400),
            connect_timeout=s.duration("connectTimeout", cls.connect_timeout, low=0.1, high=60),
            statement_timeout=s.duration(
                "statementTimeout", cls.statement_timeout, low=0.01, high=3600
            ),
            synchronous_commit=(
                s.choice("synchronousCommit", SYNCHRONOUS_COMMIT)
                if s.has("synchronousCommit")
                else None
            ),
            transaction_pooler=s.boolean("transactionPooler", False),
            direct_dsn=s.string("directDsn"),
        )
        tls.done()
        if settings.transaction_pooler and settings.direct_dsn is None:
            s.fail(
                "directDsn",
                "is required with transactionPooler: migrations need a connection straight "
                "to PostgreSQL (a pooler in transaction mode drops their lock)",
            )
        if settings.direct_dsn is not None and not settings.direct_dsn.startswith(
            ("postgresql://", "postgres://")
        ):
            s.fail("directDsn", "must start with postgresql://")
        if settings.pool_min > settings.pool_max:
            s.fail("poolMin", f"must not exceed poolMax ({settings.pool_max})")
        targets = parse_qs(urlsplit(dsn).query).get("target_session_attrs", [None])[-1]
        if len(dsn_hosts(dsn)) > 1 and targets not in WRITABLE_TARGETS:
            s.fail(
                "dsn",
                "names several hosts: add target_session_attrs=read-write, so that the "
                "sidecar connects only to the one that accepts writes (the primary)",
            )
        mode = sslmode(dsn)
        if settings.ca_file and mode not in (None, "verify-full", "verify-ca"):
            s.fail("tls.caFile", f"verifies the server, which sslmode={mode} in the dsn turns off")
        if bool(settings.cert_file) != bool(settings.key_file):
            s.fail("tls", "certFile and keyFile go together")
        return settings

    def ssl(self) -> ssl_module.SSLContext | bool | None:
        """TLS for the pool. The DSN's own `sslmode` wins; a `tls.caFile` verifies the
        server against that CA; with neither, a server beyond loopback is verified
        against the system's CAs (libpq's default, `prefer`, would accept anyone who
        answers on the path) and a loopback one is reached without TLS."""
        mode = sslmode(self.dsn)
        if self.ca_file or (mode is None and not loopback_only(self.dsn)):
            context = ssl_module.create_default_context(cafile=self.ca_file)
            if mode == "verify-ca":
                context.check_hostname = False
            if self.cert_file and self.key_file:
                context.load_cert_chain(self.cert_file, self.key_file)
            return context
        return None if mode is not None else False


def sslmode(dsn: str) -> str | None:
    return parse_qs(urlsplit(dsn).query).get("sslmode", [None])[-1]


def dsn_hosts(dsn: str) -> list[str]:
    """Every host the DSN names: in its netloc (comma-separated, as libpq allows for
    failover) and in `host=` parameters; an empty name is the default host."""
    parts = urlsplit(dsn)
    hosts = parse_qs(parts.query).get("host", [])
    for entry in parts.netloc.rpartition("@")[2].split(","):
        if entry.startswith("["):
            hosts.append(entry[1 : entry.find("]")])
        else:
            hosts.append(entry.partition(":")[0])
    return hosts


def loopback_only(dsn: str) -> bool:
    """True when every host of the DSN is a loopback address or a unix socket."""
    return all(not h or h.startswith("/") or is_loopback_host(h) for h in dsn_hosts(dsn))


WRITABLE_TARGETS = ("read-write", "primary")
SYNCHRONOUS_COMMIT = ("remote_apply", "on", "remote_write", "local", "off")
