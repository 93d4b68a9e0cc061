"""Planning: the objects one FineTuneJob needs, computed from the job alone.

Everything here is pure: no I/O, no clock. Given the same FineTuneJob and configuration,
``plan`` returns the same objects with the same names, which is what makes the operator
safe to rerun after a crash at any point: what already exists is found by name.

One module a kind of child: ``configmap`` (the resolved spec), ``rbac`` (ServiceAccount, Role,
RoleBinding), ``service`` (the headless Service of a multi-node job), ``job`` (the trainer
Job); ``meta`` holds the names, labels and owner references they share, and ``admission``
the operator's configuration and the jobs it refuses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubetune import api

from .admission import (
    DEFAULT_GPU_RESOURCE,
    DEFAULT_TRAINER_IMAGE,
    OperatorConfig,
    _version,
    admission,
    image_allowed,
)
from .configmap import config_map, resolved_job, spec_drift
from .job import (
    ANNOTATION_SUSPENDED_BY_SPEC,
    COMPLETION_INDEX_ANNOTATION,
    NCCL_DEBUG_DEFAULTS,
    NETWORKS_ANNOTATION,
    suspend_patch,
    trainer_job,
)
from .meta import (
    ANNOTATION_GENERATION,
    ANNOTATION_JOB,
    JOB_NAME_MAX,
    LABEL_JOB,
    LABEL_KUEUE_QUEUE,
    LABEL_MANAGED_BY,
    MANAGER,
    Names,
    Owner,
    dns_label,
    label_value,
    labels,
)
from .rbac import role, role_binding, service_account, trainer_rules
from .service import headless_service

__all__ = [
    "ANNOTATION_GENERATION",
    "ANNOTATION_JOB",
    "ANNOTATION_SUSPENDED_BY_SPEC",
    "COMPLETION_INDEX_ANNOTATION",
    "DEFAULT_GPU_RESOURCE",
    "DEFAULT_TRAINER_IMAGE",
    "JOB_NAME_MAX",
    "LABEL_JOB",
    "LABEL_KUEUE_QUEUE",
    "LABEL_MANAGED_BY",
    "MANAGER",
    "NCCL_DEBUG_DEFAULTS",
    "NETWORKS_ANNOTATION",
    "Names",
    "OperatorConfig",
    "Owner",
    "Plan",
    "_version",
    "admission",
    "dns_label",
    "image_allowed",
    "label_value",
    "labels",
    "parse",
    "plan",
    "resolved_job",
    "spec_drift",
    "suspend_patch",
    "trainer_rules",
]


@dataclass(frozen=True)
class Plan:
    """The desired objects of one FineTuneJob, as plain dicts ready for the API server."""

    names: Names
    config_map: dict[str, Any]
    service_account: dict[str, Any]
    role: dict[str, Any]
    role_binding: dict[str, Any]
    service: dict[str, Any] | None
    job: dict[str, Any]

    def prerequisites(self) -> list[dict[str, Any]]:
        """What the Job needs, in creation order (the RoleBinding after its Role)."""
        objects = [self.config_map, self.service_account, self.role, self.role_binding]
        return objects + ([self.service] if self.service else [])

    def objects(self) -> list[dict[str, Any]]:
        return [*self.prerequisites(), self.job]


def plan(job: api.FineTuneJob, config: OperatorConfig | None = None, *, attempt: int = 1) -> Plan:
    """Every object the FineTuneJob needs. ``job`` carries metadata uid, namespace and generation."""
    config = config or OperatorConfig()
    owner = Owner.of(job)
    names = Names.of(owner.name, attempt)
    return Plan(
        names=names,
        config_map=config_map(job, owner, names),
        service_account=service_account(owner, names),
        role=role(owner, names),
        role_binding=role_binding(owner, names),
        service=headless_service(owner, names) if job.spec.resources.nodes > 1 else None,
        job=trainer_job(job.spec, owner, names, config),
    )


def parse(body: Mapping[str, Any]) -> api.FineTuneJob:
    """The FineTuneJob model of an API object; status is the operator's and trainer's, not read here."""
    metadata = body.get("metadata") or {}
    kept = {
        k: metadata[k]
        for k in ("name", "namespace", "uid", "generation", "labels", "annotations")
        if k in metadata
    }
    return api.FineTuneJob.model_validate({"metadata": kept, "spec": body.get("spec") or {}})
