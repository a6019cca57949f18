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
  the whole session; `latest(None)` returns everything. With `max_bytes` the items are
  taken newest first and the read stops after the first one that takes their total past
  it: an answer larger than `max_bytes` tells that older items were left out, and a
  read of a session of large items holds at most `max_bytes` and one item.
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

A driver that also keeps conversation structure implements `Branching` (and its backend
declares the capability, `drivers.BACKENDS`): each item carries its `Meta` and the user
turn it belongs to (a user message opens the next turn), items live on branches (`main`
is the plain session above), a branch is copied from another one's turns before a given
turn in one atomic step, and token usage is kept per branch and turn. Ids of branches,
once used, stay reserved for the session, even after a delete or a clear (until the
session expires: then it is gone whole). On the others the `Store` refuses the
structure calls (`NotSupported`, naming the backend and its reason).

Drivers that keep structure also compact (`Compacting`): the first items of a branch,
exactly as read before the model summarised them, are replaced by the summary in one
atomic step, unless any of them changed meanwhile; items appended since stay after the
summary. The replaced items move to the branch's archive (`archive_of`), except those an
earlier compaction wrote (kind `compacted`), so the archive holds each original once.

They also keep each session's record (`Labelled`): its creation and last write, and its
labels, which listings find sessions by along an index and erasures erase them by;
and the data keys of the subjects those labels name (`SubjectKeys`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..config import StoreConfig

Check = Callable[[bytes], object]
Transform = Callable[[bytes], bytes | None]


@dataclass(frozen=True)
class Sealed:
    """An append whose stored bytes depend on where its items land: encryption at rest
    binds each item to its position. A driver calls `seal(positions)` with the position
    it gives each item, inside the step that makes those positions theirs, and stores
    what it returns; positions only grow along a branch."""

    count: int
    seal: Callable[[Sequence[int]], list[bytes]]

    def __len__(self) -> int:
        return self.count


Items = Sequence[bytes] | Sealed


def stored(items: Items, first: int) -> list[bytes]:
    """What to store for `items` when the first lands at position `first`."""
    return stored_at(items, range(first, first + len(items)))


def stored_at(items: Items, positions: Sequence[int]) -> list[bytes]:
    """What to store for `items` landing at `positions`, one each, growing."""
    return items.seal(positions) if isinstance(items, Sealed) else list(items)


class Gathered:
    """Items gathered newest first, up to the first that takes their total past
    `max_bytes` (see `latest`): a driver reads no further once `take` says so."""

    def __init__(self, max_bytes: int | None) -> None:
        self.max_bytes = max_bytes
        self.total = 0
        self._newest_first: list[bytes] = []

    def take(self, item: bytes) -> bool:
        """Keep `item`; whether to read on."""
        self._newest_first.append(item)
        self.total += len(item)
        return self.max_bytes is None or self.total <= self.max_bytes

    def __len__(self) -> int:
        return len(self._newest_first)

    def page(self, least: int, most: int) -> int:
        """How many items to ask for next: as many more of the average size so far as
        the byte cap leaves room for, between `least` and `most`, so that large items
        never fill a page of their own."""
        if self.max_bytes is None or not self.total:
            return most if self.total else least
        room = (self.max_bytes - self.total) * len(self) // self.total + 1
        return max(least, min(most, room))

    def oldest_first(self) -> list[bytes]:
        return self._newest_first[::-1]


class Cause(StrEnum):
    """Why a backend did not do what was asked, as the API's error code: each a 503 with
    `Retry-After`, so agents retry, and a message that names it, so operators see it."""

    UNAVAILABLE = "backend_unavailable"
    OUT_OF_MEMORY = "backend_out_of_memory"
    READ_ONLY = "backend_read_only"
    LOCK_TIMEOUT = "backend_lock_timeout"
    DISK_FULL = "backend_disk_full"
    TOO_MANY_CONNECTIONS = "backend_too_many_connections"
    STORAGE_GONE = "backend_storage_gone"
    OUTCOME_UNKNOWN = "outcome_unknown"


CAUSES = {
    Cause.UNAVAILABLE: "is unavailable",
    Cause.OUT_OF_MEMORY: "is out of memory and refuses writes",
    Cause.READ_ONLY: "refuses writes: it is a read-only replica (failing over?)",
    Cause.LOCK_TIMEOUT: "gave up waiting for a lock another writer held",
    Cause.DISK_FULL: "is out of disk space and refuses writes",
    Cause.TOO_MANY_CONNECTIONS: "has no connection to spare",
    Cause.STORAGE_GONE: "lost its database file (deleted or replaced) and refuses writes",
    Cause.OUTCOME_UNKNOWN: (
        "may or may not have stored the write: the same request with the same "
        "Idempotency-Key is safe to retry and tells which"
    ),
}


class BackendUnavailable(Exception):
    """The backend could not be reached, did not answer in time or refused for a cause
    that may pass (`cause`); retrying may help."""

    def __init__(self, message: str, cause: Cause = Cause.UNAVAILABLE) -> None:
        super().__init__(message)
        self.cause = cause


class BackendMisconfigured(BackendUnavailable):
    """The backend refuses the store's own settings (a database or role that does not
    exist, a wrong password, a missing privilege): unavailable until they change."""


class IdempotencyKeyReused(Exception):
    """An `Idempotency-Key` came back with a different request body than the first time."""


@dataclass(frozen=True)
class Idempotency:
    """A client's `Idempotency-Key` with the fingerprint of the request it came with."""

    key: str
    fingerprint: str
    ttl_seconds: float


ERASURES_KEPT = 10_000
"""Erasure records a store keeps; older ones go as new ones come."""


class TooManyLabels(Exception):
    """A label change would leave the session more labels than the store allows."""

    def __init__(self, most: int) -> None:
        super().__init__(f"a session holds at most {most} labels")
        self.most = most


class BranchNotFound(Exception):
    """No live branch by that id in the session."""


class BranchIdUsed(Exception):
    """The branch id was used before in this session; ids are never reused."""


class TurnNotFound(Exception):
    """The branch has no user message with that turn number."""


MAIN = "main"
COMPACTED = "compacted"
"""The kind of the items a compaction wrote; they are no user turns and are not archived."""


def archive_of(branch: str) -> str:
    """Where a branch keeps the items compaction replaced: a name with `/`, which no branch
    id may hold, so no API call can write or list it."""
    return f"{branch}/archive"


@dataclass(frozen=True)
class Meta:
    """What the structure calls need to know of an item without reading it: its kind
    (`user`, `assistant`, else the item's `type`) and its tool. A `user` item opens a turn."""

    kind: str = "other"
    tool: str | None = None


@dataclass(frozen=True)
class AppendResult:
    appended: int
    replayed: bool
    turn: int | None = None
    anchor: int | None = None


@dataclass(frozen=True)
class BranchInfo:
    branch_id: str
    message_count: int
    user_turns: int
    created_at: float


@dataclass(frozen=True)
class UserTurn:
    turn: int
    item: bytes
    created_at: float


@dataclass(frozen=True)
class ItemShape:
    turn: int
    kind: str
    tool: str | None


@dataclass(frozen=True)
class Usage:
    requests: int
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_details: bytes | None = None
    output_details: bytes | None = None


@dataclass(frozen=True)
class TurnUsage:
    branch: str
    turn: int
    usage: Usage


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
        self, session_id: str, items: Items, idempotency: Idempotency | None
    ) -> AppendResult: ...

    async def latest(
        self, session_id: str, limit: int | None, max_bytes: int | None = None
    ) -> list[bytes]: ...

    async def pop(self, session_id: str, check: Check | None = None) -> bytes | None: ...

    async def clear(self, session_id: str) -> None: ...

    async def list_sessions(self, prefix: str, after: str | None, limit: int) -> list[str]:
        """Up to `limit` ids starting with `prefix` and greater than `after`, sorted."""

    async def sweep(self) -> int:
        """Delete expired sessions and idempotency keys; return how many sessions went."""

    async def rewrite(self, session_id: str, transform: Transform) -> int:
        """Replace each item for which `transform` returns bytes; return how many."""


