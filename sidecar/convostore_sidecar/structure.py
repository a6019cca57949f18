"""What the sidecar reads from an item to keep a conversation's structure: its kind and
tool (as the Agents SDK's `AdvancedSQLiteSession` classifies them, so turn numbers, tool
counts and searches agree with it), and whether a user message mentions a term."""

from __future__ import annotations

import re
from typing import Any

import orjson

from .drivers.base import ItemShape, Meta
from .jsonbody import loads
from .vocabulary import NAMELESS_TOOL_TYPES, opens_turn


def shapes_of(items: list[bytes]) -> list[ItemShape]:
    """Each item's turn, kind and tool, from the items alone: a `user` item opens the
    next turn, and what comes before the first one is turn 0."""
    shapes, turn = [], 0
    for data in items:
        meta = describe(loads(data))
        turn += meta.kind == "user"
        shapes.append(ItemShape(turn, meta.kind, meta.tool))
    return shapes


def describe(item: dict[str, Any]) -> Meta:
    if opens_turn(item):
        return Meta("user", _tool(item))
    role, kind = item.get("role"), item.get("type")
    if role == "assistant":
        return Meta(str(role), _tool(item))
    return Meta(str(kind) if kind else "other", _tool(item))


def _tool(item: dict[str, Any]) -> str | None:
    kind = item.get("type")
    if kind in ("mcp_call", "mcp_approval_request") and "server_label" in item:
        label, name = item.get("server_label"), item.get("name")
        if name and label:
            return f"{label}.{name}"
        return str(label or name) if (label or name) else None
    if kind in ("tool_search_call", "tool_search_output"):
        return "tool_search"
    if kind in NAMELESS_TOOL_TYPES:
        return str(kind)
    if "name" not in item or item["name"] is None:
        return None
    name, namespace = str(item["name"]), item.get("namespace")
    if not name or not isinstance(namespace, str) or not namespace or namespace == name:
        return name
    return f"{namespace}.{name}"


def texts(content: Any) -> list[str]:
    """The text of a message's content: the string, or each part's `text`."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [str(part.get("text", "")) for part in content if isinstance(part, dict)]
    return []


def mentions(item: bytes, term: str) -> bool:
    """Whether the message's text contains `term`, ignoring ASCII case (as SQLite's LIKE,
    which the SDK's search uses)."""
    pattern = re.compile(re.escape(term), re.IGNORECASE | re.ASCII)
    content = orjson.loads(item).get("content", "")
    return any(pattern.search(text) for text in texts(content))
