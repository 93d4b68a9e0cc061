"""The trainer pod's resources, grace period and failure policy; disruption and admission rules.

Pure planning and observing first, then the same behaviour against the real API server and
Job controller (the test control plane; a test stands in for the kubelet).
"""

from __future__ import annotations

from typing import Any

import pytest

from kubetune import api
from kubetune.contract import PEER_LOST_EXIT_CODE
from kubetune.operator import observe, planning, workload
from kubetune.operator.kube import Kube
from kubetune.operator.planning import OperatorConfig, admission, image_allowed, plan
from kubetune_testkit import manifests
from kubetune_testkit.operator_runner import OperatorRunner, set_pod_finished

from .test_operator_controlplane import create, create_with_pod, events, get, live_pod, pods, wait_phase


def job(namespace: str = "ml", **spec: Any) -> api.FineTuneJob:
    body = manifests.finetunejob("llama", namespace, **spec)
    body["metadata"]["uid"] = "u-1"
    return api.FineTuneJob.model_validate(body)


def pod_spec(p: planning.Plan) -> dict[str, Any]:
    return p.job["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def container(p: planning.Plan) -> dict[str, Any]:
    return pod_spec(p)["containers"][0]  # type: ignore[no-any-return]


def env(p: planning.Plan) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container(p)["env"]}


# --- planning (pure) ---------------------------------------------------------------------


def test_scratch_is_bounded_and_requested() -> None:
    default = plan(job())
    scratch = next(v for v in pod_spec(default)["volumes"] if v["name"] == "scratch")
    assert scratch["emptyDir"] == {"sizeLimit": "100Gi"}
    assert container(default)["resources"]["requests"]["ephemeral-storage"] == "10Gi"

    sized = plan(job(resources={"scratch": "800Gi"}))
    scratch = next(v for v in pod_spec(sized)["volumes"] if v["name"] == "scratch")
    assert scratch["emptyDir"] == {"sizeLimit": "800Gi"}
    assert container(sized)["resources"]["requests"]["ephemeral-storage"] == "800Gi"


def test_a_pod_without_resources_is_burstable_not_best_effort() -> None:
    resources = container(plan(job(resources={"gpus": 0})))["resources"]
    assert resources["requests"]["cpu"] == "1" and resources["requests"]["memory"] == "4Gi"
    assert "limits" not in resources, "no limit: the trainer may use what the node has free"


def test_the_grace_period_comes_from_the_spec_and_reaches_the_launcher() -> None:
    default = plan(job())
    assert pod_spec(default)["terminationGracePeriodSeconds"] == 120
    assert env(default)["KUBETUNE_GRACE_SECONDS"] == "120"
    long = plan(job(terminationGracePeriodSeconds=900))
    assert pod_spec(long)["terminationGracePeriodSeconds"] == 900
    assert env(long)["KUBETUNE_GRACE_SECONDS"] == "900"


def test_a_lost_peer_is_ignored_by_the_job_like_a_disruption() -> None:
    rules = plan(job(resources={"nodes": 4})).job["spec"]["podFailurePolicy"]["rules"]
    assert {
        "action": "Ignore",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [PEER_LOST_EXIT_CODE]},
    } in rules
    multi = plan(job(resources={"nodes": 4}))
    assert "KUBETUNE_NODE_RANK" in {e["name"] for e in container(multi)["env"]}


def test_images_are_allowed_by_the_operator_only() -> None:
    config = OperatorConfig(trainer_image="ghcr.io/kubetune/trainer:0.1.0")
    assert image_allowed("ghcr.io/kubetune/trainer:0.2.0", config)
    assert image_allowed("ghcr.io/kubetune/trainer@sha256:" + "a" * 64, config)
    assert not image_allowed("ghcr.io/kubetune/trainer-evil:1", config)
    assert not image_allowed("docker.io/attacker/miner:latest", config)
    registry = OperatorConfig(allowed_images=("registry.example.com/ml/*",))
    assert image_allowed("registry.example.com/ml/trainer:7", registry)
    assert not image_allowed("registry.example.com/other/trainer:7", registry)
    assert image_allowed("anything:1", OperatorConfig(allowed_images=("*",)))
    with_port = OperatorConfig(trainer_image="localhost:5000/trainer:dev")
    assert image_allowed("localhost:5000/trainer:next", with_port)

    refused = admission(job(image="docker.io/attacker/miner:latest"), config)
    assert refused is not None and refused[0] == "ImageNotAllowed"
    assert "spec.image docker.io/attacker/miner:latest is not allowed" in refused[1]
    assert admission(job(), config) is None, "no spec.image: the operator's own trainer image"


def test_secrets_are_injected_only_where_the_operator_allows() -> None:
    spec = {"credentials": {"storageSecret": "s3-creds"}}
    refused = admission(job("team-a", **spec), OperatorConfig())
    assert refused is not None and refused[0] == "CredentialsNotAllowed"
    assert "s3-creds" in refused[1] and "team-a" in refused[1]
    assert admission(job("team-a", **spec), OperatorConfig(secrets_namespaces=("team-a",))) is None
    assert admission(job("team-b", **spec), OperatorConfig(secrets_namespaces=("team-a",))) is not None
    assert admission(job("team-b", **spec), OperatorConfig(secrets_namespaces=("*",))) is None
    assert admission(job("team-b"), OperatorConfig()) is None, "no Secrets named: nothing to allow"


