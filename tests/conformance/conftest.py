"""The conformance suite runs every test once per driver, through the sidecar's API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from convostore_sidecar.encryption import generate_key

from tests.support import BACKENDS, StartSidecar, Subject


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["plain", "encrypted"])
def at_rest(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Every driver runs the suite twice: as it is, and behind encryption at rest."""
    if request.param == "plain":
        return {}
    return {"encryption": {"keys": [{"id": "k1", "value": generate_key()}]}}


@pytest.fixture
def make_subject(
    backend: str,
    at_rest: dict[str, Any],
    start_sidecar: StartSidecar,
    store_config: Callable[..., dict[str, Any]],
) -> Callable[..., Any]:
    async def make(**store_settings: Any) -> Subject:
        config = store_config(backend, **at_rest, **store_settings)
        sidecar = await start_sidecar({"stores": {"conf": config}})
        return Subject(backend, sidecar, config)

    return make


@pytest.fixture
async def subject(make_subject: Callable[..., Any]) -> Subject:
    result: Subject = await make_subject()
    return result
