"""`convostore sessions`: list, show, export, import and clear a running sidecar's sessions.

`export` writes JSON Lines, one `{"session_id", "item"}` object per item in conversation
order: by default the conversation as it was said (on a store that compacts, the original
items that compaction archived included, its summaries not), with `--view live` what
agents read now; `import` reads the same format back. Each imported batch carries an
idempotency key derived from the file's content and the batch's position, so an
interrupted import can simply be run again without duplicating items.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from convostore.errors import ConvostoreError

from .common import run, sidecar_options, store

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
    show.set_defaults(run=lambda a: run(_show(a)))
    export = actions.add_parser("export", help="write sessions as JSON Lines", parents=shared)
    export.add_argument("--prefix", default="")
    export.add_argument("-o", "--output", default="-", help="file (default: stdout)")
    export.add_argument(
        "--view",
        choices=("full", "live"),
        default="full",
        help="full: every original item, compacted ones included (default); live: what agents"
        " read now, summaries included",
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
    items = await store(args).session(args.session_id).get_items(args.limit)
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
    sidecar_store = store(args)
    full = args.view == "full"
    async for session_id in sidecar_store.session_ids(args.prefix):
        session = sidecar_store.session(session_id)
        try:
            items = await (session.get_full_items() if full else session.get_items())
        except ConvostoreError as exc:
            if exc.code != "not_supported":
                raise
            full = False  # a backend that keeps no archive: its live items are all there is
            items = await session.get_items()
        for item in items:
            line = {"session_id": session_id, "item": item}
            out.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n")
    return 0


def run_import(args: argparse.Namespace) -> int:
    if args.file == "-":
        return run(_import(args, sys.stdin.read()))
    with open(args.file, encoding="utf-8") as f:
        return run(_import(args, f.read()))


async def _import(args: argparse.Namespace, text: str) -> int:
    """Every line is checked before anything is written; a batch the sidecar refuses
    stops the import, naming its line and session and what was written before it."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
    planned = list(batches(text))
    sidecar_store = store(args)
    added = replayed = 0
    for first_line, session_id, items in planned:
        key = f"import-{digest}-{first_line}"
        try:
            answer = await sidecar_store.session(session_id)._append(items, key, {})
        except ConvostoreError as exc:
            raise ImportStopped(
                f"line {first_line}, session {session_id!r}: {exc.code}: {exc.message}; "
                f"{_written(added, replayed)} before it (running the import again skips "
                "them)"
            ) from None
        if answer.get("replayed"):
            replayed += len(items)
        else:
            added += len(items)
    print(_written(added, replayed), file=sys.stderr)
    return 0


class ImportStopped(ValueError):
    """A batch the sidecar refused; the message names where, and what was written."""


def _written(added: int, replayed: int) -> str:
    again = f"; {replayed} were imported before and left as they were" if replayed else ""
    return f"imported {added} items{again}"


def batches(text: str) -> Iterator[tuple[int, str, list[Any]]]:
    """Consecutive lines of one session, up to IMPORT_BATCH at a time, with line numbers."""
    batch: list[Any] = []
    current, first = "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        session_id, item = _record(number, line)
        if batch and (session_id != current or len(batch) >= IMPORT_BATCH):
            yield first, current, batch
            batch = []
        if not batch:
            current, first = session_id, number
        batch.append(item)
    if batch:
        yield first, current, batch


def _record(number: int, line: str) -> tuple[str, Any]:
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise ValueError(
            f"line {number}: not a {{session_id, item}} record: not JSON: {exc}; "
            "nothing was imported"
        ) from None
    if not isinstance(record, dict) or set(record) != {"session_id", "item"}:
        raise ValueError(
            f"line {number}: not a {{session_id, item}} record (an object with exactly those "
            "two keys, as `sessions export` writes them); nothing was imported"
        )
    session_id, item = record["session_id"], record["item"]
    if not isinstance(session_id, str) or not session_id:
        raise ValueError(
            f"line {number}: 'session_id' must be a non-empty string; nothing was imported"
        )
    if not isinstance(item, dict):
        raise ValueError(f"line {number}: 'item' must be a JSON object; nothing was imported")
    return session_id, item
