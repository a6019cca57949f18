"""Encryption at rest: AES-256-GCM per item, a key per session, rotation without downtime.

Each store may name a keyring: one primary key that encrypts new items, and older keys
that still decrypt. A session's own key is derived from the store key with HKDF, its
`info` binding store and session, and the associated data binds them again, so a
ciphertext copied into another session or store fails to decrypt instead of appearing
there. Every ciphertext starts with a header naming the key id it was made with, so
reads pick the right key and rotation can find what is left to re-encrypt.

    magic "cs2" | key-id length (1 byte) | key id | position (8 bytes) | nonce (12 bytes)
        | ciphertext + tag

The associated data also binds the position the backend gave the item when it was
appended (the driver seals it in the step that makes the position the item's: see
`Sealed`). Positions only grow along a branch, so reads check them: two items swapped,
an old item put back after newer ones, an item repeated, all fail as `DecryptionFailed`
instead of being served. Items written before positions were bound ("cs1", no position)
still decrypt, unchecked for order.

A missing or wrong key raises `DecryptionFailed` with the key id: never garbage, never
an item silently skipped. Drivers see only ciphertext; they store bytes as they get them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import os
import random
import re
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, cast

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
    Transform,
    TurnUsage,
    Usage,
    UserTurn,
)
from .structure import shapes_of

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from .sections import Section

MAGIC = b"cs1"
POSITIONED = b"cs2"
POSITION_BYTES = 8
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32
KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
Read = Callable[[int | None], Awaitable[list[bytes]]]
"""A read of stored items within a byte cap."""


class DecryptionFailed(Exception):
    """An item that cannot be decrypted with the keys this sidecar has."""

    def __init__(self, key_id: str | None, reason: str) -> None:
        super().__init__(reason)
        self.key_id = key_id
        self.reason = reason


def generate_key() -> str:
    """A new random store key, base64-encoded as key files and Secrets hold it."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


