"""What a store's author may make the operator do with Secrets.

Whoever may create a ConversationStore in a namespace is not, for that alone, trusted
with the namespace's Secrets: the operator reads them with its own, wider rights. So a
Secret lends its values to a store only when it says so, by the annotation
`convostore.dev/allowed-stores` (a comma list of store names, or `*`), and each of its
values goes only to endpoints that Secret accepts.

Lending is decided per value and per destination, here and nowhere else. `flows` lists,
for every Secret value a spec uses, each endpoint that value will be sent to, and who
chose that endpoint: the spec's author (`redis.url`, Sentinel hosts, cluster seed nodes,
`openai.baseURL`, `compaction.baseURL`, a Dapr Component's host metadata) or a Secret (a
`urlSecretRef`, a `dsnSecretRef`, a Dapr `secretKeyRef`). `check_flows` then lets a value
go to an endpoint only when the Secret it comes from is the one that chose that endpoint,
or when that Secret lists the endpoint in `convostore.dev/allowed-endpoints` (comma list
of `scheme://host:port` origins). OpenAI's own API needs no listing for an API key. So
mixing Secrets gains nothing: a password taken from one Secret and sent to a host named
by another needs the first Secret's consent for that host.

Endpoints are normalised the way the client library that connects will read them: a
Redis URL through redis-py's own parser (its query parameters can move the host and port
or turn certificate checks off, so a URL with parameters beyond a few harmless ones has
no origin that can be listed), a PostgreSQL DSN by its hosts and ports, `host=` and
`port=` parameters included (a `service`, `servicefile`, `hostaddr` or `passfile`
parameter hides where it connects, so it too has no listable origin), a SQLAlchemy URL
by its dialect, host and port (any parameter but `charset` goes to its driver, and
could move it: unlistable). Sentinels and a
cluster's seed nodes are endpoints for both passwords: they name the servers the data
password goes to. A Dapr Component is sent by Dapr, not the operator, but the rule is the
same: its metadata fields that name a server (`DAPR_ENDPOINT_FIELDS`) are its endpoints.

The operator itself connects (to check a store, bootstrap its schema or purge it) only
to endpoints some Secret the store uses chose or lists (`unvouched`): a spec alone
cannot aim it at a service, and a store with no such Secret is checked by its sidecars.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from redis.connection import parse_url
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from .crd import GROUP
from .kube import StoredSecret
from .spec import SecretRef

ALLOWED_STORES = f"{GROUP}/allowed-stores"
ALLOWED_ENDPOINTS = f"{GROUP}/allowed-endpoints"
OPENAI_API = "https://api.openai.com"
DEFAULT_PORTS = {
    "https": 443,
    "http": 80,
    "redis": 6379,
    "rediss": 6379,
    "postgresql": 5432,
    "mysql": 3306,
    "mariadb": 3306,
}
UNLISTABLE = "unlistable://"
"""The origin of an endpoint that cannot be known before connecting: no Secret lists it."""
REDIS_QUERY_KEPT = frozenset({"db", "client_name", "socket_timeout", "socket_connect_timeout"})
"""Parameters that change neither where nor how securely redis-py connects. `protocol` is
not one: RESP3 lets a server redirect clients elsewhere (MOVING notifications)."""
POSTGRES_QUERY_HIDING = frozenset({"service", "servicefile", "hostaddr", "passfile"})
SQLALCHEMY_QUERY_KEPT = frozenset({"charset"})
"""The only URL parameter the sqlalchemy backend's drivers read that moves nothing: the
others go to the driver's `connect()` (a socket path, another host, TLS turned off)."""
DAPR_ENDPOINT_FIELDS = frozenset(
    name.lower()
    for name in (
        "redisHost",
        "host",
        "hosts",
        "server",
        "servers",
        "url",
        "endpoint",
        "address",
        "addresses",
        "connectionString",
        "accountName",
        "baseUrl",
        "brokers",
        "nodes",
        "uri",
        "dsn",
    )
)


class NotAllowed(Exception):
    """A Secret that does not lend itself to this store, or not to that endpoint."""


