"""What asyncpg raises, as the driver reports it: unavailable (with a cause), or the
store's own settings refused."""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg

from ..base import (
    Cause,
)

if TYPE_CHECKING:
    pass


UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # a connection cut between a statement and its COMMIT
    asyncpg.CannotConnectNowError,
    asyncpg.OperatorInterventionError,
    asyncpg.QueryCanceledError,
    asyncpg.TooManyConnectionsError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.DiskFullError,
    asyncpg.LockNotAvailableError,
    asyncpg.OutOfMemoryError,
)
# refusals that name their cause; a lock_timeout is a LockNotAvailableError
CAUSES: tuple[tuple[type[BaseException], Cause], ...] = (
    (asyncpg.LockNotAvailableError, Cause.LOCK_TIMEOUT),
    (asyncpg.DiskFullError, Cause.DISK_FULL),
    (asyncpg.TooManyConnectionsError, Cause.TOO_MANY_CONNECTIONS),
    (asyncpg.OutOfMemoryError, Cause.OUT_OF_MEMORY),
)
# what the server says of the store's own settings; retrying does not help
MISCONFIGURED: tuple[type[BaseException], ...] = (
    asyncpg.InvalidCatalogNameError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InsufficientPrivilegeError,
    asyncpg.InvalidSchemaNameError,
)
