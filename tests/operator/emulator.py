"""kmock's Kubernetes emulator, made realistic enough for Kopf and the kubernetes client.

The plain emulator stores objects as they are sent. A real API server also stamps
`uid`, `resourceVersion` (bumped on every change), `generation` (bumped on spec
changes), `creationTimestamp` and the namespace from the URL; Kopf's patches and
`ownerReferences` depend on them. Resources are declared with the verbs Kopf needs.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import attrs
import jsonpatch
import kmock
from kmock._internal import enums
from kmock._internal.k8s import KubernetesError

STORES = "convostore.dev/v1alpha1/conversationstores"
LEASES = "coordination.k8s.io/v1/leases"
PEERINGS, CLUSTER_PEERINGS = "kopf.dev/v1/kopfpeerings", "kopf.dev/v1/clusterkopfpeerings"
ALL_VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}


@attrs.frozen
class StaleResourceVersion(KubernetesError):
    """A JSON patch whose `test` of resourceVersion failed: 422, as a real API server
    answers, which Kopf treats as "newer changes are on their way"."""

    status: int = 422
    reason: str = "Invalid"


@attrs.frozen
class Conflict(KubernetesError):
    """A replace (PUT) naming a resourceVersion that is no longer current."""

    status: int = 409
    reason: str = "Conflict"


class RealisticEmulator(kmock.KubernetesEmulator):
    _latest_version: ClassVar[int] = 999

    def _next_version(self) -> str:
        RealisticEmulator._latest_version += 1
        return str(self._latest_version)

    async def _serve_list(self, request: kmock.Request) -> Any:
        """A list carries the resourceVersion to watch from, as a real API server's does."""
        since = str(self._latest_version)
        listing: Any = await super()._serve_list(request)
        listing["metadata"]["resourceVersion"] = since
        return listing

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        """A watch from a listed resourceVersion does not replay what the list returned."""
        since = request.params.get("resourceVersion", "")
        floor = int(since) if since.isdigit() else 0
        async for event in super()._serve_watch(request):
            if not (
                isinstance(event, dict)
                and event.get("type") == "ADDED"
                and _version(event) <= floor
            ):
                yield event

    async def _handle(self, request: kmock.Request) -> Any:
        if request.method.name == "PUT" and request.name and request.action is None:
            # kmock leaves a PUT unparsed; an API server treats it as an update (replace)
            object.__setattr__(request, "action", enums.action.UPDATE)
        if request.resource is not None and isinstance(request.data, dict | list):
            if request.action == enums.action.CREATE and isinstance(request.data, dict):
                self._stamp_new(request)
            elif request.action == enums.action.UPDATE and request.name:
                if request.method.name == "PUT" and isinstance(request.data, dict):
                    self._as_replacement(request)
                self._stamp_changed(request)
        try:
            return await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed as e:
            raise StaleResourceVersion(message=str(e)) from None

    def _as_replacement(self, request: kmock.Request) -> None:
        """A PUT replaces the whole object, and only the version it was read at: turned
        into the merge patch that the emulator applies (absent keys become deletions)."""
        key: Any = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return
        current = dict(self.objects[key].raw)
        sent = request.data.get("metadata", {}).get("resourceVersion")
        stored = current.get("metadata", {}).get("resourceVersion")
        if sent is not None and sent != stored:
            raise Conflict(message=f"the object has been modified (at {stored}, not {sent})")
        kept = {f: current["metadata"][f] for f in KEPT_METADATA if f in current["metadata"]}
        request.data.setdefault("metadata", {}).update(kept)
        replacement = _replacement(current, request.data)
        request.data.clear()
        request.data.update(replacement)

    def _stamp_new(self, request: kmock.Request) -> None:
        meta = request.data.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta["resourceVersion"] = self._next_version()
        meta.setdefault("generation", 1)
        meta.setdefault(
            "creationTimestamp", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        )
        if request.namespace:
            meta.setdefault("namespace", request.namespace)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]

    def _stamp_changed(self, request: kmock.Request) -> None:
        """Folds the new resourceVersion (and generation) into the change itself, so the
        watch event that the change emits already carries them."""
        key: Any = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return
        stamp: dict[str, Any] = {"resourceVersion": self._next_version()}
        if request.subresource is None and _touches_spec(request.data):
            stamp["generation"] = self.objects[key].get("metadata", {}).get("generation", 1) + 1
        if isinstance(request.data, dict):
            request.data.setdefault("metadata", {}).update(stamp)
        else:
            request.data.extend(
                {"op": "add", "path": f"/metadata/{field}", "value": value}
                for field, value in stamp.items()
            )


KEPT_METADATA = ("uid", "creationTimestamp", "generation", "namespace", "name")


def _replacement(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The merge patch that turns `old` into `new`."""
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            patch[key] = _replacement(old[key], value)
        else:
            patch[key] = value
    return patch


def _version(event: dict[str, Any]) -> int:
    return int(event["object"]["metadata"].get("resourceVersion", "0"))


def _touches_spec(change: dict[str, Any] | list[dict[str, Any]]) -> bool:
    if isinstance(change, dict):
        return "spec" in change
    return any(str(op.get("path", "")).startswith("/spec") for op in change)


def declare_resources(emulator: kmock.KubernetesEmulator) -> None:
    emulator.resources.load_bundled()
    emulator.resources[LEASES] = kmock.ResourceInfo(kind="Lease", namespaced=True, verbs=ALL_VERBS)
    for name, kind in (
        (STORES, "ConversationStore"),
        ("dapr.io/v1alpha1/components", "Component"),
    ):
        emulator.resources[name] = kmock.ResourceInfo(
            kind=kind, namespaced=True, verbs=ALL_VERBS, subresources={"status"}
        )
    for name, kind, namespaced in (
        (PEERINGS, "KopfPeering", True),
        (CLUSTER_PEERINGS, "ClusterKopfPeering", False),
    ):
        emulator.resources[name] = kmock.ResourceInfo(
            kind=kind, namespaced=namespaced, verbs=ALL_VERBS
        )
