"""The headless Service of a multi-node job: pod DNS names and the rendezvous port (pure)."""

from __future__ import annotations

from typing import Any

from kubetune import contract

from .meta import LABEL_JOB, LABEL_MANAGED_BY, MANAGER, Names, Owner, label_value, metadata


def headless_service(owner: Owner, names: Names) -> dict[str, Any]:
    """Node rank 0 is reached at ``<job>-0.<service>``; addresses are published before readiness."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(names.service, owner),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB: label_value(owner.name), LABEL_MANAGED_BY: MANAGER},
            "ports": [
                {"name": "rendezvous", "port": contract.MASTER_PORT, "targetPort": contract.MASTER_PORT}
            ],
        },
    }
