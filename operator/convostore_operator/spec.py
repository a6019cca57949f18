"""Validating a ConversationStore's spec: the CRD's own schema, then its CEL rules.

Both come from `crd.py`, so the operator refuses exactly what a conforming API server
would have refused, with an error that names the field. This matters on clusters (and
emulators) that skip some validation, and for objects stored under an older schema.
`parse` does it once per reconcile and gives a `StoreSpec`: the facts the operator
decides on, typed, beside the checked document that `render` translates for the sidecar.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import celpy
import jsonschema
from celpy import celtypes
from celpy.adapter import json_to_cel

from .crd import MAX_STORE_NAME, SPEC, STORE_NAME


class InvalidSpec(Exception):
    """A spec the operator cannot act on; `field` is its path, e.g. `spec.redis.url`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass(frozen=True)
class SecretRef:
    name: str
    key: str


@dataclass(frozen=True)
class StoreSpec:
    """A checked spec: what reconcile and deletion decide on, and the whole `document`."""

    name: str
    document: dict[str, Any]
    """The validated spec, as `render`, `trust` and `backend` read its sections."""
    backend: str
    deletion_policy: Literal["Retain", "Delete"]
    refs: dict[str, SecretRef]
    """Every Secret value the spec uses, by the name the renderer gives it."""
    keys_secret: str | None
    """The Secret with the store's encryption keys; None when it is not encrypted."""
    keys_named: bool
    """True when the author names the key Secret; False when the operator generates it."""
    primary_key: str | None
    dapr_component: bool
    """True when the operator writes the store's Dapr Component itself."""

    @property
    def retained(self) -> bool:
        return self.deletion_policy == "Retain"


def parse(name: str, raw: Any) -> StoreSpec:
    """The store's name and spec, checked; raises `InvalidSpec` naming the field."""
    validate_name(name)
    document = validate(dict(raw))
    encryption = document.get("encryption", {})
    return StoreSpec(
        name=name,
        document=document,
        backend=document["backend"],
        deletion_policy=document.get("deletionPolicy", "Retain"),
        refs=secret_refs(document),
        keys_secret=keys_secret_name(name, document),
        keys_named="keySecretRef" in encryption,
        primary_key=encryption.get("primary"),
        dapr_component=document["backend"] == "dapr" and "component" in document["dapr"],
    )


_validator = jsonschema.Draft202012Validator(SPEC)


def validate_name(name: str) -> None:
    """A store's name becomes volume names in pods (`convostore-store-<name>`, at most
    63 characters) and a store name in the sidecar's config; the CRD refuses others too."""
    if len(name) > MAX_STORE_NAME or not re.fullmatch(STORE_NAME, name):
        raise InvalidSpec(
            "metadata.name",
            f"a ConversationStore name must be at most {MAX_STORE_NAME} lowercase letters, "
            f"digits or '-', starting and ending with a letter or digit; got {name!r}",
        )


def validate(spec: Any) -> dict[str, Any]:
    """The spec, checked; raises `InvalidSpec` for the first problem found."""
    errors = sorted(_validator.iter_errors(spec), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        path = ".".join(["spec", *map(str, first.absolute_path)])
        raise InvalidSpec(path, _short(first))
    for field, message in cel_failures(SPEC, spec, "spec"):
        raise InvalidSpec(field, message)
    result: dict[str, Any] = spec
    return result


def cel_failures(schema: dict[str, Any], value: Any, path: str) -> Iterator[tuple[str, str]]:
    """(field, message) of every `x-kubernetes-validations` rule that `value` breaks,
    evaluated with a CEL interpreter where the API server would evaluate it."""
    for rule in schema.get("x-kubernetes-validations", []):
        outcome = _program(rule["rule"]).evaluate({"self": json_to_cel(value)})
        if not (isinstance(outcome, celtypes.BoolType) and outcome):
            yield path + rule.get("fieldPath", ""), rule["message"]
    if isinstance(value, dict):
        for name, child in schema.get("properties", {}).items():
            if name in value:
                yield from cel_failures(child, value[name], f"{path}.{name}")
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            yield from cel_failures(schema["items"], item, f"{path}[{index}]")


@functools.cache
def _program(rule: str) -> celpy.Runner:
    environment = celpy.Environment()
    return environment.program(environment.compile(rule))


def _short(error: jsonschema.ValidationError) -> str:
    if error.validator == "enum":
        allowed = ", ".join(str(v) for v in error.validator_value)  # type: ignore[union-attr]
        return f"must be one of {allowed}; got {error.instance!r}"
    if error.validator == "pattern":
        return f"{error.instance!r} does not match {error.validator_value}"
    return error.message


def secret_refs(spec: dict[str, Any]) -> dict[str, SecretRef]:
    """Every Secret value the spec refers to, by a name the renderer uses; the openai
    backend's map store adds its own under `mapping.`, compaction its key under
    `compaction.`."""
    section = spec.get(spec["backend"], {})
    refs = _section_refs(section)
    mapping = section.get("mapping", {})
    if spec["backend"] == "openai" and mapping:
        mapped = _section_refs(mapping.get(mapping["backend"], {}))
        refs.update({f"mapping.{field}": ref for field, ref in mapped.items()})
    for index, item in enumerate(section.get("component", {}).get("metadata", [])):
        if "secretKeyRef" in item:
            ref = item["secretKeyRef"]
            refs[f"component.{index}"] = SecretRef(ref["name"], ref["key"])
    if "compaction" in spec:
        ref = spec["compaction"]["apiKeySecretRef"]
        refs["compaction.apiKeySecretRef"] = SecretRef(ref["name"], ref["key"])
    return refs


def _section_refs(section: dict[str, Any]) -> dict[str, SecretRef]:
    refs: dict[str, SecretRef] = {
        field: SecretRef(section[field]["name"], section[field]["key"])
        for field in (
            "urlSecretRef",
            "passwordSecretRef",
            "dsnSecretRef",
            "directDsnSecretRef",
            "apiKeySecretRef",
            "caSecretRef",
        )
        if field in section
    }
    sentinel = section.get("sentinel", {})
    if "passwordSecretRef" in sentinel:
        ref = sentinel["passwordSecretRef"]
        refs["sentinel.passwordSecretRef"] = SecretRef(ref["name"], ref["key"])
    return refs


def keys_secret_name(name: str, spec: dict[str, Any]) -> str | None:
    """The Secret holding an encrypted store's keys: named in the spec, or generated."""
    encryption = spec.get("encryption", {})
    if not encryption.get("enabled"):
        return None
    ref = encryption.get("keySecretRef")
    return str(ref["name"]) if ref else f"{name}-convostore-keys"


def uses_embedded_sqlite(spec: dict[str, Any]) -> bool:
    """True when the sidecar keeps a SQLite file in the pod: a sqlite store, or an openai
    store whose session map is on SQLite (its default)."""
    if spec.get("backend") == "sqlite":
        return True
    mapping = spec.get("openai", {}).get("mapping", {})
    return spec.get("backend") == "openai" and mapping.get("backend", "sqlite") == "sqlite"
