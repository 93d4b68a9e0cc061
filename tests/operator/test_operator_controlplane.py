"""The operator in-process against a real kube-apiserver, etcd and kube-controller-manager.

No kubelet runs: the tests write pod status as a kubelet would (``set_pod_*``) and the real
Job controller turns it into Job status, which the operator maps to the FineTuneJob.
Run with ``-p kubetune_testkit.controlplane_fixtures``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from typing import Any

import pytest
from kubernetes.client import ApiClient, BatchV1Api
from kubernetes.client.exceptions import ApiException
from kubernetes.watch import Watch
from prometheus_client.parser import text_string_to_metric_families

from kubetune import api
from kubetune.operator import planning
from kubetune.operator.handlers import Controller
from kubetune.operator.kube import Kube
from kubetune.operator.metrics import Metrics
from kubetune.operator.reconcile import Reconciler
from kubetune_testkit import manifests
from kubetune_testkit.controlplane import ControlPlane, free_port
from kubetune_testkit.operator_runner import (
    OperatorRunner,
    operator_identity,
    set_pod_finished,
    set_pod_running,
    set_pod_waiting,
    wait_for,
)

pytestmark = pytest.mark.controlplane

KINDS = ("ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Job")


def create(kube: Kube, ns: str, name: str, **spec: Any) -> dict[str, Any]:
    return kube.create(manifests.finetunejob(name, ns, **spec))


def create_with_pod(kube: Kube, ns: str, name: str, **spec: Any) -> tuple[str, dict[str, Any]]:
    """Create FineTuneJob ``name``; the name of its trainer Job and that Job's first pod."""
    create(kube, ns, name, **spec)
    job_name = planning.Names.of(name).job
    return job_name, live_pod(kube, ns, job_name)


def get(kube: Kube, ns: str, name: str) -> dict[str, Any]:
    found = kube.get(api.KIND, ns, name)
    assert found is not None
    return found


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == kind), None)