@runtime_checkable
class Migrates(Protocol):
    """A backend whose schema is migrated explicitly (`convostore migrate`), not by the
    sidecars that serve from it."""

    async def migrate(self) -> str:
        """Bring the schema to this version; say what was done, in one line."""


class Branching(Protocol):
    """Conversation structure: items by branch with their turn, branches, usage."""

    async def append_to(
        self,
        session_id: str,
        branch: str,
        items: Items,
        meta: Sequence[Meta],
        idempotency: Idempotency | None,
    ) -> AppendResult:
        """Append to a live branch; the result names the last item's turn and `anchor`,
        the sequence number of that turn's first item (what usage is recorded against)."""

    async def latest_in(
        self, session_id: str, branch: str, limit: int | None, max_bytes: int | None = None
    ) -> list[bytes]: ...

    async def pop_from(self, session_id: str, branch: str, check: Check | None) -> bytes | None:
        """As `pop`; a turn left without items on the branch loses its usage."""

    async def branches(self, session_id: str) -> list[BranchInfo]:
        """The live branches that hold items, oldest first."""

    async def branch_exists(self, session_id: str, branch: str) -> bool: ...

    async def create_branch(self, session_id: str, source: str, turn: int, new: str) -> None:
        """Copy the source branch's items before user turn `turn` to a new branch."""

    async def delete_branch(self, session_id: str, branch: str) -> None: ...

    async def user_turns(self, session_id: str, branch: str) -> list[UserTurn]:
        """The branch's user messages, by turn; nothing else of the session is read."""

    async def shapes(self, session_id: str, branch: str) -> list[ItemShape]: ...

    async def record_usage(
        self, session_id: str, branch: str, turn: int | None, anchor: int | None, usage: Usage
    ) -> int | None:
        """Store usage for the turn whose first item is `anchor` (the branch's latest turn
        when not given); returns the turn, or None when that turn is gone."""

    async def usage(self, session_id: str, branch: str | None) -> list[TurnUsage]: ...


