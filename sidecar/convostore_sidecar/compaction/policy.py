"""What to compact, when, and in which mode: the Agents SDK's decisions, made on the items
as stored, so a session compacts where the SDK's `OpenAIResponsesCompactionSession`
would, and the model sees the same request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..vocabulary import CALL_OUTPUT_TYPES, OUTPUT_TYPES, SDK_ONLY_KEYS, is_user_message
from .settings import CompactionSettings

BYTES_PER_TOKEN = 4


@dataclass(frozen=True)
class Request:
    """What the Runner passes to `run_compaction`, meaning what it means in the SDK."""

    response_id: str | None = None
    store: bool | None = None
    mode: str | None = None
    force: bool = False


def candidates(items: Sequence[Any]) -> int:
    """Items that compaction shrinks: all but user messages and earlier summaries."""
    return sum(
        1
        for item in items
        if not is_user_message(item)
        and not (isinstance(item, dict) and item.get("type") == "compaction")
    )


def covered(items: Sequence[Any], keep_recent_turns: int) -> int:
    """How many of the oldest items to compact: all of them, or those before the user
    message that opens the `keep_recent_turns`-th latest turn."""
    if not keep_recent_turns:
        return len(items)
    users = [index for index, item in enumerate(items) if is_user_message(item)]
    return users[-keep_recent_turns] if len(users) >= keep_recent_turns else 0


def triggered(settings: CompactionSettings, items: Sequence[Any], sizes: Sequence[int]) -> bool:
    """By items to compact (the SDK's rule), or by the estimated size of the whole
    history the next turn would send."""
    if settings.trigger_tokens is not None:
        return sum(sizes) // BYTES_PER_TOKEN >= settings.trigger_tokens
    return candidates(items) >= (settings.trigger_items or 0)


def mode(request: Request, default: str, partial: bool) -> str | None:
    """`input` or `previous_response_id`, as the SDK resolves `auto`; None when the caller
    asked for a response chain that would also summarise turns kept verbatim."""
    requested = request.mode or default
    if partial:
        return None if requested == "previous_response_id" else "input"
    if requested != "auto":
        return requested
    if request.store is False or not request.response_id:
        return "input"
    return "previous_response_id"


def tool_groups_whole(items: Sequence[Any]) -> bool:
    """Every tool call among `items` has its output among them, and the reverse: a
    compaction never separates the two (an approval request and its answer alike)."""
    calls, outputs = set(), set()
    for item in items:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind in CALL_OUTPUT_TYPES:
            calls.add((CALL_OUTPUT_TYPES[kind], item.get("call_id")))
        elif kind in OUTPUT_TYPES:
            outputs.add((kind, item.get("call_id")))
        elif kind == "mcp_approval_request":
            calls.add(("mcp_approval_response", item.get("id")))
        elif kind == "mcp_approval_response":
            outputs.add(("mcp_approval_response", item.get("approval_request_id")))
    return calls == outputs


def for_model(items: Sequence[Any]) -> list[Any]:
    """The items as the SDK sends them: without its own bookkeeping keys."""
    return [_without(item, SDK_ONLY_KEYS) if isinstance(item, dict) else item for item in items]


def _without(item: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k not in keys}


class UnusableOutput(ValueError):
    """The model returned an item that cannot be sent back as input."""


def from_model(output: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The compacted items as the SDK stores them: user messages' images and files in
    their input shape, and assistant message ids dropped when no reasoning item they
    would pair with came back."""
    items = [_user_message(item) if is_user_message(item) else item for item in output]
    if any(item.get("type") == "reasoning" for item in items):
        return items
    return [_without(item, ("id",)) if item.get("role") == "assistant" else item for item in items]


def _user_message(item: dict[str, Any]) -> dict[str, Any]:
    content = item.get("content")
    if item.get("type") != "message" or not isinstance(content, list):
        return item
    parts = [
        _input_part(part) if isinstance(part, dict) and part.get("type") in INPUT_SOURCES else part
        for part in content
    ]
    return {**item, "content": parts}


# Where an image or a file may come from, in the order the SDK prefers them.
INPUT_SOURCES = {
    "input_image": ("image_url", "file_id"),
    "input_file": ("file_data", "file_url", "file_id"),
}


def _input_part(part: dict[str, Any]) -> dict[str, Any]:
    kind = part["type"]
    source = next((key for key in INPUT_SOURCES[kind] if _text(part.get(key))), None)
    if source is None:
        raise UnusableOutput(f"a compacted {kind} has none of {', '.join(INPUT_SOURCES[kind])}")
    shaped = {"type": kind, source: part[source]}
    extras = ("filename", "detail") if kind == "input_file" else ("detail",)
    shaped.update({key: part[key] for key in extras if _text(part.get(key))})
    return shaped


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)