def wait_phase(
    kube: Kube, ns: str, name: str, phase: str, reason: str | None = None, *, timeout: float = 30
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        obj = get(kube, ns, name)
        if (obj.get("status") or {}).get("phase") != phase:
            return None
        if reason is not None:
            found = condition(obj, phase) if phase in ("Succeeded", "Failed") else condition(obj, "Running")
            if not found or found["reason"] != reason:
                return None
        return obj

    try:
        return wait_for(reached, timeout=timeout, what=f"{name} to be {phase} ({reason})")
    except TimeoutError as error:
        raise AssertionError(f"{error}; status is {get(kube, ns, name).get('status')}") from None


def children(kube: Kube, ns: str, name: str) -> dict[str, list[dict[str, Any]]]:
    selector = f"{planning.LABEL_JOB}={planning.label_value(name)}"
    return {kind: kube.list(kind, ns, label_selector=selector) for kind in KINDS}


def assert_one_of_each(kube: Kube, ns: str, name: str) -> dict[str, dict[str, Any]]:
    found = children(kube, ns, name)
    assert {kind: len(objs) for kind, objs in found.items()} == dict.fromkeys(KINDS, 1)
    return {kind: objs[0] for kind, objs in found.items()}


def pods(kube: Kube, ns: str, job_name: str) -> list[dict[str, Any]]:
    found = kube.list("Pod", ns, label_selector=f"batch.kubernetes.io/job-name={job_name}")
    return sorted(found, key=lambda p: (p["metadata"]["creationTimestamp"], p["metadata"]["name"]))


def live_pod(kube: Kube, ns: str, job_name: str, other_than: tuple[str, ...] = ()) -> dict[str, Any]:
    def fetch() -> dict[str, Any] | None:
        for pod in pods(kube, ns, job_name):
            meta = pod["metadata"]
            fresh = meta["name"] not in other_than and not meta.get("deletionTimestamp")
            if fresh and pod["status"].get("phase") in (None, "Pending"):
                return pod
        return None

    return wait_for(fetch, timeout=40, what=f"a new pod of Job {job_name}")


def events(kube: Kube, ns: str, name: str) -> list[tuple[str, str]]:
    found = kube.list("Event", ns, field_selector=f"involvedObject.name={name}")
    found.sort(key=lambda e: int(e["metadata"]["resourceVersion"]))
    return [(e["type"], e["reason"]) for e in found if e["involvedObject"]["kind"] == api.KIND]


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(runner: OperatorRunner) -> Samples:
    with urllib.request.urlopen(runner.metrics_url, timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def assert_events(kube: Kube, ns: str, name: str, expected: list[tuple[str, str]]) -> None:
    """The events of ``name`` are ``expected``, in order (they are posted just after the status)."""
    try:
        wait_for(lambda: events(kube, ns, name) == expected, timeout=5, what=f"events {expected}")
    except TimeoutError:
        assert events(kube, ns, name) == expected


def assert_event(kube: Kube, ns: str, name: str, event: tuple[str, str]) -> None:
    wait_for(lambda: event in events(kube, ns, name), timeout=5, what=f"event {event} on {name}")


def scrape_until(runner: OperatorRunner, name: str, value: float, **labels: str) -> Samples:
    def fetch() -> Samples | None:
        samples = scrape(runner)
        return samples if metric(samples, name, **labels) == value else None

    return wait_for(fetch, what=f"{name}{labels} == {value} in /metrics")


def metric(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_a_finetunejob_runs_to_success_with_the_operators_own_rbac(
    control_plane: ControlPlane, kube: Kube, ns: str
) -> None:
    token = operator_identity(control_plane, kube, ns)
    # spec.credentials is injected only for namespaces the operator is configured to allow
    config = planning.OperatorConfig(
        trainer_image="registry.test/kubetune-trainer:test", secrets_namespaces=(ns,)
    )
    with (
        control_plane.token_api_client(token) as client,
        OperatorRunner(client, [ns], config=config) as runner,
    ):
        created = create(
            kube,
            ns,
            "llama",
            resources={"gpus": 2, "cpu": "4", "memory": "16Gi"},
            credentials={"storageSecret": "s3-creds"},
            training={"maxSteps": 100},
        )
        obj = wait_phase(kube, ns, "llama", "Pending", "PodPending")
        assert condition(obj, "Created")["status"] == "True"  # type: ignore[index]
        assert obj["status"]["startTime"] and obj["status"]["observedGeneration"] == 1
        # No finalizer: a FineTuneJob can be deleted while the operator is down.
        assert not obj["metadata"].get("finalizers")
        annotations = obj["metadata"].get("annotations") or {}
        assert not [key for key in annotations if key.startswith("kopf.")]

        kids = assert_one_of_each(kube, ns, "llama")
        for child in kids.values():
            [ref] = child["metadata"]["ownerReferences"]
            assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
                "FineTuneJob",
                "llama",
                created["metadata"]["uid"],
                True,
            )
        assert kids["ConfigMap"]["immutable"] is True
        job = kids["Job"]
        assert job["spec"]["podFailurePolicy"]["rules"][1]["onExitCodes"]["values"] == [3, 5]
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == "registry.test/kubetune-trainer:test"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
        assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]

        pod = live_pod(kube, ns, job["metadata"]["name"])
        assert pod["spec"]["serviceAccountName"] == kids["ServiceAccount"]["metadata"]["name"]
        assert any(v.get("projected") for v in pod["spec"]["volumes"]), "the service account token is mounted"

        # The trainer's own identity may report progress on its job, and nothing else.
        create(kube, ns, "other")
        trainer_token = control_plane.service_account_token(kids["ServiceAccount"]["metadata"]["name"], ns)
        progress = {"stage": "train", "step": 40, "totalSteps": 100, "loss": 1.25, "tokensPerSecond": 900.5}
        with control_plane.token_api_client(trainer_token) as trainer_client:
            as_trainer = Kube(trainer_client)
            as_trainer.patch(api.KIND, ns, "llama", {"status": {"progress": progress}}, subresource="status")
            assert as_trainer.get(api.KIND, ns, "llama") is not None
            for forbidden in (
                lambda: as_trainer.patch(
                    api.KIND, ns, "other", {"status": {"progress": {"step": 1}}}, subresource="status"
                ),
                lambda: as_trainer.patch(api.KIND, ns, "llama", {"spec": {"suspend": True}}),
                lambda: as_trainer.get(api.KIND, ns, "other"),
                lambda: as_trainer.list("Pod", ns),
            ):
                with pytest.raises(ApiException) as denied:
                    forbidden()
                assert denied.value.status == 403

        set_pod_running(client=kube.client, pod=pod)
        obj = wait_phase(kube, ns, "llama", "Running", "PodRunning")
        assert obj["status"]["attempts"] == 1

        samples = scrape_until(runner, "kubetune_jobs", 1, phase="Running")
        job_labels = {"namespace": ns, "finetunejob": "llama"}
        assert metric(samples, "kubetune_job_loss", **job_labels) == 1.25
        assert metric(samples, "kubetune_job_step", **job_labels) == 40
        assert metric(samples, "kubetune_job_tokens_per_second", **job_labels) == 900.5
        assert metric(samples, "kubetune_jobs", phase="Pending") == 1  # "other"
        assert metric(samples, "kubetune_jobs", phase="Succeeded") == 0

        set_pod_finished(kube.client, pod, 0)
        obj = wait_phase(kube, ns, "llama", "Succeeded", "Completed")
        status = obj["status"]
        assert status["completionTime"] and status["attempts"] == 1
        assert condition(obj, "Running")["status"] == "False"  # type: ignore[index]
        assert condition(obj, "Failed") is None
        assert status["progress"] == progress, "the trainer's fields are left alone"
        assert "stage" not in status
        assert all(c["observedGeneration"] == 1 for c in status["conditions"])
        assert_events(
            kube,
            ns,
            "llama",
            [
                ("Normal", "Pending"),
                ("Normal", "Running"),
                ("Normal", "Succeeded"),
            ],
        )

        samples = scrape_until(runner, "kubetune_jobs", 1, phase="Succeeded")
        assert metric(samples, "kubetune_job_duration_seconds_count", phase="Succeeded") == 1
        assert (metric(samples, "kubetune_reconcile_total") or 0) >= 3
        assert metric(samples, "kubetune_reconcile_errors_total") == 0
        assert (metric(samples, "kubetune_reconcile_duration_seconds_count") or 0) >= 3
        with urllib.request.urlopen(runner.health_url, timeout=5) as health:
            assert health.status == 200

        kube.delete(api.KIND, ns, "llama")
        wait_for(
            lambda: metric(scrape(runner), "kubetune_job_loss", **job_labels) is None,
            what="the deleted job's series to go",
        )
        assert metric(scrape(runner), "kubetune_jobs", phase="Succeeded") == 0


def test_an_invalid_finetunejob_is_rejected_and_creates_nothing(
    kube: Kube, ns: str, operator: OperatorRunner
) -> None:
    for name, spec, field in (
        ("both", {"training": {"epochs": 1, "maxSteps": 10}}, "spec.training.maxSteps"),
        ("negative", {"backoffLimit": -1}, "spec.backoffLimit"),
        ("qlora-only", {"method": "lora", "quantization": {"bits": 4}}, "spec.quantization"),
    ):
        with pytest.raises(ApiException) as rejected:
            create(kube, ns, name, **spec)
        assert rejected.value.status == 422
        assert field in str(rejected.value.body)
    assert kube.list(api.KIND, ns) == []
    create(kube, ns, "valid")
    wait_phase(kube, ns, "valid", "Pending")
    # Only the valid job has children.
    for kind in KINDS:
        managed = kube.list(kind, ns, label_selector=f"{planning.LABEL_MANAGED_BY}={planning.MANAGER}")
        assert {o["metadata"]["annotations"][planning.ANNOTATION_JOB] for o in managed} == {"valid"}


def test_backoff_failure_after_a_retry(kube: Kube, ns: str, operator: OperatorRunner) -> None:
    create(kube, ns, "oom", backoffLimit=1)
    job_name = wait_phase(kube, ns, "oom", "Pending")["metadata"]["name"]
    first = live_pod(kube, ns, job_name)
    set_pod_running(kube.client, first)
    wait_phase(kube, ns, "oom", "Running")
    kube.patch(
        api.KIND, ns, "oom", {"status": {"progress": {"stage": "train", "step": 3}}}, subresource="status"
    )

    set_pod_finished(kube.client, first, 137, reason="OOMKilled")
    retrying = wait_phase(kube, ns, "oom", "Pending", "Retrying")
    assert "OOMKilled" in retrying["status"]["message"]

    second = live_pod(kube, ns, job_name, other_than=(first["metadata"]["name"],))
    set_pod_finished(kube.client, second, 137, reason="OOMKilled")
    failed = wait_phase(kube, ns, "oom", "Failed", "OOMKilled")
    assert failed["status"]["attempts"] == 2
    assert failed["status"]["stage"] == "train"
    assert "spec.resources.memory" in failed["status"]["message"]
    assert_events(
        kube,
        ns,
        "oom",
        [
            ("Normal", "Pending"),
            ("Normal", "Running"),
            ("Normal", "Pending"),
            ("Warning", "Retrying"),
            ("Warning", "Failed"),
        ],
    )


def test_disruptions_are_not_counted_and_a_config_error_fails_at_once(
    kube: Kube, ns: str, operator: OperatorRunner
) -> None:
    job_name, first = create_with_pod(kube, ns, "bad-data", backoffLimit=3)
    set_pod_finished(
        kube.client,
        first,
        143,
        conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}],
    )
    second = live_pod(kube, ns, job_name, other_than=(first["metadata"]["name"],))
    job = kube.get("Job", ns, job_name)
    assert job is not None and not job["status"].get("failed"), "a preempted pod is no failed attempt"
    assert get(kube, ns, "bad-data")["status"]["phase"] == "Pending"

    set_pod_finished(
        kube.client, second, 3, message="spec.dataset.train: s3://data/train.jsonl does not exist"
    )
    failed = wait_phase(kube, ns, "bad-data", "Failed", "ConfigError")
    assert "does not exist" in failed["status"]["message"]
    assert len(pods(kube, ns, job_name)) == 2, "no retry after a configuration error"