@dataclass(frozen=True)
class SessionInfo:
    """A session's record: when it began and was last written, and its labels."""

    session_id: str
    created_at: float
    updated_at: float
    labels: Mapping[str, str]


Cursor = tuple[float, str]
"""Where a listing newest first stopped: the last session's creation time and id."""


@dataclass(frozen=True)
class SessionQuery:
    """Sessions newest first (by creation, then id, descending) that carry every label in
    `labels`, created and written within the bounds (each exclusive), after `cursor`."""

    labels: Mapping[str, str]
    limit: int
    cursor: Cursor | None = None
    created_after: float | None = None
    created_before: float | None = None
    updated_after: float | None = None
    updated_before: float | None = None

    def admits(self, info: SessionInfo) -> bool:
        """Whether a session's record matches; for drivers whose index is a hint."""
        return (
            all(info.labels.get(name) == value for name, value in self.labels.items())
            and _within(info.created_at, self.created_after, self.created_before)
            and _within(info.updated_at, self.updated_after, self.updated_before)
            and (self.cursor is None or (info.created_at, info.session_id) < self.cursor)
        )


def _within(value: float, after: float | None, before: float | None) -> bool:
    return (after is None or value > after) and (before is None or value < before)


@dataclass(frozen=True)
class ErasureRecord:
    """That an erasure happened, and nothing of whom: when, the label names it selected
    by (never their values), what it erased, and whether it was complete."""

    erasure_id: str
    at: float
    label_names: tuple[str, ...]
    sessions: int
    items: int
    complete: bool


def erasure_of(
    erasure_id: str, at: float, names: str, sessions: int, items: int, complete: object
) -> ErasureRecord:
    """A record as a table row holds it (label names joined by commas)."""
    split = tuple(names.split(",")) if names else ()
    return ErasureRecord(erasure_id, float(at), split, int(sessions), int(items), bool(complete))


LabelChanges = Mapping[str, str | None]
"""Labels to set, and (as None) to remove."""


class Labelled(Protocol):
    """Sessions carry labels (`user_id`, `tenant`, ...) and are found by them: every
    driver that keeps structure. A label change is one atomic step that also makes the
    session's record when there is none (it counts as a write, for `ttl`); a clear or an
    expiry forgets the labels with the rest of the session. Listings read an index, in
    pages newest first, never the whole store."""

    async def label(self, session_id: str, changes: LabelChanges, most: int) -> SessionInfo:
        """Apply `changes`; `TooManyLabels`, changing nothing, past `most` labels."""

    async def session_info(self, session_id: str) -> SessionInfo | None:
        """The session's record; None for a session that holds nothing."""

    async def find_sessions(self, query: SessionQuery) -> list[SessionInfo]: ...

    async def erase(self, session_id: str, idle_since: float | None = None) -> int | None:
        """Forget the session whole, as if it had never been: its items on every branch
        and in the compaction archive, usage, labels, reserved branch ids and
        idempotency records. Returns how many items it held; with `idle_since`, only if
        it was last written no later than then, in the same atomic step (else None)."""

    async def settle_erasures(self) -> None:
        """After erasures: clear what the backend keeps of erased data beside its tables
        (SQLite's write-ahead log); called by every erasure call, so a retry settles."""

    async def record_erasure(self, record: ErasureRecord) -> None:
        """Keep the record, newest first among the store's last `ERASURES_KEPT`."""

    async def erasures(self, limit: int) -> list[ErasureRecord]:
        """The store's latest erasure records, newest first."""


