"""Reconcile: bring a store's Secrets, Component and status in line with its spec.

Create, update, resume and the periodic check all run one idempotent `converge`, whose
steps read in order: prepare (read and check everything, write nothing), check that the
sidecar would accept the rendered store, keep the store's keys, write its config, roll the
pods whose config changed, check the backend, report. A failure before the first write
leaves nothing half-created and is reported in `status` and as an Event naming the field
or the Secret.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, NoReturn

import kopf
from convostore_sidecar.sections import ConfigError

from . import backend
from .backend import Reachability
from .crd import GROUP
from .kube import Kube, MissingSecret, NotOurs
from .prepare import Prepared, prepare
from .redact import Redactor
from .render import Rendered, dapr_component, render
from .spec import InvalidSpec
from .status import Report, not_connecting
from .trust import NotAllowed

log = logging.getLogger("convostore.operator")
FIRST_KEY_ID = "k1"
HASH_KEY = "hash-key"  # in the config Secret: keys the config hash (render.Rendered)
REASONS = {
    InvalidSpec: "InvalidSpec",
    MissingSecret: "SecretNotFound",
    NotOurs: "ObjectConflict",
    NotAllowed: "SecretNotAllowed",
}


def owner_of(body: kopf.Body) -> dict[str, Any]:
    return {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "metadata": {"name": body.metadata.name, "uid": body.metadata.uid},
    }


@dataclass
class Reconcile:
    """One pass over one store."""

    body: kopf.Body
    kube: Kube
    report: Report
    retry_delay: float

    @property
    def name(self) -> str:
        return str(self.body.metadata.name)

    @property
    def namespace(self) -> str:
        return str(self.body.metadata.namespace)

    async def converge(self, raw_spec: Any) -> None:
        prepared = await self.prepare(raw_spec)
        redact = Redactor(prepared.secret_values())
        generated = self.first_key(prepared)
        await self.check_sidecar_accepts(prepared, redact)
        if generated:
            await self.keep_generated_keys(prepared, generated)
        rendered = render(
            self.name,
            prepared.spec.document,
            prepared.secrets,
            primary_key=prepared.spec.primary_key,
            scope=prepared.scope,
        )
        config_hash = await self.write_config(prepared, rendered)
        await self.roll_if_changed(config_hash)
        reach = await self.check_backend(prepared, redact)
        self.report_ready(prepared, reach, config_hash)

    async def prepare(self, raw_spec: Any) -> Prepared:
        try:
            uid = str(self.body.metadata.uid)
            return await asyncio.to_thread(
                prepare, self.kube, self.name, self.namespace, uid, raw_spec
            )
        except (InvalidSpec, MissingSecret, NotOurs, NotAllowed) as exc:
            self.report.failure(REASONS[type(exc)], str(exc))
            if isinstance(exc, InvalidSpec):
                raise kopf.PermanentError(str(exc)) from exc
            raise kopf.TemporaryError(str(exc), delay=self.retry_delay) from exc

    @staticmethod
    def first_key(prepared: Prepared) -> dict[str, bytes] | None:
        """A key for an encrypted store that has none yet; the sidecar is checked with it
        before it is written."""
        if prepared.spec.keys_secret is None or prepared.keys:
            return None
        prepared.keys = {FIRST_KEY_ID: base64.b64encode(os.urandom(32))}
        return prepared.keys

    async def check_sidecar_accepts(self, prepared: Prepared, redact: Redactor) -> None:
        spec = prepared.spec
        try:
            await asyncio.to_thread(
                backend.check_rendered,
                self.name,
                spec.document,
                prepared.secrets,
                prepared.keys,
                prepared.scope,
            )
        except ConfigError as exc:
            message = redact(f"the sidecar would refuse this store: {exc}")
            self.report.failure("InvalidConfig", message)
            raise kopf.PermanentError(message) from None

    async def keep_generated_keys(self, prepared: Prepared, generated: dict[str, bytes]) -> None:
        """Write the generated key Secret, or adopt the one a racing pass wrote first."""
        secret = prepared.spec.keys_secret
        assert secret is not None
        await asyncio.to_thread(
            self.kube.create_secret,
            self.namespace,
            secret,
            generated,
            owner=None if prepared.spec.retained else owner_of(self.body),
            labels={f"{GROUP}/store": self.name},
        )
        stored = await asyncio.to_thread(self.kube.read_secret_versioned, self.namespace, secret)
        if stored is not None and not stored.made_for(self.name):
            self.conflict(NotOurs("Secret", secret))
        prepared.keys = stored.data if stored else generated
        self.report.event("Normal", "KeyGenerated", f"generated encryption key Secret {secret!r}")

    async def write_config(self, prepared: Prepared, rendered: Rendered) -> str:
        """Write the Dapr Component (when the operator owns it) and the config Secret;
        the config hash they carry."""
        config_secret = f"{self.name}-convostore"
        existing = await asyncio.to_thread(self.kube.read_secret, self.namespace, config_secret)
        hash_key = (existing or {}).get(HASH_KEY) or os.urandom(32)
        config_hash = rendered.config_hash(hash_key, prepared.keys)
        owner = owner_of(self.body)
        try:
            if prepared.spec.dapr_component:
                component = dapr_component(self.name, self.namespace, prepared.spec.document)
                await asyncio.to_thread(self.kube.apply_component, component, owner)
            await asyncio.to_thread(
                self.kube.apply_secret,
                self.namespace,
                config_secret,
                {**rendered.secret_data(), HASH_KEY: hash_key},
                owner=owner,
                annotations={f"{GROUP}/config-hash": config_hash},
                labels={f"{GROUP}/store": self.name},
            )
        except NotOurs as exc:
            self.conflict(exc)
        return config_hash

    async def roll_if_changed(self, config_hash: str) -> None:
        old_hash = self.report.status.get("configHash")
        if not old_hash or old_hash == config_hash:
            return
        rolled = await asyncio.to_thread(
            self.kube.roll_workloads, self.namespace, self.name, config_hash
        )
        if rolled:
            self.report.event("Normal", "Rolled", f"config changed; restarted {', '.join(rolled)}")

    async def check_backend(self, prepared: Prepared, redact: Redactor) -> Reachability:
        """The backend as the operator may see it, its words redacted."""
        if prepared.unvouched:
            reach = Reachability("Unknown", "NotChecked", not_connecting(prepared.unvouched))
        else:
            reach = await backend.check(
                self.name, prepared.spec.document, prepared.secrets, prepared.keys, prepared.scope
            )
        if reach.detail:
            where = f"{self.namespace}/{self.name}"
            log.warning("store %s: backend check failed: %s", where, redact(reach.detail))
        return dataclasses.replace(reach, message=redact(reach.message), detail="")

    def report_ready(self, prepared: Prepared, reach: Reachability, config_hash: str) -> None:
        config_secret = f"{self.name}-convostore"
        phase, reachability = self.report.reachability(reach)
        rendered = self.report.condition(
            "ConfigRendered", "True", "Rendered", f"sidecar config in Secret {config_secret}"
        )
        isolation = self.report.isolation(prepared.scope, self.name)
        self.report.write(
            phase,
            [rendered, *reachability, isolation],
            configHash=config_hash,
            configSecret=config_secret,
            backendIdentity=prepared.identity,
        )

    def conflict(self, exc: NotOurs) -> NoReturn:
        """Report an object in the way and try again later: its owner may remove it."""
        self.report.failure("ObjectConflict", str(exc))
        raise kopf.TemporaryError(str(exc), delay=self.retry_delay)


async def converge(
    body: kopf.Body, spec: Any, status: Any, patch: kopf.Patch, kube: Kube, retry_delay: float
) -> None:
    await Reconcile(body, kube, Report(body, patch, status), retry_delay).converge(spec)
