"""What every child of a FineTuneJob carries: its name, labels, annotations and owner (pure)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubetune import api

MANAGER = "kubetune-operator"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_JOB = "kubetune.io/job-name"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
ANNOTATION_JOB = "kubetune.io/finetunejob"
ANNOTATION_GENERATION = "kubetune.io/generation"

DNS_LABEL_MAX = 63
# Indexed Job pods get the hostname `<job>-<index>`, which must stay a DNS label too.
JOB_NAME_MAX = 52

_NOT_DNS = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True)
class Owner:
    """The identity of a FineTuneJob that its children point back to."""

    name: str
    namespace: str
    uid: str
    generation: int = 1

    @classmethod
    def of(cls, job: api.FineTuneJob) -> Owner:
        extra = job.metadata.model_extra or {}
        if not job.metadata.namespace or not extra.get("uid"):
            raise ValueError("a FineTuneJob read from the API server has metadata.namespace and uid")
        return cls(
            name=job.metadata.name,
            namespace=job.metadata.namespace,
            uid=str(extra["uid"]),
            generation=int(extra.get("generation") or 1),
        )

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def dns_label(name: str, suffix: str = "", limit: int = DNS_LABEL_MAX) -> str:
    """``name + suffix`` as a DNS-1123 label of at most ``limit`` characters.

    A name that is already valid and short enough is kept; any other is shortened and gets a
    hash of the full original name, so two different names never map to the same label.
    """
    if len(suffix) >= limit - 10:
        raise ValueError(f"suffix {suffix!r} leaves no room within {limit} characters")
    clean = _NOT_DNS.sub("-", name.lower()).strip("-")
    if clean == name and len(name) + len(suffix) <= limit:
        return name + suffix
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    keep = limit - len(suffix) - len(digest) - 1
    head = clean[:keep].rstrip("-")
    return f"{head}-{digest}{suffix}" if head else f"{digest}{suffix}"


def label_value(name: str) -> str:
    """A label value (at most 63 characters) that stands for ``name``."""
    return name if len(name) <= DNS_LABEL_MAX else dns_label(name)


@dataclass(frozen=True)
class Names:
    job: str
    config_map: str
    service_account: str
    role: str
    role_binding: str
    service: str

    @classmethod
    def of(cls, name: str, attempt: int = 1) -> Names:
        trainer = dns_label(name, "-trainer")
        return cls(
            job=dns_label(name, limit=JOB_NAME_MAX),
            config_map=dns_label(name, f"-config-{attempt}"),
            service_account=trainer,
            role=trainer,
            role_binding=trainer,
            service=dns_label(name, "-workers"),
        )


def labels(owner: Owner) -> dict[str, str]:
    return {
        LABEL_NAME: "kubetune",
        LABEL_COMPONENT: "trainer",
        LABEL_MANAGED_BY: MANAGER,
        LABEL_JOB: label_value(owner.name),
    }


def metadata(name: str, owner: Owner, *, extra_labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": {**labels(owner), **(extra_labels or {})},
        "annotations": {ANNOTATION_JOB: owner.name, ANNOTATION_GENERATION: str(owner.generation)},
        "ownerReferences": [owner.reference()],
    }
