"""No Secret-derived value reaches an Event, a status field, an annotation or a log line.

Stores whose Secrets hold marker strings are reconciled into every outcome (ready,
unreachable, refused by the sidecar's own parser, rotated, deleted); then every Event,
every object's status and annotations, and every log line of the operator and of a
sidecar serving such a store are searched for the markers.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from convostore import SidecarSession
from convostore.errors import StoreUnavailableError

from tests.openai_standin import OpenAIStandIn
from tests.operator.conftest import (
    NAMESPACE,
    Operator,
    create_secret,
    create_store,
    phase_is,
    secret_data,
)
from tests.operator.emulator import STORES, RealisticEmulator
from tests.servers import free_port
from tests.support import eventually

pytestmark = pytest.mark.kmock(cls=RealisticEmulator)
SIDECAR = [sys.executable, "-m", "convostore", "sidecar"]
MARKERS = {
    "url": "Mk1UrlSecretValue",
    "password": "Mk2RedisPassword",
    "dsn": "Mk3PgPassword",
    "key": "sk-Mk4OpenAiKey",
}


def ref(name: str, key: str) -> dict[str, str]:
    return {"name": name, "key": key}


def everything_said(cluster: Any, logs: str) -> str:
    """Events, statuses and annotations of every object, and the logs, as one text."""
    said = [logs]
    for (resource, _, _), obj in cluster.objects.items():
        if obj.deleted:
            continue
        raw = obj.raw
        if resource.plural == "events":
            said.append(json.dumps(raw))
        said.append(json.dumps(raw.get("status") or {}))
        said.append(json.dumps((raw.get("metadata") or {}).get("annotations") or {}))
    return "\n".join(said)


async def test_marker_secrets_never_show(
    cluster: Any,
    operator: Operator,
    caplog: pytest.LogCaptureFixture,
    openai_api: OpenAIStandIn,
    postgres_dsn: str,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.DEBUG)
    pg = postgres_dsn.replace("postgresql://postgres@", f"postgresql://postgres:{MARKERS['dsn']}@")
    await create_secret(
        cluster,
        "creds",
        {
            "bad-url": f"http://user:{MARKERS['url']}@cache.example:6379/0",
            "dead-url": f"redis://:{MARKERS['password']}@127.0.0.1:1/0",
            "password": MARKERS["password"],
            "dsn": pg,
            "key": MARKERS["key"],
        },
        {
            "convostore.dev/allowed-stores": "*",
            "convostore.dev/allowed-endpoints": openai_api.base_url,
        },
    )
    await operator()
    stores = {
        "refused": {"backend": "redis", "redis": {"urlSecretRef": ref("creds", "bad-url")}},
        "dead": {"backend": "redis", "redis": {"urlSecretRef": ref("creds", "dead-url")}},
        "pg": {
            "backend": "postgres",
            "postgres": {"dsnSecretRef": ref("creds", "dsn"), "schema": "markers"},
            "deletionPolicy": "Delete",
        },
        "wrongkey": {
            "backend": "openai",
            "openai": {"apiKeySecretRef": ref("creds", "key"), "baseURL": openai_api.base_url},
        },
        "compacting": {
            "backend": "sqlite",
            "compaction": {"apiKeySecretRef": ref("creds", "key"), "baseURL": openai_api.base_url},
        },
    }
    for name, spec in stores.items():
        await create_store(cluster, name, spec)
    await eventually(functools.partial(phase_is, cluster, "refused", "Failed"))
    await eventually(functools.partial(phase_is, cluster, "dead", "Degraded"))
    await eventually(functools.partial(phase_is, cluster, "pg", "Ready"))
    await eventually(functools.partial(phase_is, cluster, "wrongkey", "Degraded"))
    await eventually(functools.partial(phase_is, cluster, "compacting", "Ready"))
    compacting = secret_data(cluster, "compacting-convostore") or {}
    assert compacting["compaction-api-key"] == MARKERS["key"].encode(), "rendered for the sidecar"
    assert secret_data(cluster, "refused-convostore") is None, "nothing written for it"

    # a sidecar serving the unreachable store, with the config the operator rendered
    files = secret_data(cluster, "dead-convostore") or {}
    config = yaml.safe_load(files["config.yaml"])
    (tmp_path / "config.yaml").write_bytes(files["config.yaml"])
    port = free_port()
    sidecar = subprocess.Popen(  # noqa: ASYNC220 - stopped and read below, not awaited
        [*SIDECAR, "--config", str(tmp_path / "config.yaml"), "--port", str(port)],
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await eventually(functools.partial(_answers, url), within=30)
        with pytest.raises(StoreUnavailableError):
            await SidecarSession("s", "dead", url=url, retries=0).add_items([{"n": 1}])
    finally:
        sidecar.terminate()
        _, sidecar_log = sidecar.communicate(timeout=30)

    # the sidecar's own parser refusing a Secret-derived URL says which field, not what
    config["stores"]["dead"]["redis"]["url"] = f"http://user:{MARKERS['url']}@x:1"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    refused = subprocess.run(  # noqa: ASYNC221 - a start-up that exits at once
        [*SIDECAR, "--config", str(tmp_path / "bad.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2

    await cluster.delete(
        f"/apis/convostore.dev/v1alpha1/namespaces/{NAMESPACE}/conversationstores/pg"
    )
    await eventually(lambda: cluster.objects[STORES, NAMESPACE, "pg"].deleted)

    said = everything_said(cluster, caplog.text + sidecar_log + refused.stderr)
    assert "redis.url" in said, "the search covers what the operator said"
    for what, marker in MARKERS.items():
        assert marker not in said, f"the {what} Secret's value was disclosed"
    encoded = [base64.b64encode(m.encode()).decode() for m in MARKERS.values()]
    assert not any(e in said for e in encoded)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=0.5):
            return True
    except OSError:
        return False