def test_deadline_exceeded(kube: Kube, ns: str, operator: OperatorRunner) -> None:
    _, pod = create_with_pod(kube, ns, "slow", activeDeadlineSeconds=2)
    set_pod_running(kube.client, pod)
    failed = wait_phase(kube, ns, "slow", "Failed", "DeadlineExceeded")
    assert "activeDeadlineSeconds (2s)" in failed["status"]["message"]
    assert failed["status"]["completionTime"]
    assert_event(kube, ns, "slow", ("Warning", "Failed"))


def test_suspend_and_resume(kube: Kube, ns: str, operator: OperatorRunner) -> None:
    job_name, first = create_with_pod(kube, ns, "pausable")
    set_pod_running(kube.client, first)
    wait_phase(kube, ns, "pausable", "Running")

    kube.patch(api.KIND, ns, "pausable", {"spec": {"suspend": True}})
    suspended = wait_phase(kube, ns, "pausable", "Suspended")
    assert condition(suspended, "Suspended")["status"] == "True"  # type: ignore[index]
    job = kube.get("Job", ns, job_name)
    assert job is not None and job["spec"]["suspend"] is True
    wait_for(
        lambda: not [p for p in pods(kube, ns, job_name) if not p["metadata"].get("deletionTimestamp")],
        what="the suspended Job's pods to go",
    )

    kube.patch(api.KIND, ns, "pausable", {"spec": {"suspend": False}})
    resumed = wait_phase(kube, ns, "pausable", "Pending")
    assert condition(resumed, "Suspended")["status"] == "False"  # type: ignore[index]
    assert condition(resumed, "Suspended")["reason"] == "Resumed"  # type: ignore[index]
    set_pod_running(kube.client, live_pod(kube, ns, job_name, other_than=(first["metadata"]["name"],)))
    wait_phase(kube, ns, "pausable", "Running")
    expected = ["Pending", "Running", "Suspended", "Pending", "Running"]
    assert_events(kube, ns, "pausable", [("Normal", reason) for reason in expected])
    assert len(children(kube, ns, "pausable")["Job"]) == 1


