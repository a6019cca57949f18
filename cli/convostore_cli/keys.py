"""`convostore keys`: make a key for an encrypted store, count which key seals how many
items, and re-encrypt a store under its primary key.

A rotation first re-wraps the subjects' keys (a store with a subject label), which is
all their items need, then re-encrypts what is sealed under store keys, session by
session. It ends by counting again, from the backend: it names the keys that now seal
nothing (safe to remove) and fails while any item or subject key is under another key
than the primary. Its progress file names the store and the primary key it rotates to, so it
resumes only that rotation: the next one starts from the first session."""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
from dataclasses import dataclass
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
    census = actions.add_parser(
        "census",
        help="count the items each key seals (every session, branch and archive)",
        parents=[sidecar_options(defaults=True)],
    )
    census.set_defaults(run=lambda a: run(_census(a)))


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
    """Re-encrypt each session in order, progress to stderr and, with --state, to a file a
    re-run of this same rotation resumes from; then verify with a census."""
    sidecar_store = store(args)
    primary = (await sidecar_store.keyring())["primary"]
    progress = Progress(Path(args.state), args.store, primary) if args.state else None
    rewrapped = await sidecar_store.rewrap_subject_keys()
    if rewrapped:
        print(f"{rewrapped} subject keys re-wrapped", file=sys.stderr)
    resume_after = progress.resume_point() if progress else ""
    sessions = items = 0
    async for session_id in sidecar_store.session_ids():
        if session_id <= resume_after:
            continue
        items += await sidecar_store.session(session_id).reencrypt()
        sessions += 1
        if progress:
            progress.save(session_id)
        if sessions % 100 == 0:
            print(f"{sessions} sessions, {items} items re-encrypted", file=sys.stderr)
    print(f"done: {sessions} sessions, {items} items re-encrypted", file=sys.stderr)
    return report(await count_keys(args))


async def _census(args: argparse.Namespace) -> int:
    report(await count_keys(args))
    return 0


@dataclass
class Census:
    primary: str
    held: list[str]
    sealed: dict[str, int]
    plaintext: int
    subject_keys: dict[str, int]
    shredded: int

    @property
    def stranded(self) -> dict[str, int]:
        """Items and subject keys under a key other than the primary, by key id."""
        under = {*self.sealed, *self.subject_keys}
        counts = {k: self.sealed.get(k, 0) + self.subject_keys.get(k, 0) for k in under}
        return {key: n for key, n in counts.items() if key != self.primary and n}


async def count_keys(args: argparse.Namespace) -> Census:
    sidecar_store = store(args)
    ring = await sidecar_store.keyring()
    sealed: dict[str, int] = {}
    plaintext = shredded = 0
    async for session_id in sidecar_store.session_ids():
        counted = await sidecar_store.session(session_id).key_census()
        for key, n in counted["sealed"].items():
            sealed[key] = sealed.get(key, 0) + n
        plaintext += counted["plaintext"]
        shredded += counted["shredded"]
    subject_keys = ring.get("subjectKeys", {})
    return Census(ring["primary"], ring["keys"], sealed, plaintext, subject_keys, shredded)


def report(census: Census) -> int:
    """Print the census; 1 while any item is under another key than the primary."""
    for key in sorted({*census.held, *census.sealed, *census.subject_keys}):
        role = " (primary)" if key == census.primary else ""
        missing = "" if key in census.held else " (not in the store's keyring!)"
        wraps = census.subject_keys.get(key)
        subjects = "" if wraps is None else f", {wraps} subject keys"
        print(f"{key}{role}: {census.sealed.get(key, 0)} items{subjects}{missing}")
    if census.plaintext:
        print(f"in clear: {census.plaintext} items")
    if census.shredded:
        print(f"of erased subjects (unreadable): {census.shredded} items")
    needed = {k for k, n in [*census.sealed.items(), *census.subject_keys.items()] if n}
    removable = [k for k in census.held if k != census.primary and k not in needed]
    print(f"safe to remove: {', '.join(removable) or 'none'}")
    if census.stranded or census.plaintext:
        left = ", ".join(f"{k} ({n})" for k, n in sorted(census.stranded.items()))
        print(
            f"convostore: not done: items remain under {left or 'no key (in clear)'}; run "
            "`convostore keys rotate` again, and keep every key until it seals nothing",
            file=sys.stderr,
        )
        return 1
    return 0


@dataclass
class Progress:
    """Where a rotation got to, for this store and this primary key only."""

    path: Path
    store: str
    primary: str

    def resume_point(self) -> str:
        if not self.path.exists():
            return ""
        try:
            saved = json.loads(self.path.read_text())
            mine = saved["store"] == self.store and saved["primary"] == self.primary
            after = str(saved["after"])
        except (ValueError, KeyError, TypeError):
            mine, after = False, ""
        if not mine:
            print(
                f"{self.path} is not the progress of a rotation of store {self.store!r} to "
                f"key {self.primary!r}: starting from the first session",
                file=sys.stderr,
            )
            return ""
        return after

    def save(self, session_id: str) -> None:
        record = {"store": self.store, "primary": self.primary, "after": session_id}
        self.path.write_text(json.dumps(record))
