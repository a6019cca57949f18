"""The sidecar's compaction decisions against the Agents SDK's own functions, on generated
items and arguments: which items count toward the trigger, which mode `auto` picks, and
how the model's output is made fit to store and send again."""

from __future__ import annotations

from typing import Any

import pytest
from agents.memory import openai_responses_compaction_session as sdk
from convostore_sidecar import vocabulary
from convostore_sidecar.compaction import policy
from hypothesis import given
from hypothesis import strategies as st

ROLES = st.sampled_from(["user", "assistant", "system", "developer"])
TYPES = st.sampled_from(
    ["message", "function_call", "function_call_output", "compaction", "reasoning", None]
)


@st.composite
def items(draw: st.DrawFn) -> dict[str, Any]:
    item: dict[str, Any] = {}
    kind = draw(TYPES)
    if kind is not None:
        item["type"] = kind
    if draw(st.booleans()):
        item["role"] = draw(ROLES)
    if draw(st.booleans()):
        item["content"] = draw(st.text(max_size=5))
    return item


@given(st.lists(items(), max_size=20))
def test_the_trigger_counts_what_the_sdk_counts(history: list[dict[str, Any]]) -> None:
    theirs: Any = history  # the SDK's functions take its own item types
    assert policy.candidates(history) == len(sdk.select_compaction_candidate_items(theirs))
    assert [vocabulary.is_user_message(i) for i in history] == [
        sdk._is_user_message(i) for i in theirs
    ]


@given(
    st.sampled_from(["auto", "input", "previous_response_id"]),
    st.one_of(st.none(), st.text(min_size=1, max_size=4)),
    st.one_of(st.none(), st.booleans()),
)
def test_auto_resolves_as_the_sdk_resolves_it(
    requested: str, response_id: str | None, store: bool | None
) -> None:
    ours = policy.mode(policy.Request(response_id, store, requested), "auto", partial=False)
    mode: Any = requested
    assert ours == sdk._resolve_compaction_mode(mode, response_id=response_id, store=store)


@pytest.mark.parametrize(
    "output",
    [
        [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
        [
            {
                "type": "message",
                "role": "user",
                "content": [
                    {
                        "type": "input_image",
                        "image_url": "https://x/i.png",
                        "detail": "low",
                        "x": 1,
                    },
                    {"type": "input_image", "file_id": "file_1", "image_url": ""},
                    {"type": "input_file", "file_url": "https://x/f.pdf", "filename": "f.pdf"},
                    {"type": "input_file", "file_data": "ZGF0YQ==", "file_id": "file_2"},
                ],
            },
            {"type": "compaction", "id": "cmp_1", "encrypted_content": "abc"},
        ],
        [
            {"type": "message", "role": "assistant", "id": "msg_1", "content": []},
            {"type": "compaction", "id": "cmp_1", "encrypted_content": "abc"},
        ],
        [
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "message", "role": "assistant", "id": "msg_1", "content": []},
        ],
    ],
)
def test_the_models_output_is_stored_as_the_sdk_stores_it(output: list[dict[str, Any]]) -> None:
    theirs = sdk._strip_orphaned_assistant_ids(sdk._normalize_compaction_output_items(output))
    assert policy.from_model(output) == theirs


def test_an_image_with_no_source_is_refused_as_the_sdk_refuses_it() -> None:
    output = [{"type": "message", "role": "user", "content": [{"type": "input_image"}]}]
    with pytest.raises(ValueError, match="image_url or file_id"):
        sdk._normalize_compaction_output_items(output)
    with pytest.raises(policy.UnusableOutput, match="image_url, file_id"):
        policy.from_model(output)


def test_items_reach_the_model_without_the_sdks_bookkeeping() -> None:
    stored = [
        {"type": "function_call", "call_id": "c", "_agents_tool_title": "t", "created_by": "x"}
    ]
    assert policy.for_model(stored) == sdk._normalize_compaction_session_items(stored)  # type: ignore[arg-type]
