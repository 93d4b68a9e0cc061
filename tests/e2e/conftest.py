"""The end-to-end tier: one real node (`hack/e2e-cluster`) for the whole session, the chart
installed with helm from the images of `hack/build-images`, and the test S3 server on the
address pods reach the host at."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from kubetune import api
from kubetune.operator.kube import Kube
from kubetune_testkit import node
from kubetune_testkit.controlplane import find_binaries, wait_until
from kubetune_testkit.manifests import tiny_run
from kubetune_testkit.s3 import S3Server

ROOT = Path(__file__).resolve().parents[2]
E2E_CLUSTER = ROOT / "hack" / "e2e-cluster"
CHART = ROOT / "charts" / "kubetune"
RELEASE = "kubetune"
OPERATOR_NAMESPACE = "kubetune-system"

T = TypeVar("T")


def wait_for(check: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.5) -> T:
    return wait_until(check, timeout=timeout, what=what, interval=interval)


@dataclass(frozen=True)
class Cluster:
    kubeconfig: Path
    kubectl_binary: Path

    def kubectl(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.kubectl_binary), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def api_client(self) -> k8s.ApiClient:
        config = str(self.kubeconfig)
        client: k8s.ApiClient = k8s_config.new_client_from_config(config)  # type: ignore[no-untyped-call]
        return client


@pytest.fixture(scope="session")
def e2e_cluster() -> Iterator[Cluster]:
    """The node of `hack/e2e-cluster`, started for this session (left alone if it was already
    running; E2E_CLUSTER_KEEP=1 leaves a started one running for a look afterwards)."""
    if os.geteuid() != 0:
        pytest.skip("the e2e node needs root (containerd, the kubelet, iptables); run hack/test as root")
    was_running = (
        subprocess.run([str(E2E_CLUSTER), "status"], capture_output=True, check=False).returncode == 0
    )
    up = subprocess.run([str(E2E_CLUSTER), "up"], capture_output=True, text=True, timeout=3000, check=False)
    if up.returncode != 0:
        pytest.fail(f"hack/e2e-cluster up failed ({up.returncode}):\n{up.stderr[-6000:]}")
    kubeconfig = Path(up.stdout.strip().splitlines()[-1])
    try:
        yield Cluster(kubeconfig, find_binaries(build=False).kubectl)
    finally:
        if not was_running and os.environ.get("E2E_CLUSTER_KEEP") != "1":
            subprocess.run([str(E2E_CLUSTER), "down"], capture_output=True, timeout=300, check=False)


@pytest.fixture(scope="session")
def e2e_api(e2e_cluster: Cluster) -> Iterator[Kube]:
    """The cluster's API as an admin, objects as plain dicts."""
    with e2e_cluster.api_client() as client:
        yield Kube(client)


