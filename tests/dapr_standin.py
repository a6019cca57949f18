"""A stand-in for Dapr's runtime: its gRPC state API, backed by a real Redis.

Dapr's daemon cannot be installed here, so tests serve the calls the `dapr` SDK makes
(GetState, GetBulkState, SaveState, DeleteState, DeleteBulkState,
ExecuteStateTransaction) from the SDK's own generated protocol classes, and the health
endpoint its client checks before connecting. ETags follow Dapr's documented contract:

- a write or delete with an ETag succeeds only if the record exists with that version;
- a write without an ETag under first-write concurrency succeeds only if the record
  does not exist; without an ETag otherwise, it always succeeds;
- a mismatch is answered with gRPC ABORTED, "possible etag mismatch", as daprd does;
- a transaction checks every ETag before applying anything, in one Redis script;
- `ttlInSeconds` metadata sets the record's expiry.

`interfere(suffix, times)` makes the stand-in write a record whose key ends with
`suffix` (as another writer would: a new version, or the record's creation) just before
the next write that touches it, to exercise each conflict path.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import grpc
import redis
from dapr.proto.common.v1 import common_pb2
from dapr.proto.runtime.v1 import dapr_pb2_grpc, state_pb2
from google.protobuf import empty_pb2  # type: ignore[import-untyped]

from tests.servers import free_port

FIRST_WRITE = common_pb2.StateOptions.CONCURRENCY_FIRST_WRITE

APPLY = """
local n = #KEYS
for i = 1, n do
  local base = (i - 1) * 5
  local op, etag, first_write = ARGV[base + 1], ARGV[base + 2], ARGV[base + 3]
  local version = redis.call('HGET', KEYS[i], 'version')
  if etag ~= '' then
    if version ~= etag then return 'mismatch:' .. KEYS[i] end
  elseif first_write == '1' and op == 'u' and version then
    return 'mismatch:' .. KEYS[i]
  end
end
for i = 1, n do
  local base = (i - 1) * 5
  local op, ttl, data = ARGV[base + 1], tonumber(ARGV[base + 4]), ARGV[base + 5]
  if op == 'd' then
    redis.call('DEL', KEYS[i])
  else
    redis.call('HSET', KEYS[i], 'data', data)
    redis.call('HINCRBY', KEYS[i], 'version', 1)
    if ttl > 0 then redis.call('EXPIRE', KEYS[i], ttl) else redis.call('PERSIST', KEYS[i]) end
  end
