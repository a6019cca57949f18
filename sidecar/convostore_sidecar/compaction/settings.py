"""A store's `compaction` section: when it compacts a session, with which model, and
how; read at start-up with the rest of the config, so a bad section stops the sidecar."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..sections import Section

MODEL_NAME = re.compile(r"[A-Za-z0-9._:/-]{1,128}")
COMPACTION_MODES = ("auto", "input", "previous_response_id")
SDK_COMPACTION_THRESHOLD = 10
"""The Agents SDK's default: compact once 10 items other than user messages are stored."""


def is_openai_model(name: str) -> bool:
    """The models `responses.compact` serves, by the Agents SDK's rule: `gpt-*`, `o<digit>*`
    and their fine-tunes (`ft:gpt-...`), optionally after a `provider/` prefix."""
    root = name.rsplit("/", 1)[-1].removeprefix("ft:").split(":", 1)[0]
    return root.startswith("gpt-") or (root[:1] == "o" and root[1:2].isdigit())


@dataclass(frozen=True)
class CompactionSettings:
    """When a store compacts a session and with which model; the key stays in the sidecar."""

    api_key_file: str
    model: str = "gpt-4.1"
    base_url: str | None = None
    organization: str | None = None
    project: str | None = None
    timeout: float = 60.0
    max_retries: int = 2
    trigger_items: int | None = SDK_COMPACTION_THRESHOLD
    """Compact once this many items other than user messages and earlier summaries..."""
    trigger_tokens: int | None = None
    """...or once the history is estimated at this many tokens (4 bytes each)."""
    keep_recent_turns: int = 0
    """The latest user turns that always stay verbatim, after the summary."""
    mode: str = "auto"
    """How the model gets the history when the caller does not say (as the SDK's)."""

    @classmethod
    def parse(cls, s: Section) -> CompactionSettings:
        api_key_file = s.string("apiKeyFile")
        if api_key_file is None:
            s.fail("apiKeyFile", "is required: the file that holds the OpenAI API key")
        model = s.string("model", cls.model, pattern=MODEL_NAME)
        if not is_openai_model(model):
            s.fail("model", f"must be an OpenAI model that compacts (gpt-*, o*), got {model!r}")
        trigger = s.section("trigger")
        items = trigger.integer("items", None, low=1, high=1_000_000)
        tokens = trigger.integer("tokens", None, low=1, high=100_000_000)
        if items is not None and tokens is not None:
            trigger.fail(None, "give either items or tokens, not both")
        trigger.done()
        settings = cls(
            api_key_file=api_key_file,
            model=model,
            base_url=s.api_url("baseURL"),
            organization=s.string("organization"),
            project=s.string("project"),
            timeout=s.duration("timeout", cls.timeout, low=0.1, high=600),
            max_retries=s.integer("maxRetries", cls.max_retries, low=0, high=10),
            trigger_items=items if items is not None or tokens is not None else cls.trigger_items,
            trigger_tokens=tokens,
            keep_recent_turns=s.integer("keepRecentTurns", 0, low=0, high=10_000),
            mode=s.choice("mode", COMPACTION_MODES, default="auto"),
        )
        s.done()
        return settings
