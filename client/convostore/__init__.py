"""convostore client: conversation memory for agents, served by the convostore sidecar.

The names below are imported when first used: the `convostore` command imports this
package too, and the sidecar it starts needs none of the client (about 1.3 MB of
modules in every idle sidecar otherwise).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .advanced import AdvancedSidecarSession
    from .encrypted import DecryptionError, EncryptedSession
    from .errors import (
        ConvostoreError,
        NotFoundError,
        RequestRejectedError,
        SessionClosedError,
        StoreUnavailableError,
        UnauthorizedError,
    )
    from .session import SidecarSession
    from .store import SidecarStore
    from .transport import close_pools

_HOMES = {
    "AdvancedSidecarSession": "advanced",
    "ConvostoreError": "errors",
    "DecryptionError": "encrypted",
    "EncryptedSession": "encrypted",
    "NotFoundError": "errors",
    "RequestRejectedError": "errors",
    "SessionClosedError": "errors",
    "SidecarSession": "session",
    "SidecarStore": "store",
    "StoreUnavailableError": "errors",
    "UnauthorizedError": "errors",
    "close_pools": "transport",
}

__all__ = [
    "AdvancedSidecarSession",
    "ConvostoreError",
    "DecryptionError",
    "EncryptedSession",
    "NotFoundError",
    "RequestRejectedError",
    "SessionClosedError",
    "SidecarSession",
    "SidecarStore",
    "StoreUnavailableError",
    "UnauthorizedError",
    "close_pools",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
