"""The trainer Job and its pods, read: the container's state, disruptions, failures, counts (pure).

What Kubernetes says about the workload, in the terms ``observe`` decides the phase with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kubetune import api
from kubetune.contract import PEER_LOST_EXIT_CODE, TRAINER_CONTAINER

from .planning import COMPLETION_INDEX_ANNOTATION

JOB_TRACKING_FINALIZER = "batch.kubernetes.io/job-tracking"


def true_conditions(job: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    conditions = ((job.get("status") or {}).get("conditions")) or []
    return {c["type"]: c for c in conditions if c.get("status") == "True" and "type" in c}


def trainer_status(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == TRAINER_CONTAINER:
            return status  # type: ignore[no-any-return]
    return {}


def terminated(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    status = trainer_status(pod)
    return (
        (status.get("state") or {}).get("terminated")
        or (status.get("lastState") or {}).get("terminated")
        or {}
    )


def waiting(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    return (trainer_status(pod).get("state") or {}).get("waiting") or {}


def unschedulable(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if (
            condition.get("type") == "PodScheduled"
            and condition.get("status") == "False"
            and condition.get("reason") == "Unschedulable"
        ):
            return condition  # type: ignore[no-any-return]
    return None


def disrupted(pod: Mapping[str, Any]) -> bool:
    """Ended (or ending) by preemption, eviction or a lost peer: what the Job does not count."""
    if any(
        c.get("type") == "DisruptionTarget" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    ):
        return pod_phase(pod) == "Failed" or bool((pod.get("metadata") or {}).get("deletionTimestamp"))
    return pod_phase(pod) == "Failed" and terminated(pod).get("exitCode") == PEER_LOST_EXIT_CODE


def disruptions(pods: Sequence[Mapping[str, Any]]) -> int:
    """Attempts lost to disruptions: the most disrupted pods of any one node (completion index).

    One preempted node of a multi-node job ends its own pod (DisruptionTarget) and every peer's
    (peer lost): that is one disruption on each index, not one per pod.
    """
    per_index: dict[str, int] = {}
    for pod in pods:
        if disrupted(pod):
            index = ((pod.get("metadata") or {}).get("annotations") or {}).get(
                COMPLETION_INDEX_ANNOTATION, "0"
            )
            per_index[index] = per_index.get(index, 0) + 1
    return max(per_index.values(), default=0)


def created(pod: Mapping[str, Any]) -> str:
    return str((pod.get("metadata") or {}).get("creationTimestamp") or "")


def pod_phase(pod: Mapping[str, Any]) -> str:
    return str((pod.get("status") or {}).get("phase") or "Pending")


def disruption(pod: Mapping[str, Any]) -> str:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "DisruptionTarget" and c.get("status") == "True":
            detail = str(c.get("message") or "").strip()
            return f"was disrupted ({c.get('reason') or 'DisruptionTarget'})" + (
                f": {detail}" if detail else ""
            )
    return f"lost a peer node (exit code {PEER_LOST_EXIT_CODE})"


def failure(pod: Mapping[str, Any]) -> str:
    """Why a trainer pod failed, in a few words and its termination message."""
    ended = terminated(pod)
    if ended.get("reason") == "OOMKilled":
        what = "was killed for running out of memory (OOMKilled)"
    elif "exitCode" in ended:
        what = f"exited with code {ended['exitCode']}"
    else:
        reason = (pod.get("status") or {}).get("reason") or "unknown reason"
        what = f"failed ({reason})"
    detail = str(ended.get("message") or (pod.get("status") or {}).get("message") or "").strip()
    return f"{what}: {detail}" if detail else what


def count(job: Mapping[str, Any], kind: str) -> int:
    """Pods the Job counts as ``kind`` (failed or succeeded), those not yet in the counter included."""
    status = job.get("status") or {}
    uncounted = (status.get("uncountedTerminatedPods") or {}).get(kind) or []
    return int(status.get(kind) or 0) + len(uncounted)


def attempts(job: Mapping[str, Any] | None, spec: api.FineTuneJobSpec) -> int | None:
    """Trainer attempts started: pods created, counted per node for multi-node jobs."""
    if job is None:
        return None
    pods = count(job, "failed") + count(job, "succeeded") + int((job.get("status") or {}).get("active") or 0)
    nodes = spec.resources.nodes
    return -(-pods // nodes)


def settling(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> bool:
    """A pod has ended but the Job controller has not yet counted it: the Job's state is stale."""
    uncounted = ((job.get("status") or {}).get("uncountedTerminatedPods")) or {}
    uncounted_uids = {uid for uids in uncounted.values() for uid in uids or []}
    for pod in pods:
        meta = pod.get("metadata") or {}
        if pod_phase(pod) in ("Succeeded", "Failed") and (
            JOB_TRACKING_FINALIZER in (meta.get("finalizers") or []) or meta.get("uid") in uncounted_uids
        ):
            return True
    return False


def completion_time(job: Mapping[str, Any] | None, now: str) -> str:
    if job is not None:
        status = job.get("status") or {}
        if status.get("completionTime"):
            return str(status["completionTime"])
        for condition in status.get("conditions") or []:
            if condition.get("type") in ("Complete", "Failed", "SuccessCriteriaMet", "FailureTarget") and (
                condition.get("status") == "True" and condition.get("lastTransitionTime")
            ):
                return str(condition["lastTransitionTime"])
    return now


def kueue_job_uid(workload: Mapping[str, Any]) -> str | None:
    """The uid of the Job a Kueue Workload stands for."""
    for ref in (workload.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == "Job" and ref.get("apiVersion") == "batch/v1" and ref.get("uid"):
            return str(ref["uid"])
    return None


def kueue_wait(workload: Mapping[str, Any]) -> str | None:
    """Kueue's reason for not admitting the Workload yet (``QuotaReserved`` False), or None."""
    conditions = {c.get("type"): c for c in (workload.get("status") or {}).get("conditions") or []}
    admitted = conditions.get("Admitted") or {}
    reserved = conditions.get("QuotaReserved") or {}
    if admitted.get("status") == "True" or reserved.get("status") != "False":
        return None
    return str(reserved.get("message") or reserved.get("reason") or "").strip() or None