@dataclass(frozen=True)
class Endpoint:
    """Where a value goes: `field` says where the spec names it, `chosen_by` the secret
    ref whose value named it (None when the spec's author wrote it)."""

    field: str
    origin: str
    chosen_by: str | None = None


@dataclass(frozen=True)
class Flow:
    """One Secret value (by its ref name in `spec.secret_refs`) and where it goes."""

    ref: str
    endpoints: tuple[Endpoint, ...]
    openai_key: bool = False


def check_lent(secret: str, stored: StoredSecret, store: str) -> None:
    allowed = [s.strip() for s in stored.annotations.get(ALLOWED_STORES, "").split(",")]
    if "*" not in allowed and store not in allowed:
        raise NotAllowed(
            f"Secret {secret!r} does not allow store {store!r} to use it: annotate it with "
            f"{ALLOWED_STORES}: {store} (or *)"
        )


def origin(url: str) -> str:
    """`scheme://host:port` of an HTTP(S) URL or an entry of `allowed-endpoints`."""
    parts = urlsplit(url.strip())
    try:
        port = parts.port or DEFAULT_PORTS.get(parts.scheme, 0)
    except ValueError:
        return UNLISTABLE + url
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


def redis_origin(url: str) -> str:
    """Where redis-py will connect for `url`, with TLS or not; unlistable when its query
    parameters may change the host, the port or the certificate checks."""
    try:
        options = parse_url(url.strip())  # type: ignore[no-untyped-call]
    except ValueError:
        return UNLISTABLE + url
    query = parse_qs(urlsplit(url.strip()).query)
    if set(query) - REDIS_QUERY_KEPT or "path" in options:
        return UNLISTABLE + url
    scheme = urlsplit(url.strip()).scheme
    host = str(options.get("host", "localhost")).lower()
    return f"{scheme}://{host}:{options.get('port', 6379)}"


def postgres_origins(dsn: str) -> list[str]:
    """Every `postgresql://host:port` a DSN may connect to, as libpq and asyncpg read it."""
    parts = urlsplit(dsn.strip())
    query = parse_qs(parts.query)
    if set(query) & POSTGRES_QUERY_HIDING:
        return [UNLISTABLE + dsn]
    try:
        netloc = [_host_port(entry) for entry in parts.netloc.rpartition("@")[2].split(",")]
    except ValueError:
        return [UNLISTABLE + dsn]
    hosts = [h for q in query.get("host", []) for h in q.split(",")] or [h for h, _ in netloc]
    ports = [p for q in query.get("port", []) for p in q.split(",")] or [p for _, p in netloc]
    found = []
    for index, host in enumerate(hosts):
        port = ports[index] if index < len(ports) else (ports[-1] if len(ports) == 1 else "")
        host = host.lower() or "localhost"
        if host.startswith("/") or not re.fullmatch(r"[0-9]*", port):
            return [UNLISTABLE + dsn]
        found.append(f"postgresql://{host}:{port or DEFAULT_PORTS['postgresql']}")
    return found


def sqlalchemy_origin(url: str) -> str:
    """`dialect://host:port` a SQLAlchemy URL connects to; unlistable when it has
    parameters its driver may read as another place to connect, or no host (a socket, a
    file). The URL itself is never kept: it may hold a password."""
    try:
        parsed = make_url(url.strip())
    except ArgumentError:
        return UNLISTABLE + "sqlalchemy"
    backend, host = parsed.get_backend_name(), (parsed.host or "").lower()
    if set(parsed.query) - SQLALCHEMY_QUERY_KEPT or not host or backend == "sqlite":
        return UNLISTABLE + "sqlalchemy"
    return f"{backend}://{host}:{parsed.port or DEFAULT_PORTS.get(backend, 0)}"


def _host_port(entry: str) -> tuple[str, str]:
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, rest.removeprefix(":")
    host, _, port = entry.partition(":")
    return host, port


