"""`SidecarSession`: the Agents SDK `Session` protocol, served by the convostore sidecar.

The contract is the SDK's: `get_items(limit)` returns the latest `limit` items oldest
first (all of them without a limit, none for 0), `add_items` appends one ordered batch
atomically, `pop_item` removes and returns the newest item or `None`, `clear_session`
forgets the session. Items come back exactly as they were stored, which the Runner
relies on when it compares what it wrote with what it reads back.

Every append carries a fresh `Idempotency-Key`, so a retry after a lost response
appends once: the sidecar remembers the key with the batch, atomically.

It is also a compaction-aware session in the SDK's sense (`run_compaction`): the Runner
asks it to compact after each turn, and the sidecar, when its store has a `compaction`
section, decides as the SDK's `OpenAIResponsesCompactionSession` would, calls the model
with the key it holds and replaces the history in one atomic step.
"""

from __future__ import annotations

import json
import logging
import time
import types
import uuid
from collections.abc import Generator, Mapping
from typing import Any, Self
from urllib.parse import quote

from .errors import ConvostoreError, NotFoundError
from .sdk_options import check_store_name, refuse_storage_options, sidecar_url
from .transport import BearerToken, Endpoint, Transport

Item = Any
log = logging.getLogger("convostore")
COMPACTION_TIMEOUT = 180.0
"""A compaction waits for a model call (the sidecar's own timeout and retries bound it)."""
COMPACTION_OFF = frozenset({"compaction_not_configured", "not_supported"})
ASK_AGAIN_AFTER = 60.0
_not_compacting: dict[tuple[str, str | None, str], float] = {}
"""Stores that said they do not compact, by sidecar and store, with when to ask again:
the Runner asks after every turn, and agents often make a session per request."""


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


def register_as_sdk_session(cls: type) -> None:
    """Make `isinstance(session, agents.memory.SessionABC)` hold, as for the SDK's own
    sessions, when the SDK is installed; done at the first construction, which imports
    the SDK anyway (`coerce_settings`), so importing `convostore` stays cheap."""
    try:
        from agents.memory.session import SessionABC
    except ImportError:
        return
    if not issubclass(cls, SessionABC):
        SessionABC.register(cls)


