"""History by user turns: reads that never cut a turn in two.

An item limit can separate a tool call from its output, and the next model call that
replays such history fails. A turn starts at a user message and runs to the next one,
so a read that starts at a turn's first item keeps every call with its output. Both
reads here use only a read of the latest N items, so they work on every backend (and behind
encryption at rest): they read a window of the newest items and widen it until it
reaches the turn start they need, so a long session is not read whole for a few turns.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson

from .vocabulary import opens_turn

Read = Callable[[int], Awaitable[list[bytes]]]

FIRST_WINDOW = 32
GROWTH = 4


def is_user_message(item: bytes) -> bool:
    if b'"user"' not in item:
        return False
    try:
        value = orjson.loads(item)
    except orjson.JSONDecodeError:
        return False
    return opens_turn(value)


async def latest_turns(read: Read, turns: int) -> list[bytes]:
    """The items of the latest `turns` user turns, oldest first (all of them when the
    session has fewer turns, with whatever came before its first user message)."""
    if turns == 0:
        return []
    window = max(FIRST_WINDOW, turns * GROWTH)
    while True:
        items = await read(window)
        starts = [index for index, item in enumerate(items) if is_user_message(item)]
        if len(starts) >= turns:
            return items[starts[-turns] :]
        if len(items) < window:
            return items
        window *= GROWTH


async def widened_to_turns(read: Read, limit: int) -> list[bytes]:
    """The latest `limit` items, widened back to the start of the turn the cut falls in."""
    if limit == 0:
        return []
    window = max(FIRST_WINDOW, limit * 2)
    while True:
        items = await read(window)
        cut = min(max(len(items) - limit, 0), len(items) - 1)
        start = next((i for i in range(cut, -1, -1) if is_user_message(items[i])), None)
        if start is not None:
            return items[start:]
        if len(items) < window:
            return items
        window *= GROWTH


def from_first_turn(items: list[bytes]) -> list[bytes]:
    """The items from the first user message on (all of them when there is none): a
    read cut to its cap still starts at a turn."""
    start = next((i for i, item in enumerate(items) if is_user_message(item)), 0)
    return items[start:]
