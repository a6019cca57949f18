"""What the benchmarks' command lines share: the backends asked for, and the report,
printed and (with `--out`) written, under the command that produced it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_options(parser: argparse.ArgumentParser, backends: tuple[str, ...] | None) -> None:
    """`--out`, and `--backends` (comma-separated, all of `backends` by default)."""
    if backends is not None:
        parser.add_argument("--backends", default=",".join(backends))
    parser.add_argument("--out", type=Path, help="also write the table to this file")


def chosen_backends(
    parser: argparse.ArgumentParser, args: argparse.Namespace, known: tuple[str, ...]
) -> list[str]:
    backends = [b for b in args.backends.split(",") if b]
    unknown = set(backends) - set(known)
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}; choose from {', '.join(known)}")
    return backends


def invocation(parser: argparse.ArgumentParser) -> str:
    """The command as it was given, to head the figures it produced."""
    return " ".join([parser.prog, *sys.argv[1:]])


def one_run(parser: argparse.ArgumentParser, table: str) -> str:
    return f"`{invocation(parser)}`, in one run:\n\n{table}"


def publish(report: str, out: Path | None) -> int:
    print(report)
    if out is not None:
        out.write_text(report)
    return 0
