"""The command's entry point: one parser, each command group from its own module."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from convostore.errors import ConvostoreError

from . import cluster, keys, serve, sessions
from .ui import command as ui


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        result: int = args.run(args)
        return result
    except BrokenPipeError:
        # the reader went away (`| head`): nothing more to say, and no one to say it to
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except ConvostoreError as exc:
        print(f"convostore: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"convostore: {exc}", file=sys.stderr)
        return 1


def parser() -> argparse.ArgumentParser:
    command = argparse.ArgumentParser(
        prog="convostore",
        description="conversation memory for AI agents: the sidecar, the operator, and "
        "a running sidecar's sessions and keys",
    )
    commands = command.add_subparsers(required=True, metavar="COMMAND")
    serve.add_commands(commands)
    sessions.add_commands(commands)
    ui.add_commands(commands)
    cluster.add_commands(commands)
    keys.add_commands(commands)
    return command
