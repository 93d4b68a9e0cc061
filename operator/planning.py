"""Planning: the objects one FineTuneJob needs, computed from the job alone.

Everything here is pure: no I/O, no clock. Given the same FineTuneJob and configuration,
``plan`` returns the same objects with the same names, which is what makes the operator
safe to rerun after a crash at any point: what already exists is found by name.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.metadata
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from kubetune import api, contract

DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
# Without spec.resources: a Burstable pod (never BestEffort, the first evicted) and a bounded
# scratch disk (a full node disk evicts every pod on the node, not only this one).
DEFAULT_CPU_REQUEST = "1"
DEFAULT_MEMORY_REQUEST = "4Gi"
DEFAULT_SCRATCH_LIMIT = "100Gi"
DEFAULT_SCRATCH_REQUEST = "10Gi"

MANAGER = "kubetune-operator"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_JOB = "kubetune.io/job-name"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
ANNOTATION_JOB = "kubetune.io/finetunejob"
ANNOTATION_GENERATION = "kubetune.io/generation"
# Set on a Kueue-managed Job the operator suspended for spec.suspend, so that resuming
# gives it back to Kueue instead of unsuspending a Job Kueue has not admitted.
ANNOTATION_SUSPENDED_BY_SPEC = "kubetune.io/suspended-by-spec"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"

DNS_LABEL_MAX = 63
# Indexed Job pods get the hostname `<job>-<index>`, which must stay a DNS label too.
JOB_NAME_MAX = 52

_NOT_DNS = re.compile(r"[^a-z0-9-]+")


def _version() -> str:
    try:
        return importlib.metadata.version("kubetune")
    except importlib.metadata.PackageNotFoundError:
        return "latest"


DEFAULT_TRAINER_IMAGE = f"ghcr.io/kubetune/trainer:{_version()}"


@dataclass(frozen=True)
class OperatorConfig:
    """What the operator adds to every plan; set from the command line or the chart."""

    trainer_image: str = DEFAULT_TRAINER_IMAGE
    gpu_resource: str = DEFAULT_GPU_RESOURCE
    image_pull_policy: str = "IfNotPresent"
    termination_grace_seconds: int = 120
    # spec.image must match one of these shell patterns (fnmatch); empty: the trainer image's
    # repository, any tag or digest. "*" allows every image.
    allowed_images: tuple[str, ...] = ()
    # Namespaces whose FineTuneJobs may name spec.credentials Secrets (injected as env);
    # "*" is every namespace. Empty: none may.
    secrets_namespaces: tuple[str, ...] = ()

    def image_patterns(self) -> tuple[str, ...]:
        if self.allowed_images:
            return self.allowed_images
        repository = _repository(self.trainer_image)
        return (self.trainer_image, f"{repository}:*", f"{repository}@*")


def _repository(image: str) -> str:
    """The image reference without its tag or digest (pure)."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def image_allowed(image: str, config: OperatorConfig) -> bool:
    return any(fnmatch.fnmatchcase(image, pattern) for pattern in config.image_patterns())


def admission(job: api.FineTuneJob, config: OperatorConfig) -> tuple[str, str] | None:
    """Why the operator refuses to run ``job`` (a reason and a message), or None (pure).

    Anyone who may create a FineTuneJob would otherwise run any image, with any Secret of the
    namespace in its environment: the operator's configuration decides both.
    """
    spec = job.spec
    if spec.image is not None and not image_allowed(spec.image, config):
        allowed = ", ".join(config.image_patterns())
        return (
            "ImageNotAllowed",
            f"spec.image {spec.image} is not allowed by the operator (allowed: {allowed}); "
            "ask the cluster admin to add it to the chart's trainer.allowedImages",
        )
    secrets = [s for s in (spec.credentials.storage_secret, spec.credentials.hugging_face_secret) if s]
    allowed_ns = config.secrets_namespaces
    if secrets and "*" not in allowed_ns and job.metadata.namespace not in allowed_ns:
        return (
            "CredentialsNotAllowed",
            f"spec.credentials names Secret(s) {', '.join(secrets)}, but the operator injects Secrets "
            f"only for namespaces it is configured for (chart value trainer.secretsNamespaces); "
            f"{job.metadata.namespace} is not one of them. Use workload identity (IRSA, GKE "
            "Workload Identity) or ask the cluster admin to allow this namespace",
        )
    return None


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


def labels(owner: Owner) -> dict[str, str]:
    return {
        LABEL_NAME: "kubetune",
        LABEL_COMPONENT: "trainer",
        LABEL_MANAGED_BY: MANAGER,
        LABEL_JOB: label_value(owner.name),
    }


