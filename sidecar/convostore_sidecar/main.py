"""Entry point of `convostore sidecar`: load and check the config, then serve."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from .config import ConfigError, SidecarConfig, default_config, load_config
from .serve import serve

log = logging.getLogger("convostore.sidecar")


def run_sidecar(
    *,
    config_paths: list[str],
    host: str | None = None,
    port: int | None = None,
    socket: str | None = None,
    socket_mode: int | None = None,
    token_file: str | None = None,
) -> int:
    try:
        config = load_config(*config_paths) if config_paths else default_config()
    except ConfigError as exc:
        print(f"convostore sidecar: invalid configuration: {exc}", file=sys.stderr)
        return 2
    config = _with_overrides(config, host, port, socket, socket_mode, token_file)
    try:
        _event_loop_runner()(serve(config))
    except OSError as exc:
        print(f"convostore sidecar: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


def _with_overrides(
    config: SidecarConfig,
    host: str | None,
    port: int | None,
    socket: str | None,
    socket_mode: int | None,
    token_file: str | None,
) -> SidecarConfig:
    listen = config.listen
    listen = dataclasses.replace(
        listen,
        host=host or listen.host,
        port=listen.port if port is None else port,
        socket=socket or listen.socket,
        socket_mode=listen.socket_mode if socket_mode is None else socket_mode,
    )
    return dataclasses.replace(config, listen=listen, token_file=token_file or config.token_file)


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, None]], None]:
    """uvloop where it is installed (it is with the [sidecar] extra on Linux and macOS):
    it roughly halves the sidecar's CPU per request; plain asyncio elsewhere."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run
