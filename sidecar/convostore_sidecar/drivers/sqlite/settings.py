"""A SQLite store's settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...sections import ConfigError

if TYPE_CHECKING:
    from ...sections import Section


@dataclass(frozen=True)
class Settings:
    path: str = "./convostore.db"
    busy_timeout: float = 5.0
    synchronous: str = "full"
    """`full`: an acknowledged append survives a power loss (the WAL is synced at every
    commit); `normal`: faster, and the last commits may vanish on a power loss (not on a
    crash of the sidecar alone)."""

    @classmethod
    def parse(cls, s: Section) -> Settings:
        path = s.string("path", cls.path)
        if "\x00" in path:
            s.fail("path", "must not contain NUL")
        return cls(
            path=path,
            busy_timeout=s.duration("busyTimeout", cls.busy_timeout, low=0, high=600),
            synchronous=s.choice("synchronous", ("full", "normal"), cls.synchronous),
        )


def unusable_path(store: str, path: str, why: str) -> ConfigError:
    """A path the sidecar cannot keep a database at: a start-up error naming the field."""
    return ConfigError(
        f"store {store!r}: field 'sqlite.path': cannot keep a database at {path!r}: {why}"
    )
