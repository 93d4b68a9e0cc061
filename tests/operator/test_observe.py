"""From the observed Job and pods to the FineTuneJob's phase, conditions and events: pure."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubetune import api
from kubetune.operator import observe as obs
from kubetune.operator.conditions import MESSAGE_LIMIT
from kubetune.operator.observe import observe

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
JOB = "tune"


def spec(**overrides: Any) -> api.FineTuneJobSpec:
    base: dict[str, Any] = {
        "model": {"name": "gpt2"},
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://models/out/"},
    }
    base.update(overrides)
    return api.FineTuneJobSpec.model_validate(base)


def job(*, conditions: Any = (), suspend: Any = False, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": JOB, "uid": "job-uid", "creationTimestamp": "2025-03-01T11:59:00Z"},
        "spec": {"suspend": suspend},
        "status": {
            **status,
            "conditions": [
                {
                    "type": kind,
                    "status": "True",
                    "reason": reason,
                    "message": f"{kind} because {reason}",
                    "lastTransitionTime": "2025-03-01T12:30:00Z",
                }
                for kind, reason in conditions
            ],
        },
    }


def pod(
    phase: str = "Pending",
    *,
    created: str = "2025-03-01T11:59:01Z",
    waiting: tuple[str, str] | None = None,
    terminated: dict[str, Any] | None = None,
    unschedulable: str | None = None,
) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if waiting:
        state["waiting"] = {"reason": waiting[0], "message": waiting[1]}
    if terminated is not None:
        state["terminated"] = terminated
    status: dict[str, Any] = {"phase": phase, "containerStatuses": [{"name": "trainer", "state": state}]}
    if unschedulable:
        status["conditions"] = [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unschedulable}
        ]
    return {"metadata": {"name": f"tune-{created[-3:-1]}", "creationTimestamp": created}, "status": status}


def run(
    observed: dict[str, Any] | None,
    pods: list[dict[str, Any]] = (),  # type: ignore[assignment]
    *,
    status: dict[str, Any] | None = None,
    the_spec: api.FineTuneJobSpec | None = None,
    now: datetime = T0,
    generation: int = 1,
    conflict: str | None = None,
    kueue_wait: str | None = None,
) -> obs.StatusUpdate:
    return observe(
        observed,
        pods,
        spec=the_spec or spec(),
        status=status or {},
        generation=generation,
        job_name=JOB,
        now=now,
        conflict=conflict,
        kueue_wait=kueue_wait,
    )


def condition(update: obs.StatusUpdate, kind: str) -> dict[str, Any] | None:
    return next((c for c in update.fields()["conditions"] if c["type"] == kind), None)


def applied(status: dict[str, Any], update: obs.StatusUpdate) -> dict[str, Any]:
    """What a JSON merge patch of ``update`` does to ``status``."""
    out = dict(status)
    for key, value in update.patch(status).items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


# (job conditions, pods, job status counters, spec overrides) -> (phase, reason)
PHASE_TABLE = [
    pytest.param([], [], {"active": 1}, {}, ("Pending", "PodPending"), id="created"),
    pytest.param(
        [], [pod("Running")], {"active": 1, "ready": 1}, {}, ("Running", "PodRunning"), id="running"
    ),
    pytest.param([], [], {"active": 1, "ready": 1}, {}, ("Running", "PodRunning"), id="ready-without-pods"),
    pytest.param(
        [("SuccessCriteriaMet", "CompletionsReached"), ("Complete", "CompletionsReached")],
        [pod("Succeeded")],
        {"succeeded": 1, "completionTime": "2025-03-01T12:31:00Z"},
        {},
        ("Succeeded", "Completed"),
        id="complete",
    ),
    pytest.param(
        [("SuccessCriteriaMet", "CompletionsReached")],
        [],
        {"succeeded": 1},
        {},
        ("Succeeded", "Completed"),
        id="success-criteria-met",
    ),
    pytest.param(
        [("FailureTarget", "BackoffLimitExceeded"), ("Failed", "BackoffLimitExceeded")],
        [pod("Failed", terminated={"exitCode": 1, "reason": "Error", "message": "CUDA error"})],
        {"failed": 3},
        {},
        ("Failed", "BackoffLimitExceeded"),
        id="backoff",
    ),
    pytest.param(
        [("Failed", "BackoffLimitExceeded")],
        [pod("Failed", terminated={"exitCode": 137, "reason": "OOMKilled"})],
        {"failed": 3},
        {},
        ("Failed", "OOMKilled"),
        id="oom",
    ),
    pytest.param(
        [("FailureTarget", "DeadlineExceeded")],
        [],
        {"failed": 1},
        {"activeDeadlineSeconds": 60},
        ("Failed", "DeadlineExceeded"),
        id="deadline-target",
    ),
    pytest.param(
        [("Failed", "PodFailurePolicy")],
        [pod("Failed", terminated={"exitCode": 3, "reason": "Error", "message": "dataset not found"})],
        {"failed": 1},
        {},
        ("Failed", "ConfigError"),
        id="config-error",
    ),
    pytest.param(
        [("Failed", "PodFailurePolicy")],
        [pod("Failed", terminated={"exitCode": 5, "reason": "Error"})],
        {"failed": 1},
        {},
        ("Failed", "Regressed"),
        id="regressed",
    ),
    pytest.param(
        [("Failed", "SomethingNew")], [], {"failed": 1}, {}, ("Failed", "SomethingNew"), id="unknown-failure"
    ),
    pytest.param(
        [("Suspended", "JobSuspended")], [], {}, {"suspend": True}, ("Suspended", "Suspended"), id="suspended"
    ),
    pytest.param(
        [("Suspended", "JobSuspended")],
        [],
        {},
        {"scheduling": {"queueName": "team-a"}},
        ("Pending", "Queued"),
        id="queued",
    ),
    pytest.param(
        [],
        [pod(waiting=("ImagePullBackOff", "Back-off pulling image"))],
        {"active": 1},
        {},
        ("Pending", "ImagePullBackOff"),
        id="image-pull-backoff",
    ),
    pytest.param(
        [],
        [pod(waiting=("ErrImagePull", "not found"))],
        {"active": 1},
        {},
        ("Pending", "ErrImagePull"),
        id="err-image-pull",
    ),
    pytest.param(
        [],
        [pod(waiting=("CreateContainerConfigError", 'secret "s3" not found'))],
        {"active": 1},
        {},
        ("Pending", "CreateContainerConfigError"),
        id="missing-secret",
    ),
    pytest.param(
        [],
        [pod(unschedulable="0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")],
        {"active": 1},
        {},
        ("Pending", "Unschedulable"),
        id="unschedulable",
    ),
    pytest.param(
        [],
        [pod("Running", waiting=("CrashLoopBackOff", "back-off 5m0s restarting failed container"))],
        {"active": 1},
        {},
        ("Running", "CrashLoopBackOff"),
        id="crash-loop",
    ),
    pytest.param(
        [],
        [
            pod(
                "Failed", created="2025-03-01T11:59:01Z", terminated={"exitCode": 137, "reason": "OOMKilled"}
            ),
            pod("Pending", created="2025-03-01T12:05:02Z"),
        ],
        {"failed": 1, "active": 1},
        {},
        ("Pending", "Retrying"),
        id="retrying",
    ),
]


@pytest.mark.parametrize(("conditions", "pods", "counters", "overrides", "expected"), PHASE_TABLE)
def test_phase_table(
    conditions: list[tuple[str, str]],
    pods: list[dict[str, Any]],
    counters: dict[str, Any],
    overrides: dict[str, Any],
    expected: tuple[str, str],
) -> None:
    suspended = any(kind == "Suspended" for kind, _ in conditions)
    update = run(job(conditions=conditions, suspend=suspended, **counters), pods, the_spec=spec(**overrides))
    assert (update.phase, update.reason) == expected
    assert update.message
    running = condition(update, "Running")
    assert running is not None and running["reason"] == expected[1]
    assert running["status"] == ("True" if expected == ("Running", "PodRunning") else "False")
    assert condition(update, "Created") == {
        "type": "Created",
        "status": "True",
        "reason": "JobCreated",
        "message": "created the trainer Job tune",
        "lastTransitionTime": "2025-03-01T12:00:00Z",
        "observedGeneration": 1,
    }
    for kind in ("Succeeded", "Failed"):
        found = condition(update, kind)
        if update.phase == kind:
            assert found is not None and found["status"] == "True" and found["reason"] == expected[1]
        else:
            assert found is None


def test_a_queued_job_says_why_kueue_holds_it_back() -> None:
    queued = job(conditions=[("Suspended", "JobSuspended")], suspend=True)
    the_spec = spec(scheduling={"queueName": "team-a"})
    why = "couldn't assign flavors to pod set main: insufficient quota for nvidia.com/gpu in flavor gpu"
    update = run(queued, the_spec=the_spec, kueue_wait=why)
    assert (update.phase, update.reason) == ("Pending", "Queued")
    assert update.message == f"waiting for admission to Kueue queue team-a: {why}"
    assert condition(update, "Running")["message"] == update.message  # type: ignore[index]
    # Without a word from Kueue (not installed, or no Workload yet) it names the queue alone.
    assert run(queued, the_spec=the_spec).message == "waiting for admission to Kueue queue team-a"
    # A suspended job that is not queued is resuming, whatever a stale Workload said.
    assert run(queued, kueue_wait=why).reason == "Resuming"


def test_messages_say_why() -> None:
    failed = run(
        job(conditions=[("Failed", "BackoffLimitExceeded")], failed=3),
        [
            pod(
                "Failed",
                terminated={"exitCode": 1, "reason": "Error", "message": "CUDA error: device-side assert"},
            )
        ],
        the_spec=spec(backoffLimit=2),
    )
    assert "failed 3 time(s) (backoffLimit 2)" in failed.message
    assert "exited with code 1: CUDA error: device-side assert" in failed.message

    oom = run(
        job(conditions=[("Failed", "BackoffLimitExceeded")], failed=1),
        [pod("Failed", terminated={"exitCode": 137, "reason": "OOMKilled"})],
    )
    assert "OOMKilled" in oom.message and "spec.resources.memory" in oom.message

    config = run(
        job(conditions=[("Failed", "PodFailurePolicy")], failed=1),
        [pod("Failed", terminated={"exitCode": 3, "message": "spec.dataset.train: no such object"})],
    )
    assert config.message.endswith("spec.dataset.train: no such object")

    deadline = run(job(conditions=[("Failed", "DeadlineExceeded")]), the_spec=spec(activeDeadlineSeconds=60))
    assert "activeDeadlineSeconds (60s)" in deadline.message

    retry = run(
        job(failed=1, active=1),
        [
            pod(
                "Failed", created="2025-03-01T11:59:01Z", terminated={"exitCode": 137, "reason": "OOMKilled"}
            ),
            pod("Pending", created="2025-03-01T12:05:02Z"),
        ],
        the_spec=spec(backoffLimit=2),
    )
    assert "OOMKilled" in retry.message and "1 of 3 attempts used" in retry.message

    unschedulable = run(job(active=1), [pod(unschedulable="0/3 nodes: Insufficient nvidia.com/gpu")])
    assert "Insufficient nvidia.com/gpu" in unschedulable.message


def test_a_pod_failure_policy_rule_that_is_not_the_config_error_keeps_its_reason() -> None:
    update = run(
        job(conditions=[("Failed", "PodFailurePolicy")], failed=1),
        [pod("Failed", terminated={"exitCode": 42})],
    )
    assert (update.phase, update.reason) == ("Failed", "PodFailurePolicy")


def test_terminal_status_fields() -> None:
    status = {
        "phase": "Running",
        "stage": "push",
        "startTime": "2025-03-01T11:59:00Z",
        "progress": {"stage": "train"},
    }
    done = run(
        job(
            conditions=[("Complete", "CompletionsReached")],
            succeeded=1,
            completionTime="2025-03-01T12:31:00Z",
        ),
        status=status,
    )
    assert done.status.completion_time == "2025-03-01T12:31:00Z"
    assert "stage" in done.fields() and done.status.stage is None
    assert done.patch(status)["stage"] is None  # the merge patch removes it

    failed = run(job(conditions=[("Failed", "BackoffLimitExceeded")], failed=3), status=status)
    # No completionTime on a failed Job: the Failed condition's time.
    assert failed.status.completion_time == "2025-03-01T12:30:00Z"
    assert failed.status.stage == "train" and failed.patch(status)["stage"] == "train"

    running = run(job(active=1), [pod("Running")], status=status)
    assert running.status.completion_time is None and "stage" not in running.fields()


def test_start_time_is_when_the_trainer_job_was_created_and_stays() -> None:
    first = run(job(active=1), [pod()])
    assert first.status.start_time == "2025-03-01T11:59:00Z"
    kept = run(job(active=1), [pod()], status={"startTime": "2025-02-01T00:00:00Z"})
    assert kept.status.start_time == "2025-02-01T00:00:00Z"
    assert run(None).status.start_time is None


@pytest.mark.parametrize(
    ("counters", "nodes", "attempts"),
    [
        ({}, 1, 0),
        ({"active": 1}, 1, 1),
        ({"failed": 1, "active": 1}, 1, 2),
        ({"failed": 3}, 1, 3),
        ({"failed": 1, "succeeded": 1}, 1, 2),
        ({"active": 4}, 4, 1),
        ({"failed": 4, "active": 4}, 4, 2),
    ],
)
def test_attempts(counters: dict[str, int], nodes: int, attempts: int) -> None:
    assert run(job(**counters), the_spec=spec(resources={"nodes": nodes})).status.attempts == attempts


def test_last_transition_time_moves_only_when_status_changes() -> None:
    first = run(job(active=1), [pod()], now=T0)
    status = applied({}, first)
    later = T0 + timedelta(minutes=5)
    # Still not running, for a different reason: reason and message change, time does not.
    second = run(job(active=1), [pod(waiting=("ImagePullBackOff", "x"))], status=status, now=later)
    assert condition(second, "Running")["lastTransitionTime"] == "2025-03-01T12:00:00Z"  # type: ignore[index]
    assert condition(second, "Running")["reason"] == "ImagePullBackOff"  # type: ignore[index]
    status = applied(status, second)
    third = run(job(active=1), [pod("Running")], status=status, now=later + timedelta(minutes=1))
    assert condition(third, "Running")["lastTransitionTime"] == "2025-03-01T12:06:00Z"  # type: ignore[index]
    assert condition(third, "Created")["lastTransitionTime"] == "2025-03-01T12:00:00Z"  # type: ignore[index]


def test_observed_generation_is_recorded() -> None:
    update = run(job(active=1), [pod("Running")], generation=7)
    assert update.status.observed_generation == 7
    assert update.fields()["observedGeneration"] == 7
    assert {c["observedGeneration"] for c in update.fields()["conditions"]} == {7}


def test_events_on_phase_transitions_only() -> None:
    created = run(job(active=1), [pod()])
    assert [(e.type, e.reason) for e in created.events] == [("Normal", "Pending")]
    status = applied({}, created)
    again = run(job(active=1), [pod()], status=status, now=T0 + timedelta(seconds=30))
    assert again.events == [] and again.patch(status) == {}

    running = run(job(active=1, ready=1), [pod("Running")], status=status)
    assert [(e.type, e.reason) for e in running.events] == [("Normal", "Running")]
    status = applied(status, running)

    failed = run(job(conditions=[("Failed", "BackoffLimitExceeded")], failed=3), status=status)
    assert [(e.type, e.reason) for e in failed.events] == [("Warning", "Failed")]
    assert failed.events[0].message == failed.message


def test_problems_get_one_warning_each() -> None:
    status = applied({}, run(job(active=1), [pod()]))
    stuck = run(job(active=1), [pod(waiting=("ImagePullBackOff", "no such image"))], status=status)
    assert [(e.type, e.reason) for e in stuck.events] == [("Warning", "ImagePullBackOff")]
    status = applied(status, stuck)
    still = run(job(active=1), [pod(waiting=("ImagePullBackOff", "no such image"))], status=status)
    assert still.events == []


def test_suspend_and_resume_conditions() -> None:
    suspended_spec = spec(suspend=True)
    suspended = run(job(conditions=[("Suspended", "JobSuspended")], suspend=True), the_spec=suspended_spec)
    assert suspended.phase == "Suspended"
    assert condition(suspended, "Suspended")["status"] == "True"  # type: ignore[index]
    assert [(e.type, e.reason) for e in suspended.events] == [("Normal", "Suspended")]
    status = applied({}, suspended)

    # spec.suspend is false again; the Job is no longer suspended and its pod is pending.
    resumed = run(job(active=1), [pod()], status=status)
    assert resumed.phase == "Pending"
    assert condition(resumed, "Suspended")["status"] == "False"  # type: ignore[index]
    assert condition(resumed, "Suspended")["reason"] == "Resumed"  # type: ignore[index]

    # The Job still carries the condition for a moment after the operator unsuspended it.
    catching_up = run(job(conditions=[("Suspended", "JobSuspended")], suspend=False), status=status)
    assert (catching_up.phase, catching_up.reason) == ("Pending", "Resuming")

    # A job that was never suspended has no Suspended condition at all.
    assert condition(run(job(active=1), [pod()]), "Suspended") is None


def test_trainer_job_gone() -> None:
    started = {"phase": "Running", "startTime": "2025-03-01T11:59:00Z", "attempts": 1}
    lost = run(None, status=started)
    assert (lost.phase, lost.reason) == ("Failed", "JobDeleted")
    assert lost.status.attempts == 1
    with_manifest = run(None, status={**started, "artifacts": {"manifest": "s3://m/out/manifest.json"}})
    assert (with_manifest.phase, with_manifest.reason) == ("Succeeded", "Completed")
    assert run(None).phase == "Pending"


def test_name_conflict() -> None:
    update = run(None, conflict="Job tune already exists and is controlled by no owner")
    assert (update.phase, update.reason) == ("Pending", "NameConflict")
    assert condition(update, "Created")["status"] == "False"  # type: ignore[index]
    assert ("Warning", "NameConflict") in [(e.type, e.reason) for e in update.events]


def test_patch_touches_only_operator_fields() -> None:
    trainer_part = {
        "progress": {"stage": "train", "step": 10, "loss": 1.5},
        "results": {"before": {"loss": 2.0}},
        "artifacts": {"root": "s3://m/out/"},
    }
    status = {"phase": "Running", **trainer_part}
    update = run(job(conditions=[("Complete", "CompletionsReached")], succeeded=1), status=status)
    patch = update.patch(status)
    assert set(patch) <= set(obs.OPERATOR_FIELDS)
    assert not set(patch) & set(trainer_part)
    # Every status field is the operator's or the trainer's: a new one needs no list to be added to.
    every = {info.alias for info in api.FineTuneJobStatus.model_fields.values()}
    assert set(obs.OPERATOR_FIELDS) | obs.TRAINER_FIELDS == every
    assert not set(obs.OPERATOR_FIELDS) & obs.TRAINER_FIELDS
    assert {"phase", "conditions", "observedGeneration", "message", "stage"} <= set(obs.OPERATOR_FIELDS)


def test_a_refused_job_fails_with_one_warning_and_keeps_what_it_had() -> None:
    status = {"phase": "Pending", "startTime": "2025-03-01T11:59:00Z", "stage": "fetch"}
    update = obs.refused(
        status, reason="InvalidSpec", message="invalid spec: " + "x" * 2000, generation=3, now=T0
    )
    assert (update.phase, update.reason) == ("Failed", "InvalidSpec")
    assert len(update.message) == MESSAGE_LIMIT
    failed = condition(update, "Failed")
    assert failed is not None and failed["reason"] == "InvalidSpec" and failed["observedGeneration"] == 3
    patch = update.patch(status)
    assert patch["completionTime"] == "2025-03-01T12:00:00Z" and patch["stage"] is None
    assert "startTime" not in patch, "unchanged"
    assert [(e.type, e.reason, e.message) for e in update.events] == [("Warning", "Failed", update.message)]


def test_the_status_is_valid_for_the_api_models() -> None:
    update = run(
        job(conditions=[("Failed", "BackoffLimitExceeded")], failed=3),
        status={"progress": {"stage": "train"}},
    )
    api.FineTuneJobStatus.model_validate(update.fields())


def test_long_messages_are_cut() -> None:
    huge = "x" * 10_000
    update = run(
        job(conditions=[("Failed", "BackoffLimitExceeded")], failed=1),
        [pod("Failed", terminated={"exitCode": 1, "message": huge})],
    )
    assert len(update.message) <= MESSAGE_LIMIT
    assert all(len(c["message"]) <= MESSAGE_LIMIT for c in update.fields()["conditions"])


def test_an_ended_pod_the_job_has_not_counted_yet_changes_nothing() -> None:
    status = applied({}, run(job(active=1, ready=1), [pod("Running")]))
    done = pod("Succeeded", terminated={"exitCode": 0, "reason": "Completed"})
    done["metadata"]["finalizers"] = ["batch.kubernetes.io/job-tracking"]
    settling = run(job(active=1), [done], status=status, now=T0 + timedelta(seconds=5))
    assert (settling.phase, settling.reason) == ("Running", "PodRunning")
    assert settling.events == [] and settling.patch(status) == {}

    # Counted in uncountedTerminatedPods, finalizer already gone: still settling.
    done["metadata"] = {**done["metadata"], "finalizers": [], "uid": "pod-1"}
    counted_soon = job(uncountedTerminatedPods={"succeeded": ["pod-1"]})
    assert run(counted_soon, [done], status=status).phase == "Running"
    # Once counted, the pod no longer holds the phase back.
    assert run(job(failed=1), [pod("Failed", terminated={"exitCode": 1})], status=status).reason == "Retrying"


def test_uncounted_pods_count_as_attempts() -> None:
    failing = job(
        conditions=[("FailureTarget", "BackoffLimitExceeded")],
        failed=1,
        uncountedTerminatedPods={"failed": ["pod-2"]},
    )
    update = run(failing, [pod("Failed", terminated={"exitCode": 1})], the_spec=spec(backoffLimit=1))
    assert update.status.attempts == 2
    assert "failed 2 time(s)" in update.message
