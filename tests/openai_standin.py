"""A stand-in for OpenAI's Conversations API, served by aiohttp on a loopback port.

The API itself cannot be reached from here, so tests serve the calls the official `openai`
client makes (create, retrieve and delete a conversation; create, list, retrieve and
delete its items) with the behaviour the API documents:

- input items are stored as the API stores them: an id is assigned, an easy input
  message (`{"role", "content": "text"}`) becomes a `message` item with a list of
  content parts, and `status` is `completed`;
- at most 20 items per create request; listing pages with `order` (default `desc`),
  `limit` (1 to 100, default 20) and `after` (an item id), answering `has_more`;
- unknown ids give 404, a wrong bearer token 401 with the key masked as OpenAI masks
  it, malformed bodies 400, all as `{"error": {"message", "type", "param", "code"}}`.

It also serves `responses.compact` (`POST /v1/responses/compact`) deterministically, so
two runs that send the same request get the same answer: like the API, the output is
every user message of the `input` followed by one `compaction` item, whose content and
ids are digests of the request (with `previous_response_id`, the compaction item
alone), and `usage` counts 4 bytes of request or output per token. `compact_bodies`
records the requests; `hold_compactions()` makes them wait until
`release_compactions()` (`compactions_waiting` counts them), and `compact_delay` adds
latency. Responses the Runner's scripted model made are served by `responses.retrieve`
(`GET /v1/responses/{id}`) once `remember_responses(steps)` has them, as OpenAI keeps
stored responses; any other id is 404.

It runs on its own thread and event loop, so synchronous fixtures can start it and a
sidecar process can reach it while a test awaits. `fail(status, times, after)` answers
requests with an error (with a short `retry-after-ms`, which the client honours),
`stop()`/`start()` make the API unreachable and reachable again on the same port, and
`requests` records what was asked.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.servers import free_port

API_KEY = "sk-test-standin-0123456789abcdef"
MAX_ITEMS_PER_CREATE = 20
_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}
_ROLES = ("user", "assistant", "system", "developer")


@dataclass
class Conversation:
    id: str
    created_at: int
    metadata: dict[str, str]
    items: list[dict[str, Any]] = field(default_factory=list)

    def document(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "conversation",
            "created_at": self.created_at,
            "metadata": self.metadata,
        }


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    returned_items: int = 0


RECORD = web.RequestKey("record", Request)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiFailure(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _error(
    status: int, message: str, kind: str, headers: dict[str, str] | None = None
) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return web.json_response(body, status=status, headers=headers)


def _mask(key: str) -> str:
    return f"{key[:3]}{'*' * 8}{key[-4:]}" if len(key) > 8 else "*" * len(key)


class OpenAIStandIn:
    def __init__(self, api_key: str = API_KEY) -> None:
        self.api_key = api_key
        self.conversations: dict[str, Conversation] = {}
        self.requests: list[Request] = []
        self._failures: list[int | None] = []
        self._counter = itertools.count()
        self.port = free_port()
        self.compact_bodies: list[dict[str, Any]] = []
        self.responses: dict[str, list[dict[str, Any]]] = {}
        self.compact_delay = 0.0
        self.compactions_waiting = 0
        self._released = asyncio.Event()
        self._released.set()
        self._server: TestServer | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def remember_responses(self, steps: Iterable[Any]) -> None:
        """Keep the output of each `agents.testing.ModelStep`, by its response id."""
        for step in steps:
            output = [item.model_dump(exclude_none=True) for item in step.output]
            self.responses[step.response_id] = output

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)

    def shutdown(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        # a compaction sends the history it summarises: as large as OpenAI's own API takes
        app = web.Application(middlewares=[self._middleware], client_max_size=64 << 20)
        app.router.add_post("/v1/conversations", self._create)
        app.router.add_get("/v1/conversations/{cid}", self._retrieve)
        app.router.add_post("/v1/conversations/{cid}", self._update)
        app.router.add_delete("/v1/conversations/{cid}", self._delete)
        app.router.add_post("/v1/conversations/{cid}/items", self._add_items)
        app.router.add_get("/v1/conversations/{cid}/items", self._list_items)
        app.router.add_get("/v1/conversations/{cid}/items/{iid}", self._get_item)
        app.router.add_delete("/v1/conversations/{cid}/items/{iid}", self._delete_item)
        app.router.add_post("/v1/responses/compact", self._compact)
        app.router.add_get("/v1/responses/{rid}", self._retrieve_response)
        self._server = TestServer(app, host="127.0.0.1", port=self.port)
        await self._server.start_server()

    async def _stop(self) -> None:
        if self._server is not None:
            await self._server.close()
            self._server = None

    def fail(self, status: int, times: int = 1, after: int = 0) -> None:
        """Serve `after` more requests, then answer `times` with `status`."""
        self._failures.extend([None] * after + [status] * times)

    def hold_compactions(self) -> None:
        self._on_loop(self._released.clear)

    def release_compactions(self) -> None:
        self._on_loop(self._released.set)

    def _on_loop(self, action: Callable[[], None]) -> None:
        async def run() -> None:
            action()

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def items_of(self, conversation_id: str) -> list[dict[str, Any]]:
        return self.conversations[conversation_id].items

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        record = Request(request.method, request.path, dict(request.query), dict(request.headers))
        self.requests.append(record)
        request[RECORD] = record
        presented = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if presented != self.api_key:
            return _error(
                401,
                f"Incorrect API key provided: {_mask(presented)}. You can find your API key "
                "at https://platform.openai.com/account/api-keys.",
                "invalid_request_error",
            )
        status = self._failures.pop(0) if self._failures else None
        if status is not None:
            kind = "rate_limit_exceeded" if status == 429 else "server_error"
            return _error(status, f"injected failure {status}", kind, {"retry-after-ms": "5"})
        try:
            return await handler(request)
        except ApiFailure as exc:
            return _error(exc.status, exc.message, exc.kind)

    def _conversation(self, request: web.Request) -> Conversation:
        cid = request.match_info["cid"]
        if cid not in self.conversations:
            raise ApiFailure(404, f"Conversation with id '{cid}' not found.")
        return self.conversations[cid]

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError as exc:
            raise ApiFailure(400, "We could not parse the JSON body of your request.") from exc
        if not isinstance(body, dict):
            raise ApiFailure(400, "The request body must be a JSON object.")
        return body

    def _store(self, raw: Any) -> list[dict[str, Any]]:
        if not isinstance(raw, list):
            raise ApiFailure(400, "Invalid type for 'items': expected an array.")
        if len(raw) > MAX_ITEMS_PER_CREATE:
            raise ApiFailure(
                400,
                f"Invalid 'items': array too long. Expected an array with maximum length "
                f"{MAX_ITEMS_PER_CREATE}, but got an array with length {len(raw)} instead.",
            )
        return [self._normalise(item, index) for index, item in enumerate(raw)]

    def _normalise(self, item: Any, index: int) -> dict[str, Any]:
        if not isinstance(item, dict):
            raise ApiFailure(400, f"Invalid type for 'items[{index}]': expected an object.")
        kind = item.get("type", "message" if "role" in item else None)
        if kind not in _PREFIX:
            raise ApiFailure(400, f"Invalid value for 'items[{index}].type': {kind!r}.")
        stored = {k: v for k, v in item.items() if k != "id"}
        stored["type"] = kind
        if kind == "message":
            role, content = item.get("role"), item.get("content")
            if role not in _ROLES:
                raise ApiFailure(400, f"Invalid value for 'items[{index}].role': {role!r}.")
            if isinstance(content, str):
                part = "output_text" if role == "assistant" else "input_text"
                extra: dict[str, Any] = {"annotations": []} if role == "assistant" else {}
                content = [{"type": part, "text": content, **extra}]
            if not isinstance(content, list):
                raise ApiFailure(400, f"Invalid type for 'items[{index}].content'.")
            stored["content"] = content
        elif "call_id" not in item:
            raise ApiFailure(400, f"Missing required parameter: 'items[{index}].call_id'.")
        stored["status"] = "completed"
        return {"id": f"{_PREFIX[kind]}_{next(self._counter):08d}{uuid.uuid4().hex[:16]}", **stored}

    async def _create(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict) or len(metadata) > 16:
            raise ApiFailure(400, "Invalid 'metadata': at most 16 string pairs.")
        items = self._store(body.get("items", []))
        conversation = Conversation(f"conv_{uuid.uuid4().hex}", int(time.time()), metadata, items)
        self.conversations[conversation.id] = conversation
        return web.json_response(conversation.document())

    async def _update(self, request: web.Request) -> web.Response:
        """The API's update: the metadata given replaces the conversation's."""
        conversation = self._conversation(request)
        metadata = (await self._body(request)).get("metadata")
        if not isinstance(metadata, dict) or len(metadata) > 16:
            raise ApiFailure(400, "Invalid 'metadata': at most 16 string pairs.")
        conversation.metadata = metadata
        return web.json_response(conversation.document())

    async def _retrieve(self, request: web.Request) -> web.Response:
        return web.json_response(self._conversation(request).document())

    async def _delete(self, request: web.Request) -> web.Response:
        conversation = self._conversation(request)
        del self.conversations[conversation.id]
        return web.json_response(
            {"id": conversation.id, "object": "conversation.deleted", "deleted": True}
        )

    async def _add_items(self, request: web.Request) -> web.Response:
        conversation = self._conversation(request)
        stored = self._store((await self._body(request)).get("items"))
        conversation.items.extend(stored)
        return web.json_response(_page(stored, has_more=False))

    async def _list_items(self, request: web.Request) -> web.Response:
        conversation = self._conversation(request)
        order = request.query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise ApiFailure(400, f"Invalid value for 'order': {order!r}.")
        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError as exc:
            raise ApiFailure(400, "Invalid type for 'limit': expected an integer.") from exc
        if not 1 <= limit <= 100:
            raise ApiFailure(400, "Invalid 'limit': must be between 1 and 100.")
        items = conversation.items if order == "asc" else conversation.items[::-1]
        after = request.query.get("after")
        if after:
            ids = [item["id"] for item in items]
            if after not in ids:
                raise ApiFailure(404, f"Item with id '{after}' not found.")
            items = items[ids.index(after) + 1 :]
        page = items[:limit]
        request[RECORD].returned_items = len(page)
        return web.json_response(_page(page, has_more=len(items) > limit))

    def _item(self, request: web.Request) -> tuple[Conversation, dict[str, Any]]:
        conversation = self._conversation(request)
        iid = request.match_info["iid"]
        for item in conversation.items:
            if item["id"] == iid:
                return conversation, item
        raise ApiFailure(404, f"Item with id '{iid}' not found.")

    async def _get_item(self, request: web.Request) -> web.Response:
        return web.json_response(self._item(request)[1])

    async def _delete_item(self, request: web.Request) -> web.Response:
        conversation, item = self._item(request)
        conversation.items.remove(item)
        return web.json_response(conversation.document())

    async def _compact(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self.compact_bodies.append(body)
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise ApiFailure(400, "Missing required parameter: 'model'.")
        source = body.get("input")
        if source is None and not body.get("previous_response_id"):
            raise ApiFailure(400, "Provide either 'input' or 'previous_response_id'.")
        if isinstance(source, str):
            source = [{"role": "user", "content": source}]
        if source is not None and not isinstance(source, list):
            raise ApiFailure(400, "Invalid type for 'input': expected a string or an array.")
        self.compactions_waiting += 1
        try:
            await self._released.wait()
            await asyncio.sleep(self.compact_delay)
        finally:
            self.compactions_waiting -= 1
        request_bytes = json.dumps(body, sort_keys=True).encode()
        digest = hashlib.sha256(request_bytes).hexdigest()
        output = [_kept_user_message(item) for item in source or [] if _is_user(item)]
        output.append(
            {"id": f"cmp_{digest[:24]}", "type": "compaction", "encrypted_content": digest}
        )
        tokens_in = len(request_bytes) // 4
        tokens_out = len(json.dumps(output).encode()) // 4
        return web.json_response(
            {
                "id": f"resp_{digest[:24]}",
                "object": "response.compaction",
                "created_at": int(time.time()),
                "output": output,
                "usage": {
                    "input_tokens": tokens_in,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": tokens_out,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": tokens_in + tokens_out,
                },
            }
        )

    async def _retrieve_response(self, request: web.Request) -> web.Response:
        rid = request.match_info["rid"]
        if rid not in self.responses:
            raise ApiFailure(404, f"Response with id '{rid}' not found.")
        return web.json_response(
            {
                "id": rid,
                "object": "response",
                "created_at": 0,
                "model": "scripted",
                "status": "completed",
                "output": self.responses[rid],
                "parallel_tool_calls": True,
                "tool_choice": "auto",
                "tools": [],
            }
        )


def _is_user(item: Any) -> bool:
    return isinstance(item, dict) and item.get("role") == "user"


def _kept_user_message(item: dict[str, Any]) -> dict[str, Any]:
    """A user message as the API returns it from a compaction: an output message with
    input content parts, its id a digest of the message."""
    content = item.get("content")
    if isinstance(content, str):
        content = [{"type": "input_text", "text": content}]
    digest = hashlib.sha256(json.dumps(item, sort_keys=True).encode()).hexdigest()
    return {
        "id": f"msg_{digest[:24]}",
        "type": "message",
        "role": "user",
        "status": "completed",
        "content": content,
    }


def _page(items: list[dict[str, Any]], *, has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": has_more,
    }
