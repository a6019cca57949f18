"""Store keys and the envelopes items are sealed in: AES-256-GCM per item, a key per
session, rotation without downtime.

Each store may name a keyring: one primary key that encrypts new items, and older keys
that still decrypt. A session's own key is derived from the store key with HKDF, its
`info` binding store and session, and the associated data binds them again, so a
ciphertext copied into another session or store fails to decrypt instead of appearing
there. Every ciphertext starts with a header naming the key it was made with, so reads
pick the right key and rotation can find what is left to re-encrypt.

    "cs2" | key-id length (1 byte) | key id | position (8 bytes) | nonce (12) | sealed

The associated data also binds the position the backend gave the item when it was
appended (the driver seals it in the step that makes the position the item's: see
`Sealed`). Positions only grow along a branch, so reads check them: two items swapped,
an old item put back after newer ones, an item repeated, all fail as `DecryptionFailed`
instead of being served. Items written before positions were bound ("cs1", no position)
still decrypt, unchecked for order.

With a subject label (`subjectLabel`, crypto-shredding), a labelled session's items are
sealed instead under its subject's own data key, random, which the backend keeps
wrapped by the store key ("ck1", the same header). Destroying that one wrapped key
makes every copy of the subject's items unreadable, in backups and replicas too:

    "cs3" | subject (16 bytes) | position (8 bytes) | nonce (12) | sealed

A missing or wrong key raises `DecryptionFailed` with the key id: never garbage, never
an item silently skipped. Drivers see only ciphertext; they store bytes as they get them.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, cast

from .labels import NAME

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from .sections import Section

MAGIC = b"cs1"
POSITIONED = b"cs2"
SUBJECT_SEALED = b"cs3"
WRAPPED = b"ck1"
SUBJECT_BYTES = 16
POSITION_BYTES = 8
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32
KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
NO_KEYS: Mapping[str, bytes] = {}


class DecryptionFailed(Exception):
    """An item that cannot be decrypted with the keys this sidecar has."""

    def __init__(self, key_id: str | None, reason: str) -> None:
        super().__init__(reason)
        self.key_id = key_id
        self.reason = reason


class SubjectErased(DecryptionFailed):
    """An item sealed under a subject key the store no longer holds: shredded."""

    def __init__(self) -> None:
        super().__init__(None, "the item's subject was erased: its key is destroyed")


@dataclass(frozen=True)
class Envelope:
    """An item's header: the store key it was sealed with, or (cs3) its subject."""

    key_id: str | None
    subject: str | None
    position: int | None
    nonce: bytes
    sealed: bytes


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
    subject_label: str | None = None
    """The label whose value names a session's subject, whose own key seals its items."""
    require_subject: bool = False
    """Refuse writes to a session without the subject label (nothing left unshreddable)."""

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
        subject_label = s.string("subjectLabel", None)
        if subject_label is not None and not NAME.fullmatch(subject_label):
            s.fail("subjectLabel", "must be a label name (1-63 letters, digits, _ . -)")
        require_subject = s.boolean("requireSubject", False)
        if require_subject and subject_label is None:
            s.fail("requireSubject", "needs subjectLabel, the label that names the subject")
        return cls(
            keys,
            primary,
            s.boolean("allowPlaintext", False),
            s.boolean("hideToolNames", False),
            subject_label,
            require_subject,
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

    def seal_for_subject(
        self, store: str, session_id: str, subject: str, key: bytes, plaintext: bytes, at: int
    ) -> bytes:
        """Sealed under the subject's data `key` at position `at`."""
        nonce = os.urandom(NONCE_BYTES)
        aead = _session_cipher(key, store, session_id)
        sealed = aead.encrypt(nonce, plaintext, _associated(store, session_id, at, subject))
        header = SUBJECT_SEALED + bytes.fromhex(subject) + at.to_bytes(POSITION_BYTES, "big")
        return header + nonce + sealed

    def decrypt(
        self, store: str, session_id: str, data: bytes, subject_keys: Mapping[str, bytes] = NO_KEYS
    ) -> bytes:
        return self.open(store, session_id, data, subject_keys)[0]

    def open(
        self, store: str, session_id: str, data: bytes, subject_keys: Mapping[str, bytes] = NO_KEYS
    ) -> tuple[bytes, int | None]:
        """The plaintext and the position it was sealed at (None for a "cs1" item); a
        subject's item opens with its key from `subject_keys`, or is `SubjectErased`."""
        envelope = envelope_of(data)
        if envelope is None:
            if self.allow_plaintext and data[:1] == b"{":
                return data, None
            raise DecryptionFailed(None, "the item is not encrypted (allowPlaintext is off)")
        if envelope.subject is not None:
            key = subject_keys.get(envelope.subject)
            if key is None:
                raise SubjectErased
        else:
            key = self._key(envelope.key_id)
        aad = _associated(store, session_id, envelope.position, envelope.subject)
        cipher = _session_cipher(key, store, session_id)
        return _opened(cipher, envelope, aad, envelope.key_id), envelope.position

    def _key(self, key_id: str | None) -> bytes:
        key = self.keys.get(key_id or "")
        if key is None:
            raise DecryptionFailed(key_id, f"key {key_id!r} is not in this store's keyring")
        return key

    def key_id_of(self, data: bytes) -> str | None:
        envelope = envelope_of(data)
        return None if envelope is None else envelope.key_id

    def wrap(self, store: str, subject: str, key: bytes) -> bytes:
        """A subject's data key sealed under the primary key, bound to store and subject."""
        nonce = os.urandom(NONCE_BYTES)
        sealed = _wrapping_cipher(self.keys[self.primary], store).encrypt(
            nonce, key, _wrapped_for(store, subject)
        )
        return WRAPPED + bytes([len(self.primary)]) + self.primary.encode() + nonce + sealed

    def unwrap(self, store: str, subject: str, wrapped: bytes) -> bytes:
        envelope = _wrapped_envelope(wrapped)
        key_id = envelope.key_id
        cipher = _wrapping_cipher(self._key(key_id), store)
        return _opened(cipher, envelope, _wrapped_for(store, subject), key_id)

    def wrapped_with(self, wrapped: bytes) -> str:
        """The id of the store key a wrapped subject key is sealed under."""
        return cast(str, _wrapped_envelope(wrapped).key_id)


def _wrapped_envelope(wrapped: bytes) -> Envelope:
    """A wrapped subject key's header ("ck1", the store key's id) and sealed bytes."""
    if wrapped[: len(WRAPPED)] != WRAPPED or len(wrapped) < len(WRAPPED) + 1:
        raise DecryptionFailed(None, "a subject key is not in a key envelope")
    nonce_at = len(WRAPPED) + 1 + wrapped[len(WRAPPED)]
    key_id = wrapped[len(WRAPPED) + 1 : nonce_at].decode("ascii", "replace")
    nonce = wrapped[nonce_at : nonce_at + NONCE_BYTES]
    return Envelope(key_id, None, None, nonce, wrapped[nonce_at + NONCE_BYTES :])


def _opened(cipher: AESGCM, envelope: Envelope, aad: bytes, key_id: str | None) -> bytes:
    if len(envelope.nonce) < NONCE_BYTES or len(envelope.sealed) < TAG_BYTES:
        raise DecryptionFailed(key_id, f"the item made with key {key_id!r} is truncated")
    from cryptography.exceptions import InvalidTag

    try:
        return cipher.decrypt(envelope.nonce, envelope.sealed, aad)
    except InvalidTag as exc:
        what = "its subject's key" if envelope.subject else f"key {key_id!r}"
        raise DecryptionFailed(
            key_id, f"{what} does not authenticate the item (wrong key or tampered)"
        ) from exc


def refuse_ciphertext(data: bytes) -> None:
    """A store with encryption off must not hand out an encrypted item as if it were JSON."""
    if data[:1] != b"{":
        envelope = envelope_of(data)
        key_id = None if envelope is None else envelope.key_id
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


def envelope_of(data: bytes) -> Envelope | None:
    """The item's header; None for bytes that are no envelope (JSON in clear)."""
    magic = data[: len(MAGIC)]
    if magic == SUBJECT_SEALED:
        subject_end = len(magic) + SUBJECT_BYTES
        nonce_at = subject_end + POSITION_BYTES
        return Envelope(
            None,
            data[len(magic) : subject_end].hex(),
            int.from_bytes(data[subject_end:nonce_at], "big"),
            data[nonce_at : nonce_at + NONCE_BYTES],
            data[nonce_at + NONCE_BYTES :],
        )
    if magic not in (MAGIC, POSITIONED) or len(data) < len(MAGIC) + 1:
        return None
    length = data[len(MAGIC)]
    start = len(MAGIC) + 1 + length
    key_id = data[len(MAGIC) + 1 : start].decode("ascii", "replace")
    position = None
    if magic == POSITIONED:
        position = int.from_bytes(data[start : start + POSITION_BYTES], "big")
        start += POSITION_BYTES
    return Envelope(
        key_id, None, position, data[start : start + NONCE_BYTES], data[start + NONCE_BYTES :]
    )


def _associated(
    store: str, session_id: str, position: int | None = None, subject: str | None = None
) -> bytes:
    """What a ciphertext is bound to; `position` for "cs2" items (v2), and the subject
    too for "cs3" items (v3)."""
    if subject is not None:
        return f"convostore/v3\x00{store}\x00{session_id}\x00{position}\x00{subject}".encode()
    if position is None:
        return f"convostore/v1\x00{store}\x00{session_id}".encode()
    return f"convostore/v2\x00{store}\x00{session_id}\x00{position}".encode()


def _wrapped_for(store: str, subject: str) -> bytes:
    return f"convostore/subject-key\x00{store}\x00{subject}".encode()


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


@lru_cache(maxsize=64)
def _wrapping_cipher(key: bytes, store: str) -> AESGCM:
    """The cipher a store key seals its subjects' keys with: derived apart from every
    session's, so a wrapped key and an item never open under each other's key."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    derived = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES,
        salt=None,
        info=b"convostore subject keys\x00" + store.encode(),
    ).derive(key)
    return AESGCM(derived)
