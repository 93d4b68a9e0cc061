"""The trainer Job and its pods, read: the container's state, disruptions, failures, counts (pure).

What Kubernetes says about the workload, in the terms ``observe`` decides the phase with:
``snapshot`` reads the Job and its pods once into a ``Snapshot``; the functions below it are
the readings it is made of.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from kubetune.contract import PEER_LOST_EXIT_CODE, TRAINER_CONTAINER

from .planning import COMPLETION_INDEX_ANNOTATION

JOB_TRACKING_FINALIZER = "batch.kubernetes.io/job-tracking"


class JobCondition(StrEnum):
    """The condition types of a batch/v1 Job that the operator reads."""

    COMPLETE = "Complete"
    SUCCESS_CRITERIA_MET = "SuccessCriteriaMet"
    FAILED = "Failed"
    FAILURE_TARGET = "FailureTarget"
    SUSPENDED = "Suspended"


# The Job conditions that say it ended, each pair in the order the first one found counts.
SUCCEEDED_CONDITIONS = (JobCondition.COMPLETE, JobCondition.SUCCESS_CRITERIA_MET)
FAILED_CONDITIONS = (JobCondition.FAILED, JobCondition.FAILURE_TARGET)

# Waiting reasons of the trainer container that need a person, not time.
STUCK_WAITING = frozenset(
    {
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
    }
)


@dataclass(frozen=True)
class Snapshot:
    """The trainer Job and its pods, read once: every fact the phase and status are decided from."""

    created_at: str | None  # the Job's creationTimestamp
    ended_at: str | None  # the Job's completionTime, else when a condition said it ended
    true_conditions: Mapping[str, Mapping[str, Any]]  # the Job's True conditions by type
    suspended: bool  # spec.suspend, or the Job says it is Suspended
    running: bool  # a live pod runs (or, no pod listed yet, the Job counts one ready)
    crash_loop: Mapping[str, Any] | None  # a running trainer container waiting in CrashLoopBackOff
    # The newest live pending pod that is held back: its container's waiting state when that
    # needs a person (STUCK_WAITING), else its Unschedulable condition.
    stuck_waiting: Mapping[str, Any] | None
    unschedulable: Mapping[str, Any] | None
    settling: bool  # a pod ended that the Job controller has not counted yet
    failed: int  # failed pods the Job counts
    attempts: int  # trainer attempts started, per node
    disruptions: int  # attempts lost to disruptions (see ``disruptions``)
    last_disruption: str  # how the newest disrupted pod was disrupted
    last_failure: str  # how the newest failed pod failed
    last_failed_exit: Mapping[str, Any]  # the newest failed pod's terminated trainer state

    @property
    def succeeded(self) -> bool:
        return any(kind in self.true_conditions for kind in SUCCEEDED_CONDITIONS)

    @property
    def failure(self) -> Mapping[str, Any] | None:
        """The Job condition that says it failed, or None."""
        return next((self.true_conditions[k] for k in FAILED_CONDITIONS if k in self.true_conditions), None)


def snapshot(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]], *, nodes: int) -> Snapshot:
    """Reads the Job and its pods (of a job that runs on ``nodes`` nodes) once."""
    pods = sorted(pods, key=created)
    failed_pods = [p for p in pods if pod_phase(p) == "Failed"]
    last_failed = failed_pods[-1] if failed_pods else None
    last_disrupted = next((p for p in reversed(pods) if disrupted(p)), None)
    true_by_type = true_conditions(job)
    live = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    running = [p for p in live if pod_phase(p) == "Running"]
    pending = [p for p in live if pod_phase(p) == "Pending"]
    stuck_waiting, held = _held_back(pending)
    return Snapshot(
        created_at=(job.get("metadata") or {}).get("creationTimestamp"),
        ended_at=completion_time(job),
        true_conditions=true_by_type,
        suspended=bool((job.get("spec") or {}).get("suspend")) or JobCondition.SUSPENDED in true_by_type,
        running=bool(running) or (not pods and bool((job.get("status") or {}).get("ready"))),
        crash_loop=next((w for p in running if (w := waiting(p)).get("reason") == "CrashLoopBackOff"), None),
        stuck_waiting=stuck_waiting,
        unschedulable=held,
        settling=settling(job, pods),
        failed=count(job, "failed"),
        attempts=attempts(job, nodes),
        disruptions=disruptions(pods),
        last_disruption=disruption(last_disrupted) if last_disrupted is not None else "disrupted",
        last_failure=failure(last_failed) if last_failed else "failed",
        last_failed_exit=terminated(last_failed) if last_failed else {},
    )


def _held_back(
    pending: Sequence[Mapping[str, Any]],
) -> tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]:
    """The newest pending pod held back: its stuck waiting state, or its Unschedulable condition."""
    for pod in reversed(pending):
        state = waiting(pod)
        if state.get("reason") in STUCK_WAITING:
            return state, None
        condition = unschedulable(pod)
        if condition:
            return None, condition
    return None, None


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


def attempts(job: Mapping[str, Any], nodes: int) -> int:
    """Trainer attempts started: pods created, counted per node for multi-node jobs."""
    pods = count(job, "failed") + count(job, "succeeded") + int((job.get("status") or {}).get("active") or 0)
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


def completion_time(job: Mapping[str, Any]) -> str | None:
    """When the Job ended: its completionTime, else when a condition said so; None while it runs."""
    status = job.get("status") or {}
    if status.get("completionTime"):
        return str(status["completionTime"])
    for condition in status.get("conditions") or []:
        if condition.get("type") in (*SUCCEEDED_CONDITIONS, *FAILED_CONDITIONS) and (
            condition.get("status") == "True" and condition.get("lastTransitionTime")
        ):
            return str(condition["lastTransitionTime"])
    return None


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