def dapr_origins(value: str) -> list[str]:
    """The servers a Dapr metadata value names: a URL's origin, a key=value connection
    string's host and port, or `host[:port]` entries (comma list); scheme-less."""
    value = value.strip()
    if "://" in value:
        parts = urlsplit(value)
        try:
            port = parts.port
        except ValueError:
            return [UNLISTABLE + value]
        return [f"{(parts.hostname or '').lower()}" + (f":{port}" if port else "")]
    if "=" in value:
        pairs = dict(re.findall(r"(\w+)\s*=\s*'?([^\s;']*)", value))
        host = pairs.get("host") or pairs.get("Host") or pairs.get("server")
        if not host:
            return [UNLISTABLE + value]
        port = pairs.get("port") or pairs.get("Port")
        return [host.lower() + (f":{port}" if port else "")]
    return [entry.strip().lower() for entry in value.split(",") if entry.strip()]


def flows(spec: dict[str, Any], secrets: dict[str, str]) -> list[Flow]:
    """Every Secret value the spec uses (by ref name), with every endpoint it goes to."""
    backend = spec["backend"]
    section = spec.get(backend, {})
    found: list[Flow] = []
    if backend in ("redis", "postgres"):
        found += _database_flows(backend, section, secrets, f"spec.{backend}", "")
    if backend == "sqlalchemy":
        ref = "urlSecretRef"
        data = (Endpoint(f"the URL of {ref}", sqlalchemy_origin(secrets.get(ref, "")), ref),)
        found += [Flow(name, data) for name in (ref, "passwordSecretRef", "caSecretRef")]
    if backend == "openai":
        found.append(_openai_flow(section.get("baseURL"), "spec.openai.baseURL", "apiKeySecretRef"))
        mapping = section.get("mapping", {})
        if mapping.get("backend") in ("redis", "postgres"):
            mapped = mapping["backend"]
            where = f"spec.openai.mapping.{mapped}"
            found += _database_flows(mapped, mapping.get(mapped, {}), secrets, where, "mapping.")
    if backend == "dapr":
        found += _dapr_flows(section.get("component", {}), secrets)
    if "compaction" in spec:
        base = spec["compaction"].get("baseURL")
        found.append(_openai_flow(base, "spec.compaction.baseURL", "compaction.apiKeySecretRef"))
    return found


def _openai_flow(base: str | None, field: str, ref: str) -> Flow:
    if base is None:
        return Flow(ref, (Endpoint("OpenAI's API", origin(OPENAI_API)),), openai_key=True)
    return Flow(ref, (Endpoint(field, origin(base)),), openai_key=True)


def _database_flows(
    backend: str, section: dict[str, Any], secrets: dict[str, str], where: str, prefix: str
) -> list[Flow]:
    if backend == "postgres":
        dsns = {f"{prefix}dsnSecretRef": secrets.get(f"{prefix}dsnSecretRef", "")}
        if f"{prefix}directDsnSecretRef" in secrets:  # past a pooler, for migrations
            dsns[f"{prefix}directDsnSecretRef"] = secrets[f"{prefix}directDsnSecretRef"]
        data = tuple(
            Endpoint(f"the DSN of {ref}", o, ref)
            for ref, dsn in dsns.items()
            for o in postgres_origins(dsn)
        )
        names = ("dsnSecretRef", "directDsnSecretRef", "passwordSecretRef", "caSecretRef")
        return [Flow(f"{prefix}{name}", data) for name in names]
    data = tuple(_redis_endpoints(section, secrets, where, prefix))
    refs = ("urlSecretRef", "passwordSecretRef", "caSecretRef")
    found = [Flow(f"{prefix}{ref}", data) for ref in refs]
    if "sentinel" in section:
        found.append(Flow(f"{prefix}sentinel.passwordSecretRef", data))
    return found


