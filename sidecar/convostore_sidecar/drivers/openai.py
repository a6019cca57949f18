"""OpenAI driver: history kept in OpenAI's Conversations API, one conversation per session.

The sidecar holds the API key, so agent containers never see it. Each session id maps to
a conversation created on its first append; the map lives in a store the config names
(`mapping`, SQLite by default, Redis or PostgreSQL when several pods share sessions), so
it survives restarts and every replica finds the same conversation. The map is kept with
another driver's own semantics: a session's first appended conversation id wins, so two
first appends racing on one session agree on the winner and the loser deletes the
conversation it created. A session id that is already a conversation id (`conv_…`) names
that conversation only if this store created it (or whoever did marked it for this
store in its metadata, `convostore_store: <store>`, or the store adopts conversations no
store marked: `adoptConversations`, for those the SDK's own session made); any other
conversation of the organisation is answered 404, so a caller of the sidecar cannot
reach conversations by guessing or learning their ids. Once such a conversation is
cleared (deleted), its id is a session id like any other: the next append starts a new
conversation for it, as the SDK's session starts one after a clear.

What the API cannot promise, the driver does not pretend to: the API keeps items until
they are deleted, so `ttl` and `maxItems` are refused at start-up; items must be the
API's own item shapes, so encryption at rest is refused; an append of more than 20 items
takes several requests and is not atomic. Ids the model gave to items are not sent, as
the Agents SDK's own Conversations session does not send them. Idempotency keys are kept
in the map's store with the number of items already sent, so a retried request resumes
where it stopped instead of sending items twice; the key is recorded after the API
accepted the batch, so only a crash between the two can repeat one request's items.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import openai
import orjson

from ..openai_api import api_client, read_key, redact
from ..refusals import (
    Conflict,
    Invalid,
    NotFound,
    Refused,
    Unprocessable,
    UpstreamFailed,
    UpstreamRefusedKey,
)
from ..vocabulary import KEEPS_ID, PLACEHOLDER_ID
from . import BACKENDS, parse_backend_settings
from . import open_driver as open_backend
from .base import (
    AppendResult,
    BackendUnavailable,
    Check,
    Driver,
    Gathered,
    Idempotency,
    Items,
    Migrates,
    Retention,
    Sealed,
    Transform,
    replay_of,
)

if TYPE_CHECKING:
    from ..config import StoreConfig
    from ..sections import Section

MAX_ITEMS_PER_REQUEST = 20
MAX_PAGE = 100
CONVERSATION_PREFIX = "conv_"
MAPPING_BACKENDS = ("sqlite", "redis", "postgres")
PING_CONVERSATION = "conv_convostore_ping"
MARKER = "convostore_store"
"""The metadata key that makes a conversation a store's (its value: the store's identity)."""
MAX_METADATA_KEYS = 16
PASSED_ON: dict[int, type[Refused]] = {400: Invalid, 409: Conflict, 422: Unprocessable}
"""The API's refusals that are the request's own fault, passed on as what they are; any
other is the API failing."""


@dataclass(frozen=True)
class Mapping:
    backend: str = "sqlite"
    settings: Any = None


@dataclass(frozen=True)
class Settings:
    api_key_file: str
    base_url: str | None = None
    organization: str | None = None
    project: str | None = None
    timeout: float = 60.0
    max_retries: int = 2
    mapping: Mapping = field(default_factory=Mapping)
    adopt_conversations: bool = False
    """Whether a `conv_` session id may name a conversation no convostore store has
    marked (one the SDK's `OpenAIConversationsSession` made): it is marked for this
    store on first use. Off, only conversations already marked for it are reachable."""

    @classmethod
    def parse(cls, s: Section) -> Settings:
        base_url = s.api_url("baseURL")
        api_key_file = s.string("apiKeyFile")
        if api_key_file is None:
            s.fail("apiKeyFile", "is required: the file that holds the OpenAI API key")
        mapping_s = s.section("mapping")
        backend = mapping_s.choice("backend", MAPPING_BACKENDS, default="sqlite")
        mapping = Mapping(backend, parse_backend_settings(backend, mapping_s.section(backend)))
        mapping_s.done()
        return cls(
            api_key_file=api_key_file,
            base_url=base_url,
            organization=s.string("organization"),
            project=s.string("project"),
            timeout=s.duration("timeout", cls.timeout, low=0.1, high=600),
            max_retries=s.integer("maxRetries", cls.max_retries, low=0, high=10),
            mapping=mapping,
            adopt_conversations=s.boolean("adoptConversations", False),
        )


def open_driver(store: StoreConfig) -> OpenAIDriver:
    return OpenAIDriver(store)


class OpenAIDriver:
    def __init__(self, store: StoreConfig) -> None:
        settings: Settings = store.settings
        self.name = store.name
        self.identity = store.identity
        self._key = read_key(settings.api_key_file, store.name)
        self.api = api_client(self._key, settings)
        self.conversations = _mapping_driver(store, "conversations", Retention())
        self._verified: set[str] = set()
        self.adopt = settings.adopt_conversations
        self.idempotency = _mapping_driver(
            store, "idempotency", Retention(ttl_seconds=store.idempotency_ttl)
        )

    async def open(self) -> None:
        await self.conversations.open()
        await self.idempotency.open()

    async def close(self) -> None:
        await self.api.close()
        await self.conversations.close()
        await self.idempotency.close()

    async def migrate(self) -> str:
        """The mapping backend's schema, where it has one (PostgreSQL)."""
        if not isinstance(self.conversations, Migrates):
            return "its mapping has nothing to migrate"
        return f"its mapping: {await self.conversations.migrate()}"

    async def ping(self) -> None:
        """An authenticated call that reads nothing: a conversation that cannot exist."""
        try:
            with self._errors(), contextlib.suppress(openai.NotFoundError):
                await self.api.with_options(max_retries=0).conversations.retrieve(PING_CONVERSATION)
        except Refused as exc:
            raise BackendUnavailable(exc.message) from exc
        await self.conversations.ping()

    async def append(
        self, session_id: str, items: Items, idempotency: Idempotency | None
    ) -> AppendResult:
        if isinstance(items, Sealed):
            raise TypeError("an openai store keeps no items of its own to encrypt")
        sent = 0
        if idempotency is not None:
            sent = await self._already_sent(session_id, idempotency, len(items))
            if sent == len(items):
                return AppendResult(appended=sent, replayed=True)
        conversation = await self._conversation(session_id, create=True)
        assert conversation is not None
        batches = range(sent, len(items), MAX_ITEMS_PER_REQUEST)
        for start in batches:
            chunk = items[start : start + MAX_ITEMS_PER_REQUEST]
            batch: list[Any] = [
                kept for item in chunk if (kept := _for_api(orjson.loads(item))) is not None
            ]
            if batch:
                with self._errors():
                    await self.api.conversations.items.create(conversation, items=batch)
            sent = min(start + MAX_ITEMS_PER_REQUEST, len(items))
            if idempotency is not None and (sent == len(items) or len(batches) > 1):
                await self._record_sent(session_id, idempotency, sent)
        return AppendResult(appended=len(items), replayed=False)

    async def latest(
        self, session_id: str, limit: int | None, max_bytes: int | None = None
    ) -> list[bytes]:
        conversation = await self._conversation(session_id, create=False)
        return [] if conversation is None else await self._latest(conversation, limit, max_bytes)

    async def _latest(
        self, conversation: str, limit: int | None, max_bytes: int | None = None
    ) -> list[bytes]:
        """Newest first from the API, as far as `limit` and `max_bytes` let, then put
        oldest first."""
        gathered = Gathered(max_bytes)
        page = MAX_PAGE if limit is None else min(limit, MAX_PAGE)
        pages = self.api.conversations.items.list(conversation, order="desc", limit=page)
        with self._errors(), contextlib.suppress(openai.NotFoundError):
            async for item in pages:
                more = gathered.take(orjson.dumps(item.model_dump(exclude_unset=True)))
                if not more or len(gathered) == limit:
                    break
        return gathered.oldest_first()

    async def pop(self, session_id: str, check: Check | None = None) -> bytes | None:
        """Read the newest item and delete it by id; a concurrent pop that deleted it
        first makes this one read again, so no two pops return the same item."""
        conversation = await self._conversation(session_id, create=False)
        if conversation is None:
            return None
        while True:
            newest = await self._latest(conversation, 1)
            if not newest:
                return None
            if check is not None:
                check(newest[0])
            item_id = orjson.loads(newest[0])["id"]
            with self._errors():
                try:
                    await self.api.conversations.items.delete(item_id, conversation_id=conversation)
                except openai.NotFoundError:
                    continue
            return newest[0]

    async def clear(self, session_id: str) -> None:
        conversation = await self._conversation(session_id, create=False)
        if conversation is not None:
            with self._errors(), contextlib.suppress(openai.NotFoundError):
                await self.api.conversations.delete(conversation)
            self._verified.discard(conversation)
        await self.conversations.clear(session_id)

    async def list_sessions(self, prefix: str, after: str | None, limit: int) -> list[str]:
        return await self.conversations.list_sessions(prefix, after, limit)

    async def sweep(self) -> int:
        """Expired idempotency records go; sessions never expire here."""
        await self.idempotency.sweep()
        return 0

    async def rewrite(self, session_id: str, transform: Transform) -> int:
        raise NotImplementedError(f"store {self.name!r}: {BACKENDS['openai'].lacks['encryption']}")

    async def _conversation(self, session_id: str, *, create: bool) -> str | None:
        known = await self.conversations.latest(session_id, None)
        if known:
            return known[0].decode()
        if session_id.startswith(CONVERSATION_PREFIX) and await self._own_conversation(session_id):
            return session_id
        if not create:
            return None
        metadata = {MARKER: self.identity, "convostore_session": session_id[:512]}
        with self._errors():
            created = (await self.api.conversations.create(metadata=metadata)).id
        await self.conversations.append(session_id, [created.encode()], None)
        winner = (await self.conversations.latest(session_id, None))[0].decode()
        if winner != created:
            with self._errors(), contextlib.suppress(openai.NotFoundError):
                await self.api.conversations.delete(created)
        return winner

    async def _own_conversation(self, conversation: str) -> bool:
        """Whether `conversation` exists and is this store's (marked for it, or adopted
        now); False when it does not exist (the id is then a session id like any other,
        as after the SDK clears a conversation); 404 when it is another's."""
        if conversation in self._verified:
            return True
        with self._errors():
            try:
                found = await self.api.conversations.retrieve(conversation)
            except openai.NotFoundError:
                return False
        metadata = dict(getattr(found, "metadata", None) or {})
        marked = metadata.get(MARKER)
        if marked is None and self.adopt:
            marked = await self._adopt(conversation, metadata)
        if marked != self.identity:
            hint = "" if self.adopt or marked else "; openai.adoptConversations: true adopts it"
            raise NotFound(
                "conversation_not_found",
                f"store {self.name!r} has no conversation {conversation!r}: a session id "
                f"starting with conv_ must name a conversation of this store{hint}",
            )
        self._verified.add(conversation)
        return True

    async def _adopt(self, conversation: str, metadata: dict[str, Any]) -> str | None:
        """Marks a conversation nobody marked as this store's; the marker it then has."""
        if len(metadata) >= MAX_METADATA_KEYS:
            raise Conflict(
                "conversation_not_adoptable",
                f"conversation {conversation!r} already has {len(metadata)} metadata keys, "
                f"the most the API keeps: remove one so that {MARKER!r} can be added",
            )
        with self._errors():
            updated = await self.api.conversations.update(
                conversation, metadata={**metadata, MARKER: self.identity}
            )
        return dict(getattr(updated, "metadata", None) or {}).get(MARKER)

    async def _already_sent(self, session_id: str, idempotency: Idempotency, total: int) -> int:
        record = await self.idempotency.latest(_key_session(session_id, idempotency), 1)
        if not record:
            return 0
        fingerprint, sent = record[0].decode().rsplit(" ", 1)
        replay_of(idempotency, fingerprint, int(sent))
        return min(int(sent), total)

    async def _record_sent(self, session_id: str, idempotency: Idempotency, sent: int) -> None:
        record = f"{idempotency.fingerprint} {sent}".encode()
        await self.idempotency.append(_key_session(session_id, idempotency), [record], None)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """The API's failures as the sidecar reports them: unreachable or overloaded is
        503 (the client already retried with its backoff), the rest names the store and
        passes the API's message on, with anything resembling a key removed."""
        try:
            yield
        except openai.NotFoundError as exc:
            what = "has no such conversation or item"
            raise self._refusal(NotFound, "conversation_not_found", what, exc) from exc
        except openai.APIConnectionError as exc:
            raise BackendUnavailable(f"openai: {self._redact(str(exc))}") from exc
        except (openai.RateLimitError, openai.InternalServerError) as exc:
            raise BackendUnavailable(self._describe(exc)) from exc
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            what = "refused the sidecar's API key"
            raise self._refusal(UpstreamRefusedKey, "backend_auth_failed", what, exc) from exc
        except openai.APIStatusError as exc:
            kind = PASSED_ON.get(exc.status_code, UpstreamFailed)
            what = "refused the request"
            raise self._refusal(kind, "backend_rejected", what, exc) from exc

    def _refusal(
        self, kind: type[Refused], code: str, what: str, exc: openai.APIStatusError
    ) -> Refused:
        message = f"store {self.name!r}: the OpenAI API {what}: {self._describe(exc)}"
        return kind(code, message)

    def _describe(self, exc: openai.APIStatusError) -> str:
        body = exc.body
        message = exc.message
        if isinstance(body, dict):
            message = str(body.get("message", message))
        return f"{exc.status_code} {self._redact(message)}"

    def _redact(self, text: str) -> str:
        return redact(text, self._key)


def _for_api(item: dict[str, Any]) -> dict[str, Any] | None:
    """The item as the API stores it, or None for a reasoning item it cannot store (one
    with neither a server id nor encrypted content)."""
    kept = {k: v for k, v in item.items() if k not in ("provider_data", "created_by")}
    if kept.get("id") == PLACEHOLDER_ID or kept.get("type") not in KEEPS_ID:
        kept.pop("id", None)
    if kept.get("type") == "reasoning" and not (kept.get("id") or kept.get("encrypted_content")):
        return None
    return kept


def _key_session(session_id: str, idempotency: Idempotency) -> str:
    return f"{session_id}/{idempotency.key}"


def _mapping_driver(store: StoreConfig, purpose: str, retention: Retention) -> Driver:
    """A driver of the mapping backend under its own name, `<store>:<purpose>`, which no
    store can have (':' is not allowed in store names)."""
    mapping: Mapping = store.settings.mapping
    settings = mapping.settings
    if mapping.backend == "redis" and settings.key_prefix:
        settings = replace(settings, key_prefix=f"{settings.key_prefix}:{purpose}")
    sub = replace(
        store,
        name=f"{store.name}:{purpose}",
        backend=mapping.backend,
        settings=settings,
        retention=retention,
        encryption=None,
    )
    return open_backend(sub)
