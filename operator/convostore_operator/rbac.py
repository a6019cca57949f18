"""The operator's permissions, stated once; the chart's ClusterRole is rendered from
`RULES` and its Role in the operator's own namespace from `OWN_NAMESPACE_RULES`, and a
test records every call the operator makes to check they match."""

from __future__ import annotations

from typing import Any

from .crd import GROUP, PLURAL

RULES: list[dict[str, Any]] = [
    {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create", "update"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    {
        "apiGroups": ["apps"],
        "resources": ["deployments", "statefulsets"],
        "verbs": ["list", "patch"],
    },
    {"apiGroups": ["dapr.io"], "resources": ["components"], "verbs": ["get", "create", "patch"]},
    {
        "apiGroups": ["admissionregistration.k8s.io"],
        "resources": ["mutatingwebhookconfigurations"],
        "verbs": ["get", "patch"],
    },
]

# the leader Lease (leader.py), in the operator's own namespace only
OWN_NAMESPACE_RULES: list[dict[str, Any]] = [
    {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "verbs": ["get", "create", "update"],
    },
]


def allowed() -> set[tuple[str, str, str]]:
    """Every (api group, resource, verb) the rules grant."""
    return {
        (group, resource, verb)
        for rule in RULES + OWN_NAMESPACE_RULES
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