def _metadata(name: str, owner: Owner, *, extra_labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": {**labels(owner), **(extra_labels or {})},
        "annotations": {ANNOTATION_JOB: owner.name, ANNOTATION_GENERATION: str(owner.generation)},
        "ownerReferences": [owner.reference()],
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


def plan(job: api.FineTuneJob, config: OperatorConfig | None = None, *, attempt: int = 1) -> Plan:
    """Every object the FineTuneJob needs. ``job`` carries metadata uid, namespace and generation."""
    config = config or OperatorConfig()
    owner = Owner.of(job)
    names = Names.of(owner.name, attempt)
    spec = job.spec
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(names.config_map, owner),
        "immutable": True,
        "data": {contract.CONFIG_FILE: yaml.safe_dump(resolved_job(job, owner), sort_keys=False)},
    }
    service_account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(names.service_account, owner),
    }
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(names.role, owner),
        "rules": trainer_rules(owner.name),
    }
    role_binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(names.role_binding, owner),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": names.role},
        "subjects": [{"kind": "ServiceAccount", "name": names.service_account, "namespace": owner.namespace}],
    }
    service = None
    if spec.resources.nodes > 1:
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _metadata(names.service, owner),
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": True,
                "selector": {LABEL_JOB: label_value(owner.name), LABEL_MANAGED_BY: MANAGER},
                "ports": [
                    {"name": "rendezvous", "port": contract.MASTER_PORT, "targetPort": contract.MASTER_PORT}
                ],
            },
        }
    return Plan(
        names=names,
        config_map=config_map,
        service_account=service_account,
        role=role,
        role_binding=role_binding,
        service=service,
        job=_job(spec, owner, names, config),
    )


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


def _env(spec: api.FineTuneJobSpec, owner: Owner, names: Names, grace: int) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": contract.JOB_NAMESPACE_ENV, "value": owner.namespace},
        {"name": contract.GRACE_ENV, "value": str(grace)},
        {"name": contract.JOB_NAME_ENV, "value": owner.name},
        {"name": "HOME", "value": contract.SCRATCH_DIR},
        {"name": "XDG_CACHE_HOME", "value": contract.SCRATCH_DIR},
        {"name": "HF_HOME", "value": f"{contract.SCRATCH_DIR}/huggingface"},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
        {"name": "MPLCONFIGDIR", "value": f"{contract.SCRATCH_DIR}/matplotlib"},
        {"name": "TMPDIR", "value": contract.TMP_DIR},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if spec.storage.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": spec.storage.endpoint})
    if spec.storage.region:
        env += [
            {"name": "AWS_REGION", "value": spec.storage.region},
            {"name": "AWS_DEFAULT_REGION", "value": spec.storage.region},
        ]
    if spec.resources.nodes > 1:
        env += [
            {"name": contract.NUM_NODES_ENV, "value": str(spec.resources.nodes)},
            {
                "name": contract.NODE_RANK_ENV,
                "valueFrom": {
                    "fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}
                },
            },
            {"name": contract.MASTER_ADDR_ENV, "value": f"{names.job}-0.{names.service}"},
            {"name": contract.MASTER_PORT_ENV, "value": str(contract.MASTER_PORT)},
        ]
    return env