def decode_key(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{where}: not base64") from exc
    if len(key) != KEY_BYTES:
        raise ValueError(f"{where}: a key has {KEY_BYTES} bytes, this one has {len(key)}")
    return key


@dataclass(frozen=True)
class Keyring:
    """Keys by id; `primary` encrypts, every key decrypts."""

    keys: dict[str, bytes]
    primary: str
    allow_plaintext: bool = False
    hide_tool_names: bool = False
    """Keep tool names out of the backend's structure columns too (see `shapes`)."""

    @classmethod
    def parse(cls, s: Section) -> Keyring:
        keys: dict[str, bytes] = {}
        keys_dir = s.string("keysDir")
        if keys_dir is not None:
            directory = Path(keys_dir)
            if not directory.is_dir():
                s.fail("keysDir", f"{keys_dir!r} is not a readable directory")
            for path in sorted(directory.iterdir()):
                if path.is_file() and KEY_ID.fullmatch(path.name):
                    keys[path.name] = _read_key(s, "keysDir", path)
        listed = s.raw("keys") or []
        if not isinstance(listed, list):
            s.fail("keys", "must be a list of {id, file} or {id, value}")
        for index, entry in enumerate(listed):
            keys.update(_parse_key_entry(s, index, entry))
        if not keys:
            s.fail("keys", "name at least one key (keys or keysDir)")
        primary = s.string("primary", min(keys) if len(keys) == 1 else None)
        if primary is None:
            s.fail("primary", f"name the key that encrypts new items, one of {sorted(keys)}")
        if primary not in keys:
            s.fail("primary", f"{primary!r} is not among the keys {sorted(keys)}")
        return cls(
            keys,
            primary,
            s.boolean("allowPlaintext", False),
            s.boolean("hideToolNames", False),
        )

    def encrypt(self, store: str, session_id: str, plaintext: bytes, position: int | None) -> bytes:
        """Sealed under the primary key at `position`; without one, a "cs1" item (how
        rotation keeps an item written before positions were bound)."""
        key_id = self.primary
        nonce = os.urandom(NONCE_BYTES)
        aead = _session_cipher(self.keys[key_id], store, session_id)
        sealed = aead.encrypt(nonce, plaintext, _associated(store, session_id, position))
        key = bytes([len(key_id)]) + key_id.encode()
        if position is None:
            return MAGIC + key + nonce + sealed
        return POSITIONED + key + position.to_bytes(POSITION_BYTES, "big") + nonce + sealed

    def decrypt(self, store: str, session_id: str, data: bytes) -> bytes:
        return self.open(store, session_id, data)[0]

    def open(self, store: str, session_id: str, data: bytes) -> tuple[bytes, int | None]:
        """The plaintext and the position it was sealed at (None for a "cs1" item)."""
        envelope = _parse(data)
        if envelope is None:
            if self.allow_plaintext and data[:1] == b"{":
                return data, None
            raise DecryptionFailed(None, "the item is not encrypted (allowPlaintext is off)")
        key_id, position, nonce, sealed = envelope
        key = self.keys.get(key_id)
        if key is None:
            raise DecryptionFailed(key_id, f"key {key_id!r} is not in this store's keyring")
        if len(nonce) < NONCE_BYTES or len(sealed) < TAG_BYTES:
            raise DecryptionFailed(key_id, f"the item made with key {key_id!r} is truncated")
        from cryptography.exceptions import InvalidTag

        try:
            plaintext = _session_cipher(key, store, session_id).decrypt(
                nonce, sealed, _associated(store, session_id, position)
            )
        except InvalidTag as exc:
            raise DecryptionFailed(
                key_id, f"key {key_id!r} does not authenticate the item (wrong key or tampered)"
            ) from exc
        return plaintext, position

    def key_id_of(self, data: bytes) -> str | None:
        envelope = _parse(data)
        return None if envelope is None else envelope[0]


def refuse_ciphertext(data: bytes) -> None:
    """A store with encryption off must not hand out an encrypted item as if it were JSON."""
    if data[:1] != b"{":
        envelope = _parse(data)
        key_id = None if envelope is None else envelope[0]
        raise DecryptionFailed(
            key_id, f"the item is encrypted (key {key_id!r}) but this store has no encryption"
        )


def _read_key(s: Section, field: str, path: Path) -> bytes:
    try:
        return decode_key(path.read_text("ascii"), f"key file {str(path)!r}")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        s.fail(field, str(exc))
        raise


def _parse_key_entry(s: Section, index: int, entry: object) -> dict[str, bytes]:
    field = f"keys[{index}]"
    if not isinstance(entry, dict) or not KEY_ID.fullmatch(str(entry.get("id", ""))):
        s.fail(field, "needs an id of 1-64 letters, digits, '.', '_' or '-'")
    assert isinstance(entry, dict)
    if set(entry) - {"id", "file", "value"} or ("file" in entry) == ("value" in entry):
        s.fail(field, "has an id and exactly one of file or value")
    if "file" in entry:
        return {entry["id"]: _read_key(s, field, Path(str(entry["file"])))}
    try:
        return {entry["id"]: decode_key(str(entry["value"]), field)}
    except ValueError as exc:
        s.fail(field, str(exc))
        raise


def _parse(data: bytes) -> tuple[str, int | None, bytes, bytes] | None:
    """Key id, position, nonce and sealed bytes; None for bytes that are no envelope."""
    magic = data[: len(MAGIC)]
    if magic not in (MAGIC, POSITIONED) or len(data) < len(MAGIC) + 1:
        return None
    length = data[len(MAGIC)]
    start = len(MAGIC) + 1 + length
    key_id = data[len(MAGIC) + 1 : start].decode("ascii", "replace")
    position = None
    if magic == POSITIONED:
        position = int.from_bytes(data[start : start + POSITION_BYTES], "big")
        start += POSITION_BYTES
    return key_id, position, data[start : start + NONCE_BYTES], data[start + NONCE_BYTES :]


def _associated(store: str, session_id: str, position: int | None = None) -> bytes:
    """What a ciphertext is bound to; `position` for "cs2" items (v2)."""
    if position is None:
        return f"convostore/v1\x00{store}\x00{session_id}".encode()
    return f"convostore/v2\x00{store}\x00{session_id}\x00{position}".encode()


@lru_cache(maxsize=4096)
def _session_cipher(key: bytes, store: str, session_id: str) -> AESGCM:
    """Imports `cryptography` (about 6.6 MB resident) only once a store encrypts."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    derived = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES,
        salt=None,
        info=b"convostore session key\x00" + _associated(store, session_id),
    ).derive(key)
    return AESGCM(derived)


POP_ATTEMPTS = 50


class _NewerArrived(Exception):
    """The newest item changed between the check of its order and the pop."""


class _StillNewest:
    """The pop's check: the item about to go is the one whose order was checked."""

    def __init__(
        self, driver: EncryptedDriver, session_id: str, expected: bytes | None, check: Check | None
    ) -> None:
        self.driver, self.session_id = driver, session_id
        self.expected, self.check = expected, check
        self.plaintext = b""

    def __call__(self, data: bytes) -> None:
        if data != self.expected:
            raise _NewerArrived
        self.plaintext = self.driver.keyring.decrypt(self.driver.store, self.session_id, data)
        if self.check is not None:
            self.check(self.plaintext)


class EncryptedDriver:
    """Wraps any driver: items are encrypted on the way in and decrypted on the way out."""

    def __init__(self, inner: Driver, keyring: Keyring, store: str) -> None:
        self.inner, self.keyring, self.store = inner, keyring, store
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
        return await self.inner.append(session_id, self._sealed(session_id, items), idempotency)

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

    def _sealed(self, session_id: str, items: Items) -> Sealed:
        if isinstance(items, Sealed):
            raise TypeError("items reach the keyring once, as plaintext")
        plain = list(items)

        def seal(positions: Sequence[int]) -> list[bytes]:
            return [
                self.keyring.encrypt(self.store, session_id, item, position)
                for item, position in zip(plain, positions, strict=True)
            ]

        return Sealed(len(plain), seal)

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
            opened = self._open_in_order(session_id, stored)
            stored_size, opened_size = sum(map(len, stored)), sum(map(len, opened))
            if max_bytes is None or cap is None or stored_size <= cap or opened_size > max_bytes:
                return opened, stored
            cap = max_bytes + stored_size - opened_size

    def _open_in_order(self, session_id: str, items: list[bytes]) -> list[bytes]:
        """Decrypt a window of a branch, oldest first, refusing it unless the positions
        the items were sealed at grow: a reordered, replayed or repeated item."""
        opened, last = [], -1
        for data in items:
            plaintext, position = self.keyring.open(self.store, session_id, data)
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
                self._open_in_order(session_id, window)
                verify = _StillNewest(self, session_id, window[-1] if window else None, check)
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
        sealed = self._sealed(session_id, items)
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
        sealed = self._sealed(session_id, replacement)
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
        return [
            replace(t, item=self.keyring.decrypt(self.store, session_id, t.item)) for t in turns
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
        """Labels are kept in clear: the backend finds sessions by them."""
        return await cast(Labelled, self.inner).label(session_id, changes, most)

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

        def reseal(data: bytes) -> bytes | None:
            plaintext, position = self.keyring.open(self.store, session_id, data)
            new = transform(plaintext)
            return None if new is None else self._reseal(session_id, new, position)

        return await self.inner.rewrite(session_id, reseal)

    async def reencrypt(self, session_id: str) -> int:
        """Re-encrypt the session's items that are not under the primary key."""

        def reseal(data: bytes) -> bytes | None:
            if self.keyring.key_id_of(data) == self.keyring.primary:
                return None
            plaintext, position = self.keyring.open(self.store, session_id, data)
            return self._reseal(session_id, plaintext, position)

        return await self.inner.rewrite(session_id, reseal)

    async def key_census(self, session_id: str) -> tuple[dict[str, int], int]:
        """How many of the session's stored items (every branch, the compaction archive)
        each key id seals, and how many are stored in clear (written before the store
        encrypted). Read through `rewrite` with a transform that changes nothing, so it
        sees exactly the items a re-encryption would."""
        sealed: dict[str, int] = {}
        clear = 0

        def count(data: bytes) -> None:
            nonlocal clear
            key_id = self.keyring.key_id_of(data)
            if key_id is None:
                clear += 1
            else:
                sealed[key_id] = sealed.get(key_id, 0) + 1

        await self.inner.rewrite(session_id, count)
        return sealed, clear

    def _reseal(self, session_id: str, plaintext: bytes, position: int | None) -> bytes:
        """Sealed again at the position it was sealed at; a "cs1" item keeps none."""
        return self.keyring.encrypt(self.store, session_id, plaintext, position)
