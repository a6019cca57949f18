"""The sidecar's client of OpenAI's API, shared by the openai backend and compaction's
model calls: built from a store's settings, with the key only the sidecar holds, and
kept out of every message."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

from openai import AsyncOpenAI

KEY_LIKE = re.compile(r"sk-[A-Za-z0-9_*\-]+")


class ClientSettings(Protocol):
    """How the sidecar reaches OpenAI's API (the openai backend's, compaction's)."""

    @property
    def base_url(self) -> str | None: ...
    @property
    def organization(self) -> str | None: ...
    @property
    def project(self) -> str | None: ...
    @property
    def timeout(self) -> float: ...
    @property
    def max_retries(self) -> int: ...


def api_client(key: str, settings: ClientSettings) -> AsyncOpenAI:
    return AsyncOpenAI(
        api_key=key,
        base_url=settings.base_url,
        organization=settings.organization,
        project=settings.project,
        timeout=settings.timeout,
        max_retries=settings.max_retries,
    )


def read_key(path: str, store: str) -> str:
    try:
        key = Path(path).read_text("utf-8").strip()
    except OSError as exc:
        raise RuntimeError(
            f"store {store!r}: cannot read the OpenAI API key file {path!r}: {exc.strerror}"
        ) from exc
    if not key:
        raise RuntimeError(f"store {store!r}: the OpenAI API key file {path!r} is empty")
    return key


def redact(text: str, key: str) -> str:
    """`text` without the key, or anything shaped like one (as OpenAI echoes them masked)."""
    return KEY_LIKE.sub("sk-[redacted]", text.replace(key, "[redacted]"))
