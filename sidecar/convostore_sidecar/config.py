"""The sidecar's configuration: one YAML or JSON file naming the stores it serves.

Every setting is validated at start-up, and an error names the store, the field and what
is allowed, so a typo in a mounted config fails the pod at once instead of at the first
conversation. Unknown fields are errors for the same reason. With no file at all the
sidecar serves one store, `default`, on SQLite at `./convostore.db`.

```yaml
listen: {host: 127.0.0.1, port: 8790, socket: /var/run/convostore/sidecar.sock}
auth: {tokenFile: /var/run/secrets/convostore/token}
stores:
  chat:
    backend: redis            # sqlite | redis | postgres | dapr | openai
    redis: {url: "redis://redis:6379/0"}
    ttl: 24h                  # idle time after which a session expires
    maxItems: 500             # older items are trimmed on append
    compaction: {apiKeyFile: /etc/keys/openai, trigger: {items: 10}, keepRecentTurns: 2}
    limits: {maxItemBytes: 1048576, maxRequestBytes: 8388608, maxItemsPerRequest: 1000}
```
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .compaction.settings import CompactionSettings
from .drivers import BACKENDS, Capability, parse_backend_settings
from .drivers.base import Retention
from .keyring import Keyring
from .labels import LabelRules
from .sections import ConfigError, Section

SETTINGS_NEEDING: dict[Capability, tuple[str, ...]] = {
    "retention": ("ttl", "maxItems"),
    "encryption": ("encryption",),
    "compaction": ("compaction",),
    "structure": ("labels",),
}
"""A store's settings that only a backend with the capability can honour."""
STORE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class Limits:
    max_item_bytes: int = 1 << 20
    max_request_bytes: int = 8 << 20
    max_items_per_request: int = 1000
    max_session_id_length: int = 256
    max_read_items: int = 10_000
    """A read (without `limit`, by turns, or widened to whole turns) returns at most
    this many of the latest items, and says so with `"truncated": true`."""
    max_read_bytes: int = 4 << 20
    """...and at most this many bytes of them, the same way: more than a model's
    context holds, and what keeps concurrent reads within the container's memory."""
    max_branches: int = 100
    """Branches holding items per session; each copies the history it starts from."""

    @classmethod
    def parse(cls, s: Section) -> Limits:
        limits = cls(
            max_item_bytes=s.integer("maxItemBytes", cls.max_item_bytes, low=2, high=64 << 20),
            max_request_bytes=s.integer(
                "maxRequestBytes", cls.max_request_bytes, low=16, high=256 << 20
            ),
            max_items_per_request=s.integer(
                "maxItemsPerRequest", cls.max_items_per_request, low=1, high=10_000
            ),
            max_session_id_length=s.integer(
                "maxSessionIdLength", cls.max_session_id_length, low=1, high=1024
            ),
            max_read_items=s.integer("maxReadItems", cls.max_read_items, low=1, high=1_000_000),
            max_read_bytes=s.integer("maxReadBytes", cls.max_read_bytes, low=1 << 10, high=1 << 30),
            max_branches=s.integer("maxBranches", cls.max_branches, low=1, high=100_000),
        )
        if limits.max_read_bytes < limits.max_item_bytes:
            s.fail(
                "maxReadBytes",
                f"is {limits.max_read_bytes}, less than maxItemBytes "
                f"({limits.max_item_bytes}): the latest item could not always be read",
            )
        s.done()
        return limits

    @property
    def most_read_bytes(self) -> int:
        """The most a read holds before it knows its answer: the cap and one item past it."""
        return self.max_read_bytes + self.max_item_bytes


@dataclass(frozen=True)
class StoreConfig:
    name: str
    backend: str
    settings: Any
    retention: Retention = field(default_factory=Retention)
    limits: Limits = field(default_factory=Limits)
    idempotency_ttl: float = 86400.0
    sweep_interval: float = 60.0
    encryption: Keyring | None = None
    scope: str | None = None
    """The namespace the operator rendered the store for; part of its identity."""
    compaction: CompactionSettings | None = None
    labels: LabelRules = field(default_factory=LabelRules)

    @property
    def identity(self) -> str:
        """What the store's data is keyed by in a shared backend: `<scope>/<name>`, so two
        stores of one name in two namespaces never share a session (just the name
        without a scope, as a sidecar run by hand has always keyed it)."""
        return f"{self.scope}/{self.name}" if self.scope else self.name


