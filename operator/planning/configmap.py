"""The per-attempt ConfigMap: the resolved FineTuneJob the trainer reads (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from kubetune import api, contract

from .meta import Names, Owner, metadata


def config_map(job: api.FineTuneJob, owner: Owner, names: Names) -> dict[str, Any]:
    """Immutable: a changed spec needs a new attempt, and so a new ConfigMap."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(names.config_map, owner),
        "immutable": True,
        "data": {contract.CONFIG_FILE: yaml.safe_dump(resolved_job(job, owner), sort_keys=False)},
    }


def resolved_job(job: api.FineTuneJob, owner: Owner) -> dict[str, Any]:
    """The FineTuneJob as the trainer reads it: every default applied, no status."""
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {
            "name": owner.name,
            "namespace": owner.namespace,
            "uid": owner.uid,
            "generation": owner.generation,
        },
        "spec": job.spec.to_wire(),
    }


def spec_drift(config_map: Mapping[str, Any], job: api.FineTuneJob) -> list[str]:
    """Top-level spec fields that differ from what the trainer was started with (suspend aside)."""
    data = (config_map.get("data") or {}).get(contract.CONFIG_FILE)
    if not data:
        return []
    ran = (yaml.safe_load(data) or {}).get("spec") or {}
    now = job.spec.to_wire()
    fields = (set(ran) | set(now)) - api.MUTABLE_WHEN_STARTED
    return sorted(f for f in fields if ran.get(f) != now.get(f))
