"""Run it as users run it: images built from the Dockerfiles, `helm install`, FineTuneJobs that
train in real trainer containers on a real kubelet, artifacts in S3.

The cluster is one real node (hack/e2e-cluster: kubelet + containerd + runc) joined to the
project's control plane; pods reach the host, where the S3 server listens, and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from kubetune import api, contract
from kubetune.artifacts import pull
from kubetune.operator.kube import Kube
from kubetune.storage import ObjectStore
from kubetune_testkit import node
from kubetune_testkit.controlplane import KUBERNETES_VERSION

from .conftest import Cluster, Run, status, trainer_pods, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]


def test_the_node_is_a_real_kubelet_on_containerd(e2e_cluster: Cluster) -> None:
    wide = e2e_cluster.kubectl("get", "nodes", "-o", "wide").stdout
    [header, row] = wide.strip().splitlines()
    columns = dict(zip(header.split(), row.split(), strict=False))
    assert columns["NAME"] == node.NODE_NAME
    assert columns["STATUS"] == "Ready"
    assert columns["VERSION"] == KUBERNETES_VERSION
    assert columns["INTERNAL-IP"] == node.GATEWAY
    assert re.search(r"containerd://1\.\d+", wide), wide


def test_the_trainer_image_runs_as_uid_1000(e2e_cluster: Cluster) -> None:
    overrides = '{"spec": {"securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "runAsNonRoot": true}}}'
    e2e_cluster.kubectl(
        "run", "kubetune-help", "--namespace=default", "--image=localhost/kubetune-trainer:dev",
        "--image-pull-policy=Never", "--restart=Never", f"--overrides={overrides}",
        "--command", "--", "kubetune", "--help",
    )  # fmt: skip
    try:
        e2e_cluster.kubectl(
            "wait", "pod/kubetune-help", "--namespace=default",
            "--for=jsonpath={.status.phase}=Succeeded", "--timeout=180s", timeout=200,
        )  # fmt: skip
        logs = e2e_cluster.kubectl("logs", "pod/kubetune-help", "--namespace=default").stdout
        assert "trainer" in logs and "operator" in logs, logs
        user = e2e_cluster.kubectl(
            "get", "pod/kubetune-help", "--namespace=default",
            "-o", "jsonpath={.spec.securityContext.runAsUser}",
        ).stdout  # fmt: skip
        assert user == "1000"
    finally:
        e2e_cluster.kubectl("delete", "pod/kubetune-help", "--namespace=default", "--wait=false", check=False)


def test_the_operator_runs_with_only_the_charts_service_account(
    e2e_cluster: Cluster, e2e_api: Kube, kubetune_release: str
) -> None:
    [pod] = e2e_api.list("Pod", kubetune_release)
    spec, state = pod["spec"], pod["status"]
    assert spec["serviceAccountName"] == "kubetune"
    assert state["phase"] == "Running"
    [container] = spec["containers"]
    assert container["image"] == "localhost/kubetune-operator:dev"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # Ready means kopf got through the kubernetes Service with the projected token and watches.
    assert all(status["ready"] for status in state["containerStatuses"])
    account = f"system:serviceaccount:{kubetune_release}:kubetune"
    can = e2e_cluster.kubectl(
        "auth", "can-i", "--as", account, "patch", f"finetunejobs.{api.GROUP}", "--subresource=status", "-A",
        check=False,
    )  # fmt: skip
    assert can.stdout.strip() == "yes"
    for verb, resource in (("get", "secrets"), ("create", "pods"), ("delete", "nodes")):
        refused = e2e_cluster.kubectl("auth", "can-i", "--as", account, verb, resource, "-A", check=False)
        assert refused.stdout.strip() == "no", f"the operator may {verb} {resource}"


class PhaseRecorder:
    """Every phase a FineTuneJob's status passes through, polled often (a phase lasts seconds)."""

    def __init__(self, kube: Kube, namespace: str, name: str) -> None:
        self.phases: list[str] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(kube, namespace, name), daemon=True)
        self._thread.start()

    def _run(self, kube: Kube, namespace: str, name: str) -> None:
        while not self._done.wait(0.1):
            with contextlib.suppress(ApiException, OSError):
                phase = status(kube, namespace, name).get("phase")
                if phase and (not self.phases or self.phases[-1] != phase):
                    self.phases.append(phase)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def __enter__(self) -> PhaseRecorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def finished(kube: Kube, namespace: str, name: str) -> dict[str, Any] | None:
    found = status(kube, namespace, name)
    return found if found.get("phase") in ("Succeeded", "Failed") else None


