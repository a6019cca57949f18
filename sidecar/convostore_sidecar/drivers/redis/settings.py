"""A Redis store's settings: one server by URL, the primary the Sentinels name, or a
Redis Cluster."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...sections import Section


@dataclass(frozen=True)
class Settings:
    url: str = "redis://127.0.0.1:6379/0"
    username: str | None = None
    password_file: str | None = None
    key_prefix: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    connect_timeout: float = 1.0
    timeout: float = 2.0
    max_connections: int = 64
    idle_timeout: float = 30.0
    """Connections are closed once the store has made no call for this long, so an idle
    sidecar holds none: in a fleet every pod's connections add up on the server."""
    wait_replicas: int = 0
    """Appends and clears are answered only once this many replicas hold them (WAIT)."""
    wait_timeout: float = 1.0
    sentinel: SentinelSettings | None = None
    """Where the primary is found when Sentinels watch it (instead of `url`)."""
    cluster: ClusterSettings | None = None
    """The seed nodes of a Redis Cluster (instead of `url`)."""

    @classmethod
    def parse(cls, s: Section) -> Settings:
        url = s.string("url", cls.url)
        if not url.startswith(("redis://", "rediss://", "unix://")):
            s.fail("url", "must start with redis://, rediss:// or unix://")
        prefix = s.string("keyPrefix")
        if prefix is not None and ("{" in prefix or "}" in prefix):
            s.fail("keyPrefix", "must not contain { or }: they would break the hash tags")
        sentinel = SentinelSettings.parse(s.section("sentinel")) if s.has("sentinel") else None
        cluster = ClusterSettings.parse(s.section("cluster")) if s.has("cluster") else None
        if sentinel is not None and s.has("url"):
            s.fail("sentinel", "give either url or sentinel: the Sentinels name the primary")
        if sentinel is not None and s.has("tls"):
            s.fail("tls", "TLS to Sentinel-watched servers is not supported yet")
        if cluster is not None and (s.has("url") or sentinel is not None):
            s.fail("cluster", "give one of url, sentinel and cluster")
        tls = s.section("tls")
        settings = cls(
            sentinel=sentinel,
            cluster=cluster,
            url=url,
            username=s.string("username"),
            password_file=s.string("passwordFile"),
            key_prefix=prefix,
            ca_file=tls.string("caFile"),
            cert_file=tls.string("certFile"),
            key_file=tls.string("keyFile"),
            connect_timeout=s.duration("connectTimeout", cls.connect_timeout, low=0.01, high=60),
            timeout=s.duration("timeout", cls.timeout, low=0.01, high=300),
            max_connections=s.integer("maxConnections", cls.max_connections, low=1, high=10_000),
            idle_timeout=s.duration("idleTimeout", cls.idle_timeout, low=0.1, high=86_400),
            wait_replicas=s.integer("waitReplicas", cls.wait_replicas, low=0, high=100),
            wait_timeout=s.duration("waitTimeout", cls.wait_timeout, low=0.001, high=300),
        )
        tls.done()
        if settings.wait_replicas and settings.wait_timeout >= settings.timeout:
            s.fail("waitTimeout", f"must be shorter than timeout ({settings.timeout:g}s)")
        if (settings.ca_file or settings.cert_file) and not settings.tls:
            s.fail("tls", "TLS files need a rediss:// url (or cluster.tls: true)")
        return settings

    @property
    def tls(self) -> bool:
        if self.cluster is not None:
            return self.cluster.tls
        return self.url.startswith("rediss://")


HOST_PORT = re.compile(
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]+)):(?P<port>[0-9]{1,5})"
)
SERVICE_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")


@dataclass(frozen=True)
class SentinelSettings:
    hosts: tuple[tuple[str, int], ...]
    service_name: str
    database: int = 0
    username: str | None = None
    """For the Sentinels themselves; `redis.username` and `passwordFile` are the data
    nodes'."""
    password_file: str | None = None

    @classmethod
    def parse(cls, s: Section) -> SentinelSettings:
        parsed = _host_ports(s, "hosts", "Sentinels")
        service = s.string("serviceName", pattern=SERVICE_NAME)
        if service is None:
            s.fail("serviceName", "is required: the name the Sentinels monitor the primary by")
        settings = cls(
            hosts=parsed,
            service_name=service,
            database=s.integer("database", 0, low=0, high=10_000),
            username=s.string("username"),
            password_file=s.string("passwordFile"),
        )
        s.done()
        return settings


@dataclass(frozen=True)
class ClusterSettings:
    nodes: tuple[tuple[str, int], ...]
    """Where the client first asks for the cluster's layout; it learns the rest."""
    tls: bool = False

    @classmethod
    def parse(cls, s: Section) -> ClusterSettings:
        settings = cls(nodes=_host_ports(s, "nodes", "seed nodes"), tls=s.boolean("tls", False))
        s.done()
        return settings


def _host_ports(s: Section, name: str, what: str) -> tuple[tuple[str, int], ...]:
    entries = s.raw(name)
    if not isinstance(entries, list) or not 1 <= len(entries) <= 16:
        s.fail(name, f"must list 1 to 16 {what} as host:port, got {entries!r}")
    parsed = []
    for entry in entries:
        match = HOST_PORT.fullmatch(entry) if isinstance(entry, str) else None
        if match is None or not 0 < int(match["port"]) < 65536:
            s.fail(name, f"each must be host:port (a name, an IPv4 or [IPv6]), got {entry!r}")
        parsed.append((match["v6"] or match["host"], int(match["port"])))
    return tuple(parsed)
