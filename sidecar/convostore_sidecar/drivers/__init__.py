"""Backend drivers, one module each, imported only when a store names them, and what
each backend can do (`BACKENDS`), declared here once.

A driver's client library is an optional dependency: importing the module of a backend
that no store uses costs nothing, and a missing library is reported with the command
that installs it instead of an ImportError deep inside the sidecar. The declarations
import nothing, so the operator and the CRD read them without any client library:
config validation, the `Store`, the operator's checks, the CRD's rules and the tests'
choice of backends all come from `BACKENDS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ..config import StoreConfig
    from ..sections import Section
    from .base import Driver

Capability = Literal["structure", "compaction", "retention", "encryption"]
CAPABILITIES: tuple[Capability, ...] = ("structure", "compaction", "retention", "encryption")
"""`structure`: branches, turns and usage (the driver implements `Branching`);
`compaction`: a session's first items replaced in one step (`Compacting`); `retention`:
sessions expire (`ttl`) and are trimmed (`maxItems`); `encryption`: items sealed at rest."""


@dataclass(frozen=True)
class Backend:
    module: str
    lacks: Mapping[Capability, str] = field(default_factory=dict)
    """The capabilities it has not, each with the reason given to whoever asks for it."""
    exact_json: bool = True
    """Whether any JSON value comes back byte for byte (not only what the SDK sends)."""
    in_pod: str | None = None
    """Why only a pod reaches the backend (the operator then leaves checking it to the
    sidecars), for a backend that lives beside each pod."""

    def has(self, capability: Capability) -> bool:
        return capability not in self.lacks


NO_STRUCTURE = "it keeps only the items of each session, with no branches, turns or usage"
BACKENDS: dict[str, Backend] = {
    "sqlite": Backend(
        "convostore_sidecar.drivers.sqlite",
        in_pod="history lives in each pod's embedded SQLite",
    ),
    "redis": Backend("convostore_sidecar.drivers.redis"),
    "postgres": Backend("convostore_sidecar.drivers.postgres"),
    "sqlalchemy": Backend("convostore_sidecar.drivers.sqlalchemy"),
    "dapr": Backend(
        "convostore_sidecar.drivers.dapr",
        lacks={
            "structure": NO_STRUCTURE,
            "compaction": "it keeps no structure to replace a session's items in one step "
            "(as for branches and turns)",
        },
        in_pod="the Dapr state store is reached through each pod's own Dapr sidecar",
    ),
    "openai": Backend(
        "convostore_sidecar.drivers.openai",
        lacks={
            "structure": NO_STRUCTURE,
            "compaction": "the OpenAI Conversations API manages its own history",
            "retention": "the OpenAI Conversations API keeps items until they are deleted",
            "encryption": "the OpenAI Conversations API must read the items it stores",
        },
        exact_json=False,
    ),
}


def _module(backend: str) -> ModuleType:
    try:
        return importlib.import_module(BACKENDS[backend].module)
    except ImportError as exc:
        raise RuntimeError(
            f"the {backend!r} backend needs {exc.name!r}: pip install 'convostore[sidecar]'"
        ) from exc


def parse_backend_settings(backend: str, section: Section) -> Any:
    """Validate the backend's own section of a store's config (for example `redis:`)."""
    settings = _module(backend).Settings.parse(section)
    section.done()
    return settings


def open_driver(store: StoreConfig) -> Driver:
    driver: Driver = _module(store.backend).open_driver(store)
    return driver
