"""What a store's author may make the operator do with Secrets.

Whoever may create a ConversationStore in a namespace is not, for that alone, trusted
with the namespace's Secrets: the operator reads them with its own, wider rights. So a
Secret lends its values to a store only when it says so, by the annotation
`convostore.dev/allowed-stores` (a comma list of store names, or `*`), and its values go
only to the endpoints it names. An endpoint that comes from a Secret (a DSN, a
`urlSecretRef`) was chosen by whoever wrote that Secret; an endpoint written in the spec
itself (`redis.url`, `openai.baseURL`, `compaction.baseURL`) can receive a Secret's
credentials only if that Secret lists it in `convostore.dev/allowed-endpoints` (comma
list of `scheme://host:port` origins). OpenAI's own API needs no listing. Sentinels
(`redis.sentinel.hosts`) count as `redis://host:port` endpoints for both passwords: they
name the primary the data nodes' password goes to, so whoever picks the Sentinels picks
that server too. A cluster's seed nodes (`redis.cluster.nodes`) count the same way, as
`rediss://` with `tls`: they name the other nodes.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from .crd import GROUP
from .kube import StoredSecret

ALLOWED_STORES = f"{GROUP}/allowed-stores"
ALLOWED_ENDPOINTS = f"{GROUP}/allowed-endpoints"
OPENAI_API = "https://api.openai.com"
DEFAULT_PORTS = {"https": 443, "http": 80, "redis": 6379, "rediss": 6379}


class NotAllowed(Exception):
    """A Secret that does not lend itself to this store, or not to that endpoint."""


def check_lent(secret: str, stored: StoredSecret, store: str) -> None:
    allowed = [s.strip() for s in stored.annotations.get(ALLOWED_STORES, "").split(",")]
    if "*" not in allowed and store not in allowed:
        raise NotAllowed(
            f"Secret {secret!r} does not allow store {store!r} to use it: annotate it with "
            f"{ALLOWED_STORES}: {store} (or *)"
        )


def origin(url: str) -> str:
    parts = urlsplit(url.strip())
    port = parts.port or DEFAULT_PORTS.get(parts.scheme, 0)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


def spec_endpoints(spec: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    """(field, endpoint, the secret_refs names whose values go there) for every endpoint
    written in the spec itself."""
    section = spec.get(spec["backend"], {})
    found = []
    if spec["backend"] == "redis":
        found += _redis_endpoints(section, "spec.redis", "")
    if spec["backend"] == "openai":
        base = section.get("baseURL")
        if base and origin(base) != origin(OPENAI_API):
            found.append(("spec.openai.baseURL", base, ["apiKeySecretRef"]))
        mapping = section.get("mapping", {})
        if mapping.get("backend") == "redis":
            found += _redis_endpoints(
                mapping.get("redis", {}), "spec.openai.mapping.redis", "mapping."
            )
    base = spec.get("compaction", {}).get("baseURL")
    if base and origin(base) != origin(OPENAI_API):
        found.append(("spec.compaction.baseURL", base, ["compaction.apiKeySecretRef"]))
    return found


def _redis_endpoints(
    section: dict[str, Any], where: str, prefix: str
) -> list[tuple[str, str, list[str]]]:
    if "url" in section:
        refs = [f"{prefix}passwordSecretRef", f"{prefix}caSecretRef"]
        return [(f"{where}.url", section["url"], refs)]
    if "cluster" in section:
        refs = [f"{prefix}passwordSecretRef", f"{prefix}caSecretRef"]
        scheme = "rediss" if section["cluster"].get("tls") else "redis"
        nodes = section["cluster"]["nodes"]
        return [
            (f"{where}.cluster.nodes[{n}]", f"{scheme}://{node}", refs)
            for n, node in enumerate(nodes)
        ]
    refs = [f"{prefix}passwordSecretRef", f"{prefix}sentinel.passwordSecretRef"]
    hosts = section.get("sentinel", {}).get("hosts", [])
    return [
        (f"{where}.sentinel.hosts[{n}]", f"redis://{host}", refs) for n, host in enumerate(hosts)
    ]


def check_endpoint(secret: str, stored: StoredSecret, field: str, endpoint: str) -> None:
    listed = {
        origin(entry)
        for entry in stored.annotations.get(ALLOWED_ENDPOINTS, "").split(",")
        if entry.strip()
    }
    if origin(endpoint) not in listed:
        raise NotAllowed(
            f"Secret {secret!r} does not let its values go to {origin(endpoint)} (from "
            f"{field}): add it to the Secret's {ALLOWED_ENDPOINTS}"
        )
