"""Leader election: which operator replica reconciles, through a `coordination.k8s.io` Lease.

Every replica serves the admission webhook and its health endpoint all the time; only
the holder of the Lease runs the reconcile loop. The rules are those of Kubernetes' own
controllers (client-go's `leaderelection`), so a cluster operator reads them the same way:

- a candidate takes the Lease when it has no holder, or when its record has not changed
  for `lease_seconds` as measured on the candidate's own clock (no clock comparison
  between nodes), with an update guarded by `resourceVersion`, so two candidates never
  both win;
- the holder renews every `retry_seconds`; when it has not renewed for `renew_deadline`
  (shorter than the lease) it steps down before anyone else may take over;
- a holder that stops on purpose first stops reconciling, then releases the Lease (empty
  holder), so a candidate takes over at its next poll instead of waiting out the lease.

The Lease is read and written on a thread of its own, with a timeout per call, so that
nothing else the replica does (a burst of admissions, a slow API read elsewhere) delays
a renewal, and a renewal the API server leaves unanswered still ends in a step-down.

Kopf's own peering is not used: it pauses operators of equal priority and lets a new,
higher-priority operator start before the old one has paused, while a Lease with an
explicit release gives one reconciler at a time and a take-over bounded by its timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import kubernetes
from kubernetes.client.exceptions import ApiException

log = logging.getLogger("convostore.operator")
T = TypeVar("T")


@dataclass(frozen=True)
class LeaseSettings:
    namespace: str
    name: str = "convostore-operator"
    identity: str = field(default_factory=lambda: default_identity())
    lease_seconds: int = 15
    renew_deadline: float = 10.0
    retry_seconds: float = 2.0


def default_identity() -> str:
    """The pod's name where the chart sets it, else host and process."""
    return os.environ.get("POD_ID") or f"{socket.gethostname()}-{os.getpid()}"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Observed:
    """The Lease as last read, and when (on this replica's monotonic clock) it last changed."""

    holder: str | None
    renewed: str | None
    transitions: int
    resource_version: str | None
    changed_at: float


class Election:
    def __init__(self, client: kubernetes.client.ApiClient, settings: LeaseSettings) -> None:
        self.api = kubernetes.client.CoordinationV1Api(client)
        self.settings = settings
        self.observed: Observed | None = None
        self.last_renewed = 0.0
        self.executor = ThreadPoolExecutor(1, "lease")

    async def _call(self, call: Callable[[], T]) -> T:
        """`call` on the Lease's own thread, given up after the renew deadline."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.executor, call)
        return await asyncio.wait_for(future, self.settings.renew_deadline)

    @property
    def identity(self) -> str:
        return self.settings.identity

    def _body(self, holder: str | None, transitions: int, version: str | None) -> dict[str, Any]:
        now = _now()
        spec: dict[str, Any] = {
            "holderIdentity": holder,
            "leaseDurationSeconds": self.settings.lease_seconds if holder else 1,
            "renewTime": now,
            "leaseTransitions": transitions,
        }
        if holder:
            spec["acquireTime"] = now
        metadata: dict[str, Any] = {
            "name": self.settings.name,
            "namespace": self.settings.namespace,
            "labels": {"app.kubernetes.io/managed-by": "convostore"},
        }
        if version is not None:
            metadata["resourceVersion"] = version
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": spec,
        }

    def _read(self) -> Observed | None:
        try:
            lease = self.api.read_namespaced_lease(
                self.settings.name,
                self.settings.namespace,
                _request_timeout=self.settings.renew_deadline,
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        spec = lease.spec
        renewed = spec.renew_time.isoformat() if spec and spec.renew_time else None
        seen = Observed(
            holder=(spec.holder_identity or None) if spec else None,
            renewed=renewed,
            transitions=(spec.lease_transitions or 0) if spec else 0,
            resource_version=lease.metadata.resource_version if lease.metadata else None,
            changed_at=time.monotonic(),
        )
        old = self.observed
        if old is not None and (old.holder, old.renewed) == (seen.holder, seen.renewed):
            seen.changed_at = old.changed_at
        self.observed = seen
        return seen

    def try_acquire_or_renew(self) -> bool:
        """One attempt (blocking); True when this replica holds the Lease afterwards."""
        seen = self._read()
        if seen is None:
            try:
                self.api.create_namespaced_lease(
                    self.settings.namespace,
                    self._body(self.identity, 0, None),  # type: ignore[arg-type]
                    _request_timeout=self.settings.renew_deadline,
                )
            except ApiException as exc:
                if exc.status == 409:
                    return False
                raise
            self.last_renewed = time.monotonic()
            return True
        mine = seen.holder == self.identity
        expired = time.monotonic() - seen.changed_at > self.settings.lease_seconds
        if not mine and seen.holder is not None and not expired:
            return False
        transitions = seen.transitions if mine else seen.transitions + 1
        body = self._body(self.identity, transitions, seen.resource_version)
        if mine:
            body["spec"].pop("acquireTime")
        if not self._replace(body):
            return False
        self.last_renewed = time.monotonic()
        return True

    def _replace(self, body: dict[str, Any]) -> bool:
        """False when the Lease changed since it was read (another replica wrote it)."""
        try:
            self.api.replace_namespaced_lease(
                self.settings.name,
                self.settings.namespace,
                body,  # type: ignore[arg-type]
                _request_timeout=self.settings.renew_deadline,
            )
        except ApiException as exc:
            if exc.status in (409, 422):
                return False
            raise
        return True

    async def release(self) -> None:
        """Give the Lease up at once, if this replica still holds it."""
        await self._call(self._release)

    def _release(self) -> None:
        seen = self._read()
        if seen is not None and seen.holder == self.identity:
            self._replace(self._body(None, seen.transitions, seen.resource_version))

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this replica holds the Lease (True) or `stop` is set (False)."""
        while not stop.is_set():
            try:
                if await self._call(self.try_acquire_or_renew):
                    log.info("leader election: %s now leads", self.identity)
                    return True
            except Exception as exc:  # an unreachable API server: keep trying
                log.warning("leader election: cannot reach the Lease: %s", exc)
            await _wait(stop, self.settings.retry_seconds)
        return False

    async def hold(self, stop: asyncio.Event) -> None:
        """Renew until `stop` is set or the renew deadline passes without a renewal;
        returns then, and the caller stops reconciling."""
        while not stop.is_set():
            await _wait(stop, self.settings.retry_seconds)
            if stop.is_set():
                return
            try:
                renewed = await self._call(self.try_acquire_or_renew)
            except Exception as exc:
                log.warning("leader election: renewal failed: %s", exc)
                renewed = False
            if not renewed and (
                time.monotonic() - self.last_renewed > self.settings.renew_deadline
                or (self.observed is not None and self.observed.holder != self.identity)
            ):
                log.warning("leader election: %s lost the lease", self.identity)
                return


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
