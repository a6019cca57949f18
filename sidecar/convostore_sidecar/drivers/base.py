"""The backend driver interface: what a store must do for the sidecar to serve it.

A driver keeps, per session id, an ordered list of items. Items are opaque bytes to the
driver (serialized JSON, or ciphertext when encryption is on): it never parses them, so
what comes back is exactly what went in. The semantics every driver shares, and which
the conformance suite in `tests/conformance/` checks against each of them:

- `append` adds a batch at the newest end, atomically and in order: concurrent batches
  never interleave, and an acknowledged batch is never lost or applied twice. With an
  `Idempotency` token the driver records the key together with the batch, in the same
  atomic step, so a retried request is recognised even across sidecar restarts.
- `latest(n)` returns the newest `n` items oldest first, reading about `n` items, never
  the whole session; `latest(None)` returns everything.
- `pop` removes and returns the newest item; two concurrent pops never get the same one.
  A `check` given to `pop` sees the item before it is removed, in the same atomic step;
  if it raises, nothing is removed (an item that cannot be decrypted stays stored).
- `rewrite` replaces items in place, atomically with respect to other writers; it is how
  key rotation re-encrypts a session while agents keep using it.
- `clear` forgets the session; `list_sessions` pages through ids in byte order.
- Retention: with `ttl` a session idle (not written) for that long is gone, whether or
  not a sweep has run yet; with `max_items` the oldest items are trimmed on append.
- A backend that cannot be reached raises `BackendUnavailable` quickly, instead of
  hanging, and the driver reconnects on its own when the backend is back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

Check = Callable[[bytes], object]
Transform = Callable[[bytes], bytes | None]


class BackendUnavailable(Exception):
    """The backend could not be reached or did not answer in time; retrying may help."""


class IdempotencyKeyReused(Exception):
    """An `Idempotency-Key` came back with a different request body than the first time."""


@dataclass(frozen=True)
class Idempotency:
    """A client's `Idempotency-Key` with the fingerprint of the request it came with."""

    key: str
    fingerprint: str
    ttl_seconds: float


@dataclass(frozen=True)
class AppendResult:
    appended: int
    replayed: bool


@dataclass(frozen=True)
class Retention:
    ttl_seconds: float | None = None
    max_items: int | None = None


class Driver(Protocol):
    """One store's backend. All methods are safe to call concurrently."""

    async def open(self) -> None:
        """Prepare connections and schema; must not fail when the backend is down."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise `BackendUnavailable` unless the backend answers now."""

    async def append(
        self, session_id: str, items: Sequence[bytes], idempotency: Idempotency | None
    ) -> AppendResult: ...

    async def latest(self, session_id: str, limit: int | None) -> list[bytes]: ...

    async def pop(self, session_id: str, check: Check | None = None) -> bytes | None: ...

    async def clear(self, session_id: str) -> None: ...

    async def list_sessions(self, prefix: str, after: str | None, limit: int) -> list[str]:
        """Up to `limit` ids starting with `prefix` and greater than `after`, sorted."""

    async def sweep(self) -> int:
        """Delete expired sessions and idempotency keys; return how many sessions went."""

    async def rewrite(self, session_id: str, transform: Transform) -> int:
        """Replace each item for which `transform` returns bytes; return how many."""


def replay_of(idempotency: Idempotency, fingerprint: str, appended: int) -> AppendResult:
    """The answer to a request whose key was seen before: a replay, or a conflict."""
    if fingerprint != idempotency.fingerprint:
        raise IdempotencyKeyReused(idempotency.key)
    return AppendResult(appended=appended, replayed=True)
