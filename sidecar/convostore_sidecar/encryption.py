"""Encryption at rest for any driver: items sealed on the way in, opened on the way out.

The keys and envelopes are `keyring`'s; with a subject label, `subjects` gives each
labelled session's items the key of the person it belongs to. Structure, labels and
usage pass through in clear: the backend finds and orders items by them.
"""

from __future__ import annotations

import asyncio
import functools
import random
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import cast

from .drivers.base import (
    AppendResult,
    BackendUnavailable,
    BranchInfo,
    Branching,
    Check,
    Compacting,
    Driver,
    ErasureRecord,
    Idempotency,
    Items,
    ItemShape,
    LabelChanges,
    Labelled,
    Meta,
    Sealed,
    SessionInfo,
    SessionQuery,
    Snapshot,
    SubjectKeys,
    Transform,
    TurnUsage,
    Usage,
    UserTurn,
)
from .exports import ExportCipher
from .keyring import NO_KEYS, DecryptionFailed, Keyring, SubjectErased, envelope_of
from .refusals import Conflict
from .structure import shapes_of
from .subjects import Subjects

POP_ATTEMPTS = 50
Read = Callable[[int | None], Awaitable[list[bytes]]]
"""A read of stored items within a byte cap."""
Seal = Callable[[bytes, int | None], bytes]
"""Seals one item's plaintext at its position (None: a "cs1" item, no position)."""


class _NewerArrived(Exception):
    """The newest item changed between the check of its order and the pop."""


class _StillNewest:
    """The pop's check: the item about to go is the one whose order was checked."""

    def __init__(
        self,
        driver: EncryptedDriver,
        session_id: str,
        expected: bytes | None,
        check: Check | None,
        subject_keys: Mapping[str, bytes],
    ) -> None:
        self.driver, self.session_id = driver, session_id
        self.expected, self.check, self.subject_keys = expected, check, subject_keys
        self.plaintext = b""

    def __call__(self, data: bytes) -> None:
        if data != self.expected:
            raise _NewerArrived
        keyring, store = self.driver.keyring, self.driver.store
        self.plaintext = keyring.decrypt(store, self.session_id, data, self.subject_keys)
        if self.check is not None:
            self.check(self.plaintext)


