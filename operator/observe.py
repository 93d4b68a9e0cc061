"""Observing: the FineTuneJob status that follows from its trainer Job and pods.

``observe`` is pure and reads top to bottom: read the Job and its pods once
(``workload.snapshot``), decide the phase from that (``assess``: one small function a case),
set each condition (``next_conditions``: one small function a condition type), and return
the operator's part of the next status, the merge patch to get there and the events to post.
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
from .conditions import MESSAGE_LIMIT, Condition, ConditionType, find_condition, set_condition
from .workload import Snapshot

PENDING, RUNNING, SUCCEEDED, FAILED, SUSPENDED = (p.value for p in api.Phase)
TERMINAL = frozenset({SUCCEEDED, FAILED})

# Reasons worth a Warning event of their own when they appear.
PROBLEMS = workload.STUCK_WAITING | {"Unschedulable", "CrashLoopBackOff", "Retrying", "NameConflict"}

# The trainer's part of the status; the operator writes every other field of api.FineTuneJobStatus
# (stage only when the job ends: until then it is the trainer's).
TRAINER_FIELDS = frozenset({"progress", "results", "artifacts"})
OPERATOR_FIELDS = tuple(
    alias
    for name, info in api.FineTuneJobStatus.model_fields.items()
    if (alias := info.alias or name) not in TRAINER_FIELDS
)


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
    seen = None if job is None else workload.snapshot(job, pods, nodes=spec.resources.nodes)
    found = decide(
        seen, spec=spec, status=status, job_name=job_name, conflict=conflict, kueue_wait=kueue_wait
    )
    conditions = next_conditions(
        status.get("conditions") or [],
        found,
        spec=spec,
        status=status,
        job_exists=seen is not None,
        job_name=job_name,
        conflict=conflict,
        now=stamp,
        generation=generation,
    )
    start_time = status.get("startTime")
    if not start_time and seen is not None:
        start_time = seen.created_at or stamp
    completion_time = None
    if found.phase in TERMINAL:
        completion_time = (seen.ended_at if seen is not None else None) or stamp
    return _update(
        status,
        found,
        conditions,
        generation=generation,
        attempts=status.get("attempts") if seen is None else seen.attempts,
        start_time=start_time,
        completion_time=completion_time,
        stage=(status.get("progress") or {}).get("stage") or status.get("stage"),
    )


def refused(
    status: Mapping[str, Any], *, reason: str, message: str, generation: int, now: datetime
) -> StatusUpdate:
    """Failed before anything was created (an invalid spec, a job the operator refuses to run)."""
    stamp = timestamp(now)
    conditions = set_condition(
        status.get("conditions") or [],
        ConditionType.FAILED,
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


# The phase: ``decide`` asks each case in turn; the first that applies says what is going on.


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
    seen = None if job is None else workload.snapshot(job, pods, nodes=spec.resources.nodes)
    return decide(seen, spec=spec, status=status, job_name=job_name, conflict=conflict, kueue_wait=kueue_wait)


def decide(
    seen: Snapshot | None,
    *,
    spec: api.FineTuneJobSpec,
    status: Mapping[str, Any],
    job_name: str,
    conflict: str | None,
    kueue_wait: str | None,
) -> Assessment:
    """The phase, reason and message from what was read of the trainer Job (None: there is none)."""
    if conflict:
        return Assessment(PENDING, "NameConflict", conflict)
    if seen is None:
        return _without_job(status, job_name)
    return (
        _finished(seen, spec)
        or _over_disruption_limit(seen, spec)
        or _suspended(seen, spec, kueue_wait)
        or _running(seen)
        or _held_back(seen)
        or _waiting(seen, spec, status)
    )


def _without_job(status: Mapping[str, Any], job_name: str) -> Assessment:
    """No trainer Job: not created yet, or gone (a TTL or a person deleted it)."""
    if status.get("startTime"):
        if ((status.get("artifacts") or {}).get("manifest")) is not None:
            return Assessment(
                SUCCEEDED,
                "Completed",
                f"the trainer Job {job_name} is gone; the trainer wrote its manifest",
            )
        return Assessment(FAILED, "JobDeleted", f"the trainer Job {job_name} was deleted before it finished")
    return Assessment(PENDING, "Creating", f"creating the trainer Job {job_name}")


def _finished(seen: Snapshot, spec: api.FineTuneJobSpec) -> Assessment | None:
    """The Job says it succeeded or failed."""
    if seen.succeeded:
        return Assessment(SUCCEEDED, "Completed", "the trainer finished")
    if seen.failure is not None:
        return _failed(seen.failure, seen, spec)
    return None


def _failed(condition: Mapping[str, Any], seen: Snapshot, spec: api.FineTuneJobSpec) -> Assessment:
    """Why the Job failed, from its condition and the newest failed pod."""
    reason = str(condition.get("reason") or "JobFailed")
    detail = str(condition.get("message") or "").strip()
    terminated = seen.last_failed_exit
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
        head = (
            f"the trainer failed {seen.failed} time(s) (backoffLimit {spec.backoff_limit}); "
            f"the last attempt {seen.last_failure}"
        )
        if terminated.get("reason") == "OOMKilled":
            return Assessment(
                FAILED, "OOMKilled", head + "; raise spec.resources.memory or lower the batch size"
            )
        return Assessment(FAILED, reason, head)
    return Assessment(FAILED, reason, detail or "the trainer Job failed")


def _over_disruption_limit(seen: Snapshot, spec: api.FineTuneJobSpec) -> Assessment | None:
    """More disruptions than spec.disruptionLimit (the Job itself would retry them forever)."""
    if seen.disruptions <= spec.disruption_limit:
        return None
    return Assessment(
        FAILED,
        "DisruptionLimitExceeded",
        f"the trainer was disrupted {seen.disruptions} time(s), more than spec.disruptionLimit "
        f"({spec.disruption_limit}); the last time it {seen.last_disruption}. Evictions for node "
        "pressure repeat: raise spec.resources (memory, scratch) or move the job to other nodes",
    )


def _suspended(seen: Snapshot, spec: api.FineTuneJobSpec, kueue_wait: str | None) -> Assessment | None:
    """The Job is suspended: by spec.suspend, by Kueue until it admits it, or until it resumes."""
    if not seen.suspended:
        return None
    if spec.suspend:
        return Assessment(SUSPENDED, "Suspended", "suspended (spec.suspend is true)")
    if spec.scheduling.queue_name:
        why = f": {kueue_wait}" if kueue_wait else ""
        return Assessment(
            PENDING, "Queued", f"waiting for admission to Kueue queue {spec.scheduling.queue_name}{why}"
        )
    return Assessment(PENDING, "Resuming", "resuming the trainer Job")


def _running(seen: Snapshot) -> Assessment | None:
    """A trainer pod runs (or keeps crashing)."""
    if not seen.running:
        return None
    if seen.crash_loop:
        return Assessment(
            RUNNING, "CrashLoopBackOff", str(seen.crash_loop.get("message") or "the trainer keeps crashing")
        )
    return Assessment(RUNNING, "PodRunning", f"the trainer is running (attempt {seen.attempts or 1})")


def _held_back(seen: Snapshot) -> Assessment | None:
    """The trainer pod waits for something time does not fix: an image, a config, a node."""
    if seen.stuck_waiting:
        detail = str(seen.stuck_waiting.get("message") or "").strip()
        reason = str(seen.stuck_waiting["reason"])
        return Assessment(PENDING, reason, f"trainer container: {reason}" + (f": {detail}" if detail else ""))
    if seen.unschedulable:
        detail = str(seen.unschedulable.get("message") or "no node fits").strip()
        return Assessment(PENDING, "Unschedulable", f"the trainer pod cannot be scheduled: {detail}")
    return None


def _waiting(seen: Snapshot, spec: api.FineTuneJobSpec, status: Mapping[str, Any]) -> Assessment:
    """Pending otherwise: a pod starting, or a retry after a failed attempt."""
    if seen.settling and status.get("phase"):
        # Until the Job controller has counted an ended pod, keep what was last written.
        return _previous(status)
    if seen.failed > 0:
        return Assessment(
            PENDING,
            "Retrying",
            f"attempt {seen.failed} {seen.last_failure}; retrying "
            f"({seen.failed} of {spec.backoff_limit + 1} attempts used)",
        )
    return Assessment(PENDING, "PodPending", "waiting for the trainer pod to start")


def _previous(status: Mapping[str, Any]) -> Assessment:
    running = find_condition(status.get("conditions") or [], ConditionType.RUNNING)
    return Assessment(
        str(status["phase"]),
        str(running.get("reason") or status["phase"]),
        str(status.get("message") or running.get("message") or ""),
    )


# The conditions: one function a type says how it should be now (None: leave it as it is).


def next_conditions(
    previous: Sequence[Mapping[str, Any]],
    found: Assessment,
    *,
    spec: api.FineTuneJobSpec,
    status: Mapping[str, Any],
    job_exists: bool,
    job_name: str,
    conflict: str | None,
    now: str,
    generation: int,
) -> list[dict[str, Any]]:
    """``previous`` with every condition the assessment and the spec decide set, in this order."""
    wanted = (
        created_condition(job_exists, job_name, conflict),
        running_condition(found),
        suspended_condition(found, previous),
        memory_plan_condition(spec),
        regressed_condition(status),
        succeeded_condition(found),
        failed_condition(found),
    )
    conditions = [dict(c) for c in previous]
    for condition in wanted:
        if condition is not None:
            conditions = set_condition(conditions, *condition, now=now, generation=generation)
    return conditions


def created_condition(job_exists: bool, job_name: str, conflict: str | None) -> Condition | None:
    """Created: the trainer Job exists, or another object holds one of its names."""
    if conflict:
        return Condition(ConditionType.CREATED, False, "NameConflict", conflict)
    if job_exists:
        return Condition(ConditionType.CREATED, True, "JobCreated", f"created the trainer Job {job_name}")
    return None


def running_condition(found: Assessment) -> Condition:
    """Running: True while a trainer pod runs; its reason and message say what happens otherwise."""
    running = found.phase == RUNNING and found.reason == "PodRunning"
    return Condition(ConditionType.RUNNING, running, found.reason, found.message)


def suspended_condition(found: Assessment, previous: Sequence[Mapping[str, Any]]) -> Condition | None:
    """Suspended: True while suspended; False once resumed (absent if it never was)."""
    if found.phase == SUSPENDED:
        return Condition(ConditionType.SUSPENDED, True, "Suspended", found.message)
    if any(c.get("type") == ConditionType.SUSPENDED for c in previous):
        return Condition(ConditionType.SUSPENDED, False, "Resumed", "spec.suspend is false")
    return None


def memory_plan_condition(spec: api.FineTuneJobSpec) -> Condition | None:
    """MemoryPlan: the memory plan's verdict, where the model can be sized."""
    verdict = memory_verdict(spec)
    return None if verdict is None else Condition(ConditionType.MEMORY_PLAN, *verdict)


