"""Commands that start a process or check one: `sidecar`, `migrate`, `probe`."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import aiohttp

from .common import config_paths, needs_extra, run

PROBE_TIMEOUT = aiohttp.ClientTimeout(total=5)


def add_commands(commands: Any) -> None:
    _add_sidecar(commands.add_parser("sidecar", help="serve the session API"))
    migrate = commands.add_parser(
        "migrate", help="bring each store's backend schema to this version (PostgreSQL)"
    )
    migrate.add_argument(
        "--config",
        action="append",
        default=[],
        help="the sidecar's config; repeat it to combine files (default: $CONVOSTORE_CONFIG)",
    )
    migrate.set_defaults(run=run_migrate)
    probe = commands.add_parser("probe", help="exit 0 when the sidecar answers /healthz")
    probe.add_argument("--url", help="sidecar URL (default: $CONVOSTORE_URL)")
    probe.add_argument("--ready", action="store_true", help="ask /readyz instead")
    probe.set_defaults(run=lambda a: run(_probe(a)))


def _add_sidecar(sidecar: argparse.ArgumentParser) -> None:
    sidecar.add_argument(
        "--config",
        action="append",
        default=[],
        help="YAML or JSON config; repeat it to combine one file per store (default: "
        "$CONVOSTORE_CONFIG, else one SQLite store 'default' at ./convostore.db)",
    )
    sidecar.add_argument("--host", help="TCP address to listen on (default 127.0.0.1)")
    sidecar.add_argument("--port", type=int, help="TCP port (default 8790)")
    sidecar.add_argument("--socket", help="also listen on this unix socket")
    sidecar.add_argument(
        "--socket-mode", type=lambda v: int(v, 8), help="the socket's permissions, e.g. 0660"
    )
    sidecar.add_argument("--token-file", help="require this bearer token")
    sidecar.add_argument(
        "--issue-token",
        metavar="FILE",
        help="make a new random token at start, write it to FILE and require it",
    )
    sidecar.add_argument(
        "--no-tcp", action="store_true", help="serve only the unix socket (needs --socket)"
    )
    sidecar.add_argument(
        "--health-port",
        type=int,
        help="also serve /healthz and /readyz alone on this TCP port, on every address "
        "(for the kubelet's HTTP probes; no data, no token)",
    )
    sidecar.add_argument(
        "--health-metrics",
        action="store_true",
        help="serve /metrics on the health port too (for Prometheus to scrape a pod)",
    )
    sidecar.add_argument("--log-level", default="INFO")
    sidecar.set_defaults(run=run_sidecar)


def run_sidecar(args: argparse.Namespace) -> int:
    try:
        from convostore_sidecar import main
    except ImportError as exc:
        raise needs_extra("sidecar", "the sidecar", exc) from exc
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s"
    )
    return main.run_sidecar(
        config_paths=config_paths(args),
        host=args.host,
        port=args.port,
        socket=args.socket,
        socket_mode=args.socket_mode,
        token_file=args.token_file,
        tcp=not args.no_tcp,
        issue_token=args.issue_token,
        health_port=args.health_port,
        health_metrics=args.health_metrics,
    )


def run_migrate(args: argparse.Namespace) -> int:
    try:
        from convostore_sidecar import migrate
    except ImportError as exc:
        raise needs_extra("sidecar", "migrate", exc) from exc
    paths = config_paths(args)
    if not paths:
        raise ValueError("migrate: name the sidecar's config with --config")
    return migrate.run_migrate(paths)


async def _probe(args: argparse.Namespace) -> int:
    from convostore.transport import Endpoint, Lease

    endpoint = Endpoint.parse(args.url)
    path = "/readyz" if args.ready else "/healthz"
    try:
        async with (
            Lease(endpoint) as http,
            http.get(endpoint.base_url + path, timeout=PROBE_TIMEOUT) as resp,
        ):
            return 0 if resp.status == 200 else 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or "no answer in time"
        print(
            f"convostore: cannot reach the sidecar at {args.url or endpoint.base_url}: {reason}",
            file=sys.stderr,
        )
        return 1
