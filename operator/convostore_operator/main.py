"""Entry point of `convostore operator run`: what one operator replica does, start to stop.

Every replica, from start to stop:
- serves `/healthz` (liveness) and `/readyz` (readiness: its webhook serves) on
  `health_address`;
- serves the admission webhook, when the chart enables it (`webhook.py`);
- stands for leader (`leader.py`). The leader runs Kopf's reconcile loop in a thread of
  its own, with its own event loop, so that stopping Kopf (whose shutdown cancels every
  task of its loop) never cuts an admission in flight on this replica.

On SIGTERM or SIGINT a replica stops reconciling (Kopf finishes its handlers), releases
the Lease so another replica takes over at once, stops serving and exits 0; when it
loses the Lease it stops reconciling and stands for leader again; when Kopf fails on its
own it exits 1, and Kubernetes restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

import kopf
import kubernetes
from aiohttp import web
from convostore_sidecar.http.listener import LONGEST_HEADER, MOST_HEADERS

from .crd import GROUP
from .inject import SidecarTelemetry
from .kube import Kube, api_client, configuration
from .leader import Election, LeaseSettings
from .metrics import OperatorMetrics
from .registration import OperatorConfig, register
from .webhook import AdmissionServer, WebhookSettings

log = logging.getLogger("convostore.operator")


def operator_settings(settings: kopf.OperatorSettings) -> None:
    """Our own annotation and finalizer names, and quiet Event posting. Peering is off:
    the Lease decides who reconciles."""
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.peering.standalone = True
    settings.scanning.disabled = True


@dataclass(frozen=True)
class ReplicaSettings:
    namespaces: list[str]
    sidecar_image: str
    webhook: WebhookSettings | None
    lease: LeaseSettings | None
    """None runs standalone: reconcile at once, without a Lease (one replica only)."""
    health_address: tuple[str, int] = ("0.0.0.0", 8080)


class Reconciler:
    """Kopf in a thread, started and stopped by the leader election."""

    def __init__(self, settings: ReplicaSettings) -> None:
        self.settings = settings
        self.stop_flag = threading.Event()
        self.failed = False
        self.thread: threading.Thread | None = None
        self.done = asyncio.Event()

    def _run(self) -> None:
        registry = kopf.OperatorRegistry()
        register(registry, OperatorConfig(sidecar_image=self.settings.sidecar_image))
        settings = kopf.OperatorSettings()
        operator_settings(settings)
        try:
            kopf.run(
                registry=registry,
                settings=settings,
                standalone=True,
                namespaces=self.settings.namespaces,
                clusterwide=not self.settings.namespaces,
                memo=kopf.Memo(kube=Kube(api_client())),
                stop_flag=self.stop_flag,
            )
        except Exception:
            log.exception("the reconcile loop failed")
            self.failed = True
        if not self.stop_flag.is_set():
            self.failed = True

    def _run_then_tell(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            self._run()
        finally:
            loop.call_soon_threadsafe(self.done.set)

    def start(self) -> None:
        self.stop_flag.clear()
        self.done.clear()
        self.failed = False
        self.thread = threading.Thread(
            target=self._run_then_tell,
            args=(asyncio.get_running_loop(),),
            name="reconcile",
            daemon=True,
        )
        self.thread.start()

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    async def ended(self) -> None:
        await self.done.wait()

    async def stop(self) -> None:
        self.stop_flag.set()
        if self.thread is not None:
            await asyncio.to_thread(self.thread.join)


async def serve_health(
    address: tuple[str, int],
    healthy: Reconciler,
    admitting: Callable[[], bool],
    metrics: OperatorMetrics,
) -> web.AppRunner:
    """`/healthz` (liveness): the reconcile loop has not failed. `/readyz` (readiness, so
    the webhook's Service sends admissions here): that, and the webhook serves.
    `/metrics`: the replica's metrics, for Prometheus."""

    async def healthz(_: web.Request) -> web.Response:
        if healthy.failed:
            return web.json_response({"status": "reconcile loop failed"}, status=500)
        return web.json_response({"status": "ok", "leader": healthy.running})

    async def readyz(request: web.Request) -> web.Response:
        if not healthy.failed and not admitting():
            return web.json_response({"status": "the webhook is not serving yet"}, status=503)
        return await healthz(request)

    async def exposition(_: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", exposition)
    runner = web.AppRunner(
        app, access_log=None, max_field_size=LONGEST_HEADER, max_headers=MOST_HEADERS
    )
    await runner.setup()
    await web.TCPSite(runner, *address).start()
    return runner


async def run_replica(settings: ReplicaSettings) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    kube = Kube(api_client())
    reconciler = Reconciler(settings)
    admission: AdmissionServer | None = None

    def admitting() -> bool:
        return settings.webhook is None or (admission is not None and admission.serving)

    metrics = OperatorMetrics(lambda: reconciler.running, lambda: reconciler.failed)
    health = await serve_health(settings.health_address, reconciler, admitting, metrics)
    background: list[asyncio.Task[None]] = []
    if settings.webhook is not None:
        admission = AdmissionServer(
            kube,
            settings.webhook,
            settings.sidecar_image,
            SidecarTelemetry.from_environment(),
            metrics,
        )
        await admission.start()
        background.append(asyncio.create_task(admission.keep_in_sync(stop)))
    code = 0
    try:
        code = await lead_while_running(settings, reconciler, stop)
    finally:
        stop.set()
        await reconciler.stop()
        await asyncio.gather(*background)
        if admission is not None:
            await admission.stop()
        await health.cleanup()
    log.info("operator replica stopped")
    return code


async def lead_while_running(
    settings: ReplicaSettings, reconciler: Reconciler, stop: asyncio.Event
) -> int:
    """Reconcile while this replica leads, until `stop`; 1 if Kopf failed on its own."""
    if settings.lease is None:
        reconciler.start()
        await _first(stop.wait(), reconciler.ended())
        return 1 if reconciler.failed else 0
    election = Election(api_client(), settings.lease)
    while not stop.is_set():
        if not await election.acquire(stop):
            break
        reconciler.start()
        await _first(election.hold(stop), reconciler.ended())
        await reconciler.stop()
        if reconciler.failed:
            await election.release()
            return 1
        if stop.is_set():
            await election.release()
            log.info("leader election: %s released the lease", election.identity)
    return 0


async def _first(*aws: object) -> None:
    """Wait for the first of these coroutines to finish; cancel the rest."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]  # type: ignore[call-overload]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def run_operator(settings: ReplicaSettings) -> int:
    try:
        configuration()
    except kubernetes.config.ConfigException as exc:
        raise ValueError(
            f"no Kubernetes cluster to talk to: not in a pod, and no usable kubeconfig ({exc})"
        ) from None
    return asyncio.run(run_replica(settings))


def webhook_from_environment() -> WebhookSettings | None:
    """The chart passes where the webhook lives; without it, no webhook is served."""
    service = os.environ.get("CONVOSTORE_WEBHOOK_SERVICE")
    if not service:
        return None
    return WebhookSettings(
        namespace=own_namespace(),
        service=service,
        configuration=os.environ.get("CONVOSTORE_WEBHOOK_CONFIGURATION", "convostore"),
        tls_secret=os.environ.get("CONVOSTORE_WEBHOOK_TLS_SECRET", "convostore-webhook-tls"),
        port=int(os.environ.get("CONVOSTORE_WEBHOOK_PORT", "9443")),
    )


def own_namespace() -> str:
    return os.environ.get("CONVOSTORE_NAMESPACE", "convostore-system")


def lease_from_environment() -> LeaseSettings:
    return LeaseSettings(
        namespace=own_namespace(),
        name=os.environ.get("CONVOSTORE_LEASE", "convostore-operator"),
    )
