"""`AdvancedSidecarSession`: the Agents SDK's `AdvancedSQLiteSession`, on any store.

Branches from earlier turns, the conversation by user turns, search over what users
said, and token usage per turn, with the public methods of the SDK's class (names,
arguments, return shapes and `ValueError`s), so code written for it works after changing
the constructor. The sidecar keeps the structure, atomically, next to the items; the
current branch is this object's own state, as in the SDK, and every call names it.

Where the two differ: branch ids are 1 to 128 of `[A-Za-z0-9._:@-]` (the SDK takes any
text); a branch made from turn 1 holds no items yet, so `list_branches` leaves it out
(as the SDK does) but `switch_to_branch` accepts it; `timestamp` and `created_at` come
from the sidecar's clock.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import quote

from .errors import NotFoundError, RequestRejectedError
from .session import Item, SidecarSession

MAIN = "main"
TOOL_TYPES = frozenset(
    {
        "tool_call",
        "function_call",
        "computer_call",
        "file_search_call",
        "web_search_call",
        "code_interpreter_call",
        "tool_search_call",
        "custom_tool_call",
        "mcp_call",
        "mcp_approval_request",
        "shell_call",
        "apply_patch_call",
    }
)

log = logging.getLogger("convostore.advanced")


def content_preview(content: Any, max_length: int | None = None) -> str:
    """A user message's content as text, cut to `max_length` with `...` (as the SDK)."""
    text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
    if max_length is not None and len(text) > max_length:
        return text[:max_length] + "..."
    return text