@dataclass(frozen=True)
class SubjectKey:
    """A subject's data key as the backend keeps it: sealed by the store's keyring, under
    a name (`subject`) that is a digest of the label, never the person's id itself."""

    subject: str
    wrapped: bytes


class SubjectKeys(Protocol):
    """The data keys of a store's subjects (crypto-shredding, see `encryption`): one row
    or field per subject beside the sessions, which an erasure deletes. Every driver that
    keeps labels keeps them."""

    async def subject_key(self, subject: str) -> bytes | None: ...

    async def keep_subject_key(self, subject: str, wrapped: bytes) -> bytes:
        """Keep `wrapped` unless the subject has a key already; the key kept, so
        sidecars that make a subject's first key at once all use the same one."""

    async def replace_subject_key(self, subject: str, old: bytes, new: bytes) -> bool:
        """Put `new` in place of `old` (a rotation re-sealing it); False, changing
        nothing, when the subject's key is no longer `old`."""

    async def forget_subject_key(self, subject: str) -> bool: ...

    async def subject_keys(self, cursor: str, limit: int) -> tuple[list[SubjectKey], str]:
        """A page of about `limit` keys from `cursor` ("" first); the next cursor, ""
        after the last page."""


@dataclass(frozen=True)
class Snapshot:
    """A branch as read before a compaction: the items to summarise (`items`, readable)
    and the same items as stored (`stored`), which the replacement expects to find."""

    items: list[bytes]
    stored: list[bytes]


class Compacting(Protocol):
    """Compaction of a branch's history, atomic in the backend."""

    async def snapshot(
        self, session_id: str, branch: str, limit: int, max_bytes: int | None = None
    ) -> Snapshot:
        """The branch's latest `limit` items, within `max_bytes` as `latest` reads."""

    async def compact(
        self, session_id: str, branch: str, expected: Sequence[bytes], replacement: Items
    ) -> bool:
        """If the branch still starts with `expected`, put `replacement` (at most as many
        items, of kind `compacted`, in the turn of the last one replaced) in their place
        and archive them; False, changing nothing, if it does not. The caller keeps the
        replacement within that count (it takes the replaced items' positions)."""

    async def full_history(
        self, session_id: str, branch: str, limit: int, max_bytes: int | None = None
    ) -> list[bytes]:
        """The latest `limit` of: the archived items, then the live ones that no
        compaction wrote; within `max_bytes` as `latest` reads."""


class KeepsStructure:
    """Base of the drivers that implement `Branching`: their plain item calls are the
    `main` branch's, for items whose kind nobody told them (the API always says)."""

    async def append(
        self: Branching, session_id: str, items: Items, idempotency: Idempotency | None
    ) -> AppendResult:
        return await self.append_to(session_id, MAIN, items, [Meta()] * len(items), idempotency)

    async def latest(
        self: Branching, session_id: str, limit: int | None, max_bytes: int | None = None
    ) -> list[bytes]:
        return await self.latest_in(session_id, MAIN, limit, max_bytes)

    async def pop(self: Branching, session_id: str, check: Check | None = None) -> bytes | None:
        return await self.pop_from(session_id, MAIN, check)

    async def snapshot(
        self: Branching, session_id: str, branch: str, limit: int, max_bytes: int | None = None
    ) -> Snapshot:
        items = await self.latest_in(session_id, branch, limit, max_bytes)
        return Snapshot(items, items)

    async def settle_erasures(self) -> None:
        """Nothing but the deletes themselves, unless the driver says otherwise."""


def wall_clock() -> float:
    """Now, in seconds since the epoch, to the microsecond: what the API shows of a time,
    so that a time read from it and given back (a listing's bounds) is the same number."""
    return round(time.time(), 6)


def scoped_prefix(key_prefix: str | None, store: StoreConfig, separator: str, default: str) -> str:
    """Where a key-value driver keeps a store's keys. An explicit `keyPrefix` gets the
    store's scope (its namespace) appended after `separator`, a character no namespace
    holds, so the last segment of any prefix names the namespace: whatever prefix a store
    author picks, it cannot reach another namespace's keys. Without one,
    `default` + the store's identity."""
    if key_prefix:
        return f"{key_prefix}{separator}{store.scope}" if store.scope else key_prefix
    return default + store.identity


def replay_of(idempotency: Idempotency, fingerprint: str, appended: int) -> AppendResult:
    """The answer to a request whose key was seen before: a replay, or a conflict."""
    if fingerprint != idempotency.fingerprint:
        raise IdempotencyKeyReused(idempotency.key)
    return AppendResult(appended=appended, replayed=True)