def running_trainer(kube: Kube, namespace: str) -> dict[str, Any] | None:
    pods = [p for p in trainer_pods(kube, namespace) if p["status"].get("phase") == "Running"]
    return pods[-1] if pods and pods[-1]["status"].get("podIP") else None


def test_a_finetunejob_trains_in_a_real_trainer_container(e2e_run: Run, tmp_path: Path) -> None:
    e2e_cluster, e2e_api, ns = e2e_run.cluster, e2e_run.kube, e2e_run.namespace
    job = e2e_run.finetunejob("dates")
    job["spec"]["training"]["maxSteps"] = 120
    # The image's llama.cpp (built for any x86-64 CPU) quantizes and checks a GGUF export.
    job["spec"]["export"] = {"merge": True, "formats": ["gguf-q8_0"]}
    with PhaseRecorder(e2e_api, ns, "dates") as recorder, e2e_run.described(TimeoutError, AssertionError):
        e2e_api.create(job)
        trainer = wait_for(lambda: running_trainer(e2e_api, ns), timeout=300, what="a running trainer pod")
        [container] = trainer["spec"]["containers"]
        assert container["image"] == "localhost/kubetune-trainer:dev"
        name = trainer["metadata"]["name"]
        uid = e2e_cluster.kubectl("exec", "-n", ns, name, "--", "id", "-u").stdout.strip()
        assert uid == str(contract.TRAINER_UID) == "1000"

        def scraped() -> str | None:
            url = f"http://{trainer['status']['podIP']}:9400/metrics"
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    text: str = response.read().decode()
            except OSError:
                return None
            return text if re.search(r"^kubetune_trainer_step\{[^}]*\} [1-9]", text, re.MULTILINE) else None

        metrics = wait_for(scraped, timeout=300, what="the trainer's /metrics with steps done", interval=1)
        assert 'finetunejob="dates"' in metrics and f'namespace="{ns}"' in metrics
        done = wait_for(lambda: finished(e2e_api, ns, "dates"), timeout=900, what="the job to finish")
        assert done["phase"] == "Succeeded", done
        wait_for(lambda: "Succeeded" in recorder.phases, timeout=30, what="the recorder to see Succeeded")
    phases = recorder.phases
    assert phases[0] == "Pending", phases
    assert phases.index("Pending") < phases.index("Running") < phases.index("Succeeded"), phases

    progress = done["progress"]
    assert progress["step"] == progress["totalSteps"] == 120
    assert progress["loss"] > 0 and progress["tokensPerSecond"] > 0
    assert done["results"]["after"]["loss"] < done["results"]["before"]["loss"]
    manifest = done["artifacts"]["manifest"]
    assert manifest == f"s3://{e2e_run.bucket}/runs/{ns}/dates/manifest.json"
    # Every file the manifest lists is there with its size and SHA-256 (pull checks each).
    pulled = pull(ObjectStore(e2e_run.s3.storage_config()), manifest.removesuffix("/manifest.json"), tmp_path)
    paths = {f.path for f in pulled.manifest.files}
    assert "adapter/adapter_model.safetensors" in paths and "metrics.json" in paths
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert {"quantized/gguf-q8_0/model.gguf", "quantized/gguf-q8_0/Modelfile"} <= paths
    checks = json.loads((tmp_path / "metrics.json").read_text())["checks"]
    assert checks["gguf-q8_0_top1"] >= 0.95 and checks["gguf-q8_0_prompts"] > 0

    [pod] = trainer_pods(e2e_api, ns)
    logs = e2e_cluster.kubectl("logs", "-n", ns, pod["metadata"]["name"]).stdout
    for stage in ("fetch", "prepare", "baseline", "train", "evaluate", "merge", "quantize", "push"):
        assert f"▶ {stage}" in logs and f"✓ {stage}" in logs, f"stage {stage} missing from the log:\n{logs}"
    assert e2e_run.s3.secret_key not in logs


