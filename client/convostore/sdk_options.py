"""The Agents SDK's session constructors' options, as a `SidecarSession` takes them.

A user swaps `SQLiteSession(...)`, `RedisSession.from_url(...)` or `DaprSession(...)` for
a `SidecarSession` by changing the class name and keeps the arguments. Each option means
here what it means there, or is refused with what to do instead: where a session's data
lives, how long it lives and how it is reached belong to the store, declared once in a
`ConversationStore` (or the sidecar's config), not to each session object.
"""

from __future__ import annotations

import re
from typing import Any

STORE_SIDE = {
    "db_path": "the database file is the store's (`sqlite.path`)",
    "ttl": "retention is the store's (`retention.ttl`; `ttl` in the sidecar's config)",
    "key_prefix": "Redis keys are the store's (`redis.keyPrefix`)",
    "sessions_table": "tables are the store's",
    "messages_table": "tables are the store's",
    "redis_client": "the sidecar holds the store's Redis connection",
    "redis_kwargs": "the sidecar holds the store's Redis connection",
    "engine": "the sidecar holds the store's database connection",
    "engine_kwargs": "the sidecar holds the store's database connection",
    "dapr_client": "the sidecar holds the store's Dapr connection",
    "dapr_address": "the sidecar holds the store's Dapr connection",
    "state_store_name": "the Dapr state store is the store's (`dapr.stateStore`)",
    "consistency": "the Dapr state store's consistency is the store's",
}
"""Options of the SDK's classes that configure the storage itself."""

ACCEPTED = {"create_tables", "ensure_ascii"}
"""Options that hold here as given: the store's schema exists before any session uses it
(the operator or `convostore migrate` makes it), and items come back exactly as stored
whatever the JSON encoding."""

DATABASE_FILE = re.compile(r"[./\\:]|^$")
"""What a store name never holds and a database path nearly always does."""


def refuse_storage_options(cls: str, options: dict[str, Any]) -> None:
    """Raise `TypeError` for an option of the SDK's classes that configures storage,
    naming what to set instead; unknown options as Python itself refuses them."""
    for name in options:
        if name in ACCEPTED:
            continue
        if name in STORE_SIDE:
            raise TypeError(
                f"{cls}(..., {name}=...): {STORE_SIDE[name]}, declared once for every "
                "session in the store's ConversationStore or the sidecar's config; pass "
                "the store's name as `store` (the sidecar serves its stores by name)"
            )
        raise TypeError(f"{cls}() got an unexpected keyword argument {name!r}")


def check_store_name(cls: str, store: Any) -> None:
    """A database path in the store's place (`SQLiteSession("id", "conversations.db")`
    with the class name changed) is refused before it can fail at first use."""
    if not isinstance(store, str):
        raise TypeError(f"{cls}: store must be a store's name, got {type(store).__name__}")
    if DATABASE_FILE.search(store):
        raise ValueError(
            f"{cls}(session_id, {store!r}): the second argument names a store the sidecar "
            f"serves, not a database file; {STORE_SIDE['db_path']}: declare the file as "
            "a store's `sqlite.path` and pass that store's name, or leave it out for "
            "the store 'default'"
        )


def sidecar_url(cls: str, url: str) -> str:
    """`from_url`'s URL: the sidecar's; a database's URL is refused with what to do."""
    if url.split("://", 1)[0] in ("http", "https", "unix"):
        return url
    raise ValueError(
        f"{cls}.from_url: {url.split('://', 1)[0]!r} URLs are the store's, not the "
        "session's: declare the database in a ConversationStore (or the sidecar's config) "
        "and pass the sidecar's URL (http://, https:// or unix://), or no URL for "
        "$CONVOSTORE_URL"
    )
