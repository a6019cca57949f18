"""Schemathesis, driven by the sidecar's own OpenAPI document, against the real sidecar
process: for generated valid and invalid requests to every operation, no 5xx, and every
answer matches the document (status, content type, headers and body schema).

Left out: the `Allow` header check. A session id may hold ':', so the action URLs
(`…/s:pop`, `…/s:reencrypt`) are also the URL of a session named `s:pop`, and aiohttp
rightly lists that URL's DELETE too."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
import yaml
from convostore_sidecar.http.openapi import openapi_document
from convostore_sidecar.keyring import generate_key
from hypothesis import HealthCheck, settings
from schemathesis.checks import allow_header_conformance

from tests.servers import free_port

SCHEMA = schemathesis.openapi.from_dict(openapi_document())


@pytest.fixture(scope="module")
def sidecar_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("schemathesis")
    config = workdir / "sidecar.yaml"
    store = {
        "backend": "sqlite",
        "sqlite": {"path": str(workdir / "c.db")},
        "encryption": {"keys": [{"id": "k1", "value": generate_key()}]},  # reaches :reencrypt
    }
    config.write_text(yaml.safe_dump({"stores": {"default": store}}))
    port = free_port()
    command = ["convostore", "sidecar", "--config", str(config), "--port", str(port)]
    process = subprocess.Popen([sys.executable, "-m", *command], cwd=workdir)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert process.poll() is None, "the sidecar exited"
            assert time.monotonic() < deadline, "the sidecar did not start"
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=30)


@SCHEMA.parametrize()
@settings(
    max_examples=60,
    derandomize=True,  # the same cases on every run: a failure is a finding, never noise
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_every_operation_answers_within_its_contract(
    case: schemathesis.Case[Any], sidecar_url: str
) -> None:
    if "store" in (case.path_parameters or {}):
        case.path_parameters["store"] = "default"  # reach the handlers behind the store
    query = case.query or {}
    if "limit" in query and "turns" in query:  # a rule between parameters OpenAPI cannot state
        del query["turns"]
    if "turns" in query or query.get("whole_turns") in (True, "true"):  # another such rule
        query.pop("sealed", None)
    query.pop("cursor", None)  # opaque: only one the sidecar issued is valid
    case.call_and_validate(base_url=sidecar_url, excluded_checks=[allow_header_conformance])
