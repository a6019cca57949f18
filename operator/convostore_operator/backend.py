"""Talking to a store's backend from the operator, with the sidecar's own drivers.

The operator renders the store as a sidecar would see it, with credential and key files
(and any SQLite file, such as an openai store's per-pod map) in a private temporary
directory, parses it with the sidecar's config parser and opens
the sidecar's driver. So a reachability check is the sidecar's `ping`, the PostgreSQL
schema is migrated by `convostore migrate`'s own code (which changes nothing once the
schema is at this version), and a `Delete` purge clears sessions the way the API does:
one design, checked by the same code that serves traffic.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convostore_sidecar.config import StoreConfig, parse_config
from convostore_sidecar.drivers import BACKENDS
from convostore_sidecar.drivers.base import BackendMisconfigured, BackendUnavailable
from convostore_sidecar.migrate import migrate_store
from convostore_sidecar.stores import Store

from .render import render

PURGE_PAGE = 500
LOCAL_BACKENDS = {name: b.in_pod for name, b in BACKENDS.items() if b.in_pod is not None}
"""The backends only a pod reaches, with why: the sidecars check those, not the operator."""


@dataclass(frozen=True)
class Reachability:
    status: str  # "True", "False" or "Unknown"
    reason: str
    message: str
    detail: str = ""
    """For the operator's log only (redacted there): what an unexpected failure said."""


@contextlib.contextmanager
def materialised(
    name: str,
    spec: dict[str, Any],
    secrets: dict[str, str],
    keys: dict[str, bytes],
    scope: str | None,
) -> Iterator[StoreConfig]:
    """The store as the sidecar will parse it, its files in a private temporary
    directory; raises the sidecar's own ConfigError for anything it would refuse."""
    with tempfile.TemporaryDirectory(prefix="convostore-operator-") as tmp:
        root = Path(tmp)
        rendered = render(
            name,
            spec,
            secrets,
            stores_root=str(root / "stores"),
            keys_root=str(root / "keys"),
            data_root=str(root / "data"),
            scope=scope,
        )
        for folder, files in (
            (root / "stores" / name, rendered.files),
            (root / "keys" / name, keys),
            (root / "data", {}),
        ):
            folder.mkdir(parents=True)
            for file, data in files.items():
                (folder / file).write_bytes(data)
        yield parse_config(rendered.config).stores[name]


def check_rendered(
    name: str,
    spec: dict[str, Any],
    secrets: dict[str, str],
    keys: dict[str, bytes],
    scope: str | None,
) -> None:
    """Raises ConfigError when the sidecar would refuse what the operator is about to
    write: checked before anything is written or any pod rolled."""
    with materialised(name, spec, secrets, keys, scope):
        pass


@contextlib.asynccontextmanager
async def opened(
    name: str,
    spec: dict[str, Any],
    secrets: dict[str, str],
    keys: dict[str, bytes],
    scope: str | None,
) -> AsyncIterator[Store]:
    with materialised(name, spec, secrets, keys, scope) as config:
        async with store_of(config) as store:
            yield store


@contextlib.asynccontextmanager
async def store_of(config: StoreConfig) -> AsyncIterator[Store]:
    store = Store.open(config)
    await store.open_driver()
    try:
        yield store
    finally:
        await store.close()


async def check(
    name: str,
    spec: dict[str, Any],
    secrets: dict[str, str],
    keys: dict[str, bytes],
    scope: str | None,
) -> Reachability:
    if spec["backend"] in LOCAL_BACKENDS:
        return Reachability("Unknown", "CheckedBySidecar", LOCAL_BACKENDS[spec["backend"]])
    try:
        with materialised(name, spec, secrets, keys, scope) as config:
            await migrate_store(config)
            async with store_of(config) as store:
                await store.ping()
    except BackendUnavailable as exc:
        return Reachability("False", "Unreachable", str(exc))
    except BackendMisconfigured as exc:
        return Reachability("False", "Misconfigured", str(exc))
    except Exception as exc:
        # whatever else the far end made the client raise may quote its answer: the
        # store's author reads status, so it says only what kind of failure it was
        return Reachability(
            "False",
            "CheckFailed",
            f"the {spec['backend']} backend gave an answer its client did not expect "
            f"({type(exc).__name__}); the operator's log has the detail",
            detail=f"{type(exc).__name__}: {exc}",
        )
    return Reachability("True", "Reachable", f"the {spec['backend']} backend answered")


async def purge(
    name: str,
    spec: dict[str, Any],
    secrets: dict[str, str],
    keys: dict[str, bytes],
    scope: str,
) -> int:
    """Clear every session of the store; returns how many there were."""
    if spec["backend"] in LOCAL_BACKENDS:
        return 0
    cleared = 0
    async with opened(name, spec, secrets, keys, scope) as store:
        while ids := await store.list_sessions("", None, PURGE_PAGE):
            for session_id in ids:
                await store.clear(session_id)
            cleared += len(ids)
        await store.forget_subject_keys()
    return cleared
