"""`SidecarStore`: operations on a whole store, for tools rather than agents."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from typing import Any

from .session import SidecarSession, store_path
from .transport import BearerToken, Endpoint, Transport

ERASE_TIMEOUT = 60.0
"""An erasure or a re-wrap call works for up to 20 s before it answers, asking to be
called again; a key census reads every subject's key."""


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

    async def find_sessions(
        self,
        labels: Mapping[str, str] | None = None,
        *,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        updated_after: datetime | None = None,
        updated_before: datetime | None = None,
        page_size: int = 100,
    ) -> AsyncIterator[dict[str, Any]]:
        """The records (`session_id`, `created_at`, `updated_at`, `labels`) of the
        sessions carrying every label in `labels`, created and last written within the
        bounds given (aware datetimes, exclusive), newest first, fetched page by page. A
        listing neither repeats nor skips a session that existed when it began."""
        params = [("label", f"{name}={value}") for name, value in (labels or {}).items()]
        bounds = {
            "created_after": created_after,
            "created_before": created_before,
            "updated_after": updated_after,
            "updated_before": updated_before,
        }
        params += [(key, when.isoformat()) for key, when in bounds.items() if when is not None]
        params.append(("limit", str(page_size)))
        cursor: str | None = None
        while True:
            page: dict[str, Any] = await self._transport.call(
                "GET",
                store_path(self.store) + "/sessions:find",
                params=params + ([("cursor", cursor)] if cursor else []),
                idempotent=True,
            )
            for record in page["sessions"]:
                yield record
            cursor = page["next_cursor"]
            if not cursor:
                return

    async def erase(self, labels: Mapping[str, str]) -> dict[str, int]:
        """Erase every session carrying all of `labels` (a person's, a tenant's): every
        branch, the compaction archive, usage, labels and idempotency records. Safe to
        run again, and to resume after an interruption; answers the totals erased."""
        body = json.dumps({"labels": dict(labels)}, ensure_ascii=False).encode("utf-8")
        answers = await self._until_complete("/sessions:erase", body)
        return {key: sum(a[key] for a in answers) for key in ("erased_sessions", "erased_items")}

    async def _until_complete(self, path: str, body: bytes | None = None) -> list[Any]:
        """A call that works for a while and says whether it is done, asked again until
        it is (each time it goes on where it stopped): every answer."""
        answers = []
        while True:
            answer: dict[str, Any] = await self._transport.call(
                "POST",
                store_path(self.store) + path,
                body=body,
                idempotent=True,
                answer_within=ERASE_TIMEOUT,
            )
            answers.append(answer)
            if answer["complete"]:
                return answers

    async def erasures(self, limit: int = 100) -> list[dict[str, Any]]:
        """The store's latest erasure records, newest first: `erasure_id`, `at`,
        `label_names`, `erased_sessions`, `erased_items`, `complete` (no label values)."""
        answer: dict[str, Any] = await self._transport.call(
            "GET",
            store_path(self.store) + "/erasures",
            params={"limit": str(limit)},
            idempotent=True,
        )
        records: list[dict[str, Any]] = answer["erasures"]
        return records

    async def keyring(self) -> dict[str, Any]:
        """An encrypted store's key ids: `primary`, every one it holds (`keys`), and with
        a subject label, how many subjects' keys each wraps (`subjectKeys`)."""
        ring: dict[str, Any] = await self._transport.call(
            "GET", store_path(self.store) + "/keys", idempotent=True, answer_within=ERASE_TIMEOUT
        )
        return ring

    async def rewrap_subject_keys(self) -> int:
        """Seal every subject's key under the store's primary key (a rotation's first
        step; their items need no re-encryption). Resumable; how many were re-wrapped."""
        answers = await self._until_complete("/keys:rewrap")
        return sum(int(answer["rewrapped"]) for answer in answers)

    def session(self, session_id: str) -> SidecarSession:
        return SidecarSession(
            session_id,
            self.store,
            self._url,
            token=self._token,
            token_file=self._token_file,
            timeout=self._timeout,
        )
