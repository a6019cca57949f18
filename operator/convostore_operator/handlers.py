"""The reconcile loop: Kopf handlers for ConversationStore objects.

Create, update and resume all run one idempotent `converge`: validate the spec, read
every Secret it names, and only then write anything (key Secret, Dapr Component, config
Secret), so an invalid spec or a missing Secret leaves nothing half-created behind; it
is reported in `status` and as an Event that names the field or the Secret. A timer runs
the same `converge` every `check_interval`: a Secret that was rotated since is rendered
again and the pods that use it are rolled, and the backend is re-checked. Deletion
honours `deletionPolicy`. Only the replica that holds the leader Lease runs these.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import kopf
import yaml
from convostore_sidecar.drivers.base import BackendUnavailable
from convostore_sidecar.sections import ConfigError

from . import backend
from .backend import Reachability
from .crd import GROUP, PLURAL, VERSION
from .kube import Kube, MissingSecret, NotOurs, StoredSecret, connection_info
from .redact import Redactor
from .render import dapr_component, render
from .spec import InvalidSpec, keys_secret_name, secret_refs, validate, validate_name
from .trust import ALLOWED_ENDPOINTS, Endpoint, NotAllowed, check_flows, check_lent, unvouched

log = logging.getLogger("convostore.operator")
FIRST_KEY_ID = "k1"
PURGE_ATTEMPTS = 10
HASH_KEY = "hash-key"  # in the config Secret: keys the config hash (render.Rendered)
REASONS = {
    InvalidSpec: "InvalidSpec",
    MissingSecret: "SecretNotFound",
    NotOurs: "ObjectConflict",
    NotAllowed: "SecretNotAllowed",
}


@dataclass(frozen=True)
class OperatorConfig:
    sidecar_image: str = "ghcr.io/convostore/convostore-sidecar:0.1.0"
    check_interval: float = 60.0
    retry_delay: float = 30.0


@dataclass
class Prepared:
    """Everything read and checked before anything is written."""

    spec: dict[str, Any]
    secrets: dict[str, str]
    keys_secret: str | None
    keys: dict[str, bytes]
    primary: str | None
    unvouched: list[Endpoint]
    """Endpoints the operator will not connect to itself (`trust.unvouched`)."""


def owner_of(body: kopf.Body) -> dict[str, Any]:
    return {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "metadata": {"name": body.metadata.name, "uid": body.metadata.uid},
    }


def lent_secret(kube: Kube, namespace: str, secret: str, store: str) -> StoredSecret:
    """A Secret of the store's own namespace that lends itself to `store`."""
    stored = kube.read_secret_versioned(namespace, secret)
    if stored is None:
        raise MissingSecret(secret)
    check_lent(secret, stored, store)
    return stored


def prepare(kube: Kube, name: str, namespace: str, raw_spec: Any) -> Prepared:
    """Validate the spec and read what it refers to; raises InvalidSpec, MissingSecret,
    NotAllowed or NotOurs."""
    validate_name(name)
    spec = validate(dict(raw_spec))
    refs = secret_refs(spec)
    lent = {ref.name: lent_secret(kube, namespace, ref.name, name) for ref in refs.values()}
    secrets = {}
    for key, ref in refs.items():
        if ref.key not in lent[ref.name].data:
            raise MissingSecret(ref.name, ref.key)
        secrets[key] = lent[ref.name].data[ref.key].decode()
    check_flows(spec, refs, lent, secrets)
    keys_secret = keys_secret_name(name, spec)
    keys: dict[str, bytes] = {}
    encryption = spec.get("encryption", {})
    if keys_secret and "keySecretRef" in encryption:
        keys = lent_secret(kube, namespace, keys_secret, name).data
    elif keys_secret:
        stored = kube.read_secret_versioned(namespace, keys_secret)
        if stored is not None and not stored.made_for(name):
            raise NotOurs("Secret", keys_secret)
        keys = stored.data if stored else {}
    primary = encryption.get("primary")
    if keys_secret and "keySecretRef" in encryption:
        if primary is None and len(keys) != 1:
            raise InvalidSpec(
                "spec.encryption.primary",
                f"name the key that encrypts new items; Secret {keys_secret!r} holds "
                f"{', '.join(sorted(keys)) or 'no keys'}",
            )
        if primary is not None and primary not in keys:
            raise InvalidSpec(
                "spec.encryption.primary", f"Secret {keys_secret!r} has no key {primary!r}"
            )
    return Prepared(spec, secrets, keys_secret, keys, primary, unvouched(spec, refs, lent, secrets))


