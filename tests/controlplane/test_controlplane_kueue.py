"""Kueue (built from its Go module by hack/build-kueue) in the test control plane, with its
CRDs and webhooks: a Job in a LocalQueue waits suspended until Kueue admits it within the
ClusterQueue's quota, then runs on a fake GPU node."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import pytest
from kubernetes import client as k8s

from kubetune_testkit.controlplane import KUEUE_VERSION, ControlPlane, FakeNode, wait_until

from .conftest import job_complete

pytestmark = pytest.mark.controlplane

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
GROUP, VERSION = "kueue.x-k8s.io", "v1beta1"


def kueue_object(kind: str, name: str, spec: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": meta, "spec": spec}


def gpu_quota(gpus: int) -> dict[str, Any]:
    return {
        "namespaceSelector": {},
        "resourceGroups": [
            {
                "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                "flavors": [
                    {
                        "name": "gpu",
                        "resources": [
                            {"name": "cpu", "nominalQuota": "64"},
                            {"name": "memory", "nominalQuota": "512Gi"},
                            {"name": "nvidia.com/gpu", "nominalQuota": str(gpus)},
                        ],
                    }
                ],
            }
        ],
    }


@pytest.fixture(scope="module")
def cluster() -> Iterator[ControlPlane]:
    nodes = [FakeNode(f"gpu-{index}", gpus=8) for index in range(2)]
    with ControlPlane(fake_nodes=nodes, kueue=True) as plane:
        with plane.admin_api_client() as api:
            custom = k8s.CustomObjectsApi(api)
            custom.create_cluster_custom_object(
                GROUP, VERSION, "resourceflavors", kueue_object("ResourceFlavor", "gpu", {})
            )
            custom.create_cluster_custom_object(
                GROUP, VERSION, "clusterqueues", kueue_object("ClusterQueue", "gpus", gpu_quota(8))
            )
            custom.create_namespaced_custom_object(
                GROUP,
                VERSION,
                "default",
                "localqueues",
                kueue_object("LocalQueue", "team", {"clusterQueue": "gpus"}, "default"),
            )
        yield plane


def gpu_job(name: str, gpus: int, *, queue: str = "team", suspend: bool = True) -> k8s.V1Job:
    job = k8s.V1Job.from_dict(
        {
            "metadata": {"name": name, "labels": {QUEUE_LABEL: queue}},
            "spec": {
                "suspend": suspend,
                "backoffLimit": 0,
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [
                            {
                                "name": "trainer",
                                "image": "registry.test/trainer:1",
                                "resources": {
                                    "requests": {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": str(gpus)},
                                    "limits": {"nvidia.com/gpu": str(gpus)},
                                },
                            }
                        ],
                    }
                },
            },
        }
    )
    assert job is not None
    return job


def workload_of(custom: k8s.CustomObjectsApi, job: str) -> dict[str, Any] | None:
    listed = cast(
        dict[str, Any], custom.list_namespaced_custom_object(GROUP, VERSION, "default", "workloads")
    )
    found = [
        w
        for w in listed["items"]
        if any(ref["name"] == job for ref in w["metadata"].get("ownerReferences") or [])
    ]
    return found[0] if len(found) == 1 else None


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    conditions = ((obj or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == kind), None)


def test_kueue_runs_with_its_crds_and_webhooks(cluster: ControlPlane) -> None:
    assert "kueue" in cluster.process_logs()
    assert KUEUE_VERSION in cluster.process_logs()["kueue"].read_text()
    with cluster.admin_api_client() as api:
        served = {r.name for r in k8s.CustomObjectsApi(api).get_api_resources(GROUP, VERSION).resources}
        admission = k8s.AdmissionregistrationV1Api(api)
        mutating = admission.list_mutating_webhook_configuration().items
    assert {"clusterqueues", "localqueues", "resourceflavors", "workloads"} <= served
    urls = [w.client_config.url or "" for c in mutating for w in c.webhooks or [] if w.client_config]
    assert any(url.startswith("https://127.0.0.1:") and url.endswith("/mutate-batch-v1-job") for url in urls)


def test_a_queued_job_is_admitted_unsuspended_and_runs(cluster: ControlPlane) -> None:
    with cluster.admin_api_client() as api:
        batch, custom = k8s.BatchV1Api(api), k8s.CustomObjectsApi(api)
        batch.create_namespaced_job("default", gpu_job("admitted", gpus=8))
        wait_until(
            lambda: job_complete(batch, "admitted"),
            timeout=60,
            what="the admitted Job to run and complete on a fake node",
        )
        workload = workload_of(custom, "admitted")
        admitted = condition(workload, "Admitted")
        assert admitted is not None and admitted["status"] == "True"
        assert workload is not None
        assert workload["status"]["admission"]["clusterQueue"] == "gpus"


def test_the_webhook_suspends_a_queued_job_created_running(cluster: ControlPlane) -> None:
    with cluster.admin_api_client() as api:
        created = k8s.BatchV1Api(api).create_namespaced_job(
            "default", gpu_job("unsuspended", gpus=1, queue="nowhere", suspend=False)
        )
    assert created.spec is not None and created.spec.suspend is True


def test_a_job_over_quota_stays_suspended_with_the_reason(cluster: ControlPlane) -> None:
    with cluster.admin_api_client() as api:
        batch, custom = k8s.BatchV1Api(api), k8s.CustomObjectsApi(api)
        batch.create_namespaced_job("default", gpu_job("too-big", gpus=16))

        def pending() -> dict[str, Any] | None:
            reserved = condition(workload_of(custom, "too-big"), "QuotaReserved")
            return reserved if reserved and reserved["status"] == "False" else None

        reserved = wait_until(pending, timeout=30, what="Kueue to report why too-big waits")
        assert "nvidia.com/gpu" in reserved["message"]
        job = batch.read_namespaced_job("too-big", "default")
        assert job.spec is not None and job.spec.suspend is True
        assert not job.status or not job.status.active
