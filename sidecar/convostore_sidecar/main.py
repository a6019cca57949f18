"""Entry point of `convostore sidecar`: load and check the config, then serve.

A sidecar holds conversations, so it refuses to start where anyone could reach it
without a token: a TCP listener beyond loopback needs `auth.tokenFile` (or
`--issue-token`). `--issue-token FILE` makes a new random token at every start and
writes it to FILE, for a pod whose sidecar shares that file only with the containers
allowed to call it (the operator injects it so); clients re-read the file when it
changes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import sys
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from .config import SidecarConfig, default_config, load_config
from .http.serve import serve
from .sections import ConfigError, is_loopback_host

log = logging.getLogger("convostore.sidecar")


def run_sidecar(
    *,
    config_paths: list[str],
    host: str | None = None,
    port: int | None = None,
    socket: str | None = None,
    socket_mode: int | None = None,
    token_file: str | None = None,
    tcp: bool = True,
    issue_token: str | None = None,
    health_port: int | None = None,
    health_metrics: bool = False,
) -> int:
    try:
        config = load_config(*config_paths) if config_paths else default_config()
        config = _with_overrides(config, host, port, socket, socket_mode, token_file, tcp)
        if health_port is not None:
            listen = dataclasses.replace(config.listen, health_port=health_port)
            config = dataclasses.replace(config, listen=listen)
        if health_metrics:
            listen = dataclasses.replace(config.listen, health_metrics=True)
            config = dataclasses.replace(config, listen=listen)
        if issue_token:
            config = dataclasses.replace(config, token_file=write_new_token(Path(issue_token)))
        check_exposure(config)
        check_token_file(config)
        _event_loop_runner()(serve(config))
    except ConfigError as exc:
        print(f"convostore sidecar: invalid configuration: {exc}", file=sys.stderr)
        return 2
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
    tcp: bool,
) -> SidecarConfig:
    listen = config.listen
    listen = dataclasses.replace(
        listen,
        host=host or listen.host,
        port=listen.port if port is None else port,
        socket=socket or listen.socket,
        socket_mode=listen.socket_mode if socket_mode is None else socket_mode,
        tcp=listen.tcp and tcp,
    )
    return dataclasses.replace(config, listen=listen, token_file=token_file or config.token_file)


def check_token_file(config: SidecarConfig) -> None:
    if config.token_file is None:
        return
    try:
        token = Path(config.token_file).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(
            f"field 'auth.tokenFile': cannot read {config.token_file!r}: {exc.strerror}"
        ) from None
    if not token:
        raise ConfigError(f"field 'auth.tokenFile': {config.token_file!r} is empty")


def check_exposure(config: SidecarConfig) -> None:
    """Raise ConfigError for a sidecar that would serve conversations to strangers."""
    listen = config.listen
    for field, value in (("port", listen.port), ("healthPort", listen.health_port or 0)):
        if not 0 <= value <= 65535:
            raise ConfigError(f"field 'listen.{field}': must be from 0 to 65535, got {value}")
    if not listen.tcp and not listen.socket:
        raise ConfigError("listen: with tcp off, a socket is needed (--socket)")
    if listen.tcp and not is_loopback_host(listen.host) and not config.token_file:
        raise ConfigError(
            f"listen.host: refusing to serve {listen.host}:{listen.port} without a token: "
            "anyone who reaches it could read and change every conversation; set "
            "auth.tokenFile (or --token-file / --issue-token), or listen on 127.0.0.1"
        )


def write_new_token(path: Path) -> str:
    """A fresh random token in `path`, replaced in one rename so a client never reads
    half of it; returns the path, which the sidecar then reads as its token file. The
    partial file gets a name no one can guess and is made new (never opened through a
    link planted there), and a link at `path` is replaced, not followed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as out:
            os.fchmod(fd, 0o644)
            out.write(secrets.token_urlsafe(32) + "\n")
        os.replace(partial, path)
    except OSError as exc:
        raise ConfigError(f"--issue-token: cannot write {str(path)!r}: {exc.strerror}") from exc
    return str(path)


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, None]], None]:
    """uvloop where it is installed (it is with the [sidecar] extra on Linux and macOS):
    it roughly halves the sidecar's CPU per request; plain asyncio elsewhere."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run
