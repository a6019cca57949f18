"""What the commands share: running a coroutine, reaching a sidecar's store, the config."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from convostore.store import SidecarStore


def run(coro: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coro)


def sidecar_options(*, defaults: bool) -> argparse.ArgumentParser:
    """How a command reaches a running sidecar's store. A command group takes them with
    their defaults and each of its actions again without (`defaults=False`), so they
    may come before or after the action and the action's own value wins."""
    options = argparse.ArgumentParser(add_help=False)
    unset: Any = argparse.SUPPRESS
    options.add_argument(
        "--url", help="sidecar URL (default: $CONVOSTORE_URL)", default=None if defaults else unset
    )
    options.add_argument(
        "--store",
        help="the store's name (default: default)",
        default="default" if defaults else unset,
    )
    options.add_argument(
        "--token-file",
        help="bearer token file (default: $CONVOSTORE_TOKEN_FILE)",
        default=None if defaults else unset,
    )
    return options


def store(args: argparse.Namespace) -> SidecarStore:
    # imported by the commands that use it: the sidecar's process has no use for the client
    from convostore.store import SidecarStore

    return SidecarStore(args.store, args.url, token_file=args.token_file)


def config_paths(args: argparse.Namespace) -> list[str]:
    from_env = os.environ.get("CONVOSTORE_CONFIG")
    paths: list[str] = args.config or ([from_env] if from_env else [])
    return paths


def needs_extra(extra: str, what: str, exc: ImportError) -> ValueError:
    """An install without `extra` has the command but not what it starts."""
    return ValueError(
        f"{what} needs the [{extra}] extra ({exc.name} is missing): "
        f"pip install 'convostore[{extra}]'"
    )
