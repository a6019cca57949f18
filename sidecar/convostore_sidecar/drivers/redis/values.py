"""How a session's values are written in its keys: branch key suffixes, the registry of
branches, the tab-separated `meta` entries, and usage as JSON."""

from __future__ import annotations

import orjson

from ..base import MAIN, Usage


def live_branches(registry: dict[bytes, bytes]) -> list[str]:
    return sorted(name.decode() for name, live in registry.items() if live == b"1")


def suffix(branch: str) -> str:
    return "" if branch == MAIN else f"@{branch}"


def clean(text: str) -> str:
    """Kinds and tool names go into tab-separated entries."""
    return text.replace("\t", " ")


def encode_usage(usage: Usage) -> bytes:
    return orjson.dumps(
        {
            "requests": usage.requests,
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "total_tokens": usage.total_tokens,
            "input_details": None if usage.input_details is None else usage.input_details.decode(),
            "output_details": (
                None if usage.output_details is None else usage.output_details.decode()
            ),
        }
    )


def decode_usage(raw: bytes) -> Usage:
    value = orjson.loads(raw)
    details = [value[k] for k in ("input_details", "output_details")]
    return Usage(
        value["requests"],
        value["input_tokens"],
        value["output_tokens"],
        value["total_tokens"],
        *(None if d is None else d.encode() for d in details),
    )