def test_problems_while_pending_are_reported(kube: Kube, ns: str, operator: OperatorRunner) -> None:
    # an allowed repository (the trainer image's), a tag that does not exist
    create(kube, ns, "typo", image="registry.test/kubetune-trainer:no-such-tag")
    pod = live_pod(kube, ns, planning.Names.of("typo").job)
    set_pod_waiting(
        kube.client,
        pod,
        "ImagePullBackOff",
        'Back-off pulling image "registry.test/kubetune-trainer:no-such-tag"',
    )
    stuck = wait_phase(kube, ns, "typo", "Pending", "ImagePullBackOff")
    assert "no-such-tag" in stuck["status"]["message"]
    assert_event(kube, ns, "typo", ("Warning", "ImagePullBackOff"))


def test_restart_after_a_crash_at_any_point_ends_with_one_of_each(
    control_plane_api_client: ApiClient, kube: Kube, ns: str
) -> None:
    """With the operator down, leave each FineTuneJob as a crash after its k-th object would."""
    config = planning.OperatorConfig(trainer_image="registry.test/kubetune-trainer:test")
    prepared: dict[str, dict[str, str]] = {}
    for k in range(len(KINDS) + 1):
        name = f"crash-{k}"
        created = create(kube, ns, name)
        plan = planning.plan(planning.parse(created), config)
        prepared[name] = {obj["kind"]: kube.create(obj)["metadata"]["uid"] for obj in plan.objects()[:k]}

    with OperatorRunner(control_plane_api_client, [ns], config=config):
        for name, made in prepared.items():
            obj = wait_phase(kube, ns, name, "Pending")
            assert condition(obj, "Created")["status"] == "True"  # type: ignore[index]
            kids = assert_one_of_each(kube, ns, name)
            for kind, uid in made.items():
                assert kids[kind]["metadata"]["uid"] == uid, (
                    f"{name}: the {kind} made before the crash is kept"
                )