def _resources(spec: api.FineTuneJobSpec, config: OperatorConfig) -> dict[str, Any]:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    for key, value, default in (
        ("cpu", spec.resources.cpu, DEFAULT_CPU_REQUEST),
        ("memory", spec.resources.memory, DEFAULT_MEMORY_REQUEST),
    ):
        if value:
            requests[key] = limits[key] = value
        else:
            requests[key] = default
    # The scratch volume's sizeLimit bounds what is written; the request reserves it on the node.
    requests["ephemeral-storage"] = spec.resources.scratch or DEFAULT_SCRATCH_REQUEST
    if spec.resources.gpus:
        # Extended resources are never overcommitted: the limit alone sets the request too.
        limits[config.gpu_resource] = str(spec.resources.gpus)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _job(spec: api.FineTuneJobSpec, owner: Owner, names: Names, config: OperatorConfig) -> dict[str, Any]:
    queue = spec.scheduling.queue_name
    pod_labels = labels(owner)
    grace = spec.termination_grace_period_seconds or config.termination_grace_seconds
    container: dict[str, Any] = {
        "name": contract.TRAINER_CONTAINER,
        "image": spec.image or config.trainer_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": [*contract.TRAINER_COMMAND, "--config", contract.CONFIG_PATH],
        "env": _env(spec, owner, names, grace),
        "resources": _resources(spec, config),
        "volumeMounts": [
            {"name": "config", "mountPath": contract.CONFIG_DIR, "readOnly": True},
            {"name": "scratch", "mountPath": contract.SCRATCH_DIR},
            {"name": "tmp", "mountPath": contract.TMP_DIR},
            {"name": "dshm", "mountPath": contract.SHM_DIR},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": contract.TRAINER_UID,
            "runAsGroup": contract.TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "ports": [{"name": "metrics", "containerPort": contract.METRICS_PORT}],
    }
    env_from = [
        {"secretRef": {"name": secret}}
        for secret in (spec.credentials.storage_secret, spec.credentials.hugging_face_secret)
        if secret
    ]
    if env_from:
        container["envFrom"] = env_from
    if spec.resources.nodes > 1:
        container["ports"].append({"name": "rendezvous", "containerPort": contract.MASTER_PORT})

    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": names.service_account,
        "automountServiceAccountToken": True,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": grace,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": contract.TRAINER_UID,
            "runAsGroup": contract.TRAINER_UID,
            "fsGroup": contract.TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": names.config_map}},
            {"name": "scratch", "emptyDir": {"sizeLimit": spec.resources.scratch or DEFAULT_SCRATCH_LIMIT}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    scheduling = spec.scheduling
    if scheduling.node_selector:
        pod_spec["nodeSelector"] = dict(scheduling.node_selector)
    if scheduling.tolerations:
        pod_spec["tolerations"] = [t.to_wire() for t in scheduling.tolerations]
    if scheduling.affinity:
        pod_spec["affinity"] = scheduling.affinity
    if scheduling.priority_class_name:
        pod_spec["priorityClassName"] = scheduling.priority_class_name
    if spec.resources.nodes > 1:
        pod_spec["subdomain"] = names.service

    job_spec: dict[str, Any] = {
        "backoffLimit": spec.backoff_limit,
        # Kueue admits Jobs that are created suspended; it unsuspends them itself.
        "suspend": spec.suspend or bool(queue),
        "completions": spec.resources.nodes,
        "parallelism": spec.resources.nodes,
        # A replacement pod starts only once the old one is gone: never two trainers at once.
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": {
            "rules": [
                # Preemption, node drain, eviction: not the trainer's fault, not a retry spent.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                # The trainer found its configuration unusable, or its result failed the
                # regression gate after publishing: retrying cannot help.
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": contract.TRAINER_CONTAINER,
                        "operator": "In",
                        "values": [contract.CONFIG_ERROR_EXIT_CODE, contract.REGRESSED_EXIT_CODE],
                    },
                },
                # Another node of the job went away: not this pod's fault either. The operator
                # bounds these retries with spec.disruptionLimit.
                {
                    "action": "Ignore",
                    "onExitCodes": {
                        "containerName": contract.TRAINER_CONTAINER,
                        "operator": "In",
                        "values": [contract.PEER_LOST_EXIT_CODE],
                    },
                },
            ]
        },
        "template": {
            "metadata": {
                "labels": pod_labels,
                "annotations": {ANNOTATION_JOB: owner.name},
            },
            "spec": pod_spec,
        },
    }
    if spec.resources.nodes > 1:
        job_spec["completionMode"] = "Indexed"
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(names.job, owner, extra_labels={LABEL_KUEUE_QUEUE: queue} if queue else None),
        "spec": job_spec,
    }


def suspend_patch(spec: api.FineTuneJobSpec, job: Mapping[str, Any]) -> dict[str, Any] | None:
    """The merge patch that makes the observed Job's suspend follow ``spec.suspend``, or None.

    A Job in a Kueue queue is left to Kueue unless the operator itself suspended it.
    """
    suspended = bool((job.get("spec") or {}).get("suspend"))
    annotations = (job.get("metadata") or {}).get("annotations") or {}
    ours = annotations.get(ANNOTATION_SUSPENDED_BY_SPEC) == "true"
    if spec.scheduling.queue_name:
        if spec.suspend and not ours:
            return {
                "metadata": {"annotations": {ANNOTATION_SUSPENDED_BY_SPEC: "true"}},
                "spec": {"suspend": True},
            }
        if not spec.suspend and ours:
            return {
                "metadata": {"annotations": {ANNOTATION_SUSPENDED_BY_SPEC: None}},
                "spec": {"suspend": False},
            }
        return None
    if suspended != spec.suspend:
        return {"spec": {"suspend": spec.suspend}}
    return None


def spec_drift(config_map: Mapping[str, Any], job: api.FineTuneJob) -> list[str]:
    """Top-level spec fields that differ from what the trainer was started with (suspend aside)."""
    data = (config_map.get("data") or {}).get(contract.CONFIG_FILE)
    if not data:
        return []
    ran = (yaml.safe_load(data) or {}).get("spec") or {}
    now = job.spec.to_wire()
    fields = (set(ran) | set(now)) - api.MUTABLE_WHEN_STARTED
    return sorted(f for f in fields if ran.get(f) != now.get(f))


def parse(body: Mapping[str, Any]) -> api.FineTuneJob:
    """The FineTuneJob model of an API object; status is the operator's and trainer's, not read here."""
    metadata = body.get("metadata") or {}
    kept = {
        k: metadata[k]
        for k in ("name", "namespace", "uid", "generation", "labels", "annotations")
        if k in metadata
    }
    return api.FineTuneJob.model_validate({"metadata": kept, "spec": body.get("spec") or {}})
