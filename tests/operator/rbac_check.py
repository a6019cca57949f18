"""Kubernetes RBAC, evaluated on a rendered chart: which calls its Roles and ClusterRoles,
bound to the operator's ServiceAccount, allow (the rules an API server's authorizer
applies: namespace of the binding, groups, resources, verbs, resourceNames)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Call:
    group: str
    resource: str  # with "/subresource" where there is one
    verb: str
    namespace: str | None
    name: str | None


@dataclass(frozen=True)
class Grant:
    namespace: str | None  # None: every namespace, and cluster-scoped objects
    group: str
    resource: str
    verb: str
    names: tuple[str, ...]  # empty: any name

    def allows(self, call: Call) -> bool:
        if self.namespace is not None and call.namespace != self.namespace:
            return False
        if (self.group, self.resource, self.verb) != (call.group, call.resource, call.verb):
            return False
        return not self.names or call.name in self.names


def grants(docs: list[dict[str, Any]], account: str, account_namespace: str) -> list[Grant]:
    roles = {
        (doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"]): doc["rules"]
        for doc in docs
        if doc["kind"] in ("Role", "ClusterRole")
    }
    found = []
    for doc in docs:
        if doc["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        subject = {"kind": "ServiceAccount", "name": account, "namespace": account_namespace}
        if subject not in doc["subjects"]:
            continue
        where = doc["metadata"].get("namespace") if doc["kind"] == "RoleBinding" else None
        ref = doc["roleRef"]
        role_namespace = where if ref["kind"] == "Role" else None
        for rule in roles[ref["kind"], role_namespace, ref["name"]]:
            found += [
                Grant(where, group, resource, verb, tuple(rule.get("resourceNames", [])))
                for group in rule["apiGroups"]
                for resource in rule["resources"]
                for verb in rule["verbs"]
            ]
    return found