# --- observing (pure) --------------------------------------------------------------------


def failed_pod(index: int, *, exit_code: int = 1, disruption: str | None = None) -> dict[str, Any]:
    conditions = [{"type": "DisruptionTarget", "status": "True", "reason": disruption}] if disruption else []
    return {
        "metadata": {
            "name": f"p-{index}-{exit_code}-{disruption}",
            "annotations": {planning.COMPLETION_INDEX_ANNOTATION: str(index)},
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "status": {
            "phase": "Failed",
            "conditions": conditions,
            "containerStatuses": [
                {"name": "trainer", "state": {"terminated": {"exitCode": exit_code, "reason": "Error"}}}
            ],
        },
    }


def test_one_lost_node_counts_once_not_once_per_peer() -> None:
    preempted = [failed_pod(2, exit_code=143, disruption="PreemptionByScheduler")]
    peers = [failed_pod(i, exit_code=PEER_LOST_EXIT_CODE) for i in (0, 1, 3)]
    assert workload.disruptions(preempted + peers) == 1
    again = [failed_pod(2, disruption="TerminationByKubelet")] + [
        failed_pod(i, exit_code=PEER_LOST_EXIT_CODE) for i in (0, 1, 3)
    ]
    assert workload.disruptions(preempted + peers + again) == 2
    assert workload.disruptions([failed_pod(0, exit_code=1)]) == 0, "an ordinary failure is backoff's"


def test_more_disruptions_than_the_limit_fail_the_job() -> None:
    spec = job(disruptionLimit=1).spec
    active_job = {"metadata": {"name": "llama"}, "spec": {}, "status": {"active": 1}}
    evicted = [failed_pod(0, exit_code=137, disruption="TerminationByKubelet") for _ in range(2)]
    found = observe.assess(active_job, evicted[:1], spec=spec, status={}, job_name="llama")
    assert found.phase != observe.FAILED
    found = observe.assess(active_job, evicted, spec=spec, status={}, job_name="llama")
    assert (found.phase, found.reason) == (observe.FAILED, "DisruptionLimitExceeded")
    assert "disrupted 2 time(s), more than spec.disruptionLimit (1)" in found.message
    assert "TerminationByKubelet" in found.message


# --- against the real API server ---------------------------------------------------------

controlplane = pytest.mark.controlplane


@controlplane
def test_evictions_are_retried_up_to_the_limit_then_the_job_fails(
    kube: Kube, ns: str, operator: OperatorRunner
) -> None:
    job_name, first = create_with_pod(kube, ns, "evicted", disruptionLimit=1, backoffLimit=5)
    # The API server computes the QoS class: never BestEffort, the first evicted on pressure.
    assert first["status"]["qosClass"] == "Burstable"
    evicted = [{"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet"}]
    set_pod_finished(kube.client, first, 137, conditions=evicted)
    second = live_pod(kube, ns, job_name, other_than=(first["metadata"]["name"],))
    set_pod_finished(kube.client, second, 137, conditions=evicted)

    failed = wait_phase(kube, ns, "evicted", "Failed", "DisruptionLimitExceeded")
    assert "more than spec.disruptionLimit (1)" in failed["status"]["message"]
    assert ("Warning", "Failed") in events(kube, ns, "evicted")
    trainer_job = kube.get("Job", ns, job_name)
    assert trainer_job is not None and trainer_job["spec"]["suspend"] is True, "no third pod"
    assert not trainer_job["status"].get("failed"), "evictions never counted against backoffLimit"
    assert len(pods(kube, ns, job_name)) == 2


@controlplane
def test_a_peer_lost_exit_is_retried_without_spending_backoff(
    kube: Kube, ns: str, operator: OperatorRunner
) -> None:
    job_name, first = create_with_pod(kube, ns, "peers", backoffLimit=0)
    set_pod_finished(kube.client, first, PEER_LOST_EXIT_CODE, message="another process went away")
    live_pod(kube, ns, job_name, other_than=(first["metadata"]["name"],))
    trainer_job = kube.get("Job", ns, job_name)
    assert trainer_job is not None and not trainer_job["status"].get("failed")
    assert get(kube, ns, "peers")["status"]["phase"] == "Pending"


@controlplane
def test_an_image_the_operator_does_not_allow_fails_and_creates_nothing(
    kube: Kube, ns: str, operator: OperatorRunner
) -> None:
    create(kube, ns, "miner", image="docker.io/attacker/miner:latest")
    failed = wait_phase(kube, ns, "miner", "Failed", "ImageNotAllowed")
    assert "spec.image docker.io/attacker/miner:latest is not allowed" in failed["status"]["message"]
    assert ("Warning", "Failed") in events(kube, ns, "miner")
    assert kube.get("Job", ns, planning.Names.of("miner").job) is None
    assert not kube.list("ConfigMap", ns, label_selector=f"{planning.LABEL_JOB}=miner")


@controlplane
def test_credentials_in_a_namespace_not_allowed_fail_and_create_nothing(
    kube: Kube, ns: str, operator: OperatorRunner
) -> None:
    create(kube, ns, "creds", credentials={"storageSecret": "s3-creds"})
    failed = wait_phase(kube, ns, "creds", "Failed", "CredentialsNotAllowed")
    assert "s3-creds" in failed["status"]["message"]
    assert kube.get("Job", ns, planning.Names.of("creds").job) is None
