"""FineTuneJobs with ``scheduling.queueName`` under a real Kueue (built from its Go module by
hack/build-kueue) in the test control plane, with fake GPU nodes (kwok + kube-scheduler).

The operator runs in-process. kwok runs the trainer pods without completing them
(``fake_job_pods_complete=False``): a test ends one by writing its status as a kubelet would.
Each test has its own namespace, ClusterQueue (8 ``nvidia.com/gpu``, selecting only that
namespace) and LocalQueue ``team``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client as k8s

from kubetune import api
from kubetune.operator.kube import Kube
from kubetune_testkit.controlplane import ControlPlane, FakeNode
from kubetune_testkit.operator_runner import (
    OperatorRunner,
    install_crd,
    operator_identity,
    set_pod_finished,
    wait_for,
)

pytestmark = pytest.mark.controlplane

GROUP, VERSION = "kueue.x-k8s.io", "v1beta1"
KUEUE = f"/apis/{GROUP}/{VERSION}"
FLAVOR = "gpu"


@pytest.fixture(scope="module")
def cluster() -> Iterator[ControlPlane]:
    nodes = [FakeNode(f"gpu-{index}", gpus=8) for index in range(2)]
    with ControlPlane(fake_nodes=nodes, fake_job_pods_complete=False, kueue=True) as plane:
        with plane.admin_api_client() as client:
            install_crd(client)
            kube = Kube(client)
            kube.request(
                "POST",
                f"{KUEUE}/resourceflavors",
                body={
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "ResourceFlavor",
                    "metadata": {"name": FLAVOR},
                },
            )
            for name, value in (("low", 100), ("high", 1000)):
                kube.request(
                    "POST",
                    "/apis/scheduling.k8s.io/v1/priorityclasses",
                    body={
                        "apiVersion": "scheduling.k8s.io/v1",
                        "kind": "PriorityClass",
                        "metadata": {"name": name},
                        "value": value,
                    },
                )
        yield plane


@pytest.fixture
def client(cluster: ControlPlane) -> Iterator[k8s.ApiClient]:
    with cluster.admin_api_client() as client:
        yield client


@pytest.fixture
def kube(client: k8s.ApiClient) -> Kube:
    return Kube(client)


@pytest.fixture
def ns(kube: Kube) -> Iterator[str]:
    """A namespace with the LocalQueue ``team`` of a ClusterQueue of its own."""
    name = f"kueue-{uuid.uuid4().hex[:8]}"
    kube.request(
        "POST",
        "/api/v1/namespaces",
        body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
    )
    wait_for(lambda: kube.get("ServiceAccount", name, "default"), what=f"ServiceAccount {name}/default")
    kube.request("POST", f"{KUEUE}/clusterqueues", body=cluster_queue(name, gpus=8))
    kube.request(
        "POST",
        f"{KUEUE}/namespaces/{name}/localqueues",
        body={
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "LocalQueue",
            "metadata": {"name": "team", "namespace": name},
            "spec": {"clusterQueue": name},
        },
    )
    yield name
    kube.request("DELETE", f"/api/v1/namespaces/{name}")


@pytest.fixture
def operator(cluster: ControlPlane, kube: Kube, ns: str) -> Iterator[OperatorRunner]:
    """The operator with its own rights (rbac.OPERATOR_RULES), Kueue's Workloads among them."""
    token = operator_identity(cluster, kube, ns)
    with cluster.token_api_client(token) as client, OperatorRunner(client, [ns]) as runner:
        yield runner


def cluster_queue(name: str, *, gpus: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ClusterQueue",
        "metadata": {"name": name},
        "spec": {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}},
            "queueingStrategy": "StrictFIFO",
            "preemption": {"withinClusterQueue": "LowerPriority"},
            "resourceGroups": [
                {
                    "coveredResources": ["cpu", "memory", "ephemeral-storage", "nvidia.com/gpu"],
                    "flavors": [
                        {
                            "name": FLAVOR,
                            "resources": [
                                {"name": "cpu", "nominalQuota": "64"},
                                {"name": "memory", "nominalQuota": "512Gi"},
                                {"name": "ephemeral-storage", "nominalQuota": "1Ti"},
                                {"name": "nvidia.com/gpu", "nominalQuota": str(gpus)},
                            ],
                        }
                    ],
                }
            ],
        },
    }


