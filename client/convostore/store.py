"""`SidecarStore`: operations on a whole store, for tools rather than agents."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from .session import SidecarSession, store_path
from .transport import BearerToken, Endpoint, Transport


class SidecarStore:
    """One store of a sidecar: list its sessions and open any of them."""

    def __init__(
        self,
        store: str = "default",
        url: str | None = None,
        *,
        token: str | None = None,
        token_file: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.store = store
        self._url, self._timeout = url, timeout
        self._token, self._token_file = token, token_file
        self._transport = Transport(
            Endpoint.parse(url), BearerToken(token, token_file), timeout=timeout
        )

    async def session_ids(self, prefix: str = "", page_size: int = 100) -> AsyncIterator[str]:
        """Every session id starting with `prefix`, in byte order, fetched page by page."""
        cursor: str | None = None
        while True:
            params = {"prefix": prefix, "limit": str(page_size)}
            if cursor:
                params["cursor"] = cursor
            page: dict[str, Any] = await self._transport.call(
                "GET", store_path(self.store) + "/sessions", params=params, idempotent=True
            )
            for session_id in page["sessions"]:
                yield session_id
            cursor = page["next_cursor"]
            if not cursor:
                return

    async def keyring(self) -> dict[str, Any]:
        """An encrypted store's key ids: `primary`, and every one it holds (`keys`)."""
        ring: dict[str, Any] = await self._transport.call(
            "GET", store_path(self.store) + "/keys", idempotent=True
        )
        return ring

    def session(self, session_id: str) -> SidecarSession:
        return SidecarSession(
            session_id,
            self.store,
            self._url,
            token=self._token,
            token_file=self._token_file,
            timeout=self._timeout,
        )
