"""The few Kubernetes calls the operator makes, through the official client.

Kopf watches and patches the ConversationStore itself; everything else (Secrets, Dapr
Components, workloads, the webhook configuration) goes through here. The client is
synchronous: handlers call these methods in a worker thread. `rbac.py` lists exactly the
permissions they need.
"""

from __future__ import annotations

import base64
import os
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from .crd import GROUP


class MissingSecret(Exception):
    def __init__(self, name: str, key: str | None = None) -> None:
        what = f"Secret {name!r}" + (f" has no key {key!r}" if key else " does not exist")
        super().__init__(what)
        self.name, self.key = name, key


def api_client() -> kubernetes.client.ApiClient:
    """In a pod, the service account; elsewhere `$KUBECONFIG` (read now, not at import)."""
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration
        )
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration
        )
    return kubernetes.client.ApiClient(configuration)


class Kube:
    def __init__(self, client: kubernetes.client.ApiClient) -> None:
        self.core = kubernetes.client.CoreV1Api(client)
        self.apps = kubernetes.client.AppsV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.admission = kubernetes.client.AdmissionregistrationV1Api(client)

    # Secrets

    def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}

    def secret_value(self, namespace: str, name: str, key: str) -> str:
        data = self.read_secret(namespace, name)
        if data is None:
            raise MissingSecret(name)
        if key not in data:
            raise MissingSecret(name, key)
        return data[key].decode()

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
        try:
            self.core.create_namespaced_secret(namespace, body)  # type: ignore[arg-type]
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.core.patch_namespaced_secret(name, namespace, body)

    def create_secret_if_absent(
        self, namespace: str, name: str, data: dict[str, bytes], owner: dict[str, Any] | None
    ) -> bool:
        """Create it unless it exists; an existing Secret is never changed."""
        if self.read_secret(namespace, name) is not None:
            return False
        self.apply_secret(namespace, name, data, owner=owner)
        return True

    def apply_component(self, component: dict[str, Any], owner: dict[str, Any]) -> None:
        component = {**component, "metadata": {**component["metadata"]}}
        component["metadata"]["ownerReferences"] = [_owner_reference(owner)]
        namespace, name = component["metadata"]["namespace"], component["metadata"]["name"]
        try:
            self.custom.create_namespaced_custom_object(
                "dapr.io", "v1alpha1", namespace, "components", component
            )
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.custom.patch_namespaced_custom_object(
                "dapr.io", "v1alpha1", namespace, "components", name, component
            )

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

    def set_webhook_ca(self, configuration: str, ca_bundle: bytes) -> bool:
        """Put the CA into every webhook of the configuration; False if it does not exist."""
        try:
            current = self.admission.read_mutating_webhook_configuration(configuration)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        encoded = base64.b64encode(ca_bundle).decode()
        ops: list[dict[str, Any]] = [
            {
                "op": "test",
                "path": "/metadata/resourceVersion",
                "value": current.metadata.resource_version if current.metadata else None,
            }
        ]
        ops += [
            {"op": "add", "path": f"/webhooks/{index}/clientConfig/caBundle", "value": encoded}
            for index in range(len(current.webhooks or []))
        ]
        self.admission.patch_mutating_webhook_configuration(configuration, ops)
        return True


def _owner_reference(owner: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
    }