def create(kube: Kube, ns: str, name: str, gpus: int, *, nodes: int = 1, priority: str | None = None) -> None:
    scheduling: dict[str, Any] = {"queueName": "team"}
    if priority:
        scheduling["priorityClassName"] = priority
    kube.create(
        {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "model": {"name": "Qwen/Qwen2.5-0.5B"},
                "dataset": {"train": "s3://data/train.jsonl"},
                "output": {"uri": f"s3://models/{name}/"},
                "resources": {"gpus": gpus, "nodes": nodes},
                "scheduling": scheduling,
            },
        }
    )


def state(kube: Kube, ns: str, name: str) -> tuple[str | None, str | None]:
    """(phase, reason of the Running condition) of a FineTuneJob."""
    obj = kube.get(api.KIND, ns, name) or {}
    status = obj.get("status") or {}
    running: dict[str, Any] = next((c for c in status.get("conditions") or [] if c["type"] == "Running"), {})
    return status.get("phase"), running.get("reason")


def wait_state(kube: Kube, ns: str, name: str, phase: str, reason: str, *, timeout: float = 60) -> None:
    try:
        wait_for(
            lambda: state(kube, ns, name) == (phase, reason), timeout=timeout, what=f"{name} {phase}/{reason}"
        )
    except TimeoutError as error:
        obj = kube.get(api.KIND, ns, name) or {}
        raise AssertionError(f"{error}; status is {obj.get('status')}") from None


def job(kube: Kube, ns: str, name: str) -> dict[str, Any]:
    found = kube.get("Job", ns, name)
    assert found is not None, f"no Job {ns}/{name}"
    return found


def live_pods(kube: Kube, ns: str, name: str) -> list[dict[str, Any]]:
    pods = kube.list("Pod", ns, label_selector=f"batch.kubernetes.io/job-name={name}")
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def running_pods(kube: Kube, ns: str, name: str, count: int = 1) -> list[dict[str, Any]]:
    """Wait for ``count`` pods of the Job ``name`` that kwok runs on fake nodes."""

    def fetch() -> list[dict[str, Any]] | None:
        pods = [p for p in live_pods(kube, ns, name) if (p.get("status") or {}).get("phase") == "Running"]
        return pods if len(pods) == count else None

    return wait_for(fetch, timeout=60, what=f"{count} running pod(s) of {name}")


def workload(kube: Kube, ns: str, name: str) -> dict[str, Any] | None:
    found = kube.request("GET", f"{KUEUE}/namespaces/{ns}/workloads").get("items") or []
    owned = [
        w for w in found if any(ref["name"] == name for ref in w["metadata"].get("ownerReferences") or [])
    ]
    return owned[0] if len(owned) == 1 else None


def workload_condition(kube: Kube, ns: str, name: str, kind: str) -> dict[str, Any] | None:
    conditions = ((workload(kube, ns, name) or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == kind), None)


def assert_waiting(kube: Kube, ns: str, name: str, *, behind_head: bool = False) -> None:
    """Queued in the FineTuneJob, suspended without pods, and Kueue says it lacks quota.

    ``behind_head``: the Workload waits behind another one in a StrictFIFO queue, which Kueue
    may not try (and so not give a reason) until the head is admitted.
    """
    wait_state(kube, ns, name, "Pending", "Queued")
    assert job(kube, ns, name)["spec"]["suspend"] is True
    assert live_pods(kube, ns, name) == []
    if behind_head:
        assert running_message(kube, ns, name).startswith("waiting for admission to Kueue queue team")
        return
    reserved = wait_for(
        lambda: workload_condition(kube, ns, name, "QuotaReserved"), what=f"the Workload of {name}"
    )
    assert reserved["status"] == "False"
    assert "insufficient" in reserved["message"] or "quota" in reserved["message"].lower()

    # The FineTuneJob says why, in Kueue's words (the operator watches the Workloads).
    def kueue_says() -> str:
        return str((workload_condition(kube, ns, name, "QuotaReserved") or {}).get("message"))

    wait_for(
        lambda: (
            running_message(kube, ns, name) == f"waiting for admission to Kueue queue team: {kueue_says()}"
        ),
        what=f"Kueue's reason in {name}'s status",
    )


def running_message(kube: Kube, ns: str, name: str) -> str:
    status = (kube.get(api.KIND, ns, name) or {}).get("status") or {}
    running: dict[str, Any] = next((c for c in status.get("conditions") or [] if c["type"] == "Running"), {})
    return str(running.get("message") or "")