@dataclass(frozen=True)
class ListenConfig:
    host: str = "127.0.0.1"
    port: int = 8790
    socket: str | None = None
    socket_mode: int = 0o660
    tcp: bool = True
    health_port: int | None = None
    """A TCP port for the kubelet's probes, serving `/healthz` and `/readyz` alone."""
    health_host: str = "0.0.0.0"
    """The kubelet probes the pod's IP, so by default every address."""
    health_metrics: bool = False
    """Serve `/metrics` on the health port too, for Prometheus to scrape a pod's sidecar."""

    @classmethod
    def parse(cls, s: Section) -> ListenConfig:
        listen = cls(
            host=s.string("host", cls.host),
            port=s.integer("port", cls.port, low=0, high=65535),
            socket=s.string("socket"),
            socket_mode=s.integer("socketMode", cls.socket_mode, low=0, high=0o777),
            tcp=s.boolean("tcp", True),
            health_port=(
                s.integer("healthPort", 0, low=1, high=65535) if s.has("healthPort") else None
            ),
            health_host=s.string("healthHost", cls.health_host),
            health_metrics=s.boolean("healthMetrics", False),
        )
        s.done()
        return listen


@dataclass(frozen=True)
class RequestLimits:
    """What one sidecar takes on at once, whatever its stores: API calls past
    `max_concurrent`, or bodies past `max_buffered_bytes` all together, get 503; reads
    wait while their answers would pass `max_buffered_read_bytes`; connections past
    `max_connections` are answered 503 and closed; a request's headers must arrive
    within `idle_timeout` of the connection opening or of the last answer on it (which
    also closes idle connections), its body within `body_timeout`, and an answer must be
    taken within `body_timeout` too."""

    max_concurrent: int = 64
    body_timeout: float = 30.0
    max_buffered_bytes: int = 24 << 20
    max_buffered_read_bytes: int = 16 << 20
    max_connections: int = 256
    idle_timeout: float = 30.0

    @classmethod
    def parse(cls, s: Section) -> RequestLimits:
        """The section's fields; `done()` is left to the caller, which checks each
        store against them first (`check_room_for`)."""
        return cls(
            max_concurrent=s.integer("maxConcurrent", cls.max_concurrent, low=1, high=100_000),
            body_timeout=s.duration("bodyTimeout", cls.body_timeout, low=0.1, high=3600),
            max_buffered_bytes=s.integer(
                "maxBufferedBytes", cls.max_buffered_bytes, low=1 << 10, high=4 << 30
            ),
            max_buffered_read_bytes=s.integer(
                "maxBufferedReadBytes", cls.max_buffered_read_bytes, low=1 << 10, high=4 << 30
            ),
            max_connections=s.integer("maxConnections", cls.max_connections, low=1, high=100_000),
            idle_timeout=s.duration("idleTimeout", cls.idle_timeout, low=0.1, high=3600),
        )

    def check_room_for(self, store: StoreConfig, s: Section) -> None:
        """Refuses budgets that a store's largest request or read could never fit in."""
        if store.limits.max_request_bytes > self.max_buffered_bytes:
            s.fail(
                "maxBufferedBytes",
                f"is {self.max_buffered_bytes}, less than store {store.name!r}'s "
                f"limits.maxRequestBytes ({store.limits.max_request_bytes}): "
                "its largest request could never be taken",
            )
        if store.limits.most_read_bytes > self.max_buffered_read_bytes:
            s.fail(
                "maxBufferedReadBytes",
                f"is {self.max_buffered_read_bytes}, less than store {store.name!r}'s "
                f"limits.maxReadBytes and maxItemBytes together "
                f"({store.limits.most_read_bytes}): its largest read could never be taken",
            )


@dataclass(frozen=True)
class SidecarConfig:
    stores: dict[str, StoreConfig]
    listen: ListenConfig = field(default_factory=ListenConfig)
    token_file: str | None = None
    shutdown_timeout: float = 30.0
    requests: RequestLimits = field(default_factory=RequestLimits)


def default_config() -> SidecarConfig:
    """One store, `default`, on SQLite at `./convostore.db`."""
    return parse_config({"stores": {"default": {"backend": "sqlite"}}})


