"""Deleting a store: `deletionPolicy: Delete` purges its sessions, `Retain` keeps them.

The purge goes through the sidecar's own driver (`backend.purge`). Data is kept, with a
Warning Event that says why, whenever purging could reach the wrong data or an endpoint
the operator does not trust; a Secret or backend that stays away keeps the store's
finalizer for `PURGE_ATTEMPTS` tries at most.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
from convostore_sidecar.drivers.base import BackendUnavailable
from convostore_sidecar.sections import ConfigError

from . import backend
from .kube import Kube, MissingSecret, NotOurs
from .prepare import Prepared, prepare
from .redact import Redactor
from .spec import InvalidSpec
from .status import not_connecting
from .trust import NotAllowed

PURGE_ATTEMPTS = 10


class Kept(Exception):
    """The store's data stays; the message says why."""


class Later(Exception):
    """The purge cannot run yet; the message says why."""


async def delete(body: kopf.Body, spec: Any, kube: Kube, retry: int, retry_delay: float) -> None:
    if spec.get("deletionPolicy", "Retain") != "Delete":
        _event(body, "Normal", "Retained", "deletionPolicy Retain: the store's data is kept")
        return
    try:
        prepared = await _purgeable(body, spec, kube)
        cleared = await _purge(prepared, body)
    except Kept as exc:
        _event(body, "Warning", "NotPurged", f"the store's data is kept: {exc}")
    except Later as exc:
        _purge_later(body, str(exc), retry, retry_delay)
    else:
        message = f"deletionPolicy Delete: cleared {cleared} session(s)"
        _event(body, "Normal", "Purged", message)


async def _purgeable(body: kopf.Body, spec: Any, kube: Kube) -> Prepared:
    """The store, read as reconcile reads it; raises Kept when purging it is unsafe."""
    name, namespace = str(body.metadata.name), str(body.metadata.namespace)
    try:
        prepared = await asyncio.to_thread(
            prepare, kube, name, namespace, str(body.metadata.uid), spec
        )
    except MissingSecret as exc:
        raise Later(f"cannot purge: {exc}") from None
    except (InvalidSpec, NotOurs, NotAllowed) as exc:
        raise Kept(str(exc)) from None
    if prepared.scope is None:
        raise Kept(
            "its sessions are keyed by its name alone and may be shared with a store of "
            "that name in another namespace"
        )
    if prepared.unvouched and prepared.spec.backend not in backend.LOCAL_BACKENDS:
        raise Kept(not_connecting(prepared.unvouched))
    return prepared


async def _purge(prepared: Prepared, body: kopf.Body) -> int:
    redact = Redactor(prepared.secret_values())
    spec = prepared.spec
    try:
        return await backend.purge(
            spec.name, spec.document, prepared.secrets, prepared.keys, str(body.metadata.namespace)
        )
    except ConfigError as exc:
        raise Kept(redact(f"its config is invalid: {exc}")) from None
    except BackendUnavailable as exc:
        raise Later(redact(f"cannot purge yet: {exc}")) from None


def _purge_later(body: kopf.Body, why: str, retry: int, retry_delay: float) -> None:
    """Try the purge again later (raises), or after `PURGE_ATTEMPTS` tries let the store
    go with its data kept: a Secret or backend gone for good must not keep the store's
    finalizer, and so the store, for ever."""
    if retry + 1 < PURGE_ATTEMPTS:
        raise kopf.TemporaryError(why, delay=retry_delay)
    message = f"the store's data is kept after {PURGE_ATTEMPTS} attempts: {why}"
    _event(body, "Warning", "NotPurged", message)


def _event(body: kopf.Body, level: str, reason: str, message: str) -> None:
    kopf.event(body, type=level, reason=reason, message=message)
