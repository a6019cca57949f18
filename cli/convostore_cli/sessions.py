"""`convostore sessions`: list, show, export, import and clear a running sidecar's sessions.

`export` and `import` move sessions whole, every branch with its usage and compaction
archive, in the format `transfer.py` describes; an interrupted import can simply be run
again without writing anything twice.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from typing import Any, TextIO

from convostore import AdvancedSidecarSession

from . import transfer
from .common import run, sidecar_options, store
from .wire import Sidecar

TIME_BOUNDS = ("created_after", "created_before", "updated_after", "updated_before")


def add_commands(commands: Any) -> None:
    sessions = commands.add_parser(
        "sessions",
        help="inspect a running sidecar's sessions",
        parents=[sidecar_options(defaults=True)],
    )
    actions = sessions.add_subparsers(required=True, metavar="ACTION")
    shared = [sidecar_options(defaults=False)]
    ls = actions.add_parser(
        "ls",
        help="list session ids: by prefix in byte order, or by labels and time newest first",
        parents=shared,
    )
    ls.add_argument("--prefix", default="")
    ls.add_argument(
        "--label",
        action="append",
        default=[],
        type=_label,
        metavar="NAME=VALUE",
        help="only sessions with this label (repeat for several)",
    )
    for bound in TIME_BOUNDS:
        ls.add_argument(
            f"--{bound.replace('_', '-')}", type=_instant, metavar="TIME", help="RFC 3339"
        )
    ls.add_argument(
        "--long", action="store_true", help="print each session's record as a JSON line"
    )
    ls.set_defaults(run=lambda a: run(_ls(a)))
    label = actions.add_parser("label", help="set or remove a session's labels", parents=shared)
    label.add_argument("session_id")
    label.add_argument("labels", nargs="*", type=_label, metavar="NAME=VALUE")
    label.add_argument(
        "--remove", action="append", default=[], metavar="NAME", help="remove this label"
    )
    label.set_defaults(run=lambda a: run(_set_labels(a)))
    erase = actions.add_parser(
        "erase",
        help="erase every session with the labels given (a person's, a tenant's)",
        parents=shared,
    )
    erase.add_argument(
        "--label",
        action="append",
        required=True,
        type=_label,
        metavar="NAME=VALUE",
        help="erase the sessions with this label (repeat: with all of them)",
    )
    erase.set_defaults(run=lambda a: run(_erase(a)))
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
    export.add_argument(
        "--plaintext",
        action="store_true",
        help="write a subject's items in clear, to read them or to move sessions to a store "
        "with other keys (by default, on a store with encryption.subjectLabel, they are "
        "sealed: only that store reads them, and not once the subject is erased)",
    )
    export.set_defaults(run=run_export)
    imp = actions.add_parser("import", help="append sessions from JSON Lines", parents=shared)
    imp.add_argument("file", help="file written by export ('-' for stdin)")
    imp.set_defaults(run=run_import)
    clear = actions.add_parser("clear", help="delete a session", parents=shared)
    clear.add_argument("session_id")
    clear.set_defaults(run=lambda a: run(_clear(a)))


async def _ls(args: argparse.Namespace) -> int:
    bounds = {bound: getattr(args, bound) for bound in TIME_BOUNDS if getattr(args, bound)}
    if not (args.label or bounds or args.long):
        async for session_id in store(args).session_ids(args.prefix):
            print(session_id)
        return 0
    if args.prefix:
        raise ValueError("--prefix lists in byte order; it does not combine with labels or times")
    async for record in store(args).find_sessions(dict(args.label), **bounds):
        print(json.dumps(record, ensure_ascii=False) if args.long else record["session_id"])
    return 0


async def _set_labels(args: argparse.Namespace) -> int:
    changes: dict[str, str | None] = dict(args.labels)
    changes.update(dict.fromkeys(args.remove))
    if not changes:
        raise ValueError("give labels to set (NAME=VALUE) or to remove (--remove NAME)")
    record = await store(args).session(args.session_id).set_metadata(changes)
    print(json.dumps(record, ensure_ascii=False))
    return 0


async def _erase(args: argparse.Namespace) -> int:
    totals = await store(args).erase(dict(args.label))
    print(json.dumps(totals))
    return 0


def _label(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, value


def _instant(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an RFC 3339 time with an offset")
    return when


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
    full = args.view == "full"
    await transfer.export(Sidecar(args), args.prefix, full, out, sealed=not args.plaintext)
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
