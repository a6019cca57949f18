"""Where a Secret's values go, as the clients that connect will read the endpoint."""

from __future__ import annotations

from typing import Any

import pytest
from convostore_operator.kube import StoredSecret
from convostore_operator.spec import secret_refs, validate
from convostore_operator.trust import (
    UNLISTABLE,
    NotAllowed,
    check_flows,
    dapr_origins,
    postgres_origins,
    redis_origin,
    sqlalchemy_origin,
)

PASSWORD = {"name": "victim", "key": "password"}


def lending(endpoints: str) -> StoredSecret:
    annotations = {
        "convostore.dev/allowed-stores": "*",
        "convostore.dev/allowed-endpoints": endpoints,
    }
    return StoredSecret({"password": b"pw"}, "1", annotations, labels={}, owners=[])


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://Cache.Data:6380/0", "redis://cache.data:6380"),
        ("rediss://cache.data", "rediss://cache.data:6379"),
        ("redis://cache.data/0?db=2&socket_timeout=3", "redis://cache.data:6379"),
        ("redis://[::1]:7000", "redis://::1:7000"),
    ],
)
def test_a_redis_url_is_read_as_redis_py_connects(url: str, expected: str) -> None:
    assert redis_origin(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "rediss://cache.data:6380?ssl_cert_reqs=none",
        "redis://?host=evil.example&port=7000",
        "redis://cache.data:6379?ssl_check_hostname=false",
        "redis://cache.data:6379?protocol=3",
        "unix:///var/run/redis.sock",
        "http://cache.data:6379",
        "redis://cache.data:99999",
    ],
)
def test_a_redis_url_whose_parameters_move_or_weaken_it_cannot_be_listed(url: str) -> None:
    assert redis_origin(url).startswith(UNLISTABLE)


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("postgresql://app@db.data/chat", ["postgresql://db.data:5432"]),
        (
            "postgresql://app@a:5433,b/chat?target_session_attrs=read-write",
            ["postgresql://a:5433", "postgresql://b:5432"],
        ),
        ("postgresql://app@db.data/chat?host=evil.example", ["postgresql://evil.example:5432"]),
        (
            "postgresql://app@db.data:5432/chat?host=x,y&port=6000",
            ["postgresql://x:6000", "postgresql://y:6000"],
        ),
        ("postgresql://app@[::1]:6000/chat", ["postgresql://::1:6000"]),
    ],
)
def test_a_dsn_names_every_host_it_may_connect_to(dsn: str, expected: list[str]) -> None:
    assert postgres_origins(dsn) == expected


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://app@db.data/chat?service=prod",
        "postgresql://app@db.data/chat?hostaddr=10.0.0.9",
        "postgresql://app@/chat?host=/var/run/postgresql",
        "postgresql://app@db.data:x/chat",
    ],
)
def test_a_dsn_that_hides_where_it_connects_cannot_be_listed(dsn: str) -> None:
    assert all(o.startswith(UNLISTABLE) for o in postgres_origins(dsn))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("redis.data:6379", ["redis.data:6379"]),
        ("a:26379, b:26379", ["a:26379", "b:26379"]),
        ("host=pg.data user=x password=y port=5433", ["pg.data:5433"]),
        ("postgres://u@pg.data:5432/db", ["pg.data:5432"]),
        ("user=x password=y", [UNLISTABLE + "user=x password=y"]),
    ],
)
def test_a_dapr_host_field_is_read_in_each_of_its_forms(value: str, expected: list[str]) -> None:
    assert dapr_origins(value) == expected


def check(spec: dict[str, Any], listed: str, secrets: dict[str, str] | None = None) -> None:
    spec = validate(spec)
    refs = secret_refs(spec)
    lent = {ref.name: lending(listed) for ref in refs.values()}
    check_flows(spec, refs, lent, secrets or {})


