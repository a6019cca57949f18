"""The append-body parser walks `{"items": [...]}` itself so it can parse one item at a
time; Hypothesis checks it against the standard library's whole-document parser."""

from __future__ import annotations

import json
from typing import Any

import pytest
from convostore_sidecar.jsonbody import append_items, loads
from hypothesis import given, settings
from hypothesis import strategies as st

SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=10,
)
DOCUMENTS = (
    VALUES
    | st.fixed_dictionaries({"items": st.lists(VALUES, max_size=4)})
    | st.fixed_dictionaries({"items": VALUES}, optional={"x": VALUES})
    | st.dictionaries(st.sampled_from(["items", "x", "Items"]), VALUES, max_size=3)
)
SPELLINGS = st.sampled_from(
    [
        {},
        {"indent": 2},
        {"separators": (",", ":")},
        {"separators": (" , ", " : ")},
        {"ensure_ascii": False},
        {"indent": "\t", "ensure_ascii": False},
    ]
)


def whole_document_answer(raw: bytes) -> list[Any] | None:
    """The items a whole-document parse finds, or None where the body is not an
    append body (`{"items": <non-empty array>}` and nothing else)."""
    try:
        document = loads(raw)
    except ValueError:
        return None
    if not isinstance(document, dict) or set(document) != {"items"}:
        return None
    items = document["items"]
    return items if isinstance(items, list) and items else None


def streamed_answer(raw: bytes) -> list[Any] | None:
    try:
        return list(append_items(raw))
    except ValueError:
        return None


@settings(max_examples=400, derandomize=True, database=None)
@given(document=DOCUMENTS, spelling=SPELLINGS, padding=st.sampled_from(["", " ", "\n\t "]))
def test_the_streamed_parse_agrees_with_a_whole_document_parse(
    document: Any, spelling: dict[str, Any], padding: str
) -> None:
    raw = (padding + json.dumps(document, **spelling) + padding).encode()
    expected, got = whole_document_answer(raw), streamed_answer(raw)
    assert json.dumps(got) == json.dumps(expected)


@pytest.mark.parametrize(
    "raw",
    [b'{"items":[{}]', b'{"items":[{}],}', b'{"items":[{}]}{}', b'{"items":[{},]}', b"\xff"],
)
def test_text_that_is_not_json_is_refused(raw: bytes) -> None:
    assert whole_document_answer(raw) is None
    assert streamed_answer(raw) is None