def test_an_evicted_trainer_resumes_from_its_checkpoint_without_spending_a_retry(e2e_run: Run) -> None:
    """A drain or a preemption evicts the pod: SIGTERM, a checkpoint, a replacement that
    resumes. backoffLimit 0 makes any failure that counts fail the job."""
    e2e_cluster, e2e_api, ns = e2e_run.cluster, e2e_run.kube, e2e_run.namespace
    job = e2e_run.finetunejob("dates", backoffLimit=0)
    job["spec"]["training"] |= {"maxSteps": 200, "checkpointEvery": 25}
    job["spec"]["evaluation"] = {"metrics": ["loss"], "baseline": False, "maxSamples": 8}
    e2e_api.create(job)
    with e2e_run.described(TimeoutError, AssertionError):
        first = wait_for(lambda: running_trainer(e2e_api, ns), timeout=300, what="a running trainer pod")
        wait_for(
            lambda: (status(e2e_api, ns, "dates").get("progress") or {}).get("step", 0) >= 40,
            timeout=600,
            what="training past the first checkpoint",
        )
        name = first["metadata"]["name"]
        eviction = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": name, "namespace": ns},
        }
        e2e_api.request("POST", e2e_api.path("Pod", ns, name, "eviction"), body=eviction)

        def replacement() -> dict[str, Any] | None:
            pod = running_trainer(e2e_api, ns)
            return pod if pod is not None and pod["metadata"]["uid"] != first["metadata"]["uid"] else None

        second = wait_for(replacement, timeout=300, what="the replacement trainer pod")
        done = wait_for(lambda: finished(e2e_api, ns, "dates"), timeout=900, what="the job to finish")
        assert done["phase"] == "Succeeded", done
    logs = e2e_cluster.kubectl("logs", "-n", ns, second["metadata"]["name"]).stdout
    resumed = re.search(r"resuming from checkpoint step (\d+)", logs)
    assert resumed, logs
    assert int(resumed.group(1)) >= 25
    [trainer_job] = e2e_api.list("Job", ns)
    assert trainer_job["status"].get("succeeded") == 1
    assert not trainer_job["status"].get("failed"), "the eviction was counted as a failure"
    # The eviction deleted the first pod; the replacement is the only one.
    assert [p["metadata"]["uid"] for p in trainer_pods(e2e_api, ns)] == [second["metadata"]["uid"]]


def test_a_bad_dataset_fails_the_job_once_naming_the_file_and_line(e2e_run: Run) -> None:
    e2e_api, ns = e2e_run.kube, e2e_run.namespace
    rows = [
        '{"prompt": "2020-01-01 ->", "completion": " January"}',
        '{"prompt": "2020-02-01 ->", "completion": " February"}',
        '{"prompt": "2020-03-01 ->", "completion": ',
    ]
    client = e2e_run.s3.client()
    client.put_object(Bucket=e2e_run.bucket, Key="data/bad.jsonl", Body="\n".join(rows).encode() + b"\n")
    client.close()
    dataset = {
        "train": f"s3://{e2e_run.bucket}/data/bad.jsonl",
        "validationSplit": 0.3,
        "format": "prompt-completion",
    }
    e2e_api.create(e2e_run.finetunejob("broken", dataset=dataset, backoffLimit=2))
    with e2e_run.described(TimeoutError):
        done = wait_for(lambda: finished(e2e_api, ns, "broken"), timeout=600, what="the job to finish")
    assert done["phase"] == "Failed", done
    assert "bad.jsonl" in done["message"] and re.search(r"bad\.jsonl:3\b", done["message"]), done["message"]
    assert len(trainer_pods(e2e_api, ns)) == 1, "a configuration error is not retried"