def test_restart_while_the_job_finished_and_after_ttl_cleanup(
    control_plane_api_client: ApiClient, kube: Kube, ns: str
) -> None:
    names = ("done-while-down", "cleaned-up", "cleaned-up-with-manifest")
    with OperatorRunner(control_plane_api_client, [ns]):
        create(kube, ns, names[0])
        for name in names[1:]:
            create(kube, ns, name, ttlSecondsAfterFinished=0)
        for name in names:
            wait_phase(kube, ns, name, "Pending")

    # The operator is down while the trainers finish; the trainer of the last one wrote its manifest.
    manifest_uri = "s3://models/out/manifest.json"
    kube.patch(
        api.KIND, ns, names[2], {"status": {"artifacts": {"manifest": manifest_uri}}}, subresource="status"
    )
    for name in names:
        pod = live_pod(kube, ns, planning.Names.of(name).job)
        set_pod_running(kube.client, pod)
        set_pod_finished(kube.client, pod, 0)

    # The TTL controller deletes a finished Job at once: the operator will only find it gone.
    def jobs_deleted() -> bool:
        return all(kube.get("Job", ns, planning.Names.of(name).job) is None for name in names[1:])

    wait_for(jobs_deleted, what="the TTL controller to delete the Jobs")

    with OperatorRunner(control_plane_api_client, [ns]):
        done = wait_phase(kube, ns, names[0], "Succeeded", "Completed")
        assert done["status"]["completionTime"]
        assert_events(kube, ns, names[0], [("Normal", "Pending"), ("Normal", "Succeeded")])
        assert_one_of_each(kube, ns, names[0])
        gone = wait_phase(kube, ns, names[1], "Failed", "JobDeleted")
        assert "deleted before it finished" in gone["status"]["message"]
        wait_phase(kube, ns, names[2], "Succeeded", "Completed")
        for name in names[1:]:
            assert children(kube, ns, name)["Job"] == [], "a Job that ran is never created again"