class EncryptedDriver:
    """Wraps any driver: items are encrypted on the way in and decrypted on the way out."""

    def __init__(self, inner: Driver, keyring: Keyring, store: str) -> None:
        self.inner, self.keyring, self.store = inner, keyring, store
        self.subjects = (
            None
            if keyring.subject_label is None
            else Subjects(cast(SubjectKeys, inner), keyring, store)
        )
        self._pop_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def ping(self) -> None:
        await self.inner.ping()

    async def append(
        self, session_id: str, items: Items, idempotency: Idempotency | None
    ) -> AppendResult:
        sealed = self._sealed(items, await self._sealer(session_id))
        return await self.inner.append(session_id, sealed, idempotency)

    async def latest(
        self, session_id: str, limit: int | None, max_bytes: int | None = None
    ) -> list[bytes]:
        read = functools.partial(self.inner.latest, session_id, limit)
        return (await self._within(session_id, read, max_bytes))[0]

    async def pop(self, session_id: str, check: Check | None = None) -> bytes | None:
        return await self._verified_pop(
            session_id,
            lambda: self.inner.latest(session_id, 2),
            lambda verify: self.inner.pop(session_id, verify),
            check,
        )

    async def _sealer(self, session_id: str, *, writing: bool = True) -> Seal:
        """How the session's items are sealed now: under its subject's key when it has
        a subject, else under the primary store key. A store that requires a subject
        refuses new items (`writing`) of a session without one."""
        subject = await self._subject(session_id)
        if subject is None:
            if writing and self.keyring.require_subject:
                label = self.keyring.subject_label
                raise Conflict(
                    "subject_required",
                    f"store {self.store!r} seals each session under its subject's key: set "
                    f"the session's {label!r} label (metadata) before writing to it",
                )
            return functools.partial(self.keyring.encrypt, self.store, session_id)
        assert self.subjects is not None
        key = await self.subjects.key_for_write(subject)

        def seal(plaintext: bytes, position: int | None) -> bytes:
            if position is None:  # written before positions were bound: the store key's
                return self.keyring.encrypt(self.store, session_id, plaintext, None)
            return self.keyring.seal_for_subject(
                self.store, session_id, subject, key, plaintext, position
            )

        return seal

    async def export_cipher(self, session_id: str) -> ExportCipher | None:
        """What seals the session's items for an export, and opens them again on
        import: its subject's (see `exports`); None for a session without a subject."""
        subject = await self._subject(session_id)
        if subject is None:
            return None
        assert self.subjects is not None
        key = (await self.subjects.keys_for([subject])).get(subject)
        if key is None:
            raise SubjectErased
        return ExportCipher(self.store, subject, key)

    async def _subject(self, session_id: str) -> str | None:
        """The session's subject (a digest), read from its labels on every call: a label
        set by another sidecar counts at once."""
        if self.subjects is None:
            return None
        info = await cast(Labelled, self.inner).session_info(session_id)
        value = None if info is None else info.labels.get(self.subjects.label)
        return None if value is None else self.subjects.subject_of(value)

    async def _subject_keys(self, stored: Iterable[bytes]) -> Mapping[str, bytes]:
        """The keys of the subjects these stored items are sealed under; nothing is read
        when none is a subject's."""
        subjects = {e.subject for e in map(envelope_of, stored) if e is not None and e.subject}
        if not subjects or self.subjects is None:
            return NO_KEYS
        return await self.subjects.keys_for(subjects)

    @staticmethod
    def _sealed(items: Items, seal: Seal) -> Sealed:
        if isinstance(items, Sealed):
            raise TypeError("items reach the keyring once, as plaintext")
        plain = list(items)

        def sealed(positions: Sequence[int]) -> list[bytes]:
            return [seal(item, at) for item, at in zip(plain, positions, strict=True)]

        return Sealed(len(plain), sealed)

    async def _within(
        self, session_id: str, read: Read, max_bytes: int | None
    ) -> tuple[list[bytes], list[bytes]]:
        """A read within `max_bytes` of plaintext (see `latest`), opened and as stored.
        The backend counts the bytes it stores, each item's header included: when it
        stopped at the cap while the plaintext is within it, it reads again with room
        for the headers it met, which takes in at least one more item each time."""
        cap = max_bytes
        while True:
            stored = await read(cap)
            opened = self._open_in_order(session_id, stored, await self._subject_keys(stored))
            stored_size, opened_size = sum(map(len, stored)), sum(map(len, opened))
            if max_bytes is None or cap is None or stored_size <= cap or opened_size > max_bytes:
                return opened, stored
            cap = max_bytes + stored_size - opened_size

    def _open_in_order(
        self, session_id: str, items: list[bytes], subject_keys: Mapping[str, bytes]
    ) -> list[bytes]:
        """Decrypt a window of a branch, oldest first, refusing it unless the positions
        the items were sealed at grow: a reordered, replayed or repeated item."""
        opened, last = [], -1
        for data in items:
            plaintext, position = self.keyring.open(self.store, session_id, data, subject_keys)
            if position is not None:
                if position <= last:
                    raise DecryptionFailed(
                        self.keyring.key_id_of(data),
                        f"the item sealed at position {position} comes after position {last}:"
                        " the session's items were reordered or replayed",
                    )
                last = position
            opened.append(plaintext)
        return opened

    async def _verified_pop(
        self,
        session_id: str,
        newest_two: Callable[[], Awaitable[list[bytes]]],
        pop: Callable[[Check], Awaitable[bytes | None]],
        check: Check | None,
    ) -> bytes | None:
        """Pop the newest item only once it is known to follow the one before it: read
        both, check their order, then pop, provided the newest is still the one read.
        Pops of one session in this sidecar take turns; another sidecar's pop or append
        in between makes this one look again, after a random pause."""
        lock = self._pop_locks.setdefault(session_id, asyncio.Lock())
        async with lock:
            for attempt in range(POP_ATTEMPTS):
                if attempt:
                    await asyncio.sleep(random.uniform(0, 0.002 * min(attempt, 10)))
                window = await newest_two()
                keys = await self._subject_keys(window)
                self._open_in_order(session_id, window, keys)
                newest = window[-1] if window else None
                verify = _StillNewest(self, session_id, newest, check, keys)
                try:
                    item = await pop(verify)
                except _NewerArrived:
                    continue
                return None if item is None else verify.plaintext
        raise BackendUnavailable(f"session {session_id!r} changed too often to pop")

    async def clear(self, session_id: str) -> None:
        await self.inner.clear(session_id)

    @property
    def _structured(self) -> Branching:
        return cast(Branching, self.inner)

    async def append_to(
        self,
        session_id: str,
        branch: str,
        items: Items,
        meta: Sequence[Meta],
        idempotency: Idempotency | None,
    ) -> AppendResult:
        if self.keyring.hide_tool_names:
            meta = [replace(m, tool=None) for m in meta]
        sealed = self._sealed(items, await self._sealer(session_id))
        return await self._structured.append_to(session_id, branch, sealed, meta, idempotency)

    async def latest_in(
        self, session_id: str, branch: str, limit: int | None, max_bytes: int | None = None
    ) -> list[bytes]:
        read = functools.partial(self._structured.latest_in, session_id, branch, limit)
        return (await self._within(session_id, read, max_bytes))[0]

    async def pop_from(self, session_id: str, branch: str, check: Check | None) -> bytes | None:
        return await self._verified_pop(
            session_id,
            lambda: self._structured.latest_in(session_id, branch, 2),
            lambda verify: self._structured.pop_from(session_id, branch, verify),
            check,
        )

    async def snapshot(
        self, session_id: str, branch: str, limit: int, max_bytes: int | None = None
    ) -> Snapshot:
        """The items to summarise in plaintext, and as stored, for the replacement."""
        read = functools.partial(self._structured.latest_in, session_id, branch, limit)
        return Snapshot(*await self._within(session_id, read, max_bytes))

    async def compact(
        self, session_id: str, branch: str, expected: Sequence[bytes], replacement: Items
    ) -> bool:
        sealed = self._sealed(replacement, await self._sealer(session_id, writing=False))
        return await cast(Compacting, self.inner).compact(session_id, branch, expected, sealed)

    async def full_history(
        self, session_id: str, branch: str, limit: int, max_bytes: int | None = None
    ) -> list[bytes]:
        read = functools.partial(
            cast(Compacting, self.inner).full_history, session_id, branch, limit
        )
        return (await self._within(session_id, read, max_bytes))[0]

    async def branches(self, session_id: str) -> list[BranchInfo]:
        return await self._structured.branches(session_id)

    async def branch_exists(self, session_id: str, branch: str) -> bool:
        return await self._structured.branch_exists(session_id, branch)

    async def create_branch(self, session_id: str, source: str, turn: int, new: str) -> None:
        await self._structured.create_branch(session_id, source, turn, new)

    async def delete_branch(self, session_id: str, branch: str) -> None:
        await self._structured.delete_branch(session_id, branch)

    async def user_turns(self, session_id: str, branch: str) -> list[UserTurn]:
        turns = await self._structured.user_turns(session_id, branch)
        keys = await self._subject_keys(t.item for t in turns)
        return [
            replace(t, item=self.keyring.decrypt(self.store, session_id, t.item, keys))
            for t in turns
        ]

    async def shapes(self, session_id: str, branch: str) -> list[ItemShape]:
        """With `hideToolNames` the backend holds no tool name, so the shapes come from
        the decrypted items themselves, numbered as the drivers number turns."""
        if not self.keyring.hide_tool_names:
            return await self._structured.shapes(session_id, branch)
        return shapes_of(await self.latest_in(session_id, branch, None))

    async def record_usage(
        self, session_id: str, branch: str, turn: int | None, anchor: int | None, usage: Usage
    ) -> int | None:
        return await self._structured.record_usage(session_id, branch, turn, anchor, usage)

    async def usage(self, session_id: str, branch: str | None) -> list[TurnUsage]:
        return await self._structured.usage(session_id, branch)

    async def label(self, session_id: str, changes: LabelChanges, most: int) -> SessionInfo:
        """Labels are kept in clear: the backend finds sessions by them. A session's
        subject, once set, stays until the session is cleared or erased (its items are
        sealed under that subject's key); set on a session that holds items, it seals
        them again under the subject's key there and then. The subject's key is made at
        their first item, not their first label: an import labels a session before it
        appends the items exported sealed, which then find an erased subject's key gone."""
        labelled = cast(Labelled, self.inner)
        label = None if self.subjects is None else self.subjects.label
        if label is None or label not in changes:
            return await labelled.label(session_id, changes, most)
        before = await labelled.session_info(session_id)
        held = None if before is None else before.labels.get(label)
        if held is not None and changes[label] != held:
            raise Conflict(
                "subject_fixed",
                f"the session's {label!r} label names the subject its items are sealed "
                "for; it cannot change: clear the session, or use another one",
            )
        info = await labelled.label(session_id, changes, most)
        if before is not None and held is None and changes[label] is not None:
            await self.reencrypt(session_id)  # a session new now holds nothing to seal
        return info

    async def session_info(self, session_id: str) -> SessionInfo | None:
        return await cast(Labelled, self.inner).session_info(session_id)

    async def find_sessions(self, query: SessionQuery) -> list[SessionInfo]:
        return await cast(Labelled, self.inner).find_sessions(query)

    async def erase(self, session_id: str, idle_since: float | None = None) -> int | None:
        return await cast(Labelled, self.inner).erase(session_id, idle_since)

    async def settle_erasures(self) -> None:
        await cast(Labelled, self.inner).settle_erasures()

    async def record_erasure(self, record: ErasureRecord) -> None:
        await cast(Labelled, self.inner).record_erasure(record)

    async def erasures(self, limit: int) -> list[ErasureRecord]:
        return await cast(Labelled, self.inner).erasures(limit)

    async def list_sessions(self, prefix: str, after: str | None, limit: int) -> list[str]:
        return await self.inner.list_sessions(prefix, after, limit)

    async def sweep(self) -> int:
        return await self.inner.sweep()

    async def rewrite(self, session_id: str, transform: Transform) -> int:
        """`transform` sees and returns plaintext; what it changes is sealed again."""
        seal = await self._sealer(session_id, writing=False)
        keys = await self._own_subject_keys(session_id)

        def reseal(data: bytes) -> bytes | None:
            plaintext, position = self.keyring.open(self.store, session_id, data, keys)
            new = transform(plaintext)
            return None if new is None else seal(new, position)

        return await self.inner.rewrite(session_id, reseal)

    async def reencrypt(self, session_id: str) -> int:
        """Seal again the session's items that are not sealed as it seals them now: under
        another store key than the primary, or (for a session with a subject) under a
        store key at all. A subject's items stay as they are: a rotation re-wraps their
        key instead (`Subjects.rewrap`)."""
        subject = await self._subject(session_id)
        seal = await self._sealer(session_id, writing=False)

        def reseal(data: bytes) -> bytes | None:
            envelope = envelope_of(data)
            if envelope is not None and envelope.subject is not None:
                return None
            under_primary = envelope is not None and envelope.key_id == self.keyring.primary
            keeps_position = envelope is not None and envelope.position is not None
            if under_primary and (subject is None or not keeps_position):
                return None
            plaintext, position = self.keyring.open(self.store, session_id, data)
            return seal(plaintext, position)

        return await self.inner.rewrite(session_id, reseal)

    async def _own_subject_keys(self, session_id: str) -> Mapping[str, bytes]:
        subject = await self._subject(session_id)
        if subject is None or self.subjects is None:
            return NO_KEYS
        return await self.subjects.keys_for([subject])

    async def key_census(self, session_id: str) -> tuple[dict[str, int], int, int]:
        """How many of the session's stored items (every branch, the compaction archive)
        depend on each store key id, how many are stored in clear (written before the
        store encrypted), and how many are sealed for a subject whose key is destroyed.
        A subject's item depends on the store key that wraps the subject's key. Read
        through `rewrite` with a transform that changes nothing, so it sees exactly the
        items a re-encryption would."""
        sealed: dict[str, int] = {}
        by_subject: dict[str, int] = {}
        clear = 0

        def count(data: bytes) -> None:
            nonlocal clear
            envelope = envelope_of(data)
            if envelope is None:
                clear += 1
            elif envelope.subject is not None:
                by_subject[envelope.subject] = by_subject.get(envelope.subject, 0) + 1
            else:
                key_id = cast(str, envelope.key_id)
                sealed[key_id] = sealed.get(key_id, 0) + 1

        await self.inner.rewrite(session_id, count)
        wrapping = {} if self.subjects is None else await self.subjects.wrapping_key_ids(by_subject)
        shredded = 0
        for subject, n in by_subject.items():
            key_id = wrapping.get(subject)
            if key_id is None:
                shredded += n
            else:
                sealed[key_id] = sealed.get(key_id, 0) + n
        return sealed, clear, shredded
