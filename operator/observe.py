"""Observing: the FineTuneJob status that follows from its trainer Job and pods.

``observe`` is pure: it reads the Job, its pods and the current status and returns the
operator's part of the next status, the merge patch to get there and the events to post.
The trainer's part of the status (progress, results, artifacts) is never touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubetune import api
from kubetune.contract import CONFIG_ERROR_EXIT_CODE, REGRESSED_EXIT_CODE

from . import workload

PENDING, RUNNING, SUCCEEDED, FAILED, SUSPENDED = (p.value for p in api.Phase)
TERMINAL = frozenset({SUCCEEDED, FAILED})

# Condition types on a FineTuneJob.
CREATED = "Created"
RUNNING_CONDITION = "Running"
SUCCEEDED_CONDITION = "Succeeded"
FAILED_CONDITION = "Failed"
SUSPENDED_CONDITION = "Suspended"
MEMORY_PLAN_CONDITION = "MemoryPlan"  # the memory plan's verdict; informative, it never blocks
REGRESSED_CONDITION = "Regressed"  # the regression gate's verdict on the trainer's harness scores

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
# Reasons worth a Warning event of their own when they appear.
PROBLEMS = STUCK_WAITING | {"Unschedulable", "CrashLoopBackOff", "Retrying", "NameConflict"}

# The trainer's part of the status; the operator writes every other field of api.FineTuneJobStatus
# (stage only when the job ends: until then it is the trainer's).
TRAINER_FIELDS = frozenset({"progress", "results", "artifacts"})
OPERATOR_FIELDS = tuple(
    alias
    for name, info in api.FineTuneJobStatus.model_fields.items()
    if (alias := info.alias or name) not in TRAINER_FIELDS
)
MESSAGE_LIMIT = 1024


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Assessment:
    """What is going on, before it is written down as status."""

    phase: str
    reason: str
    message: str
    running: bool = False


@dataclass(frozen=True)
class StatusUpdate:
    """The operator's part of the next status, why, and the events it deserves.

    The fields set on ``status`` are the ones written; None there deletes the field.
    """

    status: api.FineTuneJobStatus
    reason: str
    events: list[Event] = field(default_factory=list)

    @property
    def phase(self) -> str:
        return str(self.status.phase)

    @property
    def message(self) -> str:
        return self.status.message or ""

    def fields(self) -> dict[str, Any]:
        """The written fields, as JSON."""
        return self.status.model_dump(by_alias=True, mode="json", exclude_unset=True)

    def patch(self, current: Mapping[str, Any]) -> dict[str, Any]:
        """A JSON merge patch of ``status`` with only what changed (None deletes a field)."""
        return {k: v for k, v in self.fields().items() if current.get(k) != v}


def timestamp(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    *,
    now: str,
    generation: int,
) -> list[dict[str, Any]]:
    """``conditions`` with one condition set; its lastTransitionTime moves only when status does."""
    value = "True" if status else "False"
    old = next((c for c in conditions if c.get("type") == type_), None)
    since = old["lastTransitionTime"] if old and old.get("status") == value else now
    new = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message[:MESSAGE_LIMIT],
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }
    out = [dict(c) for c in conditions if c.get("type") != type_]
    out.append(new)
    order = [CREATED, RUNNING_CONDITION, SUSPENDED_CONDITION, SUCCEEDED_CONDITION, FAILED_CONDITION]
    return sorted(out, key=lambda c: order.index(c["type"]) if c["type"] in order else len(order))


def assess(
    job: Mapping[str, Any] | None,
    pods: Sequence[Mapping[str, Any]],
    *,
    spec: api.FineTuneJobSpec,
    status: Mapping[str, Any],
    job_name: str,
    conflict: str | None = None,
    kueue_wait: str | None = None,
) -> Assessment:
    """The phase, a CamelCase reason and a message, from the Job and its pods (and Kueue's
    reason for holding the Job back, where a Kueue Workload gives one)."""
    if conflict:
        return Assessment(PENDING, "NameConflict", conflict)
    if job is None:
        if status.get("startTime"):
            if ((status.get("artifacts") or {}).get("manifest")) is not None:
                return Assessment(
                    SUCCEEDED,
                    "Completed",
                    f"the trainer Job {job_name} is gone; the trainer wrote its manifest",
                )
            return Assessment(
                FAILED, "JobDeleted", f"the trainer Job {job_name} was deleted before it finished"
            )
        return Assessment(PENDING, "Creating", f"creating the trainer Job {job_name}")

    pods = sorted(pods, key=workload.created)
    failed_pods = [p for p in pods if workload.pod_phase(p) == "Failed"]
    true = workload.true_conditions(job)
    job_status = job.get("status") or {}

    for kind in ("Complete", "SuccessCriteriaMet"):
        if kind in true:
            return Assessment(SUCCEEDED, "Completed", "the trainer finished")
    for kind in ("Failed", "FailureTarget"):
        if kind in true:
            return _failed(true[kind], failed_pods[-1] if failed_pods else None, spec, job_status)
    disrupted = workload.disruptions(pods)
    if disrupted > spec.disruption_limit:
        last = next((p for p in reversed(pods) if workload.disrupted(p)), None)
        why = workload.disruption(last) if last is not None else "disrupted"
        return Assessment(
            FAILED,
            "DisruptionLimitExceeded",
            f"the trainer was disrupted {disrupted} time(s), more than spec.disruptionLimit "
            f"({spec.disruption_limit}); the last time it {why}. Evictions for node pressure "
            "repeat: raise spec.resources (memory, scratch) or move the job to other nodes",
        )

    if (job.get("spec") or {}).get("suspend") or "Suspended" in true:
        if spec.suspend:
            return Assessment(SUSPENDED, "Suspended", "suspended (spec.suspend is true)")
        if spec.scheduling.queue_name:
            why = f": {kueue_wait}" if kueue_wait else ""
            return Assessment(
                PENDING, "Queued", f"waiting for admission to Kueue queue {spec.scheduling.queue_name}{why}"
            )
        return Assessment(PENDING, "Resuming", "resuming the trainer Job")

    live = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    running = [p for p in live if workload.pod_phase(p) == "Running"]
    if running or (not pods and job_status.get("ready")):
        crash = next(
            (w for p in running if (w := workload.waiting(p)).get("reason") == "CrashLoopBackOff"), None
        )
        if crash:
            return Assessment(
                RUNNING, "CrashLoopBackOff", str(crash.get("message") or "the trainer keeps crashing")
            )
        return Assessment(
            RUNNING, "PodRunning", f"the trainer is running (attempt {workload.attempts(job, spec) or 1})"
        )

    pending = [p for p in live if workload.pod_phase(p) == "Pending"]
    for pod in reversed(pending):
        waiting = workload.waiting(pod)
        if waiting.get("reason") in STUCK_WAITING:
            detail = str(waiting.get("message") or "").strip()
            reason = str(waiting["reason"])
            return Assessment(
                PENDING, reason, f"trainer container: {reason}" + (f": {detail}" if detail else "")
            )
        unschedulable = workload.unschedulable(pod)
        if unschedulable:
            detail = str(unschedulable.get("message") or "no node fits").strip()
            return Assessment(PENDING, "Unschedulable", f"the trainer pod cannot be scheduled: {detail}")
    if workload.settling(job, pods) and status.get("phase"):
        # Until the Job controller has counted an ended pod, keep what was last written.
        return _previous(status)
    used = workload.count(job, "failed")
    if used > 0:
        last = workload.failure(failed_pods[-1]) if failed_pods else "failed"
        return Assessment(
            PENDING,
            "Retrying",
            f"attempt {used} {last}; retrying ({used} of {spec.backoff_limit + 1} attempts used)",
        )
    return Assessment(PENDING, "PodPending", "waiting for the trainer pod to start")


def _previous(status: Mapping[str, Any]) -> Assessment:
    running = _condition(status.get("conditions") or [], RUNNING_CONDITION)
    return Assessment(
        str(status["phase"]),
        str(running.get("reason") or status["phase"]),
        str(status.get("message") or running.get("message") or ""),
    )


def _failed(
    condition: Mapping[str, Any],
    last_failed: Mapping[str, Any] | None,
    spec: api.FineTuneJobSpec,
    job_status: Mapping[str, Any],
) -> Assessment:
    reason = str(condition.get("reason") or "JobFailed")
    detail = str(condition.get("message") or "").strip()
    terminated = workload.terminated(last_failed) if last_failed else {}
    if reason == "PodFailurePolicy":
        if (
            terminated.get("exitCode") == CONFIG_ERROR_EXIT_CODE
            or f"exit code {CONFIG_ERROR_EXIT_CODE}" in detail
        ):
            why = str(terminated.get("message") or "").strip()
            message = f"the trainer rejected its configuration (exit code {CONFIG_ERROR_EXIT_CODE})"
            return Assessment(FAILED, "ConfigError", f"{message}: {why}" if why else message)
        if terminated.get("exitCode") == REGRESSED_EXIT_CODE or f"exit code {REGRESSED_EXIT_CODE}" in detail:
            message = (
                "the result regressed beyond spec.evaluation.regression.maxDrop; its artifacts are published"
            )
            return Assessment(FAILED, "Regressed", message)
        return Assessment(FAILED, reason, detail or "a pod failure policy rule failed the Job")
    if reason == "DeadlineExceeded":
        return Assessment(
            FAILED,
            reason,
            f"the trainer ran longer than activeDeadlineSeconds ({spec.active_deadline_seconds}s)",
        )
    if reason == "BackoffLimitExceeded":
        failed = workload.count({"status": job_status}, "failed")
        last = workload.failure(last_failed) if last_failed else "failed"
        head = (
            f"the trainer failed {failed} time(s) (backoffLimit {spec.backoff_limit}); "
            f"the last attempt {last}"
        )
        if terminated.get("reason") == "OOMKilled":
            return Assessment(
                FAILED, "OOMKilled", head + "; raise spec.resources.memory or lower the batch size"
            )
        return Assessment(FAILED, reason, head)
    return Assessment(FAILED, reason, detail or "the trainer Job failed")


def observe(
    job: Mapping[str, Any] | None,
    pods: Sequence[Mapping[str, Any]],
    *,
    spec: api.FineTuneJobSpec,
    status: Mapping[str, Any],
    generation: int,
    job_name: str,
    now: datetime,
    conflict: str | None = None,
    kueue_wait: str | None = None,
) -> StatusUpdate:
    """The operator's part of the next FineTuneJob status, and the events it deserves."""
    stamp = timestamp(now)
    found = assess(
        job, pods, spec=spec, status=status, job_name=job_name, conflict=conflict, kueue_wait=kueue_wait
    )
    conditions: list[dict[str, Any]] = [dict(c) for c in status.get("conditions") or []]

    def put(type_: str, value: bool, reason: str, message: str) -> None:
        nonlocal conditions
        conditions = set_condition(
            conditions, type_, value, reason, message, now=stamp, generation=generation
        )

    if conflict:
        put(CREATED, False, "NameConflict", conflict)
    elif job is not None:
        put(CREATED, True, "JobCreated", f"created the trainer Job {job_name}")
    put(
        RUNNING_CONDITION,
        found.phase == RUNNING and found.reason == "PodRunning",
        found.reason,
        found.message,
    )
    if found.phase == SUSPENDED:
        put(SUSPENDED_CONDITION, True, "Suspended", found.message)
    elif any(c.get("type") == SUSPENDED_CONDITION for c in conditions):
        put(SUSPENDED_CONDITION, False, "Resumed", "spec.suspend is false")
    verdict = memory_verdict(spec)
    if verdict is not None:
        put(MEMORY_PLAN_CONDITION, *verdict)
    gate = regression_verdict(status)
    if gate is not None:
        put(REGRESSED_CONDITION, *gate)
    if found.phase == SUCCEEDED:
        put(SUCCEEDED_CONDITION, True, found.reason, found.message)
    if found.phase == FAILED:
        put(FAILED_CONDITION, True, found.reason, found.message)

    start_time = status.get("startTime")
    if not start_time and job is not None:
        start_time = (job.get("metadata") or {}).get("creationTimestamp") or stamp
    attempts = workload.attempts(job, spec)
    return _update(
        status,
        found,
        conditions,
        generation=generation,
        attempts=status.get("attempts") if attempts is None else attempts,
        start_time=start_time,
        completion_time=workload.completion_time(job, stamp) if found.phase in TERMINAL else None,
        stage=(status.get("progress") or {}).get("stage") or status.get("stage"),
    )