def test_a_job_deleted_by_ttl_right_after_success_still_succeeds(
    kube: Kube, ns: str, operator: OperatorRunner
) -> None:
    job_name, pod = create_with_pod(kube, ns, "quick-ttl", ttlSecondsAfterFinished=0)
    set_pod_running(kube.client, pod)
    set_pod_finished(kube.client, pod, 0)
    wait_phase(kube, ns, "quick-ttl", "Succeeded", "Completed")
    wait_for(lambda: kube.get("Job", ns, job_name) is None, what="the TTL controller to delete the Job")
    assert get(kube, ns, "quick-ttl")["status"]["phase"] == "Succeeded"


def test_a_finished_job_is_left_alone(control_plane_api_client: ApiClient, kube: Kube, ns: str) -> None:
    with OperatorRunner(control_plane_api_client, [ns]):
        create(kube, ns, "finished", backoffLimit=0)
        pod = live_pod(kube, ns, planning.Names.of("finished").job)
        set_pod_finished(kube.client, pod, 1, message="boom")
        failed = wait_phase(kube, ns, "finished", "Failed", "BackoffLimitExceeded")
    before = failed["status"]
    kube.delete("Job", ns, planning.Names.of("finished").job)
    with OperatorRunner(control_plane_api_client, [ns]):
        kube.patch(api.KIND, ns, "finished", {"metadata": {"labels": {"touched": "yes"}}})
        create(kube, ns, "witness")
        wait_phase(kube, ns, "witness", "Pending")  # the operator has caught up
        after = get(kube, ns, "finished")["status"]
        assert after == before
        assert children(kube, ns, "finished")["Job"] == []


def test_a_spec_change_that_slips_through_is_explained(
    control_plane_api_client: ApiClient, kube: Kube, ns: str
) -> None:
    with OperatorRunner(control_plane_api_client, [ns]):
        create(kube, ns, "frozen")
        wait_phase(kube, ns, "frozen", "Pending")
        with pytest.raises(ApiException) as refused:
            kube.patch(api.KIND, ns, "frozen", {"spec": {"backoffLimit": 5}})
        assert refused.value.status == 422 and "immutable once the job has started" in str(refused.value.body)

    # As if the change had raced the operator's first status write (or an older CRD lacked the rule).
    kube.patch(api.KIND, ns, "frozen", {"status": {"startTime": None}}, subresource="status")
    kube.patch(api.KIND, ns, "frozen", {"spec": {"backoffLimit": 5}})
    with OperatorRunner(control_plane_api_client, [ns]):
        wait_for(
            lambda: ("Warning", "SpecChangeIgnored") in events(kube, ns, "frozen"),
            what="a SpecChangeIgnored event",
        )
        obj = wait_for(
            lambda: (o := get(kube, ns, "frozen"))["status"].get("observedGeneration") == 2 and o,
            what="observedGeneration 2",
        )
        assert obj["status"]["startTime"], "the start time is written back"
        assert_one_of_each(kube, ns, "frozen")
        job = kube.get("Job", ns, planning.Names.of("frozen").job)
        assert job is not None and job["spec"]["backoffLimit"] == 2


