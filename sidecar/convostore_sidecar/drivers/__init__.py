"""Backend drivers, one module each, imported only when a store names them.

A driver's client library is an optional dependency: importing the module of a backend
that no store uses costs nothing, and a missing library is reported with the command
that installs it instead of an ImportError deep inside the sidecar.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import StoreConfig
    from ..sections import Section
    from .base import Driver

BACKENDS = {
    "sqlite": "convostore_sidecar.drivers.sqlite",
    "redis": "convostore_sidecar.drivers.redis",
    "postgres": "convostore_sidecar.drivers.postgres",
    "dapr": "convostore_sidecar.drivers.dapr",
    "openai": "convostore_sidecar.drivers.openai",
}


def _module(backend: str) -> ModuleType:
    try:
        return importlib.import_module(BACKENDS[backend])
    except ImportError as exc:
        raise RuntimeError(
            f"the {backend!r} backend needs {exc.name!r}: pip install 'convostore[sidecar]'"
        ) from exc


def parse_backend_settings(backend: str, section: Section) -> Any:
    """Validate the backend's own section of a store's config (for example `redis:`)."""
    settings = _module(backend).Settings.parse(section)
    section.done()
    return settings


def unsupported_settings(backend: str) -> dict[str, str]:
    """Store settings the backend cannot honour, each with the reason it gives."""
    unsupported: dict[str, str] = getattr(_module(backend), "UNSUPPORTED", {})
    return unsupported


def open_driver(store: StoreConfig) -> Driver:
    driver: Driver = _module(store.backend).open_driver(store)
    return driver
