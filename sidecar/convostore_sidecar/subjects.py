"""Subject keys: the data key each subject's items are sealed under (crypto-shredding).

A subject is the person a session belongs to, named by the store's subject label
(`encryption.subjectLabel`, say `user_id`). Their key is made at their first write,
random, and kept in the backend wrapped by the store key; it is read again on every
call that needs it, so an erasure by any sidecar takes effect at once in all of them.
Erasing the subject destroys the wrapped key, and with it every copy of their items,
wherever it was copied to: a backup still holds the key wrapped by the store key of
its day, so retiring that store key after the erasure (`convostore keys rotate`)
finishes the job. A rotation re-wraps the subjects' keys alone: their items, sealed
under keys that do not change, stay as they are.

The backend names a subject by a digest of the store and the label's value, so the key
table holds no one's id.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Iterable

from .drivers.base import SubjectKeys
from .keyring import KEY_BYTES, SUBJECT_BYTES, Keyring

PAGE = 500
UNWRAPPED_KEPT = 4096


class Subjects:
    def __init__(self, keys: SubjectKeys, keyring: Keyring, store: str) -> None:
        assert keyring.subject_label is not None
        self.label: str = keyring.subject_label
        self._keys, self._keyring, self._store = keys, keyring, store
        self._unwrapped: dict[bytes, bytes] = {}

    def subject_of(self, value: str) -> str:
        named = f"convostore subject\x00{self._store}\x00{self.label}\x00{value}"
        return hashlib.sha256(named.encode()).digest()[:SUBJECT_BYTES].hex()

    async def key_for_write(self, subject: str) -> bytes:
        """The subject's key, made now if they have none."""
        wrapped = await self._keys.subject_key(subject)
        if wrapped is None:
            made = self._keyring.wrap(self._store, subject, os.urandom(KEY_BYTES))
            wrapped = await self._keys.keep_subject_key(subject, made)
        return self._unwrap(subject, wrapped)

    async def keys_for(self, subjects: Iterable[str]) -> dict[str, bytes]:
        """The keys the store still holds of these subjects (an erased one's is gone)."""
        held = await self._held(subjects)
        return {subject: self._unwrap(subject, wrapped) for subject, wrapped in held.items()}

    async def _held(self, subjects: Iterable[str]) -> dict[str, bytes]:
        """These subjects' keys as the backend holds them, wrapped; erased: absent."""
        found = {}
        for subject in set(subjects):
            wrapped = await self._keys.subject_key(subject)
            if wrapped is not None:
                found[subject] = wrapped
        return found

    def _unwrap(self, subject: str, wrapped: bytes) -> bytes:
        key = self._unwrapped.get(wrapped)
        if key is None:
            key = self._keyring.unwrap(self._store, subject, wrapped)
            if len(self._unwrapped) >= UNWRAPPED_KEPT:
                self._unwrapped.clear()
            self._unwrapped[wrapped] = key
        return key

    async def forget(self, value: str) -> bool:
        """Destroy the key of the subject this label value names."""
        subject = self.subject_of(value)
        wrapped = await self._keys.subject_key(subject)
        if wrapped is not None:
            self._unwrapped.pop(wrapped, None)
        return await self._keys.forget_subject_key(subject)

    async def forget_all(self) -> int:
        """Destroy every subject's key: the store is being deleted. Passes over the keys
        until one finds none (a scan's page may come back empty before its end)."""
        forgotten = 0
        while True:
            found, cursor = 0, ""
            while True:
                page, cursor = await self._keys.subject_keys(cursor, PAGE)
                for entry in page:
                    forgotten += await self._keys.forget_subject_key(entry.subject)
                found += len(page)
                if not cursor:
                    break
            if not found:
                self._unwrapped.clear()
                return forgotten

    async def rewrap(self, budget: float) -> tuple[int, bool]:
        """Re-seal the subjects' keys that are not under the primary key, for up to
        `budget` seconds; how many, and whether none is left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        rewrapped, cursor = 0, ""
        while True:
            page, cursor = await self._keys.subject_keys(cursor, PAGE)
            for entry in page:
                if self._keyring.wrapped_with(entry.wrapped) == self._keyring.primary:
                    continue
                key = self._keyring.unwrap(self._store, entry.subject, entry.wrapped)
                new = self._keyring.wrap(self._store, entry.subject, key)
                rewrapped += await self._keys.replace_subject_key(entry.subject, entry.wrapped, new)
            if not cursor:
                return rewrapped, True
            if loop.time() > deadline:
                return rewrapped, False

    async def census(self) -> dict[str, int]:
        """How many subjects' keys each store key wraps."""
        counts: dict[str, int] = {}
        cursor = ""
        while True:
            page, cursor = await self._keys.subject_keys(cursor, PAGE)
            for entry in page:
                key_id = self._keyring.wrapped_with(entry.wrapped)
                counts[key_id] = counts.get(key_id, 0) + 1
            if not cursor:
                return counts

    async def wrapping_key_ids(self, subjects: Iterable[str]) -> dict[str, str]:
        """The store key id each of these subjects' keys is wrapped by; erased: absent."""
        held = await self._held(subjects)
        return {subject: self._keyring.wrapped_with(wrapped) for subject, wrapped in held.items()}
