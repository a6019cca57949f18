"""Keeping Secret values out of everything the operator says.

Status conditions, Events and log lines are readable by far more people than the
Secrets a store names (the built-in `view` role reads Events and status, not Secrets).
Every message the operator builds while it holds a store's Secret values goes through a
`Redactor` made from those values: each value, and the user and password inside a
URL-shaped one, is replaced, as is any `user:password@` part of a URL in the text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit

HIDDEN = "<redacted>"
USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
SHORTEST = 3  # shorter values would redact ordinary words; they are too weak to matter


class Redactor:
    def __init__(self, values: Iterable[str | bytes]) -> None:
        found: set[str] = set()
        for value in values:
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            for part in (text, text.strip(), *_url_parts(text.strip())):
                if len(part) >= SHORTEST:
                    found.add(part)
        self._values = sorted(found, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for value in self._values:
            text = text.replace(value, HIDDEN)
        return USERINFO.sub(f"{HIDDEN}@", text)


def _url_parts(text: str) -> list[str]:
    if "://" not in text:
        return []
    try:
        parts = urlsplit(text)
        found = [parts.username or "", parts.password or ""]
    except ValueError:
        return []
    return found + [unquote(p) for p in found]
