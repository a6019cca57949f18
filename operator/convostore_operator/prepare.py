"""What a reconcile reads and checks before it writes anything.

`prepare` parses the spec, reads every Secret it names (each must lend itself to the
store), the store's keys and its identity in the backend, and checks where each Secret
value would be sent. It raises before any write, so an invalid spec or a missing Secret
leaves nothing half-created.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from .kube import Kube, MissingSecret, NotOurs, StoredSecret
from .spec import InvalidSpec, StoreSpec, parse
from .trust import Endpoint, check_flows, check_lent, unvouched


@dataclass
class Prepared:
    """Everything read and checked before anything is written."""

    spec: StoreSpec
    secrets: dict[str, str]
    """The value of every ref in `spec.refs`, by the same name."""
    keys: dict[str, bytes]
    """The store's encryption keys; empty until the operator generates the first."""
    scope: str | None
    """The namespace that keys the store's sessions, or None for a store keyed by name
    alone (`keyed_by_name_alone`)."""
    unvouched: list[Endpoint]
    """Endpoints the operator will not connect to itself (`trust.unvouched`)."""

    @property
    def identity(self) -> str:
        return f"{self.scope}/{self.spec.name}" if self.scope else self.spec.name

    def secret_values(self) -> list[str | bytes]:
        """What no log line, Event or status may show."""
        return [*self.secrets.values(), *self.keys.values()]


def prepare(kube: Kube, name: str, namespace: str, uid: str, raw_spec: Any) -> Prepared:
    """Raises InvalidSpec, MissingSecret, NotAllowed or NotOurs."""
    spec = parse(name, raw_spec)
    lent = {ref.name: lent_secret(kube, namespace, ref.name, name) for ref in spec.refs.values()}
    secrets = {}
    for key, ref in spec.refs.items():
        if ref.key not in lent[ref.name].data:
            raise MissingSecret(ref.name, ref.key)
        secrets[key] = lent[ref.name].data[ref.key].decode()
    check_flows(spec.document, spec.refs, lent, secrets)
    keys = store_keys(kube, namespace, spec)
    scope = None if keyed_by_name_alone(kube, namespace, name, uid) else namespace
    return Prepared(spec, secrets, keys, scope, unvouched(spec.document, spec.refs, lent, secrets))


def lent_secret(kube: Kube, namespace: str, secret: str, store: str) -> StoredSecret:
    """A Secret of the store's own namespace that lends itself to `store`."""
    stored = kube.read_secret_versioned(namespace, secret)
    if stored is None:
        raise MissingSecret(secret)
    check_lent(secret, stored, store)
    return stored


def store_keys(kube: Kube, namespace: str, spec: StoreSpec) -> dict[str, bytes]:
    """The keys in the Secret the author names (which must hold the primary key), or in
    the one the operator generated for this store (empty before the first)."""
    if spec.keys_secret is None:
        return {}
    if spec.keys_named:
        keys = lent_secret(kube, namespace, spec.keys_secret, spec.name).data
        check_primary(spec, keys)
        return keys
    stored = kube.read_secret_versioned(namespace, spec.keys_secret)
    if stored is not None and not stored.made_for(spec.name):
        raise NotOurs("Secret", spec.keys_secret)
    return stored.data if stored else {}


def check_primary(spec: StoreSpec, keys: dict[str, bytes]) -> None:
    primary, secret = spec.primary_key, spec.keys_secret
    if primary is None and len(keys) != 1:
        raise InvalidSpec(
            "spec.encryption.primary",
            f"name the key that encrypts new items; Secret {secret!r} holds "
            f"{', '.join(sorted(keys)) or 'no keys'}",
        )
    if primary is not None and primary not in keys:
        raise InvalidSpec("spec.encryption.primary", f"Secret {secret!r} has no key {primary!r}")


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
