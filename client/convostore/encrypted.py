"""`EncryptedSession`: end-to-end encryption of any Session's items, in the agent process.

The wrapped session (a `SidecarSession`, or any Agents SDK session) only ever sees
envelopes, `{"type": "convostore.encrypted", "v": 1, "kid": ..., "ct": ...}`: AES-256-GCM
under a key derived (HKDF) from the caller's key and the session id, which is also the
associated data, so neither the sidecar nor the backend can read or move an item. Older
keys may be listed for reading while new items use `key`.

Needs the `cryptography` package (`pip install 'convostore[encryption]'`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import inspect
import json
import os
from typing import Any, Self

from .errors import ConvostoreError

ENVELOPE = "convostore.encrypted"


class DecryptionError(ConvostoreError):
    """An envelope that the keys given cannot open (wrong key, or altered)."""


class EncryptedSession:
    """Wraps `inner` so that what it stores is encrypted with `key` (32 bytes, or base64)."""

    def __init__(
        self, inner: Any, key: bytes | str, *, previous_keys: list[bytes | str] | None = None
    ) -> None:
        try:
            from cryptography.hazmat.primitives import hashes
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
            from cryptography.hazmat.primitives.kdf.hkdf import HKDF
        except ImportError as exc:
            raise ImportError(
                "EncryptedSession needs cryptography: pip install 'convostore[encryption]'"
            ) from exc
        self.inner = inner
        self.session_id: str = inner.session_id
        self.session_settings = getattr(inner, "session_settings", None)
        self._aad = f"convostore/e2e/v1\x00{self.session_id}".encode()
        self._ciphers: dict[str, Any] = {}
        for raw in [key, *(previous_keys or [])]:
            material = _key_bytes(raw)
            kid = hashlib.sha256(material).hexdigest()[:16]
            derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=self._aad).derive(
                material
            )
            self._ciphers.setdefault(kid, AESGCM(derived))
        self._primary = next(iter(self._ciphers))

    def _seal(self, item: Any) -> dict[str, Any]:
        nonce = os.urandom(12)
        plaintext = json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode()
        sealed = self._ciphers[self._primary].encrypt(nonce, plaintext, self._aad)
        return {
            "type": ENVELOPE,
            "v": 1,
            "kid": self._primary,
            "ct": base64.b64encode(nonce + sealed).decode(),
        }

    def _open(self, envelope: Any) -> Any:
        if not isinstance(envelope, dict) or envelope.get("type") != ENVELOPE:
            raise DecryptionError("decryption_failed", "the stored item is not encrypted")
        kid = str(envelope.get("kid"))
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise DecryptionError("decryption_failed", f"no key with id {kid!r} was given")
        try:
            raw = base64.b64decode(envelope["ct"], validate=True)
            return json.loads(cipher.decrypt(raw[:12], raw[12:], self._aad))
        except Exception as exc:
            raise DecryptionError(
                "decryption_failed", f"key {kid!r} does not open the item (wrong key or altered)"
            ) from exc

    async def get_items(self, limit: int | None = None) -> list[Any]:
        return [self._open(envelope) for envelope in await self.inner.get_items(limit)]

    async def add_items(self, items: list[Any]) -> None:
        await self.inner.add_items([self._seal(item) for item in items])

    async def pop_item(self) -> Any | None:
        """The newest item; checked before it is removed, and put back if it cannot be
        opened after all (another writer raced in)."""
        newest = await self.inner.get_items(limit=1)
        if not newest:
            return None
        self._open(newest[0])
        envelope = await self.inner.pop_item()
        if envelope is None:
            return None
        try:
            return self._open(envelope)
        except DecryptionError:
            await self.inner.add_items([envelope])
            raise

    async def clear_session(self) -> None:
        await self.inner.clear_session()

    def close(self) -> Any:
        """Closes the wrapped session (awaitable, as its `close` is)."""
        return self.inner.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        closed = self.close()
        if inspect.isawaitable(closed):
            await closed


def _key_bytes(key: bytes | str) -> bytes:
    if isinstance(key, bytes) and len(key) == 32:
        return key
    try:
        material = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("a key is 32 bytes, or their base64 text") from exc
    if len(material) != 32:
        raise ValueError(f"a key is 32 bytes; this one has {len(material)}")
    return material
