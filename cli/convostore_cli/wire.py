"""The sidecar's HTTP API as the transfer commands call it: paths and bodies as the
OpenAPI document gives them, through the client's transport (its retries, its token)."""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from convostore.session import store_path
from convostore.store import SidecarStore
from convostore.transport import BearerToken, Endpoint, Transport


class Sidecar:
    """One store of a running sidecar."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.store = SidecarStore(args.store, args.url, token_file=args.token_file)
        self.store_path = store_path(args.store)
        self.transport = Transport(
            Endpoint.parse(args.url), BearerToken(None, args.token_file), timeout=60.0
        )

    def session_ids(self, prefix: str) -> AsyncIterator[str]:
        return self.store.session_ids(prefix)

    async def get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        return await self.transport.call("GET", path, params=params, idempotent=True)

    async def post(
        self,
        path: str,
        body: bytes,
        params: Mapping[str, str] | None = None,
        *,
        key: str | None = None,
    ) -> Any:
        """An append carries its idempotency key and may be retried; any other call is
        sent once."""
        headers = {"Idempotency-Key": key} if key else None
        return await self.transport.call(
            "POST", path, params=params, body=body, headers=headers, idempotent=key is not None
        )

    async def patch(self, path: str, body: bytes) -> Any:
        """A change that states its result (as setting labels does): safe to retry."""
        return await self.transport.call("PATCH", path, body=body, idempotent=True)


def json_body(value: dict[str, Any]) -> bytes:
    return json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