def test_a_url_that_turns_certificate_checks_off_gets_no_password() -> None:
    listed = "rediss://cache.data:6380"
    weakened = {"url": f"{listed}?ssl_cert_reqs=none", "passwordSecretRef": PASSWORD}
    with pytest.raises(NotAllowed, match="query parameters"):
        check({"backend": "redis", "redis": weakened}, listed)
    check({"backend": "redis", "redis": {**weakened, "url": listed}}, listed)


def test_a_dapr_component_host_must_be_listed_by_every_secret_it_takes_a_value_from() -> None:
    metadata = [
        {"name": "redisHost", "value": "redis.data:6379"},
        {"name": "redisPassword", "secretKeyRef": PASSWORD},
    ]
    spec = {
        "backend": "dapr",
        "dapr": {"stateStore": "s", "component": {"type": "state.redis", "metadata": metadata}},
    }
    check(spec, "redis://redis.data:6379")
    with pytest.raises(NotAllowed, match=r"redis\.data:6379 \(from spec\.dapr\.component"):
        check(spec, "redis://redis.data:6380")


def test_a_password_goes_to_the_direct_dsn_only_where_its_secret_lists_it() -> None:
    """Through a pooler the operator migrates over `directDsnSecretRef`: its hosts get
    the password too, so the password's Secret must list them as well as the pooler's
    (a store author's own DSNs cannot send someone else's password anywhere)."""
    section = {
        "dsnSecretRef": {"name": "author", "key": "pooled"},
        "directDsnSecretRef": {"name": "author", "key": "direct"},
        "passwordSecretRef": PASSWORD,
        "transactionPooler": True,
    }
    spec = {"backend": "postgres", "postgres": section}
    secrets = {
        "dsnSecretRef": "postgresql://app@pooler.data/chat",
        "directDsnSecretRef": "postgresql://app@evil.example/chat",
    }
    with pytest.raises(NotAllowed, match="from the DSN of directDsnSecretRef"):
        check(spec, "postgresql://pooler.data:5432", secrets)
    check(spec, "postgresql://pooler.data:5432,postgresql://evil.example:5432", secrets)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mysql+asyncmy://app@MariaDB.data/chat", "mysql://mariadb.data:3306"),
        ("mysql+aiomysql://app:pw@db.data:3307/chat?charset=utf8mb4", "mysql://db.data:3307"),
        ("postgresql+asyncpg://app@pg.data/chat", "postgresql://pg.data:5432"),
    ],
)
def test_a_sqlalchemy_url_is_read_by_its_dialect_host_and_port(url: str, expected: str) -> None:
    assert sqlalchemy_origin(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "mysql+asyncmy://app@db.data/chat?unix_socket=/run/mysqld.sock",
        "mysql+asyncmy://app@db.data/chat?host=evil.example",
        "mysql+asyncmy://app@db.data/chat?ssl=false",
        "postgresql+asyncpg://app@/chat?host=/var/run/postgresql",
        "sqlite+aiosqlite:////var/lib/convostore/c.db",
        "not a url",
    ],
)
def test_a_sqlalchemy_url_that_may_connect_elsewhere_cannot_be_listed(url: str) -> None:
    origin = sqlalchemy_origin(url)
    assert origin.startswith(UNLISTABLE)
    assert "pw" not in origin


def test_a_password_goes_only_to_the_url_its_own_secret_chose_or_lists() -> None:
    """A store author's URL Secret cannot borrow another Secret's password for its host."""
    section = {"urlSecretRef": {"name": "author", "key": "url"}, "passwordSecretRef": PASSWORD}
    spec = {"backend": "sqlalchemy", "sqlalchemy": section}
    secrets = {"urlSecretRef": "mysql+asyncmy://app@evil.example/chat"}
    with pytest.raises(NotAllowed, match="from the URL of urlSecretRef"):
        check(spec, "mysql://mariadb.data:3306", secrets)
    check(spec, "mysql://evil.example:3306", secrets)
