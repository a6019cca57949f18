"""Kopf's handlers for ConversationStore objects, registered on a registry of our own.

Create, update and resume run `reconcile.converge`; a timer runs it again every
`check_interval` (a rotated Secret is rendered again and its pods rolled, the backend
re-checked); deletion runs `deletion.delete`. Only the replica that holds the leader
Lease runs them. Every handler is `contained`: Kopf writes a failed handler's message
into an annotation on the store, which its author reads.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import kopf

from . import deletion, reconcile
from .crd import GROUP, PLURAL, VERSION
from .kube import Kube, connection_info

log = logging.getLogger("convostore.operator")
RESOURCE = (GROUP, VERSION, PLURAL)


@dataclass(frozen=True)
class OperatorConfig:
    sidecar_image: str = "ghcr.io/convostore/convostore-sidecar:0.1.0"
    check_interval: float = 60.0
    retry_delay: float = 30.0


def contained(
    handler: Callable[..., Awaitable[None]], retry_delay: float
) -> Callable[..., Awaitable[None]]:
    """An error this package did not word itself (it may quote a server's answer or a
    Secret-held DSN) becomes one that names only its kind."""

    @functools.wraps(handler)
    async def run(**kwargs: Any) -> None:
        try:
            await handler(**kwargs)
        except (kopf.PermanentError, kopf.TemporaryError):
            raise
        except Exception as exc:
            kind = type(exc).__name__
            where = f"{kwargs.get('namespace')}/{kwargs.get('name')}"
            log.warning("store %s: %s failed: unexpected %s", where, handler.__name__, kind)
            raise kopf.TemporaryError(f"unexpected {kind}; retrying", delay=retry_delay) from None

    return run


def register(registry: kopf.OperatorRegistry, config: OperatorConfig) -> None:
    """Register every handler on `registry` (tests give each operator a fresh one)."""
    _register_connection(registry)
    _register_reconcile(registry, config)
    _register_recheck(registry, config)
    _register_delete(registry, config)


def _register_connection(registry: kopf.OperatorRegistry) -> None:
    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return connection_info()

    @kopf.on.startup(registry=registry)
    def startup(memo: kopf.Memo, **_: Any) -> None:
        if getattr(memo, "kube", None) is None:
            from .kube import api_client

            memo.kube = Kube(api_client())


def _register_reconcile(registry: kopf.OperatorRegistry, config: OperatorConfig) -> None:
    @kopf.on.create(*RESOURCE, registry=registry)
    @kopf.on.update(*RESOURCE, registry=registry)
    @kopf.on.resume(*RESOURCE, registry=registry)
    @functools.partial(contained, retry_delay=config.retry_delay)
    async def reconcile_store(
        body: kopf.Body, spec: Any, status: Any, patch: kopf.Patch, memo: kopf.Memo, **_: Any
    ) -> None:
        await reconcile.converge(body, spec, status, patch, memo.kube, config.retry_delay)


def _register_recheck(registry: kopf.OperatorRegistry, config: OperatorConfig) -> None:
    every = config.check_interval

    @kopf.timer(*RESOURCE, interval=every, initial_delay=every, registry=registry)
    @functools.partial(contained, retry_delay=config.retry_delay)
    async def recheck(
        body: kopf.Body, spec: Any, status: Any, patch: kopf.Patch, memo: kopf.Memo, **_: Any
    ) -> None:
        if not (status or {}).get("phase"):
            return  # the reconcile handler has not finished its first pass
        try:
            await reconcile.converge(body, spec, status, patch, memo.kube, config.retry_delay)
        except (kopf.PermanentError, kopf.TemporaryError):
            return  # reported in status; the reconcile handler retries


def _register_delete(registry: kopf.OperatorRegistry, config: OperatorConfig) -> None:
    @kopf.on.delete(*RESOURCE, registry=registry)
    @functools.partial(contained, retry_delay=config.retry_delay)
    async def delete_store(
        body: kopf.Body, spec: Any, memo: kopf.Memo, retry: int, **_: Any
    ) -> None:
        await deletion.delete(body, spec, memo.kube, retry, config.retry_delay)