def condition(
    kind: str, status: str, reason: str, message: str, generation: int | None, previous: Any
) -> dict[str, Any]:
    old = next((c for c in previous or [] if c.get("type") == kind), None)
    changed = old is None or old.get("status") != status
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": now if changed or not old else old.get("lastTransitionTime", now),
    }


def reachability_conditions(
    reach: Reachability, generation: int | None, previous: Any
) -> tuple[str, list[dict[str, Any]]]:
    """The phase and the BackendReachable and Ready conditions a reachability check gives;
    reconcile and the timer both report them."""
    if reach.status == "False":
        ready = condition("Ready", "False", reach.reason, reach.message, generation, previous)
    else:
        ready = condition(
            "Ready", "True", "Ready", "the store can serve sessions", generation, previous
        )
    reachable = condition(
        "BackendReachable", reach.status, reach.reason, reach.message, generation, previous
    )
    return ("Degraded" if reach.status == "False" else "Ready"), [reachable, ready]


def report(
    body: kopf.Body,
    patch: kopf.Patch,
    status: Any,
    phase: str,
    conditions: list[dict[str, Any]],
    **extra: Any,
) -> None:
    """Write status, and post an Event for every condition that changed."""
    previous = {c.get("type"): c.get("status") for c in (status or {}).get("conditions") or []}
    for item in conditions:
        if previous.get(item["type"]) != item["status"]:
            level = "Normal" if item["status"] != "False" else "Warning"
            kopf.event(
                body,
                type=level,
                reason=item["reason"],
                message=f"{item['type']}={item['status']}: {item['message']}",
            )
    patch.status["phase"] = phase
    patch.status["conditions"] = conditions
    patch.status["observedGeneration"] = body.metadata.get("generation")
    for key, value in extra.items():
        patch.status[key] = value


def report_failure(
    body: kopf.Body, patch: kopf.Patch, status: Any, reason: str, message: str
) -> None:
    """Phase Failed, with the reason on ConfigRendered and Ready: nothing was written."""
    generation = body.metadata.get("generation")
    previous = (status or {}).get("conditions")
    failed = [
        condition("ConfigRendered", "False", reason, message, generation, previous),
        condition("Ready", "False", reason, message, generation, previous),
    ]
    report(body, patch, status, "Failed", failed)


def keyed_by_name_alone(kube: Kube, namespace: str, name: str, uid: str) -> bool:
    """Whether the store keeps the identity of an operator older than namespaced
    identities: its sessions are keyed by its name alone. Decided by the config Secret
    this operator rendered for the store (owned by it): a store first rendered since is
    keyed `<namespace>/<name>` and its config says `scope`; an older store's config has
    none, so its sessions stay where they are. Status is only a report of it: whoever may
    patch a store's status cannot make it share another namespace's sessions."""
    stored = kube.read_secret_versioned(namespace, f"{name}-convostore")
    if stored is None or not stored.made_for(name, uid) or "config.yaml" not in stored.data:
        return False
    try:
        rendered = yaml.safe_load(stored.data["config.yaml"])
        return "scope" not in rendered["stores"][name]
    except (yaml.YAMLError, KeyError, TypeError):
        return False


def isolation_condition(
    scope: str | None, name: str, generation: int | None, previous: Any
) -> dict[str, Any]:
    if scope:
        return condition(
            "NamespaceIsolated",
            "True",
            "KeyedByNamespace",
            f"sessions are keyed {scope}/{name} in the backend",
            generation,
            previous,
        )
    return condition(
        "NamespaceIsolated",
        "False",
        "KeyedByNameAlone",
        f"sessions are keyed {name!r} as an older operator keyed them: a store named "
        f"{name!r} in another namespace on the same backend shares them, and deleting "
        "this store will not purge them; move them to a new store to isolate them",
        generation,
        previous,
    )


