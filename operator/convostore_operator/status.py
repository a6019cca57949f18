"""What a store's status and Events say: its conditions, phase, and why.

Every condition keeps its `lastTransitionTime` until its status changes, and every change
of a condition's status is also an Event, so `kubectl describe` tells the story.
"""

from __future__ import annotations

import datetime
from typing import Any

import kopf

from .backend import Reachability
from .trust import ALLOWED_ENDPOINTS, Endpoint


class Report:
    """The status of one store as a handler found it, and the patch it writes."""

    def __init__(self, body: kopf.Body, patch: kopf.Patch, status: Any) -> None:
        self.body, self.patch, self.status = body, patch, status or {}
        self.generation: int | None = body.metadata.get("generation")
        self.previous = self.status.get("conditions")

    def condition(self, kind: str, status: str, reason: str, message: str) -> dict[str, Any]:
        old = next((c for c in self.previous or [] if c.get("type") == kind), None)
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if old is not None and old.get("status") == status:
            since = old.get("lastTransitionTime", now)
        else:
            since = now
        return {
            "type": kind,
            "status": status,
            "reason": reason,
            "message": message,
            "observedGeneration": self.generation,
            "lastTransitionTime": since,
        }

    def write(self, phase: str, conditions: list[dict[str, Any]], **extra: Any) -> None:
        """Write status, and post an Event for every condition that changed."""
        before = {c.get("type"): c.get("status") for c in self.previous or []}
        for item in conditions:
            if before.get(item["type"]) != item["status"]:
                kopf.event(
                    self.body,
                    type="Normal" if item["status"] != "False" else "Warning",
                    reason=item["reason"],
                    message=f"{item['type']}={item['status']}: {item['message']}",
                )
        self.patch.status["phase"] = phase
        self.patch.status["conditions"] = conditions
        self.patch.status["observedGeneration"] = self.generation
        for key, value in extra.items():
            self.patch.status[key] = value

    def failure(self, reason: str, message: str) -> None:
        """Phase Failed, with the reason on ConfigRendered and Ready: nothing was written."""
        failed = [
            self.condition("ConfigRendered", "False", reason, message),
            self.condition("Ready", "False", reason, message),
        ]
        self.write("Failed", failed)

    def reachability(self, reach: Reachability) -> tuple[str, list[dict[str, Any]]]:
        """The phase and the BackendReachable and Ready conditions a reachability check
        gives."""
        if reach.status == "False":
            ready = self.condition("Ready", "False", reach.reason, reach.message)
        else:
            ready = self.condition("Ready", "True", "Ready", "the store can serve sessions")
        reachable = self.condition("BackendReachable", reach.status, reach.reason, reach.message)
        return ("Degraded" if reach.status == "False" else "Ready"), [reachable, ready]

    def isolation(self, scope: str | None, name: str) -> dict[str, Any]:
        if scope:
            return self.condition(
                "NamespaceIsolated",
                "True",
                "KeyedByNamespace",
                f"sessions are keyed {scope}/{name} in the backend",
            )
        return self.condition(
            "NamespaceIsolated",
            "False",
            "KeyedByNameAlone",
            f"sessions are keyed {name!r} as an older operator keyed them: a store named "
            f"{name!r} in another namespace on the same backend shares them, and deleting "
            "this store will not purge them; move them to a new store to isolate them",
        )

    def event(self, level: str, reason: str, message: str) -> None:
        kopf.event(self.body, type=level, reason=reason, message=message)


def not_connecting(endpoints: list[Endpoint]) -> str:
    fields = ", ".join(sorted({e.field for e in endpoints}))
    return (
        f"the operator connects only to endpoints that a Secret the store uses names or "
        f"lists in {ALLOWED_ENDPOINTS}, and {fields} is not one: each pod's sidecar checks "
        "it (/readyz)"
    )
