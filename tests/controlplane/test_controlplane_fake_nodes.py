"""With fake nodes, kube-scheduler places Pods by their requests, selectors and
tolerations, and kwok plays the kubelet: a Job's Pod runs and the Job completes."""

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client as k8s

from kubetune_testkit.controlplane import ControlPlane, ControlPlaneError, FakeNode, wait_until

from .conftest import job_complete

pytestmark = pytest.mark.controlplane

GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[ControlPlane]:
    nodes = [
        FakeNode("cpu-0"),
        FakeNode("gpu-0", gpus=8, labels={"nvidia.com/gpu.product": "H100"}, taints=[GPU_TAINT]),
    ]
    with ControlPlane(fake_nodes=nodes) as plane:
        yield plane


def gpu_job(name: str, gpus: int, *, tolerate: bool = True) -> k8s.V1Job:
    return k8s.V1Job(
        metadata=k8s.V1ObjectMeta(name=name),
        spec=k8s.V1JobSpec(
            backoff_limit=0,
            template=k8s.V1PodTemplateSpec(
                spec=k8s.V1PodSpec(
                    restart_policy="Never",
                    node_selector={"nvidia.com/gpu.product": "H100"},
                    tolerations=[
                        k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
                    ]
                    if tolerate
                    else None,
                    containers=[
                        k8s.V1Container(
                            name="trainer",
                            image="registry.test/trainer:1",
                            resources=k8s.V1ResourceRequirements(
                                limits={"nvidia.com/gpu": str(gpus)}, requests={"nvidia.com/gpu": str(gpus)}
                            ),
                        )
                    ],
                )
            ),
        ),
    )


def only_pod(core: k8s.CoreV1Api, job: str) -> k8s.V1Pod | None:
    pods = core.list_namespaced_pod("default", label_selector=f"batch.kubernetes.io/job-name={job}").items
    return pods[0] if len(pods) == 1 else None


def condition(pod: k8s.V1Pod, kind: str) -> Any:
    conditions = (pod.status.conditions if pod.status else None) or []
    return next((c for c in conditions if c.type == kind), None)


def test_fake_nodes_are_ready(cluster: ControlPlane) -> None:
    with cluster.admin_api_client() as api:
        nodes = {node.metadata.name: node for node in k8s.CoreV1Api(api).list_node().items if node.metadata}
    assert set(nodes) == {"cpu-0", "gpu-0"}
    gpu = nodes["gpu-0"]
    assert gpu.status is not None and gpu.status.allocatable is not None
    assert gpu.status.allocatable["nvidia.com/gpu"] == "8"


def test_gpu_job_is_scheduled_runs_and_completes(cluster: ControlPlane) -> None:
    with cluster.admin_api_client() as api:
        core, batch = k8s.CoreV1Api(api), k8s.BatchV1Api(api)
        batch.create_namespaced_job("default", gpu_job("fits", gpus=4))
        wait_until(
            lambda: job_complete(batch, "fits"), timeout=60, what="the GPU Job to complete on the fake node"
        )
        pod = only_pod(core, "fits")
        assert pod is not None and pod.spec is not None and pod.status is not None
        assert pod.spec.node_name == "gpu-0"
        assert pod.status.phase == "Succeeded"


def test_unsatisfiable_requests_stay_pending_with_the_reason(cluster: ControlPlane) -> None:
    with cluster.admin_api_client() as api:
        core, batch = k8s.CoreV1Api(api), k8s.BatchV1Api(api)
        batch.create_namespaced_job("default", gpu_job("too-big", gpus=16))
        batch.create_namespaced_job("default", gpu_job("intolerant", gpus=1, tolerate=False))

        for job, reason in (("too-big", "Insufficient nvidia.com/gpu"), ("intolerant", "untolerated taint")):

            def unschedulable(job: str = job) -> bool:
                pod = only_pod(core, job)
                scheduled = condition(pod, "PodScheduled") if pod else None
                return scheduled is not None and scheduled.reason == "Unschedulable"

            wait_until(unschedulable, timeout=30, what=f"the scheduler to reject the Pod of {job}")
            pod = only_pod(core, job)
            assert pod is not None
            assert reason in condition(pod, "PodScheduled").message


def test_fake_nodes_need_the_fake_node_components(control_plane: ControlPlane) -> None:
    with pytest.raises(ControlPlaneError, match="fake_nodes"):
        control_plane.add_fake_node(FakeNode("nope"))