end
return 'ok'
"""


class DaprStandIn(dapr_pb2_grpc.DaprServicer):
    def __init__(self, redis_url: str, api_token: str | None = None) -> None:
        self.redis = redis.Redis.from_url(redis_url)
        self._apply = self.redis.register_script(APPLY)
        self.api_token = api_token
        self.calls: Counter[str] = Counter()
        self.bulk_keys_read = 0
        self._interference: dict[str, int] = {}
        self._lock = threading.Lock()
        self.grpc_port, self.http_port = free_port(), free_port()
        self._grpc: grpc.Server | None = None
        self._http: ThreadingHTTPServer | None = None

    # running

    def start(self) -> None:
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        dapr_pb2_grpc.add_DaprServicer_to_server(self, self._grpc)  # type: ignore[no-untyped-call]
        self._grpc.add_insecure_port(f"127.0.0.1:{self.grpc_port}")
        self._grpc.start()
        self._http = ThreadingHTTPServer(("127.0.0.1", self.http_port), _Health)
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(grace=None).wait()
            self._grpc = None
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    @property
    def endpoints(self) -> dict[str, str]:
        return {
            "grpcEndpoint": f"127.0.0.1:{self.grpc_port}",
            "httpEndpoint": f"http://127.0.0.1:{self.http_port}",
        }

    def interfere(self, fragment: str, times: int = 1) -> None:
        with self._lock:
            self._interference[fragment] = times

    # helpers

    def _key(self, store: str, key: str) -> str:
        return f"dapr:{store}||{key}"

    def _authorize(self, context: grpc.ServicerContext) -> None:
        if self.api_token is None:
            return
        metadata = dict(context.invocation_metadata())
        if metadata.get("dapr-api-token") != self.api_token:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong dapr-api-token")

    def _interfere_with(self, ops: list[tuple[str, Any]]) -> None:
        with self._lock:
            for suffix, left in list(self._interference.items()):
                hits = [item for _, item in ops if item.key.endswith(suffix)]
                if left > 0 and hits:
                    if not self.redis.exists(hits[0].key):
                        self.redis.hset(hits[0].key, "data", hits[0].value)
                    self.redis.hincrby(hits[0].key, "version", 1)
                    self._interference[suffix] = left - 1

    def _apply_ops(self, ops: list[tuple[str, Any]], context: grpc.ServicerContext) -> None:
        """Each op is ('u' or 'd', StateItem) with its full Redis key in item.key."""
        keys = [item.key for _, item in ops]
        self._interfere_with(ops)
        args: list[Any] = []
        for op, item in ops:
            ttl = int(item.metadata.get("ttlInSeconds", "0") or 0)
            first = (
                "1" if item.HasField("options") and item.options.concurrency == FIRST_WRITE else "0"
            )
            etag = item.etag.value if item.HasField("etag") else ""
            args += [op, etag, first, max(ttl, 0), item.value]
        result = self._apply(keys=keys, args=args).decode()
        if result != "ok":
            context.abort(
                grpc.StatusCode.ABORTED,
                f"possible etag mismatch. error from state store: {result}",
            )

    def _with_full_key(self, store: str, item: Any) -> Any:
        copy = common_pb2.StateItem()
        copy.CopyFrom(item)
        copy.key = self._key(store, item.key)
        return copy

    # the Dapr state API

    def GetState(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._authorize(context)
        self.calls["GetState"] += 1
        record = self.redis.hmget(self._key(request.store_name, request.key), "data", "version")
        data, version = cast(list[bytes | None], record)
        return state_pb2.GetStateResponse(data=data or b"", etag=(version or b"").decode())

    def GetBulkState(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._authorize(context)
        self.calls["GetBulkState"] += 1
        self.bulk_keys_read += len(request.keys)
        pipe = self.redis.pipeline(transaction=False)
        for key in request.keys:
            pipe.hmget(self._key(request.store_name, key), "data", "version")
        items = [
            state_pb2.BulkStateItem(key=key, data=data or b"", etag=(version or b"").decode())
            for key, (data, version) in zip(request.keys, pipe.execute(), strict=True)
        ]
        return state_pb2.GetBulkStateResponse(items=items)

    def SaveState(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._authorize(context)
        self.calls["SaveState"] += 1
        self._apply_ops(
            [("u", self._with_full_key(request.store_name, s)) for s in request.states], context
        )
        return _empty()

    def DeleteState(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._authorize(context)
        self.calls["DeleteState"] += 1
        item = common_pb2.StateItem(key=self._key(request.store_name, request.key))
        if request.HasField("etag"):
            item.etag.value = request.etag.value
        self._apply_ops([("d", item)], context)
        return _empty()

    def DeleteBulkState(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._authorize(context)
        self.calls["DeleteBulkState"] += 1
        self._apply_ops(
            [("d", self._with_full_key(request.store_name, s)) for s in request.states], context
        )
        return _empty()

    def ExecuteStateTransaction(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._authorize(context)
        self.calls["ExecuteStateTransaction"] += 1
        kinds = {"upsert": "u", "delete": "d"}
        ops = []
        for operation in request.operations:
            if operation.operationType not in kinds:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"bad operation {operation.operationType!r}"
                )
            ops.append(
                (
                    kinds[operation.operationType],
                    self._with_full_key(request.storeName, operation.request),
                )
            )
        self._apply_ops(ops, context)
        return _empty()


def _empty() -> Any:
    return empty_pb2.Empty()


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(204 if self.path.startswith("/v1.0/healthz") else 404)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        """Quiet: the test output is not the place for access logs."""
