"""The probe listener (`--health-port`): what the kubelet's HTTP probes reach on the
pod's IP. It answers alive and ready and nothing more: no token needed, no store names
or causes, no API, no metrics."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from tests.servers import free_port
from tests.support import SidecarProcess, eventually


async def test_the_probe_listener_serves_the_probes_alone_without_a_token(
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess], tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("t" * 32)
    health = free_port()
    down = {"backend": "redis", "redis": {"url": f"redis://127.0.0.1:{free_port()}/0"}}
    stores = {"chat": {"backend": "sqlite", "sqlite": {"path": str(tmp_path / "h.db")}}}
    proc = sidecar_process({"stores": stores})
    proc.start("--token-file", str(token), "--health-port", str(health))
    probes = f"http://127.0.0.1:{health}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{proc.url}/v1/stores/chat/sessions/s/items") as resp:
            assert resp.status == 401  # the API needs the token...
        async with http.get(f"{probes}/healthz") as resp:
            assert (resp.status, await resp.json()) == (200, {"status": "ok"})  # ...probes not
        async with http.get(f"{probes}/readyz") as resp:
            assert (resp.status, await resp.json()) == (200, {"ready": True})
        headers = {"Authorization": f"Bearer {'t' * 32}"}
        for path in ("/v1/stores/chat/sessions/s/items", "/metrics", "/v1/openapi.json"):
            async with http.get(probes + path, headers=headers) as resp:
                assert resp.status == 404, path  # not there, token or not
        async with http.post(f"{probes}/healthz", data=b"x" * 4096) as resp:
            assert resp.status == 405

    unready, other = sidecar_process({"stores": {**stores, "cache": down}}), free_port()
    unready.start("--health-port", str(other))
    async with aiohttp.ClientSession() as http:

        async def says_not_ready() -> bool:
            async with http.get(f"http://127.0.0.1:{other}/readyz") as resp:
                return resp.status == 503 and await resp.json() == {"ready": False}

        await eventually(says_not_ready)  # and says no more: no store, host or cause