def refused(
    status: Mapping[str, Any], *, reason: str, message: str, generation: int, now: datetime
) -> StatusUpdate:
    """Failed before anything was created (an invalid spec, a job the operator refuses to run)."""
    stamp = timestamp(now)
    conditions = set_condition(
        status.get("conditions") or [],
        FAILED_CONDITION,
        True,
        reason,
        message,
        now=stamp,
        generation=generation,
    )
    return _update(
        status,
        Assessment(FAILED, reason, message),
        conditions,
        generation=generation,
        attempts=status.get("attempts"),
        start_time=status.get("startTime"),
        completion_time=stamp,
        stage=None,
    )


def _update(
    before: Mapping[str, Any],
    found: Assessment,
    conditions: list[dict[str, Any]],
    *,
    generation: int,
    attempts: int | None,
    start_time: str | None,
    completion_time: str | None,
    stage: str | None,
) -> StatusUpdate:
    """The status update of an assessment; a terminal phase also settles the stage: the one a
    failure ended in, none on success."""
    message = found.message[:MESSAGE_LIMIT]
    written: dict[str, Any] = {
        "phase": found.phase,
        "conditions": conditions,
        "observed_generation": generation,
        "attempts": attempts,
        "start_time": start_time,
        "completion_time": completion_time,
        "message": message,
    }
    if found.phase in TERMINAL:
        written["stage"] = stage if found.phase == FAILED else None
    events = _events(before, found.phase, found.reason, message, conditions)
    return StatusUpdate(api.FineTuneJobStatus.model_validate(written), found.reason, events)