async def converge(
    body: kopf.Body,
    name: str,
    namespace: str,
    spec: Any,
    status: Any,
    patch: kopf.Patch,
    kube: Kube,
    retry_delay: float,
) -> None:
    """Bring the store's Secrets, Component and status in line with its spec and the
    Secrets it names; roll the pods whose config changed."""
    generation = body.metadata.get("generation")
    previous = (status or {}).get("conditions")
    try:
        prepared = await asyncio.to_thread(prepare, kube, name, namespace, spec)
    except (InvalidSpec, MissingSecret, NotOurs, NotAllowed) as exc:
        reason = REASONS[type(exc)]
        report_failure(body, patch, status, reason, str(exc))
        if isinstance(exc, InvalidSpec):
            raise kopf.PermanentError(str(exc)) from exc
        raise kopf.TemporaryError(str(exc), delay=retry_delay) from exc

    spec_ = prepared.spec
    owner = owner_of(body)
    legacy = await asyncio.to_thread(keyed_by_name_alone, kube, namespace, name, body.metadata.uid)
    scope = None if legacy else namespace
    redact = Redactor([*prepared.secrets.values(), *prepared.keys.values()])
    generated = None
    if prepared.keys_secret and not prepared.keys:
        generated = {FIRST_KEY_ID: base64.b64encode(os.urandom(32))}
        prepared.keys = generated
    try:
        await asyncio.to_thread(
            backend.check_rendered, name, spec_, prepared.secrets, prepared.keys, scope
        )
    except ConfigError as exc:
        message = redact(f"the sidecar would refuse this store: {exc}")
        report_failure(body, patch, status, "InvalidConfig", message)
        raise kopf.PermanentError(message) from None

    if prepared.keys_secret and generated is not None:
        keep = spec_.get("deletionPolicy", "Retain") == "Retain"
        await asyncio.to_thread(
            kube.create_secret,
            namespace,
            prepared.keys_secret,
            generated,
            owner=None if keep else owner,
            labels={f"{GROUP}/store": name},
        )
        stored = await asyncio.to_thread(
            kube.read_secret_versioned, namespace, prepared.keys_secret
        )
        if stored is not None and not stored.made_for(name):
            await _conflict(
                body, patch, status, NotOurs("Secret", prepared.keys_secret), retry_delay
            )
        prepared.keys = stored.data if stored else generated
        kopf.event(
            body,
            type="Normal",
            reason="KeyGenerated",
            message=f"generated encryption key Secret {prepared.keys_secret!r}",
        )
    rendered = render(name, spec_, prepared.secrets, primary_key=prepared.primary, scope=scope)
    config_secret = f"{name}-convostore"
    existing = await asyncio.to_thread(kube.read_secret, namespace, config_secret) or {}
    hash_key = existing.get(HASH_KEY) or os.urandom(32)
    config_hash = rendered.config_hash(hash_key, prepared.keys)
    try:
        if spec_["backend"] == "dapr" and "component" in spec_["dapr"]:
            component = dapr_component(name, namespace, spec_)
            await asyncio.to_thread(kube.apply_component, component, owner)
        await asyncio.to_thread(
            kube.apply_secret,
            namespace,
            config_secret,
            {**rendered.secret_data(), HASH_KEY: hash_key},
            owner=owner,
            annotations={f"{GROUP}/config-hash": config_hash},
            labels={f"{GROUP}/store": name},
        )
    except NotOurs as exc:
        await _conflict(body, patch, status, exc, retry_delay)
    old_hash = (status or {}).get("configHash")
    if old_hash and old_hash != config_hash:
        rolled = await asyncio.to_thread(kube.roll_workloads, namespace, name, config_hash)
        if rolled:
            kopf.event(
                body,
                type="Normal",
                reason="Rolled",
                message=f"config changed; restarted {', '.join(rolled)}",
            )
    if prepared.unvouched:
        reach = Reachability("Unknown", "NotChecked", not_connecting(prepared.unvouched))
    else:
        reach = await backend.check(name, spec_, prepared.secrets, prepared.keys, scope)
    if reach.detail:
        log.warning("store %s/%s: backend check failed: %s", namespace, name, redact(reach.detail))
    reach = dataclasses.replace(reach, message=redact(reach.message), detail="")
    phase, reachability = reachability_conditions(reach, generation, previous)
    rendered_condition = condition(
        "ConfigRendered",
        "True",
        "Rendered",
        f"sidecar config in Secret {config_secret}",
        generation,
        previous,
    )
    report(
        body,
        patch,
        status,
        phase,
        [rendered_condition, *reachability, isolation_condition(scope, name, generation, previous)],
        configHash=config_hash,
        configSecret=config_secret,
        backendIdentity=f"{scope}/{name}" if scope else name,
    )


def purge_later(body: kopf.Body, why: str, retry: int, retry_delay: float) -> None:
    """Try the purge again later (raises), or after `PURGE_ATTEMPTS` tries let the store
    go with its data kept: a Secret or backend gone for good must not keep the store's
    finalizer, and so the store, for ever."""
    if retry + 1 < PURGE_ATTEMPTS:
        raise kopf.TemporaryError(why, delay=retry_delay)
    kopf.event(
        body,
        type="Warning",
        reason="NotPurged",
        message=f"the store's data is kept after {PURGE_ATTEMPTS} attempts: {why}",
    )


def not_connecting(endpoints: list[Endpoint]) -> str:
    fields = ", ".join(sorted({e.field for e in endpoints}))
    return (
        f"the operator connects only to endpoints that a Secret the store uses names or "
        f"lists in {ALLOWED_ENDPOINTS}, and {fields} is not one: each pod's sidecar checks "
        "it (/readyz)"
    )


