"""kube-controller-manager runs against the test API server: the Job controller makes
Pods and follows their status, the garbage collector deletes owned objects."""

from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

from kubetune_testkit.controlplane import wait_until

from .conftest import job_complete

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


def job_gone(batch: k8s.BatchV1Api, ns: str, name: str) -> bool:
    try:
        batch.read_namespaced_job(name, ns)
    except k8s.ApiException as error:
        if error.status == 404:
            return True
        raise
    return False


def test_job_controller_creates_a_pod_and_completes_the_job(
    core: k8s.CoreV1Api, batch: k8s.BatchV1Api, control_plane_namespace: str
) -> None:
    ns = control_plane_namespace
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

    wait_until(lambda: job_complete(batch, "trainer", ns), timeout=30, what="the Job to be Complete")
    status = batch.read_namespaced_job_status("trainer", ns).status
    assert status is not None and status.succeeded == 1


def test_garbage_collector_deletes_a_job_when_its_owner_goes(
    core: k8s.CoreV1Api, batch: k8s.BatchV1Api, control_plane_namespace: str
) -> None:
    ns = control_plane_namespace
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

    wait_until(
        lambda: job_gone(batch, ns, "owned"), timeout=60, what="the garbage collector to delete the owned Job"
    )
    wait_until(lambda: not job_pods(core, ns, "owned"), timeout=60, what="the owned Job's Pod to go")
    assert meta(batch.read_namespaced_job("unowned", ns)).name == "unowned"


FINETUNEJOB_CRD = Path(__file__).resolve().parents[2] / "crds" / "finetunejob.yaml"


@pytest.mark.skipif(not FINETUNEJOB_CRD.is_file(), reason="crds/finetunejob.yaml is not there")
def test_deleting_a_finetunejob_deletes_the_job_it_owns(
    control_plane_api_client: k8s.ApiClient, batch: k8s.BatchV1Api, control_plane_namespace: str
) -> None:
    """What the operator relies on. The fixture installs crds/ before the controller
    manager starts; a CRD installed later is only seen on the collector's 30 s resync."""
    ns = control_plane_namespace
    crd = yaml.safe_load(FINETUNEJOB_CRD.read_text())
    group, kind, plural = crd["spec"]["group"], crd["spec"]["names"]["kind"], crd["spec"]["names"]["plural"]
    version = next(v["name"] for v in crd["spec"]["versions"] if v.get("storage"))
    objects = k8s.CustomObjectsApi(control_plane_api_client)
    owner = objects.create_namespaced_custom_object(
        group,
        version,
        ns,
        plural,
        {
            "apiVersion": f"{group}/{version}",
            "kind": kind,
            "metadata": {"name": "tune"},
            "spec": {
                "model": {"name": "sshleifer/tiny-gpt2"},
                "dataset": {"train": "s3://datasets/train.jsonl"},
                "output": {"uri": "s3://models/out"},
            },
        },
    )
    assert isinstance(owner, dict)
    reference = k8s.V1OwnerReference(
        api_version=f"{group}/{version}",
        kind=kind,
        name="tune",
        uid=owner["metadata"]["uid"],
        controller=True,
        block_owner_deletion=True,
    )
    batch.create_namespaced_job(ns, make_job("tune-trainer", reference))

    objects.delete_namespaced_custom_object(group, version, ns, plural, "tune")
    wait_until(
        lambda: job_gone(batch, ns, "tune-trainer"),
        timeout=20,
        what="the garbage collector to delete the Job of the deleted FineTuneJob",
    )
