"""`SidecarSession`: the Agents SDK `Session` protocol, served by the convostore sidecar.

The contract is the SDK's: `get_items(limit)` returns the latest `limit` items oldest
first (all of them without a limit, none for 0), `add_items` appends one ordered batch
atomically, `pop_item` removes and returns the newest item or `None`, `clear_session`
forgets the session. Items come back exactly as they were stored, which the Runner
relies on when it compares what it wrote with what it reads back.

Every append carries a fresh `Idempotency-Key`, so a retry after a lost response
appends once: the sidecar remembers the key with the batch, atomically.
"""

from __future__ import annotations

import json
import logging
import types
import uuid
from collections.abc import Generator
from typing import Any
from urllib.parse import quote

from .transport import BearerToken, Endpoint, Transport

Item = Any
log = logging.getLogger("convostore")


def coerce_settings(value: Any) -> Any:
    """`session_settings` as the SDK's own sessions keep them: a `SessionSettings`
    (empty by default), a dict turned into one, unknown keys refused with `TypeError`."""
    try:
        from agents.memory.session_settings import SessionSettings, coerce_session_settings
    except ImportError:  # without the SDK, only this class reads them: `limit` is all
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"limit"})
            if unknown:
                raise TypeError(f"Unknown session settings: {', '.join(unknown)}") from None
            return types.SimpleNamespace(limit=value.get("limit"))
        return value if value is not None else types.SimpleNamespace(limit=None)
    return SessionSettings() if value is None else coerce_session_settings(value)


def encode_items(items: list[Item]) -> bytes:
    """The append body. A string with a lone surrogate (which the SDK's sessions store)
    cannot be UTF-8: it goes as its JSON escape, as `json.dumps` writes it by default."""
    document = {"items": items}
    try:
        return json.dumps(document, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(document, allow_nan=False).encode("ascii")


class Closed:
    """What `close()` returns: nothing is left to wait for, yet it can be awaited, so both
    `session.close()` (as with the SDK's SQLiteSession) and `await session.close()` (as
    with its RedisSession) work."""

    def __await__(self) -> Generator[Any, None, None]:
        yield from ()


def store_path(store: str) -> str:
    return f"/v1/stores/{quote(store, safe='')}"


class SidecarSession:
    """Conversation history for one session id, kept by the sidecar in `store`."""

    def __init__(
        self,
        session_id: str,
        store: str = "default",
        url: str | None = None,
        session_settings: Any | None = None,
        *,
        token: str | None = None,
        token_file: str | None = None,
        timeout: float = 10.0,
        retries: int = 10,
        history_turns: int | None = None,
        whole_turns: bool = False,
    ) -> None:
        if not isinstance(session_id, str) or not session_id:
            raise ValueError("session_id must be a non-empty string")
        if history_turns is not None and (
            isinstance(history_turns, bool)
            or not isinstance(history_turns, int)
            or history_turns < 1
        ):
            raise ValueError(f"history_turns must be a positive integer, got {history_turns!r}")
        self.session_id = session_id
        self.store = store
        self.session_settings = coerce_settings(session_settings)
        self.history_turns = history_turns
        self.whole_turns = whole_turns
        self._transport = Transport(
            Endpoint.parse(url), BearerToken(token, token_file), timeout=timeout, retries=retries
        )
        self._path = f"{store_path(store)}/sessions/{quote(session_id, safe='')}"

    async def get_items(self, limit: int | None = None) -> list[Item]:
        """The latest `limit` items, oldest first; `session_settings.limit` when not given.

        Without any limit, a session made with `history_turns=N` reads the latest N user
        turns whole; with `whole_turns=True` a limit is widened back to the start of the
        turn it would cut, so no tool call comes back without its output.
        """
        return await self._read(limit, {})

    async def _read(self, limit: int | None, where: dict[str, str]) -> list[Item]:
        if limit is None and self.session_settings is not None:
            limit = getattr(self.session_settings, "limit", None)
        params = dict(where)
        if limit is not None:
            params.update(limit=str(limit), **({"whole_turns": "true"} if self.whole_turns else {}))
        elif self.history_turns is not None:
            params.update(turns=str(self.history_turns))
        body = await self._transport.call(
            "GET", self._path + "/items", params=params, idempotent=True
        )
        items: list[Item] = body["items"]
        if body.get("truncated"):
            log.warning(
                "session %r holds more items than its store returns in one read "
                "(limits.maxReadItems): only the latest %d came back",
                self.session_id,
                len(items),
            )
        return items

    async def add_items(self, items: list[Item], *, idempotency_key: str | None = None) -> None:
        """Append `items` in order, as one atomic batch; an empty list does nothing.

        A request repeated with the same `idempotency_key` appends once (a fresh key is
        made when none is given, which covers the client's own retries).
        """
        if items:
            await self._append(items, idempotency_key, {})

    async def _append(
        self, items: list[Item], idempotency_key: str | None, where: dict[str, str]
    ) -> dict[str, Any]:
        answer: dict[str, Any] = await self._transport.call(
            "POST",
            self._path + "/items",
            params=where,
            body=encode_items(items),
            headers={"Idempotency-Key": idempotency_key or uuid.uuid4().hex},
            idempotent=True,
        )
        return answer

    async def pop_item(self) -> Item | None:
        """Remove and return the newest item, or `None` when the session is empty."""
        return await self._pop({})

    async def _pop(self, where: dict[str, str]) -> Item | None:
        body = await self._transport.call(
            "POST", self._path + "/items:pop", params=where, idempotent=False
        )
        return body["item"]

    async def clear_session(self) -> None:
        """Remove every item of this session."""
        await self._transport.call("DELETE", self._path, idempotent=True)

    async def reencrypt(self) -> int:
        """Re-encrypt this session's items under the store's primary key (key rotation)."""
        body = await self._transport.call("POST", self._path + ":reencrypt", idempotent=True)
        count: int = body["reencrypted"]
        return count

    async def clear(self) -> None:
        """Alias of `clear_session`, as in the seed documents' examples."""
        await self.clear_session()

    async def ping(self) -> bool:
        """True when the sidecar answers (as the SDK's RedisSession.ping)."""
        return await self._transport.ping()

    def close(self) -> Closed:
        """Done with this object: later calls on it raise `SessionClosedError`. The
        connections it used belong to a pool shared by the event loop's sessions, which
        closes with the loop (`convostore.close_pools()` closes it at once)."""
        self._transport.closed = True
        return Closed()
