"""Entry point of `convostore operator`: settings, peering, the webhook, then Kopf."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path

import kopf

from .crd import GROUP
from .handlers import OperatorConfig, register
from .kube import Kube, api_client
from .webhook import WebhookSettings, serve_webhook, watch_renewal


def operator_settings(settings: kopf.OperatorSettings, *, standalone: bool) -> None:
    """Our own annotation and finalizer names, quiet Event posting, and peering.

    Peering is mandatory unless standalone: a replica that cannot see its peers must
    wait rather than act alongside them."""
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.peering.name = "convostore"
    settings.peering.mandatory = not standalone
    settings.scanning.disabled = True


def run_operator(
    *,
    namespaces: list[str],
    standalone: bool,
    webhook: WebhookSettings | None,
    sidecar_image: str,
    liveness: str | None = "http://0.0.0.0:8080/healthz",
) -> int:
    registry = kopf.OperatorRegistry()
    register(registry, OperatorConfig(sidecar_image=sidecar_image))
    settings = kopf.OperatorSettings()
    operator_settings(settings, standalone=standalone)
    kube = Kube(api_client())
    stop = threading.Event()
    with tempfile.TemporaryDirectory(prefix="convostore-webhook-") as workdir:
        if webhook is not None:
            serve_webhook(settings, kube, webhook, Path(workdir))
            threading.Thread(target=watch_renewal, args=(kube, webhook, stop), daemon=True).start()
        kopf.run(
            registry=registry,
            settings=settings,
            standalone=standalone,
            namespaces=namespaces,
            clusterwide=not namespaces,
            liveness_endpoint=liveness,
            memo=kopf.Memo(kube=kube),
            stop_flag=stop,
        )
    return 0


def webhook_from_environment() -> WebhookSettings | None:
    """The chart passes where the webhook lives; without it, no webhook is served."""
    service = os.environ.get("CONVOSTORE_WEBHOOK_SERVICE")
    if not service:
        return None
    return WebhookSettings(
        namespace=os.environ.get("CONVOSTORE_NAMESPACE", "convostore-system"),
        service=service,
        configuration=os.environ.get("CONVOSTORE_WEBHOOK_CONFIGURATION", "convostore"),
        tls_secret=os.environ.get("CONVOSTORE_WEBHOOK_TLS_SECRET", "convostore-webhook-tls"),
        port=int(os.environ.get("CONVOSTORE_WEBHOOK_PORT", "9443")),
    )