def helm_binary() -> Path:
    built = subprocess.run(
        [str(ROOT / "hack" / "build-helm")], capture_output=True, text=True, timeout=1800, check=True
    )
    return Path(built.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def kubetune_release(e2e_cluster: Cluster) -> Iterator[str]:
    """The chart installed as users install it, with the images built from the Dockerfiles.
    Returns the namespace of the operator."""
    helm = helm_binary()
    images = {
        "image.repository": "localhost/kubetune-operator",
        "image.tag": "dev",
        "image.pullPolicy": "Never",
        "trainer.image.repository": "localhost/kubetune-trainer",
        "trainer.image.tag": "dev",
    }
    sets = [arg for key, value in images.items() for arg in ("--set", f"{key}={value}")]
    # The tests' namespaces are made per test; the jobs name an S3 credentials Secret.
    sets += ["--set-json", 'trainer.secretsNamespaces=["*"]']
    env = os.environ | {"KUBECONFIG": str(e2e_cluster.kubeconfig)}
    install = subprocess.run(
        [str(helm), "upgrade", "--install", RELEASE, str(CHART), "--namespace", OPERATOR_NAMESPACE,
         "--create-namespace", *sets, "--wait", "--timeout", "5m"],
        capture_output=True, text=True, timeout=400, check=False, env=env,
    )  # fmt: skip
    if install.returncode != 0:
        pods = e2e_cluster.kubectl("describe", "pods", "-n", OPERATOR_NAMESPACE, check=False).stdout
        raise AssertionError(f"helm install failed:\n{install.stderr}\n{pods[-4000:]}")
    yield OPERATOR_NAMESPACE
    subprocess.run(
        [str(helm), "uninstall", RELEASE, "--namespace", OPERATOR_NAMESPACE, "--wait", "--timeout", "2m"],
        capture_output=True, timeout=200, check=False, env=env,
    )  # fmt: skip


@pytest.fixture(scope="session")
def e2e_s3(e2e_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """The test S3 server on the bridge address, where trainer pods reach the host."""
    with S3Server(tmp_path_factory.mktemp("e2e-s3"), host=node.GATEWAY) as server:
        yield server


@pytest.fixture
def e2e_namespace(e2e_api: Kube, e2e_s3: S3Server) -> Iterator[str]:
    """A fresh namespace with the S3 credentials Secret the jobs name."""
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    e2e_api.request("POST", "/api/v1/namespaces", body={"metadata": {"name": name}})
    wait_for(
        lambda: e2e_api.get("ServiceAccount", name, "default"),
        timeout=60,
        what=f"ServiceAccount {name}/default",
    )
    secret = {
        "metadata": {"name": "s3-credentials"},
        "stringData": {"AWS_ACCESS_KEY_ID": e2e_s3.access_key, "AWS_SECRET_ACCESS_KEY": e2e_s3.secret_key},
    }
    e2e_api.request("POST", f"/api/v1/namespaces/{name}/secrets", body=secret)
    yield name
    e2e_api.request("DELETE", f"/api/v1/namespaces/{name}")


@pytest.fixture
def e2e_bucket(e2e_s3: S3Server) -> Iterator[str]:
    name = e2e_s3.create_bucket()
    yield name
    e2e_s3.delete_bucket(name)


def finetunejob(name: str, namespace: str, server: S3Server, bucket: str, **overrides: Any) -> dict[str, Any]:
    """The tiny preset's FineTuneJob (``tiny_run``) for 30 steps in a pod of one core."""
    e2e: dict[str, Any] = {
        "training": {"maxSteps": 30, "learningRate": 0.003, "batchSize": 16, "maxSeqLength": 32},
        # One of the machine's two cores: the trainer shares it with the rest of the suite.
        "resources": {"gpus": 0, "cpu": "1", "memory": "4Gi"},
    }
    return tiny_run(name, namespace, server, bucket, **(e2e | overrides))


def status(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    obj = kube.get(api.KIND, namespace, name) or {}
    found: dict[str, Any] = obj.get("status") or {}
    return found


def trainer_pods(kube: Kube, namespace: str) -> list[dict[str, Any]]:
    """The pods of the namespace's trainer Jobs, oldest first."""
    pods = kube.list("Pod", namespace, label_selector="batch.kubernetes.io/job-name")
    return sorted(pods, key=lambda pod: str(pod["metadata"]["creationTimestamp"]))


@dataclass(frozen=True)
class Run:
    """Where a test runs FineTuneJobs: the cluster with kubetune installed, a fresh namespace
    holding the S3 credentials, and a fresh bucket."""

    cluster: Cluster
    kube: Kube
    namespace: str
    s3: S3Server
    bucket: str

    def finetunejob(self, name: str, **overrides: Any) -> dict[str, Any]:
        return finetunejob(name, self.namespace, self.s3, self.bucket, **overrides)

    @contextmanager
    def described(self, *errors: type[BaseException]) -> Iterator[None]:
        """Turn ``errors`` into an AssertionError that shows :func:`describe`."""
        try:
            yield
        except errors as error:
            raise AssertionError(f"{error}\n{describe(self.cluster, self.namespace)}") from error


@pytest.fixture
def e2e_run(
    e2e_cluster: Cluster,
    e2e_api: Kube,
    kubetune_release: str,
    e2e_namespace: str,
    e2e_s3: S3Server,
    e2e_bucket: str,
) -> Run:
    return Run(e2e_cluster, e2e_api, e2e_namespace, e2e_s3, e2e_bucket)


def describe(cluster: Cluster, namespace: str) -> str:
    """What to show when a test fails: the job, its pods, the events, the operator's log."""
    parts = [
        cluster.kubectl("get", "finetunejobs,jobs,pods", "-n", namespace, "-o", "wide", check=False).stdout,
        cluster.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False).stdout[
            -3000:
        ],
        cluster.kubectl(
            "logs", "-n", OPERATOR_NAMESPACE, "deployment/kubetune", "--tail=60", check=False
        ).stdout,
    ]
    return "\n".join(parts)
