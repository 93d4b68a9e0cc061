"""The trainer Job: its pod (container, environment, resources, security) and failure policy (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubetune import api, contract

from .admission import OperatorConfig
from .meta import ANNOTATION_JOB, LABEL_KUEUE_QUEUE, Names, Owner, labels, metadata

# Without spec.resources: a Burstable pod (never BestEffort, the first evicted) and a bounded
# scratch disk (a full node disk evicts every pod on the node, not only this one).
DEFAULT_CPU_REQUEST = "1"
DEFAULT_MEMORY_REQUEST = "4Gi"
DEFAULT_SCRATCH_LIMIT = "100Gi"
DEFAULT_SCRATCH_REQUEST = "10Gi"

# Set on a Kueue-managed Job the operator suspended for spec.suspend, so that resuming
# gives it back to Kueue instead of unsuspending a Job Kueue has not admitted.
ANNOTATION_SUSPENDED_BY_SPEC = "kubetune.io/suspended-by-spec"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
# Multus reads a pod's secondary networks from this annotation (spec.resources.network.networks).
NETWORKS_ANNOTATION = "k8s.v1.cni.cncf.io/networks"
# On pods whose processes talk through NCCL (several GPUs in all), unless spec.resources.network
# sets NCCL_DEBUG: every rank logs, when a communicator is set up, the transport NCCL chose
# ("Using network IB" or "Using network Socket"; "NET/IB : Using [0]mlx5_0:1/IB ..." or
# "NET/Socket : Using [0]eth0..."; "Channel 00/0 : 0[0] -> 8[0] [send] via NET/IB/0/GDRDMA", or
# "via P2P/..." and "via SHM/..." inside a pod). The INIT and NET subsystems log nothing per step.
NCCL_DEBUG_DEFAULTS = {"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,NET"}


def _nccl_env(spec: api.FineTuneJobSpec) -> list[dict[str, Any]]:
    """NCCL's environment: the user's NCCL_* variables, and the debug defaults where NCCL runs."""
    network = spec.resources.network
    user = dict(sorted(network.nccl_env.items())) if network else {}
    resources = spec.resources
    several_gpus = resources.gpus > 0 and resources.gpus * resources.nodes > 1
    defaults = NCCL_DEBUG_DEFAULTS if several_gpus and "NCCL_DEBUG" not in user else {}
    return [{"name": name, "value": value} for name, value in {**defaults, **user}.items()]


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
    return env + _nccl_env(spec)


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
    if spec.resources.network:
        # RDMA devices and the like; the operator's admission refuses the GPU resource here.
        for name, count in sorted(spec.resources.network.extended_resources.items()):
            limits[name] = str(count)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _capabilities(spec: api.FineTuneJobSpec) -> dict[str, Any]:
    """Every capability dropped, but those spec.resources.network adds (IPC_LOCK for RDMA)."""
    added = list(spec.resources.network.capabilities) if spec.resources.network else []
    return {"add": added, "drop": ["ALL"]} if added else {"drop": ["ALL"]}


def trainer_container(
    spec: api.FineTuneJobSpec, owner: Owner, names: Names, config: OperatorConfig, grace: int
) -> dict[str, Any]:
    """The trainer container: image, command, environment, resources, mounts, restricted security."""
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
            "capabilities": _capabilities(spec),
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
    return container


def trainer_pod_template(
    spec: api.FineTuneJobSpec, owner: Owner, names: Names, config: OperatorConfig
) -> dict[str, Any]:
    """The trainer pod template: the container, its volumes, pod security and scheduling."""
    grace = spec.termination_grace_period_seconds or config.termination_grace_seconds
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
        "containers": [trainer_container(spec, owner, names, config, grace)],
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
    annotations = {ANNOTATION_JOB: owner.name}
    if spec.resources.network and spec.resources.network.networks:
        annotations[NETWORKS_ANNOTATION] = ",".join(spec.resources.network.networks)
    return {
        "metadata": {"labels": labels(owner), "annotations": annotations},
        "spec": pod_spec,
    }


def _pod_failure_policy() -> dict[str, Any]:
    """Which pod failures spend a retry, which fail the Job at once, which are ignored."""
    return {
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
    }


def trainer_job(
    spec: api.FineTuneJobSpec, owner: Owner, names: Names, config: OperatorConfig
) -> dict[str, Any]:
    """The trainer Job: one pod a node (Indexed for several), retries, failure policy, Kueue queue."""
    queue = spec.scheduling.queue_name
    job_spec: dict[str, Any] = {
        "backoffLimit": spec.backoff_limit,
        # Kueue admits Jobs that are created suspended; it unsuspends them itself.
        "suspend": spec.suspend or bool(queue),
        "completions": spec.resources.nodes,
        "parallelism": spec.resources.nodes,
        # A replacement pod starts only once the old one is gone: never two trainers at once.
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": _pod_failure_policy(),
        "template": trainer_pod_template(spec, owner, names, config),
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
        "metadata": metadata(names.job, owner, extra_labels={LABEL_KUEUE_QUEUE: queue} if queue else None),
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
