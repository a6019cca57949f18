"""Encryption at rest: AES-256-GCM per item, a key per session, rotation without downtime.

Each store may name a keyring: one primary key that encrypts new items, and older keys
that still decrypt. A session's own key is derived from the store key with HKDF, its
`info` binding store and session, and the associated data binds them again, so a
ciphertext copied into another session or store fails to decrypt instead of appearing
there. Every ciphertext starts with a header naming the key id it was made with, so
reads pick the right key and rotation can find what is left to re-encrypt.

    magic "cs1" | key-id length (1 byte) | key id | nonce (12 bytes) | ciphertext + tag

A missing or wrong key raises `DecryptionFailed` with the key id: never garbage, never
an item silently skipped. Drivers see only ciphertext; they store bytes as they get them.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .drivers.base import (
    AppendResult,
    BranchInfo,
    Branching,
    Check,
    Driver,
    Idempotency,
    ItemShape,
    Meta,
    Transform,
    TurnUsage,
    Usage,
    UserTurn,
)
from .structure import shapes_of

if TYPE_CHECKING:
    from .config import Section

MAGIC = b"cs1"
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32
KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


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

    def encrypt(self, store: str, session_id: str, plaintext: bytes) -> bytes:
        key_id = self.primary
        nonce = os.urandom(NONCE_BYTES)
        aead = _session_cipher(self.keys[key_id], store, session_id)
        sealed = aead.encrypt(nonce, plaintext, _associated(store, session_id))
        return MAGIC + bytes([len(key_id)]) + key_id.encode() + nonce + sealed

    def decrypt(self, store: str, session_id: str, data: bytes) -> bytes:
        key_id, nonce, sealed = _parse(data)
        if key_id is None:
            if self.allow_plaintext and data[:1] == b"{":
                return data
            raise DecryptionFailed(None, "the item is not encrypted (allowPlaintext is off)")
        key = self.keys.get(key_id)
        if key is None:
            raise DecryptionFailed(key_id, f"key {key_id!r} is not in this store's keyring")
        if len(nonce) < NONCE_BYTES or len(sealed) < TAG_BYTES:
            raise DecryptionFailed(key_id, f"the item made with key {key_id!r} is truncated")
        try:
            return _session_cipher(key, store, session_id).decrypt(
                nonce, sealed, _associated(store, session_id)
            )
        except InvalidTag as exc:
            raise DecryptionFailed(
                key_id, f"key {key_id!r} does not authenticate the item (wrong key or tampered)"
            ) from exc

    def key_id_of(self, data: bytes) -> str | None:
        return _parse(data)[0]


def refuse_ciphertext(data: bytes) -> None:
    """A store with encryption off must not hand out an encrypted item as if it were JSON."""
    if data[:1] != b"{":
        key_id = _parse(data)[0]
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


def _parse(data: bytes) -> tuple[str | None, bytes, bytes]:
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 1:
        return None, b"", b""
    length = data[len(MAGIC)]
    start = len(MAGIC) + 1
    key_id = data[start : start + length].decode("ascii", "replace")
    nonce = data[start + length : start + length + NONCE_BYTES]
    return key_id, nonce, data[start + length + NONCE_BYTES :]


def _associated(store: str, session_id: str) -> bytes:
    return f"convostore/v1\x00{store}\x00{session_id}".encode()


@lru_cache(maxsize=4096)
def _session_cipher(key: bytes, store: str, session_id: str) -> AESGCM:
    derived = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES,
        salt=None,
        info=b"convostore session key\x00" + _associated(store, session_id),
    ).derive(key)
    return AESGCM(derived)


class EncryptedDriver:
    """Wraps any driver: items are encrypted on the way in and decrypted on the way out."""

    def __init__(self, inner: Driver, keyring: Keyring, store: str) -> None:
        self.inner, self.keyring, self.store = inner, keyring, store

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def ping(self) -> None:
        await self.inner.ping()

    async def append(
        self, session_id: str, items: Sequence[bytes], idempotency: Idempotency | None
    ) -> AppendResult:
        sealed = [self.keyring.encrypt(self.store, session_id, item) for item in items]
        return await self.inner.append(session_id, sealed, idempotency)

    async def latest(self, session_id: str, limit: int | None) -> list[bytes]:
        items = await self.inner.latest(session_id, limit)
        return [self.keyring.decrypt(self.store, session_id, item) for item in items]

    async def pop(self, session_id: str, check: Check | None = None) -> bytes | None:
        opened: list[bytes] = []

        def decrypt_first(data: bytes) -> None:
            opened.append(self.keyring.decrypt(self.store, session_id, data))
            if check is not None:
                check(opened[-1])

        item = await self.inner.pop(session_id, decrypt_first)
        return None if item is None else opened[-1]

    async def clear(self, session_id: str) -> None:
        await self.inner.clear(session_id)

    @property
    def branching(self) -> bool:
        """Structure is the inner driver's; only items pass through the keyring."""
        return bool(getattr(self.inner, "branching", False))

    @property
    def _structured(self) -> Branching:
        return cast(Branching, self.inner)

    async def append_to(
        self,
        session_id: str,
        branch: str,
        items: Sequence[bytes],
        meta: Sequence[Meta],
        idempotency: Idempotency | None,
    ) -> AppendResult:
        sealed = [self.keyring.encrypt(self.store, session_id, item) for item in items]
        if self.keyring.hide_tool_names:
            meta = [replace(m, tool=None) for m in meta]
        return await self._structured.append_to(session_id, branch, sealed, meta, idempotency)

    async def latest_in(self, session_id: str, branch: str, limit: int | None) -> list[bytes]:
        items = await self._structured.latest_in(session_id, branch, limit)
        return [self.keyring.decrypt(self.store, session_id, item) for item in items]

    async def pop_from(self, session_id: str, branch: str, check: Check | None) -> bytes | None:
        opened: list[bytes] = []

        def decrypt_first(data: bytes) -> None:
            opened.append(self.keyring.decrypt(self.store, session_id, data))
            if check is not None:
                check(opened[-1])

        item = await self._structured.pop_from(session_id, branch, decrypt_first)
        return None if item is None else opened[-1]

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

    async def list_sessions(self, prefix: str, after: str | None, limit: int) -> list[str]:
        return await self.inner.list_sessions(prefix, after, limit)

    async def sweep(self) -> int:
        return await self.inner.sweep()

    async def rewrite(self, session_id: str, transform: Transform) -> int:
        """`transform` sees and returns plaintext; what it changes is sealed again."""

        def reseal(data: bytes) -> bytes | None:
            new = transform(self.keyring.decrypt(self.store, session_id, data))
            return None if new is None else self.keyring.encrypt(self.store, session_id, new)

        return await self.inner.rewrite(session_id, reseal)

    async def reencrypt(self, session_id: str) -> int:
        """Re-encrypt the session's items that are not under the primary key."""

        def reseal(data: bytes) -> bytes | None:
            if self.keyring.key_id_of(data) == self.keyring.primary:
                return None
            plaintext = self.keyring.decrypt(self.store, session_id, data)
            return self.keyring.encrypt(self.store, session_id, plaintext)

        return await self.inner.rewrite(session_id, reseal)
