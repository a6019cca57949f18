"""The conformance suite runs every test once per driver, through the sidecar's API.

Each driver runs it twice, as it is and behind encryption at rest; the Redis driver
also runs it on a Redis Cluster, the PostgreSQL driver through PgBouncer in
transaction mode, and the `sqlalchemy` driver (on MariaDB) on PostgreSQL and SQLite
too. A test marked with a capability (`retention`, `any_json`) runs only on the drivers
that have it; `LACKS` in `tests/support.py` says which lack what, so nothing is skipped
at run time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from convostore_sidecar.keyring import generate_key

from tests.support import (
    BACKENDS,
    LACKS,
    POSTGRES_POOLED,
    REDIS_CLUSTER,
    SQLALCHEMY_POSTGRES,
    SQLALCHEMY_SQLITE,
    StartSidecar,
    Subject,
)

CAPABILITIES = ("retention", "any_json")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" not in metafunc.fixturenames:
        return
    needs = {m.name for m in metafunc.definition.iter_markers() if m.name in CAPABILITIES}
    combos = [
        (backend, at_rest)
        for backend in (
            *BACKENDS,
            REDIS_CLUSTER,
            POSTGRES_POOLED,
            SQLALCHEMY_POSTGRES,
            SQLALCHEMY_SQLITE,
        )
        for at_rest in ("plain", "encrypted")
        if not LACKS.get(backend, frozenset())
        & (needs | ({"encryption"} if at_rest == "encrypted" else set()))
    ]
    metafunc.parametrize(("backend", "at_rest_mode"), combos, ids=[f"{b}-{r}" for b, r in combos])


@pytest.fixture
def at_rest(at_rest_mode: str) -> dict[str, Any]:
    if at_rest_mode == "plain":
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
