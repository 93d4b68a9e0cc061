"""The permissions the operator itself needs, as RBAC PolicyRules (for the chart's ClusterRole).

Watching all namespaces needs them in a ClusterRole bound with a ClusterRoleBinding; watching
some namespaces, a RoleBinding to the same ClusterRole in each is enough. The integration
tests run the operator with exactly these rules.
"""

from __future__ import annotations

from typing import Any

from kubetune import api

OPERATOR_RULES: list[dict[str, Any]] = [
    {
        # watch and reconcile; patch: kopf keeps handler progress in annotations
        "apiGroups": [api.GROUP],
        "resources": [api.PLURAL],
        "verbs": ["get", "list", "watch", "patch"],
    },
    {"apiGroups": [api.GROUP], "resources": [f"{api.PLURAL}/status"], "verbs": ["get", "patch"]},
    {
        # children carry blockOwnerDeletion, which the OwnerReferencesPermissionEnforcement
        # admission plugin allows only to who may update the owner's finalizers
        "apiGroups": [api.GROUP],
        "resources": [f"{api.PLURAL}/finalizers"],
        "verbs": ["update"],
    },
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "patch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {
        "apiGroups": [""],
        "resources": ["configmaps", "serviceaccounts", "services"],
        "verbs": ["get", "create"],
    },
    {
        # the trainer's Role grants a subset of the operator's own rights: no escalate/bind needed
        "apiGroups": ["rbac.authorization.k8s.io"],
        "resources": ["roles", "rolebindings"],
        "verbs": ["get", "create"],
    },
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    # Kueue's reason for holding a queued trainer Job back, for the FineTuneJob's status
    {"apiGroups": ["kueue.x-k8s.io"], "resources": ["workloads"], "verbs": ["get", "list", "watch"]},
]
