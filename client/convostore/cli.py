"""The `convostore` command: run the sidecar, and inspect or move a store's sessions.

`convostore sessions export` writes JSON Lines, one `{"session_id", "item"}` object per
item in conversation order: by default the conversation as it was said (on a store that
compacts, the original items that compaction archived included, its summaries not),
with `--view live` what agents read now; `import` reads the same format back. Each imported batch
carries an idempotency key derived from the file's content and the batch's position,
so an interrupted import can simply be run again without duplicating items.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import importlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import aiohttp

from .errors import ConvostoreError

if TYPE_CHECKING:
    from .store import SidecarStore

IMPORT_BATCH = 500
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=5)
KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # what the sidecar reads from a keys directory


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result: int = args.run(args)
        return result
    except ConvostoreError as exc:
        print(f"convostore: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"convostore: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convostore", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    sidecar = commands.add_parser("sidecar", help="serve the session API")
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
    sidecar.add_argument("--log-level", default="INFO")
    sidecar.set_defaults(run=_run_sidecar)

    migrate = commands.add_parser(
        "migrate", help="bring each store's backend schema to this version (PostgreSQL)"
    )
    migrate.add_argument(
        "--config",
        action="append",
        default=[],
        help="the sidecar's config; repeat it to combine files (default: $CONVOSTORE_CONFIG)",
    )
    migrate.set_defaults(run=_run_migrate)

    sessions = commands.add_parser("sessions", help="inspect a running sidecar's sessions")
    sessions.add_argument("--url", help="sidecar URL (default: $CONVOSTORE_URL)")
    sessions.add_argument("--store", default="default")
    sessions.add_argument("--token-file", help="bearer token file ($CONVOSTORE_TOKEN_FILE)")
    actions = sessions.add_subparsers(required=True, metavar="ACTION")
    ls = actions.add_parser("ls", help="list session ids")
    ls.add_argument("--prefix", default="")
    ls.set_defaults(run=lambda a: _run(_ls(a)))
    show = actions.add_parser("show", help="print a session's items as JSON")
    show.add_argument("session_id")
    show.add_argument("--limit", type=int)
    show.set_defaults(run=lambda a: _run(_show(a)))
    export = actions.add_parser("export", help="write sessions as JSON Lines")
    export.add_argument("--prefix", default="")
    export.add_argument("-o", "--output", default="-", help="file (default: stdout)")
    export.add_argument(
        "--view",
        choices=("full", "live"),
        default="full",
        help="full: every original item, compacted ones included (default); live: what agents"
        " read now, summaries included",
    )
    export.set_defaults(run=_run_export)
    imp = actions.add_parser("import", help="append sessions from JSON Lines")
    imp.add_argument("file", help="file written by export ('-' for stdin)")
    imp.set_defaults(run=_run_import)
    clear = actions.add_parser("clear", help="delete a session")
    clear.add_argument("session_id")
    clear.set_defaults(run=lambda a: _run(_clear(a)))

    probe = commands.add_parser("probe", help="exit 0 when the sidecar answers /healthz")
    probe.add_argument("--url", help="sidecar URL (default: $CONVOSTORE_URL)")
    probe.add_argument("--ready", action="store_true", help="ask /readyz instead")
    probe.set_defaults(run=lambda a: _run(_probe(a)))

    operator = commands.add_parser("operator", help="the Kubernetes operator")
    operator_actions = operator.add_subparsers(required=True, metavar="ACTION")
    run_op = operator_actions.add_parser("run", help="run the operator")
    run_op.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="watch this namespace (repeat it; default: all namespaces)",
    )
    run_op.add_argument(
        "--standalone",
        action="store_true",
        help="reconcile at once, without the leader Lease (run a single replica only)",
    )
    run_op.add_argument(
        "--health-address",
        default="0.0.0.0:8080",
        metavar="HOST:PORT",
        help="where /healthz is served (default: %(default)s)",
    )
    run_op.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    run_op.add_argument(
        "--sidecar-image",
        default=os.environ.get(
            "CONVOSTORE_SIDECAR_IMAGE", "ghcr.io/convostore/convostore-sidecar:0.1.0"
        ),
    )
    run_op.set_defaults(run=_run_operator)
    crd = operator_actions.add_parser("crd", help="print the ConversationStore CRD as YAML")
    crd.set_defaults(run=_print_crd)
    rules = operator_actions.add_parser("rbac", help="print the operator's RBAC rules as YAML")
    rules.set_defaults(run=_print_rbac)

    keys = commands.add_parser("keys", help="encryption keys of encrypted stores")
    key_actions = keys.add_subparsers(required=True, metavar="ACTION")
    generate = key_actions.add_parser("generate", help="print a new random key (base64)")
    generate.add_argument("--dir", help="write it to DIR/ID (mode 0600) instead")
    generate.add_argument("--id", help="the key id, with --dir")
    generate.set_defaults(run=_generate_key)
    rotate = key_actions.add_parser(
        "rotate", help="re-encrypt a store's items under its primary key, online"
    )
    rotate.add_argument("--url", help="sidecar URL (default: $CONVOSTORE_URL)")
    rotate.add_argument("--store", default="default")
    rotate.add_argument("--token-file", help="bearer token file ($CONVOSTORE_TOKEN_FILE)")
    rotate.add_argument(
        "--state", help="progress file: an interrupted rotation resumes after its last session"
    )
    rotate.set_defaults(run=lambda a: _run(_rotate(a)))
    return parser


def _sidecar_module(name: str, command: str) -> Any:
    """A module of the sidecar package, which only the [sidecar] extra installs."""
    try:
        return importlib.import_module(f"convostore_sidecar.{name}")
    except ImportError as exc:
        raise ValueError(
            f"{command} needs the [sidecar] extra ({exc.name} is missing): "
            "pip install 'convostore[sidecar]'"
        ) from exc


def _config_paths(args: argparse.Namespace) -> list[str]:
    from_env = os.environ.get("CONVOSTORE_CONFIG")
    paths: list[str] = args.config or ([from_env] if from_env else [])
    return paths


def _run_sidecar(args: argparse.Namespace) -> int:
    main = _sidecar_module("main", "the sidecar")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s"
    )
    code: int = main.run_sidecar(
        config_paths=_config_paths(args),
        host=args.host,
        port=args.port,
        socket=args.socket,
        socket_mode=args.socket_mode,
        token_file=args.token_file,
        tcp=not args.no_tcp,
        issue_token=args.issue_token,
        health_port=args.health_port,
    )
    return code


def _run_migrate(args: argparse.Namespace) -> int:
    migrate = _sidecar_module("migrate", "migrate")
    paths = _config_paths(args)
    if not paths:
        raise ValueError("migrate: name the sidecar's config with --config")
    code: int = migrate.run_migrate(paths)
    return code


def _run(coro: Any) -> int:
    result: int = asyncio.run(coro)
    return result


def _store(args: argparse.Namespace) -> SidecarStore:
    from .store import SidecarStore  # the client, imported by the commands that use it

    return SidecarStore(args.store, args.url, token_file=args.token_file)


async def _ls(args: argparse.Namespace) -> int:
    async for session_id in _store(args).session_ids(args.prefix):
        print(session_id)
    return 0


async def _show(args: argparse.Namespace) -> int:
    items = await _store(args).session(args.session_id).get_items(args.limit)
    print(json.dumps(items, indent=2, ensure_ascii=False))
    return 0


async def _clear(args: argparse.Namespace) -> int:
    await _store(args).session(args.session_id).clear_session()
    return 0


async def _probe(args: argparse.Namespace) -> int:
    from .transport import Endpoint, Lease

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


def _operator_main() -> Any:
    try:
        from convostore_operator import main
    except ImportError as exc:
        raise ValueError(
            f"the operator needs the [operator] extra ({exc.name} is missing): "
            "pip install 'convostore[operator]'"
        ) from exc
    return main


def _run_operator(args: argparse.Namespace) -> int:
    main = _operator_main()
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    host, _, port = args.health_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--health-address must be HOST:PORT; got {args.health_address!r}")
    result: int = main.run_operator(
        main.ReplicaSettings(
            namespaces=args.namespace,
            sidecar_image=args.sidecar_image,
            webhook=main.webhook_from_environment(),
            lease=None if args.standalone else main.lease_from_environment(),
            health_address=(host, int(port)),
        )
    )
    return result


def _print_crd(args: argparse.Namespace) -> int:
    _operator_main()
    from convostore_operator.manifests import crd_yaml

    print(crd_yaml(), end="")
    return 0


def _print_rbac(args: argparse.Namespace) -> int:
    _operator_main()
    from convostore_operator.manifests import rules_yaml

    print(rules_yaml(), end="")
    return 0


def _generate_key(args: argparse.Namespace) -> int:
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
    store = _store(args)
    sessions = items = 0
    async for session_id in store.session_ids():
        if session_id <= resume_after:
            continue
        items += await store.session(session_id).reencrypt()
        sessions += 1
        if state:
            state.write_text(session_id)
        if sessions % 100 == 0:
            print(f"{sessions} sessions, {items} items re-encrypted", file=sys.stderr)
    print(f"done: {sessions} sessions, {items} items re-encrypted", file=sys.stderr)
    return 0


def _run_export(args: argparse.Namespace) -> int:
    if args.output == "-":
        return _run(_export(args, sys.stdout))
    with open(args.output, "w", encoding="utf-8") as out:
        return _run(_export(args, out))


async def _export(args: argparse.Namespace, out: TextIO) -> int:
    store = _store(args)
    full = args.view == "full"
    async for session_id in store.session_ids(args.prefix):
        session = store.session(session_id)
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


def _run_import(args: argparse.Namespace) -> int:
    if args.file == "-":
        return _run(_import(args, sys.stdin.read()))
    with open(args.file, encoding="utf-8") as f:
        return _run(_import(args, f.read()))


async def _import(args: argparse.Namespace, text: str) -> int:
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
    store = _store(args)
    added = replayed = 0
    for first_line, session_id, items in _batches(text):
        key = f"import-{digest}-{first_line}"
        answer = await store.session(session_id)._append(items, key, {})
        if answer.get("replayed"):
            replayed += len(items)
        else:
            added += len(items)
    again = f"; {replayed} were imported before and left as they were" if replayed else ""
    print(f"imported {added} items{again}", file=sys.stderr)
    return 0


def _batches(text: str) -> Iterator[tuple[int, str, list[Any]]]:
    """Consecutive lines of one session, up to IMPORT_BATCH at a time, with line numbers."""
    batch: list[Any] = []
    current, first = "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            session_id, item = record["session_id"], record["item"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"line {number}: not a {{session_id, item}} record: {exc}") from exc
        if batch and (session_id != current or len(batch) >= IMPORT_BATCH):
            yield first, current, batch
            batch = []
        if not batch:
            current, first = session_id, number
        batch.append(item)
    if batch:
        yield first, current, batch
