"""`convostore ui`: serve the session browser for a sidecar on 127.0.0.1, and open it."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import webbrowser
from typing import Any

from aiohttp import web

from .server import Sidecar, build, new_key


def add_commands(commands: Any) -> None:
    ui = commands.add_parser(
        "ui",
        help="browse a sidecar's sessions in a web page (read-only, on 127.0.0.1)",
        description="Serve a read-only session browser on 127.0.0.1 for the sidecar at "
        "--url (e.g. through `kubectl port-forward` to a pod's sidecar). It prints the "
        "address to open; the sidecar's token stays in this process.",
    )
    ui.add_argument("--url", help="sidecar URL (default: $CONVOSTORE_URL)")
    ui.add_argument("--token-file", help="bearer token file (default: $CONVOSTORE_TOKEN_FILE)")
    ui.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free)")
    ui.add_argument("--open", action="store_true", help="open it in the default browser")
    ui.set_defaults(run=run_ui)


def run_ui(args: argparse.Namespace) -> int:
    url = args.url or os.environ.get("CONVOSTORE_URL") or "http://127.0.0.1:8790"
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--url must be an http:// or https:// address, got {url[:80]!r}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be from 0 to 65535, got {args.port}")
    token_file = args.token_file or os.environ.get("CONVOSTORE_TOKEN_FILE")
    if token_file and not os.access(token_file, os.R_OK):
        raise ValueError(f"--token-file: cannot read {token_file!r}")
    asyncio.run(_serve(Sidecar(url, token_file), args.port, args.open))
    return 0


async def _serve(sidecar: Sidecar, port: int, open_browser: bool) -> None:
    key = new_key()
    listening = socket.socket()
    listening.bind(("127.0.0.1", port))
    port = listening.getsockname()[1]
    runner = web.AppRunner(build(sidecar, key, port), access_log=None)
    await runner.setup()
    await web.SockSite(runner, listening).start()
    address = f"http://127.0.0.1:{port}/#key={key}"
    print(f"convostore ui: browsing {sidecar.url} at {address}", file=sys.stderr, flush=True)
    if open_browser:
        webbrowser.open(address)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
