"""The admission webhook: every replica serves it, with one certificate they all agree on.

TLS. The CA and serving certificate live in one Secret. A replica that finds none
*creates* it (a replica that loses that race reads the winner's); one that finds it due
for renewal replaces it guarded by its `resourceVersion` (a replica that loses reads
the winner's). Every replica re-reads the Secret every `tls_check_seconds` and loads a
changed certificate into its running server without a restart, and keeps the webhook
configuration's `caBundle` equal to the Secret's bundle, so whichever replica renewed,
all of them serve a certificate the API server trusts.

Who may call. The webhook port is reachable from any pod, so the webhook answers only
callers that know its token: a random secret kept in the same Secret and written into
the webhook configuration's path (`/inject-sidecar/<token>`), which only the API server
(and whoever may read that configuration) sees. A request to any other path is refused
before its body is read. This is the shared-secret form of webhook authentication that
works on every cluster; client certificates need the API server's own admission config.

Bounds. Before the token is checked a connection holds at most the sidecar's header
bounds, at most `MAX_CONNECTIONS` are open (more are answered 503) and an idle one is
closed after `IDLE_SECONDS`; `networkPolicy.apiServerCIDRs` keeps strangers off the port
altogether. A body is at most `MAX_BODY` (a Pod fits: the API server stores no object
over 1.5 MiB), at most `CONCURRENT_ADMISSIONS` bodies are read and answered at once, and
a pod may name at most `MAX_STORES` stores. Admissions read the API server on threads of their
own, so a burst of them never waits for, or delays, the leader's Lease renewals.

Admission. A pod that asks for convostore gets the sidecar patch, or a denial that says
which stores are missing. Stores are read from the API server on each admission rather
than from an in-memory index: every replica, leader or not, answers alike, and a store
created a moment ago is found.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hmac
import json
import logging
import re
import ssl
import tempfile
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from convostore_sidecar.http.listener import LONGEST_HEADER, MOST_HEADERS, ConnectionCap

from .certs import WebhookTLS, issue
from .crd import GROUP
from .inject import (
    NO_TELEMETRY,
    InjectionRefused,
    SidecarTelemetry,
    StoreMount,
    already_injected,
    inject,
    requested_stores,
    store_mount,
)
from .kube import Kube
from .metrics import OperatorMetrics

log = logging.getLogger("convostore.operator")
INJECT_PATH = "/inject-sidecar"
MAX_BODY = 2 * 1024 * 1024
CONCURRENT_ADMISSIONS = 4
MAX_STORES = 16
MAX_CONNECTIONS = 256
IDLE_SECONDS = 15.0
# what Kubernetes accepts as an object name; anything else cannot name a store
OBJECT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


@dataclass(frozen=True)
class WebhookSettings:
    namespace: str
    service: str
    configuration: str
    tls_secret: str
    port: int = 9443
    address: str = "0.0.0.0"
    tls_check_seconds: float = 60.0

    @property
    def hostnames(self) -> list[str]:
        return [
            f"{self.service}.{self.namespace}.svc",
            f"{self.service}.{self.namespace}.svc.cluster.local",
        ]


def ensure_tls(kube: Kube, webhook: WebhookSettings) -> WebhookTLS:
    """The TLS material all replicas share, made or renewed here if it is missing or due."""
    for _ in range(5):
        now = datetime.datetime.now(datetime.UTC)
        stored = kube.read_secret_versioned(webhook.namespace, webhook.tls_secret)
        if stored is None:
            fresh = issue(webhook.hostnames, now)
            if kube.create_secret(webhook.namespace, webhook.tls_secret, fresh.secret_data()):
                return fresh
            continue
        current = WebhookTLS.from_secret(stored.data)
        if current is not None and not current.needs_renewal(webhook.hostnames, now):
            return current
        renewed = issue(webhook.hostnames, now, current)
        if kube.replace_secret(
            webhook.namespace, webhook.tls_secret, renewed.secret_data(), stored.version
        ):
            log.info("webhook certificate renewed")
            return renewed
    raise RuntimeError(f"the webhook TLS Secret {webhook.tls_secret!r} keeps changing")


class AdmissionServer:
    """HTTPS server for the webhook, whose certificate can change while it runs."""

    def __init__(
        self,
        kube: Kube,
        webhook: WebhookSettings,
        sidecar_image: str,
        telemetry: SidecarTelemetry = NO_TELEMETRY,
        metrics: OperatorMetrics | None = None,
    ) -> None:
        self.kube = kube
        self.webhook = webhook
        self.sidecar_image, self.telemetry, self.metrics = sidecar_image, telemetry, metrics
        self.tls: WebhookTLS | None = None
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.runner: web.AppRunner | None = None
        self.listener: asyncio.Server | None = None
        self.executor = ThreadPoolExecutor(CONCURRENT_ADMISSIONS, "admission")
        self.admitting = asyncio.Semaphore(CONCURRENT_ADMISSIONS)

    @property
    def path(self) -> str:
        """Where the API server sends admissions: the path with the webhook's token."""
        assert self.tls is not None, "start() first"
        return f"{INJECT_PATH}/{self.tls.token.decode()}"

    def load(self, tls: WebhookTLS) -> None:
        """Serve `tls` from the next handshake on (an SSLContext takes a new chain in place)."""
        if tls == self.tls:
            return
        with tempfile.TemporaryDirectory(prefix="convostore-webhook-") as workdir:
            cert, key = Path(workdir) / "tls.crt", Path(workdir) / "tls.key"
            cert.write_bytes(tls.cert)
            key.touch(mode=0o600)
            key.write_bytes(tls.key)
            self.context.load_cert_chain(cert, key)
        self.tls = tls

    def sync(self) -> None:
        """Blocking: agree on the certificate with the other replicas and publish its CA."""
        tls = ensure_tls(self.kube, self.webhook)
        self.load(tls)
        if not self.kube.set_webhook_client(self.webhook.configuration, tls.ca_bundle, self.path):
            log.warning(
                "webhook configuration %r not found; pods will not be injected",
                self.webhook.configuration,
            )

    async def start(self) -> None:
        await self._blocking(self.sync)
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post(INJECT_PATH + "/{token}", self.handle)
        self.runner = web.AppRunner(
            app,
            access_log=None,
            keepalive_timeout=IDLE_SECONDS,
            max_field_size=LONGEST_HEADER,
            max_headers=MOST_HEADERS,
        )
        await self.runner.setup()
        assert self.runner.server is not None
        accept = ConnectionCap(self.runner.server, MAX_CONNECTIONS)
        self.listener = await asyncio.get_running_loop().create_server(
            accept, self.webhook.address, self.webhook.port, ssl=self.context
        )
        log.info("admission webhook serving on port %d", self.webhook.port)

    @property
    def serving(self) -> bool:
        return self.listener is not None and self.listener.is_serving()

    async def keep_in_sync(self, stop: asyncio.Event) -> None:
        while True:
            try:
                await asyncio.wait_for(stop.wait(), self.webhook.tls_check_seconds)
                return
            except TimeoutError:
                pass
            try:
                await self._blocking(self.sync)
            except Exception as exc:
                log.warning("webhook certificate check failed: %s", exc)

    async def _blocking(self, call: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(self.executor, call)

    async def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
        if self.runner is not None:
            await self.runner.cleanup()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def handle(self, request: web.Request) -> web.Response:
        assert self.tls is not None
        if not hmac.compare_digest(request.match_info["token"].encode(), self.tls.token):
            return web.json_response({"error": "not found"}, status=404)
        if (request.content_length or 0) > MAX_BODY:
            return web.json_response({"error": "an AdmissionReview is smaller"}, status=413)
        async with self.admitting:
            return await self._review(request)

    async def _review(self, request: web.Request) -> web.Response:
        try:
            review = await request.json()
            uid = review["request"]["uid"]
            assert isinstance(uid, str)
        except web.HTTPRequestEntityTooLarge:
            return web.json_response({"error": "an AdmissionReview is smaller"}, status=413)
        except (ValueError, KeyError, TypeError, AssertionError):
            return web.json_response({"error": "expected an AdmissionReview"}, status=400)
        response = await admit(
            review["request"], self.kube, self.sidecar_image, self.executor, self.telemetry
        )
        if self.metrics is not None:
            self.metrics.admitted(response)
        return web.json_response(
            {
                "apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview",
                "response": {"uid": uid, **response},
            }
        )


def _deny(message: str, code: int = 400) -> dict[str, Any]:
    return {"allowed": False, "status": {"code": code, "message": message}}


async def admit(
    request: dict[str, Any],
    kube: Kube,
    image: str,
    executor: Executor | None = None,
    telemetry: SidecarTelemetry = NO_TELEMETRY,
) -> dict[str, Any]:
    """The `response` of an AdmissionReview for one pod (without its uid); API reads run
    on `executor` (the event loop's default without one)."""
    pod = request.get("object")
    if not isinstance(pod, dict):
        return {"allowed": True}
    names = requested_stores(pod)
    if names is None or already_injected(pod):
        return {"allowed": True}
    if len(names) > MAX_STORES:
        return _deny(
            f"convostore: the pod names {len(names)} stores in its {GROUP}/stores "
            f"annotation; at most {MAX_STORES} are served by one sidecar"
        )
    namespace = request.get("namespace") or (pod.get("metadata") or {}).get("namespace")
    if not isinstance(namespace, str) or not namespace:
        return _deny("convostore: the pod's namespace is unknown")
    try:
        found = await asyncio.get_running_loop().run_in_executor(
            executor, _read_stores, kube, namespace, names
        )
    except Exception as exc:
        log.warning("admission: cannot read ConversationStores in %r: %s", namespace, exc)
        return _deny(
            f"convostore: cannot read ConversationStores in namespace {namespace!r} now; retry",
            code=503,
        )
    missing = [name for name in names if name not in found]
    if missing:
        return _deny(
            f"convostore: no ConversationStore named {', '.join(map(repr, missing))} "
            f"in namespace {namespace!r} (from the pod's {GROUP}/stores annotation)"
        )
    changed = json.loads(json.dumps(pod))
    try:
        inject(changed, [found[name] for name in names], image, telemetry)
    except InjectionRefused as exc:
        return _deny(str(exc))
    # JSON Patch "add" replaces a member that exists, so two ops cover every pod
    ops = [
        {"op": "add", "path": "/metadata", "value": changed["metadata"]}
        if "metadata" not in pod
        else {
            "op": "add",
            "path": "/metadata/annotations",
            "value": changed["metadata"]["annotations"],
        },
        {"op": "add", "path": "/spec", "value": changed["spec"]},
    ]
    return {
        "allowed": True,
        "patchType": "JSONPatch",
        "patch": base64.b64encode(json.dumps(ops).encode()).decode(),
    }


def _read_stores(kube: Kube, namespace: str, names: list[str]) -> dict[str, StoreMount]:
    found = {}
    for name in names:
        if not OBJECT_NAME.match(name):
            continue
        store = kube.read_store(namespace, name)
        if store is not None:
            found[name] = store_mount(store)
    return found
