"""`convostore keys`: make a key for an encrypted store, re-encrypt a store under its
primary key."""

from __future__ import annotations

import argparse
import base64
import os
import re
import sys
from pathlib import Path
from typing import Any

from .common import run, sidecar_options, store

KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # what the sidecar reads from a keys directory


def add_commands(commands: Any) -> None:
    keys = commands.add_parser("keys", help="encryption keys of encrypted stores")
    actions = keys.add_subparsers(required=True, metavar="ACTION")
    generate = actions.add_parser("generate", help="print a new random key (base64)")
    generate.add_argument("--dir", help="write it to DIR/ID (mode 0600) instead")
    generate.add_argument("--id", help="the key id, with --dir")
    generate.set_defaults(run=generate_key)
    rotate = actions.add_parser(
        "rotate",
        help="re-encrypt a store's items under its primary key, online",
        parents=[sidecar_options(defaults=True)],
    )
    rotate.add_argument(
        "--state", help="progress file: an interrupted rotation resumes after its last session"
    )
    rotate.set_defaults(run=lambda a: run(_rotate(a)))


def generate_key(args: argparse.Namespace) -> int:
    key = base64.b64encode(os.urandom(32)).decode()
    if args.id and not args.dir:
        raise ValueError("--id names the key's file, with --dir; without --dir the key is printed")
    if not args.dir:
        print(key)
        return 0
    if not args.id:
        raise ValueError("--dir needs --id (the key's file name)")
    if not KEY_ID.fullmatch(args.id):
        raise ValueError(f"--id must be 1 to 64 of A-Z a-z 0-9 . _ -, got {args.id[:80]!r}")
    path = Path(args.dir) / args.id
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(key + "\n")
    print(f"wrote key {args.id!r} to {path}", file=sys.stderr)
    return 0


async def _rotate(args: argparse.Namespace) -> int:
    """Walk the store's sessions in order, re-encrypting each; progress goes to stderr and,
    with --state, to a file that a re-run resumes from."""
    state = Path(args.state) if args.state else None
    resume_after = state.read_text().strip() if state and state.exists() else ""
    sidecar_store = store(args)
    sessions = items = 0
    async for session_id in sidecar_store.session_ids():
        if session_id <= resume_after:
            continue
        items += await sidecar_store.session(session_id).reencrypt()
        sessions += 1
        if state:
            state.write_text(session_id)
        if sessions % 100 == 0:
            print(f"{sessions} sessions, {items} items re-encrypted", file=sys.stderr)
    print(f"done: {sessions} sessions, {items} items re-encrypted", file=sys.stderr)
    return 0