def load_config(*paths: str | Path) -> SidecarConfig:
    """One config from one or more files; with several (one per store, as the operator
    mounts them), their stores are combined and any other section may appear once."""
    merged: dict[str, Any] = {}
    for path in paths:
        data = _read(Path(path))
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping")
        for key, value in data.items():
            if key == "stores" and isinstance(value, dict):
                clash = set(value) & set(merged.get("stores", {}))
                if clash:
                    raise ConfigError(f"store {sorted(clash)[0]!r} is defined in two files")
                merged.setdefault("stores", {}).update(value)
            elif key in merged:
                raise ConfigError(f"section {key!r} appears in more than one config file")
            else:
                merged[key] = value
    return parse_config(merged)


def _read(p: Path) -> Any:
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(p)!r}: {exc.strerror}") from exc
    try:
        return json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        where = str(exc).replace('"<unicode string>"', repr(str(p)))
        raise ConfigError(f"config file {str(p)!r} is not valid YAML or JSON: {where}") from exc


def parse_config(data: Any) -> SidecarConfig:
    root = Section(data, "")
    listen = ListenConfig.parse(root.section("listen"))
    auth_s = root.section("auth")
    token_file = auth_s.string("tokenFile")
    auth_s.done()
    shutdown = root.duration("shutdownTimeout", 30.0, low=0, high=3600)
    requests_s = root.section("requests")
    requests = RequestLimits.parse(requests_s)
    stores_s = root.section("stores")
    names = stores_s.keys()
    if not names:
        root.fail("stores", "must name at least one store")
    stores = {name: parse_store(name, stores_s) for name in names}
    for store in stores.values():
        requests.check_room_for(store, requests_s)
    requests_s.done()
    root.done()
    return SidecarConfig(
        stores=stores,
        listen=listen,
        token_file=token_file,
        shutdown_timeout=shutdown,
        requests=requests,
    )


def _keyring(store: Section) -> Keyring | None:
    if not store.has("encryption"):
        return None
    section = store.section("encryption")
    keyring = Keyring.parse(section)
    section.done()
    return keyring


def parse_store(name: Any, stores: Section) -> StoreConfig:
    if not isinstance(name, str) or not STORE_NAME.fullmatch(name):
        stores.fail(
            None,
            f"store name {name!r} must be 1-63 lowercase letters, digits or '-', "
            "starting and ending with a letter or digit",
        )
    s = stores.section(name, store=name)
    backend = s.choice("backend", tuple(BACKENDS))
    for capability, reason in BACKENDS[backend].lacks.items():
        for key in SETTINGS_NEEDING.get(capability, ()):
            if s.has(key):
                s.fail(key, f"the {backend} backend cannot honour it: {reason}")
    settings = parse_backend_settings(backend, s.section(backend))
    retention = Retention(
        ttl_seconds=s.duration("ttl", None, low=1, high=10 * 365 * 86400),
        max_items=s.integer("maxItems", None, low=1, high=10_000_000),
    )
    store = StoreConfig(
        name=name,
        backend=backend,
        settings=settings,
        retention=retention,
        limits=Limits.parse(s.section("limits")),
        idempotency_ttl=s.duration("idempotencyTtl", 86400.0, low=1, high=30 * 86400),
        sweep_interval=s.duration("sweepInterval", 60.0, low=0.1, high=86400),
        encryption=_keyring(s),
        scope=s.string("scope", None, pattern=STORE_NAME),
        compaction=(
            CompactionSettings.parse(s.section("compaction")) if s.has("compaction") else None
        ),
        labels=LabelRules.parse(s.section("labels")),
    )
    _check_subject_label(s, store)
    s.done()
    return store


def _check_subject_label(s: Section, store: StoreConfig) -> None:
    """A subject label is a label the store keeps and allows."""
    label = None if store.encryption is None else store.encryption.subject_label
    if label is None:
        return
    if not BACKENDS[store.backend].has("structure"):
        s.fail("encryption", f"subjectLabel: the {store.backend} backend keeps no labels")
    allowed = store.labels.allowed
    if allowed is not None and label not in allowed:
        s.fail("encryption", f"subjectLabel {label!r} is not among labels.allowed")