def _redis_endpoints(
    section: dict[str, Any], secrets: dict[str, str], where: str, prefix: str
) -> Iterator[Endpoint]:
    if "url" in section:
        yield Endpoint(f"{where}.url", redis_origin(section["url"]))
    elif f"{prefix}urlSecretRef" in secrets:
        ref = f"{prefix}urlSecretRef"
        yield Endpoint(f"the URL of {ref}", redis_origin(secrets[ref]), ref)
    elif "cluster" in section:
        scheme = "rediss" if section["cluster"].get("tls") else "redis"
        for n, node in enumerate(section["cluster"]["nodes"]):
            yield Endpoint(f"{where}.cluster.nodes[{n}]", redis_origin(f"{scheme}://{node}"))
    for n, host in enumerate(section.get("sentinel", {}).get("hosts", [])):
        yield Endpoint(f"{where}.sentinel.hosts[{n}]", redis_origin(f"redis://{host}"))


def _dapr_flows(component: dict[str, Any], secrets: dict[str, str]) -> list[Flow]:
    endpoints: list[Endpoint] = []
    metadata = component.get("metadata", [])
    for index, item in enumerate(metadata):
        if item["name"].lower() not in DAPR_ENDPOINT_FIELDS:
            continue
        field = f"spec.dapr.component.metadata[{index}] ({item['name']})"
        if "value" in item:
            endpoints += [Endpoint(field, o) for o in dapr_origins(item["value"])]
        else:
            ref = f"component.{index}"
            endpoints += [Endpoint(field, o, ref) for o in dapr_origins(secrets.get(ref, ""))]
    return [
        Flow(f"component.{index}", tuple(endpoints))
        for index, item in enumerate(metadata)
        if "secretKeyRef" in item
    ]


def check_flows(
    spec: dict[str, Any],
    refs: dict[str, SecretRef],
    lent: dict[str, StoredSecret],
    secrets: dict[str, str],
) -> None:
    """Raises NotAllowed for the first Secret value that would reach an endpoint its own
    Secret neither chose nor lists."""
    for flow in flows(spec, secrets):
        if flow.ref not in refs:
            continue
        secret = refs[flow.ref].name
        for endpoint in flow.endpoints:
            if endpoint.chosen_by is not None and refs[endpoint.chosen_by].name == secret:
                continue
            if flow.openai_key and endpoint.origin == origin(OPENAI_API):
                continue
            if not listed(lent[secret], endpoint.origin):
                raise NotAllowed(
                    f"Secret {secret!r} does not let its values go to {_shown(endpoint)} "
                    f"(from {endpoint.field}): add it to the Secret's {ALLOWED_ENDPOINTS}"
                )


def unvouched(
    spec: dict[str, Any],
    refs: dict[str, SecretRef],
    lent: dict[str, StoredSecret],
    secrets: dict[str, str],
) -> list[Endpoint]:
    """The endpoints the operator's own check or purge would connect to that no Secret
    the store uses chose or lists. The operator does not connect to those: otherwise a
    store's author could aim it at any service its network reaches."""
    names = {ref.name for ref in refs.values()}
    found = []
    for flow in flows(spec, secrets):
        for endpoint in flow.endpoints:
            if endpoint.chosen_by is not None or endpoint in found:
                continue
            if flow.openai_key and endpoint.origin == origin(OPENAI_API):
                continue
            if not any(listed(lent[name], endpoint.origin) for name in names):
                found.append(endpoint)
    return found


def _shown(endpoint: Endpoint) -> str:
    if endpoint.origin.startswith(UNLISTABLE):
        return (
            "an endpoint whose query parameters may change where or how it connects (no "
            "Secret can list it; drop those parameters)"
        )
    return endpoint.origin if endpoint.chosen_by is None else "the endpoint another Secret names"


def listed(stored: StoredSecret, endpoint: str) -> bool:
    """Whether the Secret's `allowed-endpoints` names `endpoint`; a scheme-less endpoint
    (a Dapr host) matches an entry with its host and, when it has one, its port."""
    if endpoint.startswith(UNLISTABLE):
        return False
    entries = [e.strip() for e in stored.annotations.get(ALLOWED_ENDPOINTS, "").split(",")]
    origins = {origin(e) for e in entries if e}
    if "://" in endpoint:
        return endpoint in origins
    host, _, port = endpoint.partition(":")
    for entry in origins:
        parts = urlsplit(entry)
        if parts.hostname == host and (not port or str(parts.port) == port):
            return True
    return False
