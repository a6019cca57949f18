"""The few Kubernetes calls the operator makes, through the official client.

Kopf watches and patches the ConversationStore itself; everything else (Secrets, Dapr
Components, workloads, the webhook configuration) goes through here. The client is
synchronous: handlers call these methods in a worker thread. `rbac.py` lists exactly the
permissions they need.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from typing import Any

import kopf
import kubernetes
from kubernetes.client.exceptions import ApiException

from .crd import GROUP, PLURAL, VERSION


class NotOurs(Exception):
    """An object the operator would write exists, but this store did not make it: the
    operator neither adopts nor overwrites it."""

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(
            f"{kind} {name!r} exists and was not made for this store; the operator will not "
            "take it over: delete or rename it"
        )


class MissingSecret(Exception):
    def __init__(self, name: str, key: str | None = None) -> None:
        what = f"Secret {name!r}" + (f" has no key {key!r}" if key else " does not exist")
        super().__init__(what)
        self.name, self.key = name, key


def configuration() -> kubernetes.client.Configuration:
    """In a pod, the service account; elsewhere `$KUBECONFIG` (read now, not at import)."""
    config = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=config
        )
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=os.environ.get("KUBECONFIG"), client_configuration=config
        )
    return config


def api_client() -> kubernetes.client.ApiClient:
    return kubernetes.client.ApiClient(configuration())


def connection_info() -> kopf.ConnectionInfo:
    """Kopf's credentials, from the same place as the client's: Kopf signs in through
    this one login handler (a fresh registry has none of Kopf's own), and calls it again
    when a token is refused, which picks up a rotated service-account token."""
    config = configuration()
    header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix(
        "authorization"
    )
    scheme, _, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=config.host,
        ca_path=config.ssl_ca_cert,
        insecure=not config.verify_ssl,
        scheme=scheme or None,
        token=token or None,
        certificate_path=config.cert_file,
        private_key_path=config.key_file,
    )


@dataclass(frozen=True)
class StoredSecret:
    data: dict[str, bytes]
    version: str
    annotations: dict[str, str]
    labels: dict[str, str]
    owners: list[str]

    def made_for(self, store: str, owner_uid: str | None = None) -> bool:
        """Made by the operator for `store` (and, with `owner_uid`, owned by it)."""
        if owner_uid is not None:
            return owner_uid in self.owners
        return self.labels.get("app.kubernetes.io/managed-by") == "convostore" and (
            self.labels.get(f"{GROUP}/store") == store
        )


class Kube:
    def __init__(self, client: kubernetes.client.ApiClient) -> None:
        self.core = kubernetes.client.CoreV1Api(client)
        self.apps = kubernetes.client.AppsV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.admission = kubernetes.client.AdmissionregistrationV1Api(client)

    # Secrets

    def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        found = self.read_secret_versioned(namespace, name)
        return None if found is None else found.data

    def read_secret_versioned(self, namespace: str, name: str) -> StoredSecret | None:
        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        meta = secret.metadata
        return StoredSecret(
            data={k: base64.b64decode(v) for k, v in (secret.data or {}).items()},
            version=str(meta.resource_version if meta else ""),
            annotations=dict((meta.annotations if meta else None) or {}),
            labels=dict((meta.labels if meta else None) or {}),
            owners=[ref.uid for ref in (meta.owner_references if meta else None) or []],
        )

    def create_secret(
        self,
        namespace: str,
        name: str,
        data: dict[str, bytes],
        *,
        owner: dict[str, Any] | None = None,
        annotations: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
    ) -> bool:
        """False when a Secret of that name exists already (it is left as it is)."""
        body = _secret_body(namespace, name, data, owner, annotations, labels)
        try:
            self.core.create_namespaced_secret(namespace, body)  # type: ignore[arg-type]
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def replace_secret(
        self,
        namespace: str,
        name: str,
        data: dict[str, bytes],
        resource_version: str,
        *,
        owner: dict[str, Any] | None = None,
        annotations: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
    ) -> bool:
        """Replace the whole Secret (keys not in `data` go away) if it is still at
        `resource_version`; False when someone changed it meanwhile."""
        body = _secret_body(namespace, name, data, owner, annotations, labels)
        body["metadata"]["resourceVersion"] = resource_version
        try:
            self.core.replace_namespaced_secret(name, namespace, body)  # type: ignore[arg-type]
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def apply_secret(
        self,
        namespace: str,
        name: str,
        data: dict[str, bytes],
        *,
        owner: dict[str, Any] | None,
        annotations: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
    ) -> None:
        """Make the Secret hold exactly `data`, creating it if needed; a Secret that
        already holds it (and the annotations) is not written again, and one that
        `owner` does not own is never touched (NotOurs)."""
        extra: dict[str, Any] = {"owner": owner, "annotations": annotations, "labels": labels}
        for _ in range(5):
            found = self.read_secret_versioned(namespace, name)
            if found is None:
                if self.create_secret(namespace, name, data, **extra):
                    return
                continue
            if owner is not None and not found.made_for(name, owner["metadata"]["uid"]):
                raise NotOurs("Secret", name)
            unchanged = (
                found.data == data and (annotations or {}).items() <= found.annotations.items()
            )
            if unchanged or self.replace_secret(namespace, name, data, found.version, **extra):
                return
        raise ApiException(status=409, reason=f"Secret {name!r} keeps changing")

    def apply_component(self, component: dict[str, Any], owner: dict[str, Any]) -> None:
        """Create the Dapr Component, or update the one this store owns; one it does not
        own (another team's, of the same name) is never touched (NotOurs)."""
        component = {**component, "metadata": {**component["metadata"]}}
        component["metadata"]["ownerReferences"] = [_owner_reference(owner)]
        namespace, name = component["metadata"]["namespace"], component["metadata"]["name"]
        where = ("dapr.io", "v1alpha1", namespace, "components")
        try:
            self.custom.create_namespaced_custom_object(*where, component)
            return
        except ApiException as exc:
            if exc.status != 409:
                raise
        found: Any = self.custom.get_namespaced_custom_object(*where, name)
        owners = [ref.get("uid") for ref in found.get("metadata", {}).get("ownerReferences", [])]
        if owner["metadata"]["uid"] not in owners:
            raise NotOurs("Dapr Component", name)
        self.custom.patch_namespaced_custom_object(*where, name, component)

    def read_store(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A ConversationStore as the API server has it (None if absent)."""
        try:
            found: Any = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return found if isinstance(found, dict) else None

    # workloads

    def roll_workloads(self, namespace: str, store: str, config_hash: str) -> list[str]:
        """Restart Deployments and StatefulSets whose pods use `store`, by changing a
        pod-template annotation, as `kubectl rollout restart` does."""
        rolled = []
        annotation = f"{GROUP}/config-hash-{store}"
        patch = {"spec": {"template": {"metadata": {"annotations": {annotation: config_hash}}}}}
        for kind, lister, patcher in (
            (
                "Deployment",
                self.apps.list_namespaced_deployment,
                self.apps.patch_namespaced_deployment,
            ),
            (
                "StatefulSet",
                self.apps.list_namespaced_stateful_set,
                self.apps.patch_namespaced_stateful_set,
            ),
        ):
            for workload in lister(namespace).items:
                raw = self.core.api_client.sanitize_for_serialization(workload)
                template = raw.get("spec", {}).get("template", {}).get("metadata", {})
                stores = (template.get("annotations") or {}).get(f"{GROUP}/stores", "")
                if store in [s.strip() for s in stores.split(",")]:
                    name = raw["metadata"]["name"]
                    patcher(name, namespace, patch)
                    rolled.append(f"{kind}/{name}")
        return rolled

    # admission

    def set_webhook_client(self, name: str, ca_bundle: bytes, path: str) -> bool:
        """Put the CA and the path (which carries the webhook's token) into every webhook
        of the configuration; False if it does not exist. Replicas starting together race
        here: a write guarded by a resourceVersion that another replica changed meanwhile
        is read and checked again."""
        encoded = base64.b64encode(ca_bundle).decode()
        for _ in range(5):
            try:
                current = self.admission.read_mutating_webhook_configuration(name)
            except ApiException as exc:
                if exc.status == 404:
                    return False
                raise
            hooks = current.webhooks or []
            if all(_client_is(h.client_config, encoded, path) for h in hooks):
                return True
            version = current.metadata.resource_version if current.metadata else None
            ops: list[dict[str, Any]] = [
                {"op": "test", "path": "/metadata/resourceVersion", "value": version}
            ]
            for index, hook in enumerate(hooks):
                where = f"/webhooks/{index}/clientConfig"
                ops.append({"op": "add", "path": f"{where}/caBundle", "value": encoded})
                if hook.client_config and hook.client_config.service:
                    ops.append({"op": "add", "path": f"{where}/service/path", "value": path})
            try:
                self.admission.patch_mutating_webhook_configuration(name, ops)
            except ApiException as exc:
                if exc.status not in (409, 422):
                    raise
                continue
            return True
        raise ApiException(status=409, reason=f"webhook configuration {name!r} keeps changing")


def _secret_body(
    namespace: str,
    name: str,
    data: dict[str, bytes],
    owner: dict[str, Any] | None,
    annotations: dict[str, str] | None,
    labels: dict[str, str] | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "annotations": annotations or {},
            "labels": {"app.kubernetes.io/managed-by": "convostore", **(labels or {})},
        },
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
    }
    if owner is not None:
        body["metadata"]["ownerReferences"] = [_owner_reference(owner)]
    return body


def _owner_reference(owner: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
    }


def _client_is(client: Any, ca_bundle: str, path: str) -> bool:
    if client is None or client.ca_bundle != ca_bundle:
        return False
    return client.service is None or client.service.path == path