def memory_verdict(spec: api.FineTuneJobSpec) -> tuple[bool, str, str] | None:
    """The MemoryPlan condition: fits or not, with the figures; None for a model it cannot size
    (no network here: a model outside the built-in table and without a local config.json)."""
    from kubetune import memory

    try:
        plan = memory.plan_job(spec)
    except ValueError:
        return None
    return plan.fits, "Fits" if plan.fits else "DoesNotFit", plan.verdict()


def regression_verdict(status: Mapping[str, Any]) -> tuple[bool, str, str] | None:
    """The Regressed condition from the harness scores the trainer judged; None before it has."""
    drops = (status.get("results") or {}).get("regressions")
    if drops is None:
        return None
    if not drops:
        return False, "WithinMaxDrop", "no harness score dropped beyond spec.evaluation.regression.maxDrop"
    summary = "; ".join(api.ScoreDrop.model_validate(d).summary() for d in drops)
    return True, "ScoresDropped", summary


def _condition(conditions: Sequence[Mapping[str, Any]], type_: str) -> Mapping[str, Any]:
    return next((c for c in conditions if c.get("type") == type_), {})


def _events(
    before: Mapping[str, Any], phase: str, reason: str, message: str, conditions: Sequence[Mapping[str, Any]]
) -> list[Event]:
    events = []
    was = before.get("conditions") or []
    if before.get("phase") != phase:
        events.append(Event("Warning" if phase == FAILED else "Normal", phase, message))
    if reason in PROBLEMS and _condition(was, RUNNING_CONDITION).get("reason") != reason:
        events.append(Event("Warning", reason, message))
    plan = _condition(conditions, MEMORY_PLAN_CONDITION)
    if plan.get("status") == "False" and _condition(was, MEMORY_PLAN_CONDITION).get("status") != "False":
        events.append(Event("Warning", "MemoryPlan", plan["message"]))
    gate = _condition(conditions, REGRESSED_CONDITION)
    if gate.get("status") == "True" and _condition(was, REGRESSED_CONDITION).get("status") != "True":
        events.append(Event("Warning", "Regressed", gate["message"]))
    return events
