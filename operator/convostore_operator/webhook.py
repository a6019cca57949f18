"""Serving the admission webhook with the operator's own TLS material.

At start-up the operator makes sure the TLS Secret holds a CA and a serving certificate
for the webhook Service's names (issuing or renewing them as `certs.py` decides), writes
them where Kopf's webhook server reads them, and puts the CA into the webhook
configuration's `caBundle`. Every 12 hours it checks again; when it had to renew, it
stops so that its restart loads the new certificate (the other replica keeps serving).
"""

from __future__ import annotations

import datetime
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf

from .certs import WebhookTLS, issue
from .kube import Kube

log = logging.getLogger("convostore.operator")
RECHECK_SECONDS = 12 * 3600


@dataclass(frozen=True)
class WebhookSettings:
    namespace: str
    service: str
    configuration: str
    tls_secret: str
    port: int = 9443

    @property
    def hostnames(self) -> list[str]:
        return [
            f"{self.service}.{self.namespace}.svc",
            f"{self.service}.{self.namespace}.svc.cluster.local",
        ]


class PodWebhookServer(kopf.WebhookServer):
    """Kopf's HTTPS webhook server, with the namespace of the request put into the object.

    A pod created by a controller often reaches the webhook without
    `metadata.namespace`; the API server names it in `request.namespace` instead, which
    Kopf does not pass on. Stores are looked up by namespace, so it is filled in first."""

    async def __call__(self, fn: kopf.WebhookFn) -> AsyncIterator[kopf.WebhookClientConfig]:
        async def with_namespace(request: Any, **kwargs: Any) -> Any:
            review = request.get("request") if isinstance(request, dict) else None
            if isinstance(review, dict) and isinstance(review.get("namespace"), str):
                obj = review.get("object")
                if isinstance(obj, dict):
                    meta = obj.setdefault("metadata", {})
                    if isinstance(meta, dict) and not meta.get("namespace"):
                        meta["namespace"] = review["namespace"]
            return await fn(request, **kwargs)

        async for config in super().__call__(with_namespace):
            yield config


def ensure_tls(kube: Kube, webhook: WebhookSettings) -> tuple[WebhookTLS, bool]:
    """The current TLS material, renewed if needed; True when it changed."""
    now = datetime.datetime.now(datetime.UTC)
    stored = kube.read_secret(webhook.namespace, webhook.tls_secret)
    current = WebhookTLS.from_secret(stored) if stored else None
    if current is not None and not current.needs_renewal(webhook.hostnames, now):
        return current, False
    renewed = issue(webhook.hostnames, now, current)
    kube.apply_secret(webhook.namespace, webhook.tls_secret, renewed.secret_data(), owner=None)
    return renewed, True


def serve_webhook(
    settings: kopf.OperatorSettings, kube: Kube, webhook: WebhookSettings, workdir: Path
) -> WebhookTLS:
    tls, _ = ensure_tls(kube, webhook)
    cert, key = workdir / "tls.crt", workdir / "tls.key"
    cert.write_bytes(tls.cert)
    key.write_bytes(tls.key)
    key.chmod(0o600)
    settings.admission.server = PodWebhookServer(
        addr="0.0.0.0",
        port=webhook.port,
        certfile=str(cert),
        pkeyfile=str(key),
        host=webhook.hostnames[0],
    )
    if not kube.set_webhook_ca(webhook.configuration, tls.ca_cert):
        log.warning(
            "webhook configuration %r not found; pods will not be injected", webhook.configuration
        )
    return tls


def watch_renewal(kube: Kube, webhook: WebhookSettings, stop: threading.Event) -> None:
    """In a thread: renew when due, publish the CA, and ask the operator to restart."""
    while not stop.wait(RECHECK_SECONDS):
        tls, changed = ensure_tls(kube, webhook)
        if changed:
            kube.set_webhook_ca(webhook.configuration, tls.ca_cert)
            log.info("webhook certificate renewed; restarting to serve it")
            stop.set()
