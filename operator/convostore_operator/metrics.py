"""The operator replica's Prometheus metrics, on its health port's `/metrics`: whether
it leads (reconciles), whether its reconcile loop failed, and what its admission
webhook answered. The chart's alerts fire on them (a leader missing, the webhook
failing)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

ADMISSION_OUTCOMES = ("injected", "passed", "denied", "failed")


class OperatorMetrics:
    def __init__(self, leading: Callable[[], bool], failed: Callable[[], bool]) -> None:
        self.registry = CollectorRegistry()
        leader = Gauge(
            "convostore_operator_leader",
            "1 while this replica holds the Lease and reconciles.",
            registry=self.registry,
        )
        leader.set_function(lambda: float(leading()))
        loop_failed = Gauge(
            "convostore_operator_reconcile_failed",
            "1 once this replica's reconcile loop has failed (its liveness probe then fails).",
            registry=self.registry,
        )
        loop_failed.set_function(lambda: float(failed()))
        self.admissions = Counter(
            "convostore_operator_admissions",
            "Pods the admission webhook answered, by outcome: `injected` (the sidecar "
            "added), `passed` (not opted in), `denied` (refused for the pod's own reason), "
            "`failed` (refused because the operator could not read the cluster).",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in ADMISSION_OUTCOMES:
            self.admissions.labels(outcome)

    def admitted(self, response: dict[str, Any]) -> None:
        """Count one AdmissionReview's `response`."""
        if response.get("allowed"):
            outcome = "injected" if "patch" in response else "passed"
        else:
            code = (response.get("status") or {}).get("code", 400)
            outcome = "failed" if code >= 500 else "denied"
        self.admissions.labels(outcome).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