def test_a_name_taken_by_something_else_waits(kube: Kube, ns: str, operator: OperatorRunner) -> None:
    taken = planning.Names.of("clash").config_map
    kube.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": taken, "namespace": ns},
            "data": {"job.yaml": "not ours"},
        }
    )
    create(kube, ns, "clash")
    waiting = wait_phase(kube, ns, "clash", "Pending", "NameConflict")
    assert condition(waiting, "Created")["status"] == "False"  # type: ignore[index]
    assert kube.get("Job", ns, planning.Names.of("clash").job) is None
    assert_event(kube, ns, "clash", ("Warning", "NameConflict"))

    kube.delete("ConfigMap", ns, taken)
    obj = wait_phase(kube, ns, "clash", "Pending", "PodPending", timeout=30)
    assert condition(obj, "Created")["status"] == "True"  # type: ignore[index]
    assert_one_of_each(kube, ns, "clash")


def test_the_operator_command_serves_and_stops_on_sigterm(
    control_plane: ControlPlane, kube: Kube, ns: str
) -> None:
    metrics_port, health_port = free_port(), free_port()
    env = {
        **os.environ,
        "KUBECONFIG": str(control_plane.kubeconfig_path),
        "KUBETUNE_TRAINER_IMAGE": "registry.test/from-env:1",
        "KUBETUNE_LOG_FORMAT": "json",
    }
    command = [sys.executable, "-m", "kubetune", "operator", "-n", ns]
    command += ["--metrics-port", str(metrics_port), "--health-port", str(health_port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        create(kube, ns, "from-cli")
        wait_phase(kube, ns, "from-cli", "Pending")
        job = kube.get("Job", ns, "from-cli")
        assert job is not None
        assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.test/from-env:1"
        with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=5) as health:
            assert health.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            assert 'kubetune_jobs{phase="Pending"} 1.0' in response.read().decode()
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.startswith("{")]
    assert lines, stderr[-2000:]
    assert all("message" in json.loads(line) for line in lines)


def test_several_nodes_get_an_indexed_job_and_a_headless_service(
    kube: Kube, ns: str, operator: OperatorRunner
) -> None:
    create(kube, ns, "multi", resources={"nodes": 2, "gpus": 8})
    wait_phase(kube, ns, "multi", "Pending")
    names = planning.Names.of("multi")
    service = kube.get("Service", ns, names.service)
    assert service is not None and service["spec"]["clusterIP"] == "None"
    assert service["metadata"]["ownerReferences"][0]["name"] == "multi"
    job = kube.get("Job", ns, names.job)
    assert job is not None and job["spec"]["completionMode"] == "Indexed"

    def both_pods() -> list[dict[str, Any]] | None:
        found = pods(kube, ns, names.job)
        return found if len(found) == 2 else None

    indexed = wait_for(both_pods, what="two indexed pods")
    assert sorted(p["spec"]["hostname"] for p in indexed) == [f"{names.job}-0", f"{names.job}-1"]
    assert {p["spec"]["subdomain"] for p in indexed} == {names.service}
    for pod in indexed:
        set_pod_running(kube.client, pod)
    running = wait_phase(kube, ns, "multi", "Running")
    assert running["status"]["attempts"] == 1


