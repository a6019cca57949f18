"""Hypothesis: arbitrary JSON objects, appended in arbitrary batches through the
sidecar, come back from every driver (plain and encrypted) as the same values, in order,
with the same key order and number spelling."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import Subject, unique

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=16,
)
ITEMS = st.dictionaries(st.text(max_size=8), VALUES, max_size=5)
BATCHES = st.lists(st.lists(ITEMS, min_size=1, max_size=4), min_size=1, max_size=3)


@pytest.mark.any_json
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batches=BATCHES)
async def test_any_json_objects_round_trip_exactly(
    subject: Subject, batches: list[list[dict[str, Any]]]
) -> None:
    session = subject.session(unique())
    for batch in batches:
        await session.add_items(batch)
    sent = [item for batch in batches for item in batch]
    back = await session.get_items()
    assert json.dumps(back) == json.dumps(sent)  # values, key order, -0.0, big integers
    assert await session.get_items(limit=1) == sent[-1:]
    assert json.dumps(await session.pop_item()) == json.dumps(sent[-1])