class AdvancedSidecarSession(SidecarSession):
    """A `SidecarSession` with branches, turns and usage; see the module docstring."""

    def __init__(
        self,
        session_id: str,
        store: str = "default",
        url: str | None = None,
        session_settings: Any | None = None,
        **options: Any,
    ) -> None:
        """As `SidecarSession`; the SDK's `AdvancedSQLiteSession(session_id=...)` form
        (every argument by keyword) works too."""
        super().__init__(session_id, store, url, session_settings, **options)
        self._current_branch_id = MAIN
        # per branch: the turn this instance last opened with a user message, and the
        # sequence number of that message: the turn a run's usage belongs to
        self._last_turn: dict[str, tuple[int, int]] = {}

    def _branch_path(self, branch: str) -> str:
        return f"{self._path}/branches/{quote(branch, safe='')}"

    def _lost(self, branch: str, exc: NotFoundError) -> bool:
        """True when `branch`, the current one, is gone (another object cleared the
        session or deleted the branch); `main` is current again, as in the SDK."""
        if exc.code != "branch_not_found" or branch != self._current_branch_id or branch == MAIN:
            return False
        log.info("session %s: branch %r is gone; back on main", self.session_id, branch)
        self._current_branch_id = MAIN
        return True

    async def get_items(self, limit: int | None = None, branch_id: str | None = None) -> list[Item]:
        """The latest items of `branch_id` (the current branch when None)."""
        branch = branch_id or self._current_branch_id
        try:
            return await self._read(limit, {"branch": branch})
        except NotFoundError as exc:
            if branch_id is None and self._lost(branch, exc):
                return await self._read(limit, {"branch": MAIN})
            if exc.code == "branch_not_found":
                return []
            raise

    async def add_items(self, items: list[Item], *, idempotency_key: str | None = None) -> None:
        if not items:
            return
        branch = self._current_branch_id
        try:
            answer = await self._append(items, idempotency_key, {"branch": branch})
        except NotFoundError as exc:
            if not self._lost(branch, exc):
                raise
            branch = MAIN
            answer = await self._append(items, idempotency_key, {"branch": branch})
        opens_turn = any(isinstance(item, dict) and item.get("role") == "user" for item in items)
        if opens_turn and answer.get("turn") is not None:
            self._last_turn[branch] = (answer["turn"], answer["anchor"])

    def _compaction_target(self) -> dict[str, str]:
        return {"branch": self._current_branch_id}

    async def pop_item(self) -> Item | None:
        """Remove and return the newest item of the current branch."""
        branch = self._current_branch_id
        try:
            return await self._pop({"branch": branch})
        except NotFoundError as exc:
            if not self._lost(branch, exc):
                raise
            return await self._pop({"branch": MAIN})

    async def clear_session(self) -> None:
        """Forget every branch, turn and usage; the current branch is `main` again."""
        await super().clear_session()
        self._current_branch_id = MAIN
        self._last_turn.clear()

    async def store_run_usage(self, result: Any) -> None:
        """Record a run's usage for the turn this session last opened (the run's own input
        turn, whatever other writers appended since; nothing when that turn was removed
        meanwhile). Failures are logged, not raised, as in the SDK."""
        usage = getattr(getattr(result, "context_wrapper", None), "usage", None)
        if usage is None:
            return
        branch = self._current_branch_id
        body: dict[str, Any] = {
            "requests": usage.requests or 0,
            "input_tokens": usage.input_tokens or 0,
            "output_tokens": usage.output_tokens or 0,
            "total_tokens": usage.total_tokens or 0,
        }
        for key in ("input_tokens_details", "output_tokens_details"):
            details = getattr(usage, key, None)
            if details:
                body[key] = dict(details.__dict__)
        if branch in self._last_turn:
            body["turn"], body["anchor"] = self._last_turn[branch]
        try:
            await self._call(
                "POST", self._branch_path(branch) + "/usage", body=body, idempotent=True
            )
        except Exception:
            log.exception("failed to store usage for session %s", self.session_id)

    async def get_session_usage(self, branch_id: str | None = None) -> dict[str, int] | None:
        """Usage summed over every branch, or over `branch_id`; None when none was stored."""
        params = {"branch": branch_id} if branch_id else None
        answer = await self._call("GET", self._path + "/usage", params=params)
        usage: dict[str, int] | None = answer["usage"]
        return usage

    async def get_turn_usage(
        self, user_turn_number: int | None = None, branch_id: str | None = None
    ) -> list[dict[str, Any]] | dict[str, Any]:
        """Usage of each turn of the branch, or of one turn ({} when it has none)."""
        turns = await self._branch_read(branch_id, "/usage", "turns")
        if user_turn_number is None:
            return turns
        for turn in turns:
            if turn["user_turn_number"] == user_turn_number:
                return {k: v for k, v in turn.items() if k != "user_turn_number"}
        return {}

    async def get_conversation_turns(self, branch_id: str | None = None) -> list[dict[str, Any]]:
        """The branch's user turns: number, content (cut to 100), full content, time."""
        turns = await self._branch_read(branch_id, "/turns", "turns")
        return [self._turn(turn, 100) for turn in turns]

    async def find_turns_by_content(
        self, search_term: str, branch_id: str | None = None
    ) -> list[dict[str, Any]]:
        """The branch's user turns whose text contains `search_term` (ASCII case ignored)."""
        turns = await self._branch_read(branch_id, "/turns", "turns", {"containing": search_term})
        return [self._turn(turn, None) for turn in turns]

    @staticmethod
    def _turn(turn: dict[str, Any], max_length: int | None) -> dict[str, Any]:
        content = turn["item"].get("content", "")
        return {
            "turn": turn["turn"],
            "content": content_preview(content, max_length),
            "full_content": content,
            "timestamp": turn["created_at"],
            "can_branch": True,
        }

    async def get_conversation_by_turns(
        self, branch_id: str | None = None
    ) -> dict[int, list[dict[str, str | None]]]:
        """Each turn's items as `{"type", "tool_name"}`, in order."""
        shape = await self._branch_read(branch_id, "/shape", "items")
        turns: dict[int, list[dict[str, str | None]]] = {}
        for item in shape:
            turns.setdefault(item["turn"], []).append(
                {"type": item["type"], "tool_name": item["tool_name"]}
            )
        return turns

    async def get_tool_usage(self, branch_id: str | None = None) -> list[tuple[str, int, int]]:
        """(tool name, calls, turn) per tool and turn, by turn; a tool-search output
        counts only when its turn has no tool-search call of that tool."""
        shape = await self._branch_read(branch_id, "/shape", "items")
        searched = {
            (item["turn"], item["tool_name"])
            for item in shape
            if item["type"] == "tool_search_call"
        }
        counts: dict[tuple[Any, int], int] = {}
        for item in shape:
            counted = item["type"] in TOOL_TYPES or (
                item["type"] == "tool_search_output"
                and (item["turn"], item["tool_name"]) not in searched
            )
            if counted:
                key = (item["tool_name"], item["turn"])
                counts[key] = counts.get(key, 0) + 1
        rows = [(tool, count, turn) for (tool, turn), count in counts.items()]
        return sorted(rows, key=lambda row: (row[2], row[0] or ""))

    async def create_branch_from_turn(
        self, turn_number: int, branch_name: str | None = None
    ) -> str:
        """A branch with every item before user turn `turn_number` of the current branch;
        it becomes the current branch."""
        return await self._create_branch({"turn": turn_number}, branch_name)

    async def create_branch_from_content(
        self, search_term: str, branch_name: str | None = None
    ) -> str:
        """As `create_branch_from_turn`, from the first user turn containing the term."""
        return await self._create_branch({"containing": search_term}, branch_name)

    async def _create_branch(self, source: dict[str, Any], branch_name: str | None) -> str:
        if branch_name is not None and not branch_name.strip():
            raise ValueError("Branch name cannot be empty")
        body = {"from_branch": self._current_branch_id, **source}
        if branch_name is not None:
            body["branch_id"] = branch_name
        try:
            answer = await self._call("POST", self._path + "/branches", body=body)
        except RequestRejectedError as exc:
            raise self._branch_error(exc, source, branch_name) from exc
        branch: str = answer["branch_id"]
        self._current_branch_id = branch
        return branch

    def _branch_error(
        self, exc: RequestRejectedError, source: dict[str, Any], name: str | None
    ) -> Exception:
        if exc.code == "turn_not_found" and "containing" in source:
            return ValueError(f"No user turns found containing '{source['containing']}'")
        if exc.code == "turn_not_found":
            return ValueError(
                f"Turn {source['turn']} does not contain a user message "
                f"in branch '{self._current_branch_id}'"
            )
        if exc.code == "branch_id_used":
            return ValueError(f"Branch ID '{name}' has already been used. Choose a new branch ID.")
        return exc

    async def switch_to_branch(self, branch_id: str) -> None:
        """Make `branch_id` the current branch; it must exist and hold items."""
        try:
            answer = await self._call("GET", self._branch_path(branch_id))
        except RequestRejectedError as exc:
            if exc.code in ("branch_not_found", "invalid_branch_id"):
                raise ValueError(f"Branch '{branch_id}' does not exist") from exc
            raise
        if not answer["has_items"] and branch_id != MAIN:
            raise ValueError(f"Branch '{branch_id}' does not exist")
        self._current_branch_id = branch_id

    async def delete_branch(self, branch_id: str, force: bool = False) -> None:
        """Delete a branch and its usage; `main` never, the current branch only with
        `force` (which switches to `main` first). Its id stays reserved."""
        if not branch_id or not branch_id.strip():
            raise ValueError("Branch ID cannot be empty")
        if branch_id == MAIN:
            raise ValueError("Cannot delete the 'main' branch")
        if branch_id == self._current_branch_id:
            if not force:
                raise ValueError(
                    f"Cannot delete current branch '{branch_id}'. "
                    "Use force=True or switch branches first"
                )
            if not any(b["branch_id"] == branch_id for b in await self.list_branches()):
                raise ValueError(f"Branch '{branch_id}' does not exist")
            self._current_branch_id = MAIN
        params = {"current": self._current_branch_id, "force": "true" if force else "false"}
        try:
            await self._call("DELETE", self._branch_path(branch_id), params=params)
        except RequestRejectedError as exc:
            if exc.code in ("branch_not_found", "invalid_branch_id"):
                raise ValueError(f"Branch '{branch_id}' does not exist") from exc
            raise
        self._last_turn.pop(branch_id, None)

    async def list_branches(self) -> list[dict[str, Any]]:
        """The branches holding items: id, item and user-turn counts, current or not."""
        answer = await self._call("GET", self._path + "/branches")
        listed = {b["branch_id"] for b in answer["branches"]}
        if self._current_branch_id not in listed | {MAIN}:
            self._current_branch_id = MAIN  # cleared or deleted by another object
        return [
            {
                "branch_id": b["branch_id"],
                "message_count": b["message_count"],
                "user_turns": b["user_turns"],
                "is_current": b["branch_id"] == self._current_branch_id,
                "created_at": b["created_at"],
            }
            for b in answer["branches"]
        ]

    async def _branch_read(
        self, branch_id: str | None, tail: str, key: str, params: dict[str, str] | None = None
    ) -> list[Any]:
        """A list read about one branch (the current one when None); an unknown branch
        reads as empty, and a current branch that is gone reads as `main`, as in the SDK."""
        branch = branch_id or self._current_branch_id
        try:
            answer = await self._call("GET", self._branch_path(branch) + tail, params=params)
        except NotFoundError as exc:
            if branch_id is None and self._lost(branch, exc):
                return await self._branch_read(MAIN, tail, key, params)
            if exc.code == "branch_not_found":
                return []
            raise
        rows: list[Any] = answer[key]
        return rows

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
        idempotent: bool | None = None,
    ) -> Any:
        """One call; reads, deletes and usage records are safe to retry, creations not."""
        payload = None if body is None else json.dumps(body, ensure_ascii=False).encode()
        retry = method in ("GET", "DELETE") if idempotent is None else idempotent
        return await self._transport.call(
            method, path, params=params, body=payload, idempotent=retry
        )