def regressed_condition(status: Mapping[str, Any]) -> Condition | None:
    """Regressed: the regression gate's verdict, once the trainer has judged."""
    gate = regression_verdict(status)
    return None if gate is None else Condition(ConditionType.REGRESSED, *gate)


def succeeded_condition(found: Assessment) -> Condition | None:
    """Succeeded: set once, when the job succeeds."""
    if found.phase != SUCCEEDED:
        return None
    return Condition(ConditionType.SUCCEEDED, True, found.reason, found.message)


def failed_condition(found: Assessment) -> Condition | None:
    """Failed: set once, when the job fails."""
    if found.phase != FAILED:
        return None
    return Condition(ConditionType.FAILED, True, found.reason, found.message)


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


# The status update and its events.


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


def _events(
    before: Mapping[str, Any], phase: str, reason: str, message: str, conditions: Sequence[Mapping[str, Any]]
) -> list[Event]:
    events = []
    was = before.get("conditions") or []
    if before.get("phase") != phase:
        events.append(Event("Warning" if phase == FAILED else "Normal", phase, message))
    if reason in PROBLEMS and find_condition(was, ConditionType.RUNNING).get("reason") != reason:
        events.append(Event("Warning", reason, message))
    plan = find_condition(conditions, ConditionType.MEMORY_PLAN)
    if (
        plan.get("status") == "False"
        and find_condition(was, ConditionType.MEMORY_PLAN).get("status") != "False"
    ):
        events.append(Event("Warning", "MemoryPlan", plan["message"]))
    gate = find_condition(conditions, ConditionType.REGRESSED)
    if gate.get("status") == "True" and find_condition(was, ConditionType.REGRESSED).get("status") != "True":
        events.append(Event("Warning", "Regressed", gate["message"]))
    return events
