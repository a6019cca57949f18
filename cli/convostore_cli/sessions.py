"""`convostore sessions`: list, show, export, import and clear a running sidecar's sessions.

`export` and `import` move sessions whole, every branch with its usage and compaction
archive, in the format `transfer.py` describes; an interrupted import can simply be run
again without writing anything twice.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from convostore import AdvancedSidecarSession

from . import transfer
from .common import run, sidecar_options, store
from .wire import Sidecar

IMPORT_BATCH = 500


def add_commands(commands: Any) -> None:
    sessions = commands.add_parser(
        "sessions",
        help="inspect a running sidecar's sessions",
        parents=[sidecar_options(defaults=True)],
    )
    actions = sessions.add_subparsers(required=True, metavar="ACTION")
    shared = [sidecar_options(defaults=False)]
    ls = actions.add_parser("ls", help="list session ids", parents=shared)
    ls.add_argument("--prefix", default="")
    ls.set_defaults(run=lambda a: run(_ls(a)))
    show = actions.add_parser("show", help="print a session's items as JSON", parents=shared)
    show.add_argument("session_id")
    show.add_argument("--limit", type=int)
    show.add_argument("--branch", default="main", help="the branch to read (default: main)")
    show.set_defaults(run=lambda a: run(_show(a)))
    export = actions.add_parser("export", help="write sessions as JSON Lines", parents=shared)
    export.add_argument("--prefix", default="")
    export.add_argument("-o", "--output", default="-", help="file (default: stdout)")
    export.add_argument(
        "--view",
        choices=("full", "live"),
        default="full",
        help="full: every branch with its usage and compaction archive, for import "
        "(default); live: what agents read now, summaries as items, no archive",
    )
    export.set_defaults(run=run_export)
    imp = actions.add_parser("import", help="append sessions from JSON Lines", parents=shared)
    imp.add_argument("file", help="file written by export ('-' for stdin)")
    imp.set_defaults(run=run_import)
    clear = actions.add_parser("clear", help="delete a session", parents=shared)
    clear.add_argument("session_id")
    clear.set_defaults(run=lambda a: run(_clear(a)))


async def _ls(args: argparse.Namespace) -> int:
    async for session_id in store(args).session_ids(args.prefix):
        print(session_id)
    return 0


async def _show(args: argparse.Namespace) -> int:
    session = AdvancedSidecarSession(
        args.session_id, args.store, args.url, token_file=args.token_file
    )
    if args.branch != "main":
        await session.switch_to_branch(args.branch)
    items = await session.get_items(args.limit)
    print(json.dumps(items, indent=2, ensure_ascii=False))
    return 0


async def _clear(args: argparse.Namespace) -> int:
    await store(args).session(args.session_id).clear_session()
    return 0


def run_export(args: argparse.Namespace) -> int:
    if args.output == "-":
        return run(_export(args, sys.stdout))
    with open(args.output, "w", encoding="utf-8") as out:
        return run(_export(args, out))


async def _export(args: argparse.Namespace, out: TextIO) -> int:
    await transfer.export(Sidecar(args), args.prefix, args.view == "full", out)
    return 0


def run_import(args: argparse.Namespace) -> int:
    if args.file == "-":
        return run(_import(args, sys.stdin.read()))
    with open(args.file, encoding="utf-8") as f:
        return run(_import(args, f.read()))


async def _import(args: argparse.Namespace, text: str) -> int:
    """Every line is checked before anything is written; a record the sidecar refuses
    stops the import, naming its line and session and what was written before it."""
    records = transfer.parse(text)
    tally = await transfer.Importer(Sidecar(args), text).run(records)
    print(tally, file=sys.stderr)
    return 0