class RecordingKube(Kube):
    """The real client, noting each request it sends (method and resource path)."""

    def __init__(self, client: ApiClient) -> None:
        super().__init__(client)
        self.sent: list[tuple[str, str]] = []

    def request(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        self.sent.append((method, path.rsplit("/namespaces/", 1)[1].split("/", 1)[1]))
        return super().request(method, path, **kw)


def test_a_new_finetunejob_costs_one_request_per_object(
    control_plane_api_client: ApiClient, kube: Kube, ns: str
) -> None:
    create(kube, ns, "frugal")
    recording = RecordingKube(control_plane_api_client)
    reconciler = Reconciler(recording, planning.OperatorConfig(trainer_image="registry.test/t:1"))
    names = planning.Names.of("frugal")
    created: list[str] = []
    result = reconciler.reconcile(ns, "frugal", job_created=created.append)
    assert result.phase == "Pending"
    job = kube.get("Job", ns, names.job)
    assert job and len(created) == 1
    posts = [path.split("/")[0] for method, path in recording.sent if method == "POST"]
    assert posts == ["configmaps", "serviceaccounts", "roles", "rolebindings", "jobs", "events"]
    assert recording.sent[0] == ("GET", "finetunejobs/frugal")
    assert [m for m, _ in recording.sent[1:]].count("GET") == 0, "no reads before creating, no pod list"
    assert recording.sent[-2] == ("PATCH", "finetunejobs/frugal/status")
    assert len(recording.sent) == 8, "GET the FineTuneJob, 5 creates, its status, one event"

    # Once started, a pass reads the objects, then the Job's pods; with nothing new, that is all.
    reconciler.reconcile(ns, "frugal")
    recording.sent.clear()
    assert reconciler.reconcile(ns, "frugal").phase == "Pending"
    assert {m for m, _ in recording.sent} == {"GET"}
    assert len(recording.sent) == 1 + len(KINDS) + 1
    assert_one_of_each(kube, ns, "frugal")


def test_after_a_crash_before_the_status_the_creates_find_what_exists(
    control_plane_api_client: ApiClient, kube: Kube, ns: str
) -> None:
    """Objects made by a pass that died before writing status: each create gets a 409, then a read."""
    created = create(kube, ns, "half-done")
    config = planning.OperatorConfig(trainer_image="registry.test/t:1")
    plan = planning.plan(planning.parse(created), config)
    made = {obj["kind"]: kube.create(obj)["metadata"]["uid"] for obj in plan.objects()}
    recording = RecordingKube(control_plane_api_client)
    reconciler = Reconciler(recording, config)
    jobs_created: list[str] = []
    assert reconciler.reconcile(ns, "half-done", job_created=jobs_created.append).phase == "Pending"
    assert jobs_created == []
    kids = assert_one_of_each(kube, ns, "half-done")
    assert {kind: kids[kind]["metadata"]["uid"] for kind in KINDS} == made
    assert [m for m, p in recording.sent if p.startswith("pods")] == ["GET"], "the Job's pods are listed"


def test_the_watch_echo_of_a_job_just_created_needs_no_reconciliation(
    control_plane_api_client: ApiClient, kube: Kube, ns: str
) -> None:
    create(kube, ns, "echo")
    jobs = BatchV1Api(control_plane_api_client)
    listed = jobs.list_namespaced_job(ns).metadata
    assert listed is not None
    controller = Controller(
        Reconciler(kube, planning.OperatorConfig(trainer_image="registry.test/t:1")), Metrics()
    )
    asyncio.run(controller.reconcile(ns, "echo"))
    # The Job as the operator's watch shows it: created, then updated by the Job controller.
    watch = Watch()  # type: ignore[no-untyped-call]
    events = watch.stream(  # type: ignore[no-untyped-call]
        jobs.list_namespaced_job, ns, resource_version=listed.resource_version, timeout_seconds=3
    )
    seen = [event["raw_object"] for event in events]
    assert len(seen) >= 2, "ADDED, then MODIFIED when the Job controller makes the pod"
    assert controller.job_event_needs_reconcile(ns, "echo", seen[0]) is False, "the create's own event"
    assert all(controller.job_event_needs_reconcile(ns, "echo", job) for job in seen[1:])
    assert controller.job_event_needs_reconcile(ns, "echo", seen[0]) is True, (
        "a restarted watch shows it again"
    )
