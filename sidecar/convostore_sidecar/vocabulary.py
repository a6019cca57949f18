"""The Agents SDK's item vocabulary, in one place: which items open a user turn, which
tool calls pair with which outputs, which types carry a server-side id or name their
tool, and what the SDK adds to items for itself.

Items are the SDK's (and OpenAI's Responses API's) input and output items; the sidecar
stores them opaquely and reads only what is named here, so turn numbers, tool counts,
compaction boundaries and Conversations ids agree with the SDK's own sessions.
"""

from __future__ import annotations

from typing import Any

CALL_OUTPUT_TYPES = {
    "function_call": "function_call_output",
    "custom_tool_call": "custom_tool_call_output",
    "computer_call": "computer_call_output",
    "local_shell_call": "local_shell_call_output",
    "shell_call": "shell_call_output",
    "apply_patch_call": "apply_patch_call_output",
    "tool_search_call": "tool_search_output",
    "program": "program_output",
}
"""A tool call's type and the type of the item that answers it, matched by `call_id`
(the SDK's map)."""
OUTPUT_TYPES = frozenset(CALL_OUTPUT_TYPES.values())

NAMELESS_TOOL_TYPES = frozenset(
    {
        "computer_call",
        "file_search_call",
        "web_search_call",
        "code_interpreter_call",
        "shell_call",
        "apply_patch_call",
    }
)
"""Tool calls whose type names the tool, having no `name` of their own."""

KEEPS_ID = frozenset(
    {
        "file_search_call",
        "web_search_call",
        "computer_call",
        "code_interpreter_call",
        "image_generation_call",
        "local_shell_call",
        "local_shell_call_output",
        "mcp_list_tools",
        "mcp_approval_request",
        "mcp_call",
        "item_reference",
        "program",
        "program_output",
        "reasoning",
    }
)
"""The item types whose `id` names a server-side object (the Conversations API requires
it); on any other item an id is the model's own."""
PLACEHOLDER_ID = "__fake_id__"
"""The SDK's placeholder for an id it has not got: never an id."""

SDK_ONLY_KEYS = ("_agents_tool_description", "_agents_tool_title", "created_by")
"""What the SDK keeps on stored items and strips before any item reaches the API."""


def opens_turn(item: Any) -> bool:
    """A user message, as `AdvancedSQLiteSession` counts turns (and turn reads cut them):
    any item with role `user`."""
    return isinstance(item, dict) and item.get("role") == "user"


def is_user_message(item: Any) -> bool:
    """A user message, as the SDK's compaction decides what it keeps: a `message` item of
    role `user`, or an easy input message (role `user` with content)."""
    if not isinstance(item, dict):
        return False
    if item.get("type") == "message":
        return item.get("role") == "user"
    return item.get("role") == "user" and "content" in item
