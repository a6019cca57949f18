"""The model calls compaction makes, with the official `openai` client and the key only
the sidecar holds: `responses.compact`, and `responses.retrieve` to check that a
response chain is the session's own before compacting from it. Failures become 502
`compaction_failed` (504 `compaction_timeout`), with the API's message and anything like
a key removed."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import openai

from ..openai_api import api_client, read_key, redact
from ..refusals import Invalid, Refused, UpstreamFailed, UpstreamTimedOut
from ..tracing import Tracing
from .settings import CompactionSettings


@dataclass(frozen=True)
class Compacted:
    output: list[dict[str, Any]]
    usage: dict[str, Any] | None


class CompactionModel:
    def __init__(
        self, settings: CompactionSettings, store: str, tracing: Tracing | None = None
    ) -> None:
        self.model, self.store, self._tracing = settings.model, store, tracing
        self._key = read_key(settings.api_key_file, store)
        self.api = api_client(self._key, settings)

    async def close(self) -> None:
        await self.api.close()

    async def compact(
        self, mode: str, response_id: str | None, items: list[Any] | None
    ) -> Compacted:
        source: dict[str, Any] = (
            {"previous_response_id": response_id} if mode == "previous_response_id" else {}
        )
        if items is not None:
            source["input"] = items
        traced = (
            contextlib.nullcontext()
            if self._tracing is None
            else self._tracing.model_span(self.store, self.model)
        )
        with traced:
            async with self._calling():
                answer = await self.api.responses.compact(model=self.model, **source)
        output = [item.model_dump(exclude_unset=True, warnings=False) for item in answer.output]
        usage = None if answer.usage is None else answer.usage.model_dump(exclude_unset=True)
        return Compacted(output, usage)

    async def output_ids(self, response_id: str) -> set[str]:
        """The ids of a stored response's output items, as the store's key reads it."""
        unknown = Invalid(
            "response_not_in_session",
            f"store {self.store!r}: no response {response_id!r} that the store's compaction "
            "key can read; history unchanged",
        )
        async with self._calling(not_found=unknown):
            answer = await self.api.responses.retrieve(response_id)
        return {str(item.id) for item in answer.output if getattr(item, "id", None)}

    @contextlib.asynccontextmanager
    async def _calling(self, not_found: Refused | None = None) -> AsyncIterator[None]:
        try:
            yield
        except openai.APITimeoutError as exc:
            what = "did not answer in time"
            raise self._failure(UpstreamTimedOut, "compaction_timeout", what) from exc
        except openai.NotFoundError as exc:
            if not_found is None:
                raise self._status_failure(exc) from exc
            raise not_found from exc
        except openai.APIStatusError as exc:
            raise self._status_failure(exc) from exc
        except openai.APIError as exc:
            raise self._failure(UpstreamFailed, "compaction_failed", f"failed: {exc}") from exc

    def _status_failure(self, exc: openai.APIStatusError) -> Refused:
        detail = exc.body.get("message", exc.message) if isinstance(exc.body, dict) else None
        what = f"answered {exc.status_code}: {detail or exc.message}"
        return self._failure(UpstreamFailed, "compaction_failed", what)

    def _failure(self, kind: type[Refused], code: str, what: str) -> Refused:
        message = f"store {self.store!r}: the compaction model call {what}; history unchanged"
        return kind(code, redact(message, self._key), retry_later=True)
