"""Exports that an erasure makes unreadable: a subject's items leave the store sealed.

`convostore sessions export` reads items with `sealed=true`. Each item of a session
that has a subject then comes as

    {"type": "convostore.sealed", "subject": <digest>, "opens_turn": true, "sealed": <base64url>}

(`opens_turn` only on a user message): the item sealed with AES-SIV under a key derived
from the subject's data key, bound to the store and the subject. Erasing the subject
destroys that data key, and every export of their items goes unreadable with it,
wherever the file was copied. A sealed item opens only in the store that exported it,
appended to a session of the same subject (an import restores the label first), where
it is appended as the item it was.

Sealing is deterministic: an item seals to the same text each time, so an import run
again recognises what it wrote before (and a reader of the file learns which of a
subject's items are equal, nothing more). `opens_turn` says in clear what the backend's
structure already holds in clear, so an export can place each turn's usage; it is
authenticated with the item.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

from .jsonbody import dumps
from .keyring import KEY_BYTES, SUBJECT_BYTES
from .turns import is_user_message

SEALED_TYPE = "convostore.sealed"
SIV_TAG_BYTES = 16
SUBJECT = re.compile(f"[0-9a-f]{{{2 * SUBJECT_BYTES}}}")
BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
WRAPPER_BYTES = 128
"""A wrapper's bytes beyond its base64 text: its type, subject and flag."""


class NotSealedItem(ValueError):
    """An item that says it is sealed but is not shaped as a sealed item is."""


@dataclass(frozen=True)
class SealedItem:
    subject: str
    opens_turn: bool
    sealed: bytes


def is_sealed(item: dict[str, Any]) -> bool:
    return item.get("type") == SEALED_TYPE


def sealed_item(item: dict[str, Any]) -> SealedItem:
    """A sealed item checked for shape (whether it opens is for its store to say)."""
    extra = set(item) - {"type", "subject", "opens_turn", "sealed"}
    if extra:
        raise NotSealedItem(f"a sealed item has no {sorted(extra)[0]!r} field")
    subject, sealed, opens_turn = item.get("subject"), item.get("sealed"), item.get("opens_turn")
    if not isinstance(subject, str) or not SUBJECT.fullmatch(subject):
        raise NotSealedItem(
            f"a sealed item's 'subject' is {2 * SUBJECT_BYTES} lowercase hex digits"
        )
    if opens_turn not in (None, True):
        raise NotSealedItem("a sealed item's 'opens_turn' is true, or absent")
    if not isinstance(sealed, str) or not BASE64URL.fullmatch(sealed):
        raise NotSealedItem("a sealed item's 'sealed' is unpadded base64url text")
    try:
        raw = base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4))
    except (binascii.Error, ValueError):
        raise NotSealedItem("a sealed item's 'sealed' is unpadded base64url text") from None
    if len(raw) < SIV_TAG_BYTES:
        raise NotSealedItem("a sealed item's 'sealed' is too short to hold an item")
    return SealedItem(subject, opens_turn is True, raw)


def most_sealed_bytes(max_item_bytes: int) -> int:
    """The size of the sealed item of an item of `max_item_bytes`."""
    return 4 * -(-(max_item_bytes + SIV_TAG_BYTES) // 3) + WRAPPER_BYTES


class ExportCipher:
    """Seals and opens one subject's exported items."""

    def __init__(self, store: str, subject: str, subject_key: bytes) -> None:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.ciphers.aead import AESSIV
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        self.store, self.subject = store, subject
        bound = f"{store}\x00{subject}".encode()
        derived = HKDF(
            algorithm=hashes.SHA256(),
            length=2 * KEY_BYTES,
            salt=None,
            info=b"convostore export key\x00" + bound,
        ).derive(subject_key)
        self._siv = AESSIV(derived)

    def _associated(self, opens_turn: bool) -> list[bytes]:
        turn = b"opens turn" if opens_turn else b""
        return [b"convostore/export-v1", self.store.encode(), self.subject.encode(), turn]

    def seal(self, plaintext: bytes) -> bytes:
        opens_turn = is_user_message(plaintext)
        sealed = self._siv.encrypt(plaintext, self._associated(opens_turn))
        item: dict[str, Any] = {"type": SEALED_TYPE, "subject": self.subject}
        if opens_turn:
            item["opens_turn"] = True
        item["sealed"] = base64.urlsafe_b64encode(sealed).decode().rstrip("=")
        return dumps(item)

    def open(self, item: SealedItem) -> bytes | None:
        """The item it was; None when it does not open here (another store's, another
        subject's, or altered)."""
        from cryptography.exceptions import InvalidTag

        if item.subject != self.subject:
            return None
        try:
            return self._siv.decrypt(item.sealed, self._associated(item.opens_turn))
        except InvalidTag:
            return None