def finish(client: k8s.ApiClient, kube: Kube, ns: str, name: str) -> None:
    for pod in running_pods(kube, ns, name):
        set_pod_finished(client, pod, 0)
    wait_state(kube, ns, name, "Succeeded", "Completed")


def test_jobs_run_in_quota_order_and_wait_queued(
    client: k8s.ApiClient, kube: Kube, ns: str, operator: OperatorRunner
) -> None:
    create(kube, ns, "first", gpus=8)
    wait_state(kube, ns, "first", "Running", "PodRunning")
    assert job(kube, ns, "first")["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team"
    create(kube, ns, "second", gpus=8)
    wait_for(lambda: workload(kube, ns, "second"), what="the Workload of second")
    create(kube, ns, "third", gpus=4)
    assert_waiting(kube, ns, "second")
    assert_waiting(kube, ns, "third", behind_head=True)

    finish(client, kube, ns, "first")
    wait_state(kube, ns, "second", "Running", "PodRunning")
    # Strict FIFO: third fits in what is left of the quota only once second is done.
    assert_waiting(kube, ns, "third")

    finish(client, kube, ns, "second")
    wait_state(kube, ns, "third", "Running", "PodRunning")
    [pod] = running_pods(kube, ns, "third")
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    admitted = {
        name: workload_condition(kube, ns, name, "Admitted")["lastTransitionTime"]  # type: ignore[index]
        for name in ("first", "second", "third")
    }
    assert sorted(admitted, key=admitted.__getitem__) == ["first", "second", "third"]


def test_a_two_node_job_is_admitted_whole_or_not_at_all(
    kube: Kube, ns: str, operator: OperatorRunner
) -> None:
    # 2 nodes x 8 GPUs: one node's worth fits the quota of 8, the whole job does not.
    create(kube, ns, "pair", gpus=8, nodes=2)
    assert_waiting(kube, ns, "pair")

    kube.request(
        "PATCH",
        f"{KUEUE}/clusterqueues/{ns}",
        body={"spec": {"resourceGroups": cluster_queue(ns, gpus=16)["spec"]["resourceGroups"]}},
        content_type="application/merge-patch+json",
    )
    pods = running_pods(kube, ns, "pair", count=2)
    assert {p["spec"]["nodeName"] for p in pods} == {"gpu-0", "gpu-1"}
    wait_state(kube, ns, "pair", "Running", "PodRunning")


def test_deleting_a_running_job_frees_its_quota(kube: Kube, ns: str, operator: OperatorRunner) -> None:
    create(kube, ns, "running", gpus=8)
    running_pods(kube, ns, "running")
    create(kube, ns, "waiting", gpus=8)
    assert_waiting(kube, ns, "waiting")

    kube.delete(api.KIND, ns, "running")
    wait_state(kube, ns, "waiting", "Running", "PodRunning")
    assert kube.get("Job", ns, "running") is None


def test_a_higher_priority_job_preempts_and_the_preempted_one_resumes(
    client: k8s.ApiClient, kube: Kube, ns: str, operator: OperatorRunner
) -> None:
    create(kube, ns, "batch", gpus=8, priority="low")
    [first] = running_pods(kube, ns, "batch")
    config_map = job(kube, ns, "batch")["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"]

    create(kube, ns, "urgent", gpus=8, priority="high")
    wait_state(kube, ns, "urgent", "Running", "PodRunning")
    # Kueue evicted the low-priority Workload: its Job is suspended again, its pod ended
    # through a graceful delete (the trainer's checkpoint-on-SIGTERM path), and the
    # FineTuneJob waits in the queue instead of failing.
    evicted = workload_condition(kube, ns, "batch", "Evicted")
    assert evicted is not None and evicted["reason"] == "Preempted"
    wait_state(kube, ns, "batch", "Pending", "Queued")
    assert job(kube, ns, "batch")["spec"]["suspend"] is True
    wait_for(lambda: kube.get("Pod", ns, first["metadata"]["name"]) is None, what="the preempted pod to go")
    assert (job(kube, ns, "batch").get("status") or {}).get("failed", 0) == 0

    finish(client, kube, ns, "urgent")
    wait_state(kube, ns, "batch", "Running", "PodRunning")
    [second] = running_pods(kube, ns, "batch")
    assert second["metadata"]["name"] != first["metadata"]["name"]
    # The same Job, configuration and output: the new pod resumes from the newest complete
    # checkpoint under the job's output, where the preempted pod left it.
    assert job(kube, ns, "batch")["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"] == config_map
