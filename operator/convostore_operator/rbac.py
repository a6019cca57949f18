"""The operator's rights where ConversationStores live, stated once: the chart renders
them into a ClusterRole when the operator watches every namespace, or into a Role in
each watched namespace. Its other rights are named objects of its own (the leader Lease
and the webhook's TLS Secret in its namespace, its webhook configuration), which the
chart grants by name. A test runs a full life cycle in both modes, records every call
the operator makes, and checks each against the rendered chart, and each grant is used.
"""

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
]
