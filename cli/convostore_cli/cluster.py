"""`convostore operator`: run the operator, print its CRD and RBAC rules."""

from __future__ import annotations

import argparse
import logging
import os
from types import ModuleType
from typing import Any

from .common import needs_extra

DEFAULT_SIDECAR_IMAGE = "ghcr.io/convostore/convostore-sidecar:0.1.0"


def add_commands(commands: Any) -> None:
    operator = commands.add_parser("operator", help="the Kubernetes operator")
    actions = operator.add_subparsers(required=True, metavar="ACTION")
    _add_run(actions.add_parser("run", help="run the operator"))
    crd = actions.add_parser("crd", help="print the ConversationStore CRD as YAML")
    crd.set_defaults(run=print_crd)
    rules = actions.add_parser("rbac", help="print the operator's RBAC rules as YAML")
    rules.set_defaults(run=print_rbac)


def _add_run(run_op: argparse.ArgumentParser) -> None:
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
        default=os.environ.get("CONVOSTORE_SIDECAR_IMAGE", DEFAULT_SIDECAR_IMAGE),
    )
    run_op.set_defaults(run=run_operator)


def _operator_main() -> ModuleType:
    try:
        from convostore_operator import main
    except ImportError as exc:
        raise needs_extra("operator", "the operator", exc) from exc
    return main


def run_operator(args: argparse.Namespace) -> int:
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


def print_crd(_: argparse.Namespace) -> int:
    _operator_main()
    from convostore_operator.manifests import crd_yaml

    print(crd_yaml(), end="")
    return 0


def print_rbac(_: argparse.Namespace) -> int:
    _operator_main()
    from convostore_operator.manifests import rules_yaml

    print(rules_yaml(), end="")
    return 0
