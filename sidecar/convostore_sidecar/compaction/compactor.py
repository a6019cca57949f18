"""One store's compactions: read the branch, decide, call the model, replace atomically.

Compactions of one session in one sidecar take turns, so a burst of turns makes one
model call, not many; another sidecar's compaction of the same session is settled by
the driver, whose replacement expects exactly the items this one read. What a
compaction parses is bounded (`MOST_PARSED_BYTES`) and parsed on a worker thread, so a
long history neither takes the sidecar past its memory limit nor stalls its other calls.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..drivers.base import Compacting
from ..jsonbody import dumps, loads
from ..refusals import Invalid, UpstreamFailed
from ..tracing import Tracing
from . import policy
from .model import CompactionModel
from .settings import CompactionSettings

MOST_PARSED_BYTES = 4 << 20
"""The most live history a compaction parses (JSON of many small objects takes 10 to 18
times its size once parsed, within the sidecar's 256 MiB): about a million tokens, more
than a model's context window holds."""


class Compactor:
    def __init__(
        self,
        settings: CompactionSettings,
        max_read_items: int,
        driver: Compacting,
        store: str,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings, self.max_read_items, self.driver = settings, max_read_items, driver
        self.model = CompactionModel(settings, store, tracing)
        self._turns: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    async def close(self) -> None:
        await self.model.close()

    async def run(self, session_id: str, branch: str, request: policy.Request) -> dict[str, Any]:
        """What happened, as the API answers it: `compacted`, and why not when it did not."""
        lock = self._turns.setdefault((session_id, branch), asyncio.Lock())
        async with lock:
            return await self._compact(session_id, branch, request)

    async def _compact(
        self, session_id: str, branch: str, request: policy.Request
    ) -> dict[str, Any]:
        most = self.max_read_items
        snapshot = await self.driver.snapshot(session_id, branch, most + 1, MOST_PARSED_BYTES)
        if len(snapshot.items) > most:
            return _skipped(
                "history_too_long",
                f"the session holds more than limits.maxReadItems ({most}) items",
            )
        size = sum(len(data) for data in snapshot.items)
        if size > MOST_PARSED_BYTES:
            return _skipped(
                "history_too_large",
                f"the session's live history holds more than {MOST_PARSED_BYTES >> 20} MiB, "
                "what a compaction parses at most (more than a model's context holds)",
            )
        # parsing and deciding take time in proportion to the history: off the loop
        plan = await asyncio.to_thread(_plan, snapshot.items, self.settings, request)
        if isinstance(plan, dict):
            return plan
        if plan.mode == "previous_response_id":
            await self._check_chain(str(request.response_id), plan.item_ids)
        compacted = await self.model.compact(plan.mode, request.response_id, plan.for_model)
        try:
            output = policy.from_model(compacted.output)
        except policy.UnusableOutput as exc:
            raise UpstreamFailed(
                "compaction_failed", f"the model's output cannot be stored: {exc}"
            ) from exc
        outcome: dict[str, Any] = {"mode": plan.mode, "usage": compacted.usage}
        if len(output) > plan.count:
            return _skipped("not_smaller", "the summary holds more items than it replaces", outcome)
        replaced = await self.driver.compact(
            session_id, branch, snapshot.stored[: plan.count], _encoded(output)
        )
        if not replaced:
            return _skipped("history_changed", "the items read were changed meanwhile", outcome)
        return {
            "compacted": True,
            **outcome,
            "replaced": plan.count,
            "items": len(output),
            "kept": plan.total - plan.count,
        }

    async def _check_chain(self, response_id: str, item_ids: frozenset[str]) -> None:
        """A token holder may name any response: the sidecar's key would summarise a chain
        of another conversation into this session. So the response must be one whose
        output this session holds (the Runner stores a turn's output with its ids)."""
        output = await self.model.output_ids(response_id)
        if not output or not output <= item_ids:
            raise Invalid(
                "response_not_in_session",
                f"response {response_id!r} is not one of this session's: its output is not "
                "in the history; history unchanged",
            )


@dataclass(frozen=True)
class Plan:
    """What to send the model: the first `count` of `total` items, in `mode`; `item_ids`
    are the ids the compacted items carry."""

    mode: str
    count: int
    total: int
    for_model: list[Any] | None
    item_ids: frozenset[str]


def _plan(
    stored: Sequence[bytes], settings: CompactionSettings, request: policy.Request
) -> Plan | dict[str, Any]:
    """The compaction to make of these items, or why none (the API's answer)."""
    items = [loads(data) for data in stored]
    count = policy.covered(items, settings.keep_recent_turns)
    part = items[:count]
    if not part:
        return _skipped("nothing_to_compact", "no items before the turns kept verbatim")
    sizes = [len(data) for data in stored]
    if not request.force and not policy.triggered(settings, part, sizes):
        return _skipped("below_threshold", "the history is below the store's trigger")
    mode = policy.mode(request, settings.mode, partial=count < len(items))
    if mode is None:
        return _skipped(
            "partial_needs_input",
            "previous_response_id mode would also summarise the turns kept verbatim",
        )
    if mode == "previous_response_id" and not request.response_id:
        raise Invalid("response_id_required", "previous_response_id mode needs a response_id")
    if not policy.tool_groups_whole(part):
        return _skipped("tool_call_pending", "a tool call has no output yet")
    ids = frozenset(str(i["id"]) for i in part if isinstance(i, dict) and i.get("id"))
    return Plan(mode, count, len(items), policy.for_model(part) if mode == "input" else None, ids)


def _encoded(items: Sequence[Any]) -> list[bytes]:
    return [dumps(item) for item in items]


def _skipped(reason: str, message: str, outcome: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"compacted": False, "reason": reason, "message": message, **(outcome or {})}