def encode_items(items: list[Item]) -> bytes:
    """The append body. A string with a lone surrogate (which the SDK's sessions store)
    cannot be UTF-8: it goes as its JSON escape, as `json.dumps` writes it by default."""
    document = {"items": items}
    try:
        return json.dumps(document, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(document, allow_nan=False).encode("ascii")


def _run_usage(usage: dict[str, Any]) -> Any:
    """The compaction call's usage as the SDK adds a model call's to a run: its details
    taken as the `openai` client takes them, unvalidated."""
    from agents.usage import Usage
    from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails

    def details(kind: Any, key: str) -> Any:
        value = usage.get(key)
        return kind.model_construct(**value) if isinstance(value, dict) else None

    return Usage(
        requests=1,
        input_tokens=usage.get("input_tokens") or 0,
        output_tokens=usage.get("output_tokens") or 0,
        total_tokens=usage.get("total_tokens") or 0,
        input_tokens_details=details(InputTokensDetails, "input_tokens_details"),
        output_tokens_details=details(OutputTokensDetails, "output_tokens_details"),
    )


class Closed:
    """What `close()` returns: nothing is left to wait for, yet it can be awaited, so both
    `session.close()` (as with the SDK's SQLiteSession) and `await session.close()` (as
    with its RedisSession) work."""

    def __await__(self) -> Generator[Any, None, None]:
        yield from ()


def _labels(metadata: Mapping[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise TypeError("metadata must map label names to string values")
    return dict(metadata)


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
        logger: logging.Logger | None = None,
        metadata: Mapping[str, str] | None = None,
        **sdk_options: Any,
    ) -> None:
        """`store` names one of the stores the sidecar serves. The options of the SDK's
        own session classes are taken as they mean there (`logger`, `create_tables`) or
        refused with the store-side setting to use instead (`db_path`, `ttl`, clients).

        `metadata` labels the session (`{"user_id": "42", "tenant": "acme"}`), so that
        it can be listed and erased by them: applied before this object's first write,
        and again after its `clear_session`."""
        cls = type(self).__name__
        refuse_storage_options(cls, sdk_options)
        check_store_name(cls, store)
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
        self._labels = _labels(metadata)
        self._labels_pending = bool(self._labels)
        self.session_settings = coerce_settings(session_settings)
        register_as_sdk_session(type(self))
        self.log = logger or log
        self.history_turns = history_turns
        self.whole_turns = whole_turns
        self._transport = Transport(
            Endpoint.parse(url), BearerToken(token, token_file), timeout=timeout, retries=retries
        )
        self._path = f"{store_path(store)}/sessions/{quote(session_id, safe='')}"
        self._response_id: str | None = None
        self._unstored_response_id: str | None = None
        self.last_compaction: dict[str, Any] | None = None
        """The sidecar's answer to the latest `run_compaction`: whether it compacted,
        why not, what it replaced and the model call's usage."""

    async def get_items(self, limit: int | None = None) -> list[Item]:
        """The latest `limit` items, oldest first; `session_settings.limit` when not given.

        Without any limit, a session made with `history_turns=N` reads the latest N user
        turns whole; with `whole_turns=True` a limit is widened back to the start of the
        turn it would cut, so no tool call comes back without its output.
        """
        return await self._read(limit, {})

    async def get_full_items(self, limit: int | None = None) -> list[Item]:
        """The conversation as it was said: the items compaction replaced (kept in the
        store's archive), then the live items no compaction wrote; the latest `limit`."""
        return await self._read(limit, {**self._compaction_target(), "view": "full"})

    async def _read(self, limit: int | None, where: dict[str, str]) -> list[Item]:
        if limit is None and self.session_settings is not None:
            limit = getattr(self.session_settings, "limit", None)
        if limit is not None and limit < 0:
            return []  # as the SDK's sessions answer a negative limit
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
            self.log.warning(
                "session %r holds more items than its store returns in one read "
                "(limits.maxReadItems, limits.maxReadBytes): only the latest %d came back",
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
        if self._labels_pending:
            await self.set_metadata(self._labels)
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
        if body["item"] is not None:
            self._forget_responses()
        return body["item"]

    async def clear_session(self) -> None:
        """Remove every item of this session."""
        await self._transport.call("DELETE", self._path, idempotent=True)
        self._forget_responses()
        self._labels_pending = bool(self._labels)

    async def set_metadata(self, labels: Mapping[str, str | None]) -> dict[str, Any]:
        """Set the session's labels (None removes one), keeping the others; answers its
        record: `session_id`, `created_at`, `updated_at`, `labels`."""
        body = json.dumps({"labels": dict(labels)}, ensure_ascii=False).encode("utf-8")
        record: dict[str, Any] = await self._transport.call(
            "PATCH", self._path + "/metadata", body=body, idempotent=True
        )
        self._labels_pending = False
        return record

    async def get_metadata(self) -> dict[str, Any] | None:
        """The session's record (see `set_metadata`); None while it holds nothing."""
        try:
            record: dict[str, Any] = await self._transport.call(
                "GET", self._path + "/metadata", idempotent=True
            )
        except NotFoundError as exc:
            if exc.code == "session_not_found":
                return None
            raise
        return record

    def _forget_responses(self) -> None:
        """A pop or a clear ends the response chain compaction would summarise (as in
        the SDK's compaction session)."""
        self._response_id = self._unstored_response_id = None

    async def run_compaction(
        self, args: Mapping[str, Any] | None = None, *, wrapper: Any = None
    ) -> None:
        """Compact the history if the store's trigger says so (always with `force`).

        `args` is the SDK's `OpenAIResponsesCompactionArgs` (`response_id`, `store`,
        `compaction_mode`, `force`); the Runner passes its `wrapper`, to which the
        compaction call's usage is added. When the Runner calls it, a failure is logged
        and the run goes on with its history as it was; a store without compaction is
        asked again only a minute after it said so. Called directly, failures raise.
        """
        automatic = bool(getattr(wrapper, "_session_compaction_is_automatic", False))
        endpoint = self._transport.endpoint
        where = (endpoint.base_url, endpoint.socket_path, self.store)
        if automatic and time.monotonic() < _not_compacting.get(where, 0.0):
            return
        try:
            answer = await self._transport.call(
                "POST",
                self._path + "/items:compact",
                params=self._compaction_target(),
                body=json.dumps(self._compaction_request(dict(args or {}))).encode(),
                idempotent=False,
                answer_within=COMPACTION_TIMEOUT,
            )
        except ConvostoreError as exc:
            self.last_compaction = {
                "compacted": False,
                "reason": exc.code,
                "message": exc.message,
                "status": exc.status,
            }
            if exc.code in COMPACTION_OFF:
                _not_compacting[where] = time.monotonic() + ASK_AGAIN_AFTER
            elif automatic:
                self.log.warning(
                    "session %r: not compacted, history kept: %s", self.session_id, exc
                )
            if not automatic:
                raise
            return
        self.last_compaction = answer
        if wrapper is not None and answer.get("usage"):
            wrapper.usage.add(_run_usage(answer["usage"]))

    def _compaction_target(self) -> dict[str, str]:
        return {}

    def _compaction_request(self, args: dict[str, Any]) -> dict[str, Any]:
        """The request as the SDK's session would resolve it: the latest response id is
        remembered, and one answered with `store=False` is never chained from."""
        if args.get("response_id"):
            self._response_id = args["response_id"]
        store = args.get("store")
        if store is False and self._response_id:
            self._unstored_response_id = self._response_id
        elif store is True and self._response_id == self._unstored_response_id:
            self._unstored_response_id = None
        if store is None and self._response_id and self._response_id == self._unstored_response_id:
            store = False
        return {
            "response_id": self._response_id,
            "store": store,
            "compaction_mode": args.get("compaction_mode"),
            "force": bool(args.get("force", False)),
        }

    async def reencrypt(self) -> int:
        """Re-encrypt this session's items under the store's primary key (key rotation)."""
        body = await self._transport.call("POST", self._path + ":reencrypt", idempotent=True)
        count: int = body["reencrypted"]
        return count

    async def key_census(self) -> dict[str, Any]:
        """How many of this session's stored items depend on each store key id (`sealed`:
        those sealed under it, and a subject's, whose key it wraps), how many are stored
        in clear (`plaintext`), and how many are of an erased subject (`shredded`): every
        branch and the compaction archive, read from the backend."""
        census: dict[str, Any] = await self._transport.call(
            "GET", self._path + "/keys", idempotent=True
        )
        return census

    async def clear(self) -> None:
        """Alias of `clear_session`, as in the seed documents' examples."""
        await self.clear_session()

    async def ping(self) -> bool:
        """True when the sidecar answers (as the SDK's RedisSession.ping)."""
        return await self._transport.ping()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    @classmethod
    def from_url(cls, session_id: str, *, url: str, **options: Any) -> Self:
        """As the SDK's `RedisSession.from_url` and `SQLAlchemySession.from_url`, with
        the sidecar's URL: a database's URL is the store's and is refused."""
        return cls(session_id, url=sidecar_url(cls.__name__, url), **options)

    def close(self) -> Closed:
        """Done with this object: later calls on it raise `SessionClosedError`. The
        connections it used belong to a pool shared by the event loop's sessions, which
        closes with the loop (`convostore.close_pools()` closes it at once)."""
        self._transport.closed = True
        return Closed()
