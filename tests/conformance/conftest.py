"""The conformance suite runs every test once per driver, through the sidecar's API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.support import BACKENDS, StartSidecar, Subject


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_subject(
    backend: str,
    start_sidecar: StartSidecar,
    store_config: Callable[..., dict[str, Any]],
) -> Callable[..., Any]:
    async def make(**store_settings: Any) -> Subject:
        config = store_config(backend, **store_settings)
        sidecar = await start_sidecar({"stores": {"conf": config}})
        return Subject(backend, sidecar, config)

    return make


@pytest.fixture
async def subject(make_subject: Callable[..., Any]) -> Subject:
    result: Subject = await make_subject()
    return result
