"""The trainer's identity: a ServiceAccount, and a Role and RoleBinding for its one job (pure)."""

from __future__ import annotations

from typing import Any

from kubetune import api

from .meta import Names, Owner, metadata


def service_account(owner: Owner, names: Names) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(names.service_account, owner),
    }


def role(owner: Owner, names: Names) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": metadata(names.role, owner),
        "rules": trainer_rules(owner.name),
    }


def role_binding(owner: Owner, names: Names) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": metadata(names.role_binding, owner),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": names.role},
        "subjects": [{"kind": "ServiceAccount", "name": names.service_account, "namespace": owner.namespace}],
    }


def trainer_rules(name: str) -> list[dict[str, Any]]:
    """The trainer may read its own FineTuneJob and patch its status; nothing else."""
    return [
        {
            "apiGroups": [api.GROUP],
            "resources": [api.PLURAL],
            "resourceNames": [name],
            "verbs": ["get"],
        },
        {
            "apiGroups": [api.GROUP],
            "resources": [f"{api.PLURAL}/status"],
            "resourceNames": [name],
            "verbs": ["get", "patch"],
        },
    ]
