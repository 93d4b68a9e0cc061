"""kube-controller-manager runs against the test API server: the Job controller makes
Pods and follows their status, the garbage collector deletes owned objects."""

from typing import Any

import pytest
from kubernetes import client as k8s

from kubetune.testing.controlplane import wait_until

pytestmark = pytest.mark.controlplane


def make_job(name: str, owner: k8s.V1OwnerReference | None = None) -> k8s.V1Job:
    return k8s.V1Job(
        metadata=k8s.V1ObjectMeta(name=name, owner_references=[owner] if owner else None),
        spec=k8s.V1JobSpec(
            backoff_limit=0,
            template=k8s.V1PodTemplateSpec(
                spec=k8s.V1PodSpec(
                    restart_policy="Never",
                    containers=[k8s.V1Container(name="main", image="busybox", command=["true"])],
                )
            ),
        ),
    )


def meta(obj: Any) -> k8s.V1ObjectMeta:
    assert isinstance(obj.metadata, k8s.V1ObjectMeta)
    return obj.metadata


def job_pods(core: k8s.CoreV1Api, ns: str, job: str) -> list[k8s.V1Pod]:
    return list(core.list_namespaced_pod(ns, label_selector=f"batch.kubernetes.io/job-name={job}").items)


def test_job_controller_creates_a_pod_and_completes_the_job(
    control_plane_api_client: k8s.ApiClient, control_plane_namespace: str
) -> None:
    ns = control_plane_namespace
    batch = k8s.BatchV1Api(control_plane_api_client)
    core = k8s.CoreV1Api(control_plane_api_client)
    job = batch.create_namespaced_job(ns, make_job("trainer"))

    wait_until(lambda: bool(job_pods(core, ns, "trainer")), timeout=30, what="the Job's Pod")
    [pod] = job_pods(core, ns, "trainer")
    assert [ref.uid for ref in meta(pod).owner_references or []] == [meta(job).uid]
    assert pod.spec is not None
    assert pod.spec.service_account_name == "default", "ServiceAccount admission did not run"
    assert pod.spec.node_name is None, "no scheduler runs, so the Pod stays unscheduled"

    # No kubelet runs here: report the Pod finished as a kubelet would.
    core.patch_namespaced_pod_status(
        str(meta(pod).name),
        ns,
        {
            "status": {
                "phase": "Succeeded",
                "containerStatuses": [
                    {
                        "name": "main",
                        "image": "busybox",
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {"terminated": {"exitCode": 0, "reason": "Completed"}},
                    }
                ],
            }
        },
    )

    def job_status() -> k8s.V1JobStatus:
        status = batch.read_namespaced_job_status("trainer", ns).status
        assert status is not None
        return status

    def complete() -> bool:
        return any(c.type == "Complete" and c.status == "True" for c in job_status().conditions or [])

    wait_until(complete, timeout=30, what="the Job to be Complete")
    assert job_status().succeeded == 1


def test_garbage_collector_deletes_a_job_when_its_owner_goes(
    control_plane_api_client: k8s.ApiClient, control_plane_namespace: str
) -> None:
    ns = control_plane_namespace
    batch = k8s.BatchV1Api(control_plane_api_client)
    core = k8s.CoreV1Api(control_plane_api_client)
    owner = core.create_namespaced_config_map(ns, k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="owner")))
    reference = k8s.V1OwnerReference(
        api_version="v1",
        kind="ConfigMap",
        name="owner",
        uid=meta(owner).uid,
        controller=True,
        block_owner_deletion=True,
    )
    batch.create_namespaced_job(ns, make_job("owned", reference))
    batch.create_namespaced_job(ns, make_job("unowned"))
    wait_until(lambda: bool(job_pods(core, ns, "owned")), timeout=30, what="the owned Job's Pod")

    core.delete_namespaced_config_map("owner", ns)

    def owned_job_gone() -> bool:
        try:
            batch.read_namespaced_job("owned", ns)
        except k8s.ApiException as error:
            if error.status == 404:
                return True
            raise
        return False

    wait_until(owned_job_gone, timeout=60, what="the garbage collector to delete the owned Job")
    wait_until(lambda: not job_pods(core, ns, "owned"), timeout=60, what="the owned Job's Pod to go")
    assert meta(batch.read_namespaced_job("unowned", ns)).name == "unowned"
