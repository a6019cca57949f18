"""convostore client: conversation memory for agents, served by the convostore sidecar."""

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