async def _conflict(
    body: kopf.Body, patch: kopf.Patch, status: Any, exc: NotOurs, retry_delay: float
) -> NoReturn:
    """Report an object in the way and try again later: its owner may remove it."""
    report_failure(body, patch, status, "ObjectConflict", str(exc))
    raise kopf.TemporaryError(str(exc), delay=retry_delay)


def contained(
    handler: Callable[..., Awaitable[None]], retry_delay: float
) -> Callable[..., Awaitable[None]]:
    """Kopf writes a failed handler's message into an annotation on the store, which its
    author reads: an error this module did not word itself (it may quote a server's
    answer or a Secret-held DSN) becomes one that names only its kind."""

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
    resource = (GROUP, VERSION, PLURAL)
    guarded = functools.partial(contained, retry_delay=config.retry_delay)

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return connection_info()

    @kopf.on.startup(registry=registry)
    def startup(memo: kopf.Memo, **_: Any) -> None:
        if getattr(memo, "kube", None) is None:
            from .kube import api_client

            memo.kube = Kube(api_client())

    @kopf.on.create(*resource, registry=registry)
    @kopf.on.update(*resource, registry=registry)
    @kopf.on.resume(*resource, registry=registry)
    @guarded
    async def reconcile(
        body: kopf.Body,
        name: str,
        namespace: str,
        spec: Any,
        status: Any,
        patch: kopf.Patch,
        memo: kopf.Memo,
        **_: Any,
    ) -> None:
        await converge(body, name, namespace, spec, status, patch, memo.kube, config.retry_delay)

    @kopf.timer(
        *resource,
        interval=config.check_interval,
        initial_delay=config.check_interval,
        registry=registry,
    )
    @guarded
    async def recheck(
        body: kopf.Body,
        name: str,
        namespace: str,
        spec: Any,
        status: Any,
        patch: kopf.Patch,
        memo: kopf.Memo,
        **_: Any,
    ) -> None:
        if not (status or {}).get("phase"):
            return  # the reconcile handler has not finished its first pass
        try:
            await converge(
                body, name, namespace, spec, status, patch, memo.kube, config.retry_delay
            )
        except (kopf.PermanentError, kopf.TemporaryError):
            return  # reported in status; the reconcile handler retries

    @kopf.on.delete(*resource, registry=registry)
    @guarded
    async def delete(
        body: kopf.Body,
        name: str,
        namespace: str,
        spec: Any,
        status: Any,
        memo: kopf.Memo,
        retry: int,
        **_: Any,
    ) -> None:
        if spec.get("deletionPolicy", "Retain") != "Delete":
            kopf.event(
                body,
                type="Normal",
                reason="Retained",
                message="deletionPolicy Retain: the store's data is kept",
            )
            return
        try:
            prepared = await asyncio.to_thread(prepare, memo.kube, name, namespace, spec)
        except (InvalidSpec, NotOurs, NotAllowed) as exc:
            kopf.event(
                body,
                type="Warning",
                reason="NotPurged",
                message=f"the store's data is kept: {exc}",
            )
            return
        except MissingSecret as exc:
            purge_later(body, f"cannot purge: {exc}", retry, config.retry_delay)
            return
        uid = body.metadata.uid
        if await asyncio.to_thread(keyed_by_name_alone, memo.kube, namespace, name, uid):
            kopf.event(
                body,
                type="Warning",
                reason="NotPurged",
                message="the store's data is kept: its sessions are keyed by its name "
                "alone and may be shared with a store of that name in another namespace",
            )
            return
        if prepared.unvouched and prepared.spec["backend"] not in backend.LOCAL_BACKENDS:
            kopf.event(
                body,
                type="Warning",
                reason="NotPurged",
                message=f"the store's data is kept: {not_connecting(prepared.unvouched)}",
            )
            return
        redact = Redactor([*prepared.secrets.values(), *prepared.keys.values()])
        try:
            cleared = await backend.purge(
                name, prepared.spec, prepared.secrets, prepared.keys, namespace
            )
        except ConfigError as exc:
            kopf.event(
                body,
                type="Warning",
                reason="NotPurged",
                message=redact(f"the store's data is kept: its config is invalid: {exc}"),
            )
            return
        except BackendUnavailable as exc:
            purge_later(body, redact(f"cannot purge yet: {exc}"), retry, config.retry_delay)
            return
        kopf.event(
            body,
            type="Normal",
            reason="Purged",
            message=f"deletionPolicy Delete: cleared {cleared} session(s)",
        )
