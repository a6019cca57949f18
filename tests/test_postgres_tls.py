"""PostgreSQL over TLS: a configured CA is verified, and a server beyond loopback is
never reached with libpq's unverified `prefer`."""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from convostore import SidecarSession
from convostore.errors import StoreUnavailableError
from convostore_operator.certs import issue
from convostore_sidecar.config import parse_config
from convostore_sidecar.drivers.postgres import Settings
from convostore_sidecar.sections import ConfigError

from tests.servers import PostgresServer
from tests.support import StartSidecar, migrate


@pytest.fixture(scope="module")
def tls_server() -> Iterator[tuple[PostgresServer, bytes]]:
    material = issue(["localhost"], datetime.datetime.now(datetime.UTC))
    server = PostgresServer(tls=(material.cert, material.key))
    server.start()
    yield server, material.ca_cert
    server.destroy()


def store(dsn: str, **tls: str) -> dict[str, Any]:
    section: dict[str, Any] = {"dsn": dsn, "schema": "tls_test"}
    if tls:
        section["tls"] = tls
    return {"stores": {"chat": {"backend": "postgres", "postgres": section}}}


async def test_a_configured_ca_is_verified(
    tls_server: tuple[PostgresServer, bytes], start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    server, ca = tls_server
    right, wrong = tmp_path / "ca.crt", tmp_path / "other-ca.crt"
    right.write_bytes(ca)
    wrong.write_bytes(issue(["localhost"], datetime.datetime.now(datetime.UTC)).ca_cert)
    dsn = f"postgresql://postgres@localhost:{server.port}/postgres"

    migrate(store(dsn, caFile=str(right)))
    trusted = await start_sidecar(store(dsn, caFile=str(right)))
    session = SidecarSession("s", "chat", url=trusted.url)
    await session.add_items([{"n": 1}])
    assert await session.get_items() == [{"n": 1}]

    impostor = await start_sidecar(store(dsn, caFile=str(wrong)))
    with pytest.raises(StoreUnavailableError) as refused:
        await SidecarSession("s", "chat", url=impostor.url, retries=0).get_items()
    assert refused.value.code == "backend_unavailable"
    async with aiohttp.ClientSession() as http, http.get(impostor.url + "/readyz") as ready:
        assert "CERTIFICATE_VERIFY_FAILED" in (await ready.json())["details"]["chat"]


def test_a_server_beyond_loopback_is_verified_by_default() -> None:
    context = Settings(dsn="postgresql://app@db.data.svc:5432/chat").ssl()
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert Settings(dsn="postgresql://app@127.0.0.1/chat").ssl() is False
    assert Settings(dsn="postgresql://app@db/chat?sslmode=disable").ssl() is None, "the DSN wins"


def test_a_ca_with_verification_turned_off_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"tls\.caFile"):
        parse_config(store("postgresql://app@db/chat?sslmode=require", caFile="/ca.crt"))
