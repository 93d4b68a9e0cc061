"""The chart against the real test API server: every object it renders is accepted, and the
operator, run with the chart's ServiceAccount and nothing more, takes a FineTuneJob to a Job.

No kubelet runs, so the operator's Deployment never starts a pod: the tests run the operator
in-process with the Deployment's own arguments and a kubeconfig holding the ServiceAccount's token.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from kubetune import api
from kubetune.operator import main, planning
from kubetune.operator.kube import Kube
from kubetune_testkit.controlplane import ControlPlane
from kubetune_testkit.operator_runner import (
    OperatorRunner,
    install_crd,
    set_pod_finished,
    set_pod_running,
    wait_for,
)

from .conftest import CHART, VALUES_ALL, Helm, Manifest, one

pytestmark = pytest.mark.controlplane

MONITORING_CRDS = Path(__file__).with_name("monitoring-crds.yaml")
TRAINER_IMAGE = "registry.test/kubetune-trainer"


@pytest.fixture(scope="module")
def crds(control_plane: ControlPlane, control_plane_api_client: ApiClient) -> None:
    install_crd(control_plane_api_client)
    control_plane.install_crds(MONITORING_CRDS)


@pytest.fixture
def new_namespace(control_plane_api_client: ApiClient) -> Iterator[Any]:
    """Makes more fresh namespaces; all are deleted afterwards."""
    core = k8s.CoreV1Api(control_plane_api_client)
    made: list[str] = []

    def make() -> str:
        name = f"chart-{uuid.uuid4().hex[:8]}"
        core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
        made.append(name)
        return name

    yield make
    for name in made:
        core.delete_namespace(name)


@pytest.fixture
def cluster_helm(helm: Helm, control_plane: ControlPlane, tmp_path: Path) -> Helm:
    """helm talking to the test API server as its admin, with its own cache and config."""
    return helm.using(
        KUBECONFIG=str(control_plane.kubeconfig_path),
        HELM_CACHE_HOME=str(tmp_path / "helm-cache"),
        HELM_CONFIG_HOME=str(tmp_path / "helm-config"),
        HELM_DATA_HOME=str(tmp_path / "helm-data"),
    )


def write_manifests(path: Path, manifests: list[Manifest]) -> Path:
    path.write_text(yaml.safe_dump_all(manifests, sort_keys=False))
    return path


@pytest.mark.parametrize("every_option", [False, True], ids=["defaults", "every-option"])
def test_every_rendered_object_is_accepted_by_the_api_server(
    helm: Helm,
    control_plane: ControlPlane,
    control_plane_namespace: str,
    new_namespace: Any,
    crds: None,
    tmp_path: Path,
    every_option: bool,
) -> None:
    set_json: dict[str, Any] = {}
    values = [VALUES_ALL] if every_option else []
    if every_option:
        set_json = {
            "watchNamespaces": [new_namespace(), new_namespace()],
            "grafana.dashboard.namespace": control_plane_namespace,
        }
    manifests = helm.template(
        release=f"r{uuid.uuid4().hex[:6]}",
        namespace=control_plane_namespace,
        values=values,
        set_json=set_json,
    )
    assert manifests[0]["kind"] == "CustomResourceDefinition"
    assert {"ServiceMonitor", "PodMonitor"} <= {m["kind"] for m in manifests} or not every_option
    result = control_plane.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",  # the CRD is already there, applied by another field manager
        "--dry-run=server",
        "--validate=strict",
        "--filename",
        str(write_manifests(tmp_path / "chart.yaml", manifests)),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    applied = [line for line in result.stdout.splitlines() if "serverside-applied (server dry run)" in line]
    assert len(applied) == len(manifests), result.stdout


def test_the_monitoring_crds_are_strict(
    helm: Helm, control_plane: ControlPlane, control_plane_namespace: str, crds: None, tmp_path: Path
) -> None:
    """The cut-down monitoring CRDs do reject what the real ones reject."""
    manifests = helm.template(
        namespace=control_plane_namespace,
        set_json={"metrics.podMonitor.enabled": True, "metrics.serviceMonitor.enabled": True},
    )
    pod_monitor = one(manifests, "PodMonitor")
    pod_monitor["spec"]["podMetricEndpoints"] = pod_monitor["spec"].pop("podMetricsEndpoints")
    service_monitor = one(manifests, "ServiceMonitor")
    service_monitor["spec"]["endpoints"][0]["interval"] = "30 seconds"
    for broken, complaint in ((pod_monitor, "podMetricEndpoints"), (service_monitor, "interval")):
        result = control_plane.kubectl(
            "apply",
            "--server-side",
            "--dry-run=server",
            "--validate=strict",
            "--filename",
            str(write_manifests(tmp_path / "broken.yaml", [broken])),
            check=False,
        )
        assert result.returncode != 0
        assert complaint in result.stderr


def operator_arguments(deployment: Manifest) -> tuple[list[str], str]:
    """(namespaces, trainer image) from the operator container's arguments."""
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    args: list[str] = container["args"]
    assert args[0] == "operator"
    namespaces = [a.split("=", 1)[1] for a in args if a.startswith("--namespace=")]
    assert bool(namespaces) != ("--all-namespaces" in args)
    [image] = [a.split("=", 1)[1] for a in args if a.startswith("--trainer-image=")]
    return namespaces, image


def token_kubeconfig(control_plane: ControlPlane, token: str, path: Path) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "test",
                "cluster": {
                    "server": control_plane.server,
                    "certificate-authority": str(control_plane.ca_cert_path),
                },
            }
        ],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "test", "user": "operator"}}],
        "current-context": "operator",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def can(admin: ApiClient, user: str, verb: str, resource: str, namespace: str = "", group: str = "") -> bool:
    """SubjectAccessReview: may this ServiceAccount user do that? ("" namespace: cluster-wide)."""
    sa_namespace = user.split(":")[2]
    review = k8s.V1SubjectAccessReview(
        spec=k8s.V1SubjectAccessReviewSpec(
            user=user,
            groups=[
                "system:serviceaccounts",
                f"system:serviceaccounts:{sa_namespace}",
                "system:authenticated",
            ],
            resource_attributes=k8s.V1ResourceAttributes(
                namespace=namespace or None, verb=verb, group=group, resource=resource
            ),
        )
    )
    status = k8s.AuthorizationV1Api(admin).create_subject_access_review(review).status
    assert status is not None
    return bool(status.allowed)


def self_can(client: ApiClient, verb: str, resource: str, namespace: str = "") -> bool:
    review = k8s.V1SelfSubjectAccessReview(
        spec=k8s.V1SelfSubjectAccessReviewSpec(
            resource_attributes=k8s.V1ResourceAttributes(
                namespace=namespace or None, verb=verb, resource=resource
            )
        )
    )
    status = k8s.AuthorizationV1Api(client).create_self_subject_access_review(review).status
    assert status is not None
    return bool(status.allowed)


def finetunejob(namespace: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"name": "Qwen/Qwen2.5-0.5B"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": "s3://models/out/"},
        },
    }


def phase_of(kube: Kube, namespace: str, name: str) -> str | None:
    body = kube.get(api.KIND, namespace, name) or {}
    phase: str | None = (body.get("status") or {}).get("phase")
    return phase


def wait_phase(kube: Kube, namespace: str, name: str, phase: str) -> None:
    try:
        wait_for(lambda: phase_of(kube, namespace, name) == phase, timeout=40, what=f"{name} to be {phase}")
    except TimeoutError as error:
        raise AssertionError(
            f"{error}; status: {(kube.get(api.KIND, namespace, name) or {}).get('status')}"
        ) from None


def permission_problems(log: str, user: str) -> list[str]:
    """Lines of the operator's log that say a request was refused for lack of a permission."""
    signs = (
        f'User \\"{user}\\" cannot',
        f'User "{user}" cannot',
        "Not enough permissions",  # kopf
        "Failed to post an event",  # kopf
        "could not post event",  # the reconciler
    )
    # Namespaces that earlier tests delete refuse new objects while they terminate: not RBAC.
    return [
        line
        for line in log.splitlines()
        if any(sign in line for sign in signs) and "because it is being terminated" not in line
    ]


def run_a_job_through(kube: Kube, namespace: str, name: str, trainer_image: str) -> None:
    """Creation, the Job and phase Pending, then Running and Succeeded as a kubelet reports the pod."""
    kube.create(finetunejob(namespace, name))
    job_name = planning.Names.of(name).job
    job = wait_for(lambda: kube.get("Job", namespace, job_name), timeout=40, what=f"Job {job_name}")
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert container["image"] == trainer_image
    wait_phase(kube, namespace, name, "Pending")

    def pod() -> dict[str, Any] | None:
        pods = kube.list("Pod", namespace, label_selector=f"batch.kubernetes.io/job-name={job_name}")
        return pods[0] if pods else None

    trainer_pod = wait_for(pod, timeout=40, what=f"a pod of Job {job_name}")
    set_pod_running(kube.client, trainer_pod)
    wait_phase(kube, namespace, name, "Running")
    set_pod_finished(kube.client, trainer_pod, 0)
    wait_phase(kube, namespace, name, "Succeeded")


@dataclass(frozen=True)
class Release:
    """A helm release of the chart, and what its operator Deployment would run with."""

    name: str
    namespace: str
    notes: str
    namespaces: list[str]
    """The operator's --namespace arguments (none: every namespace)."""
    trainer_image: str
    user: str
    """The user name of the release's ServiceAccount."""
    kubeconfig: Path
    """A kubeconfig with a token of that ServiceAccount."""

    @contextmanager
    def operator(self, caplog: pytest.LogCaptureFixture) -> Iterator[None]:
        """The operator running in-process as the Deployment would run it; afterwards its log
        must show no request refused for lack of a permission."""
        caplog.set_level(logging.INFO)
        config = planning.OperatorConfig(trainer_image=self.trainer_image)
        with (
            main.api_client(str(self.kubeconfig)) as client,
            OperatorRunner(client, self.namespaces, config=config),
        ):
            yield
        assert not permission_problems(caplog.text, self.user)


@dataclass(frozen=True)
class Chart:
    """The test control plane as its admin, with fresh namespaces and installs of the chart."""

    admin: ApiClient
    kube: Kube
    new_namespace: Callable[[], str]
    install: Callable[[dict[str, Any]], Release]
    """helm install with these values into the test's namespace."""


@pytest.fixture
def chart(
    new_namespace: Callable[[], str],
    cluster_helm: Helm,
    control_plane: ControlPlane,
    control_plane_api_client: ApiClient,
    control_plane_namespace: str,
    crds: None,
    tmp_path: Path,
) -> Iterator[Chart]:
    """Releases are uninstalled afterwards, before the new namespaces go."""
    kube = Kube(control_plane_api_client)
    namespace = control_plane_namespace
    installed: list[str] = []

    def install(set_json: dict[str, Any]) -> Release:
        name = f"kt{uuid.uuid4().hex[:6]}"
        installed.append(name)
        args = cluster_helm.template_args(release=name, namespace=namespace, set_json=set_json)
        notes = cluster_helm.run("install", *args).stdout
        deployment = kube.request("GET", f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}-kubetune")
        namespaces, trainer_image = operator_arguments(deployment)
        service_account = f"{name}-kubetune"
        token = control_plane.service_account_token(service_account, namespace)
        kubeconfig = token_kubeconfig(control_plane, token, tmp_path / f"{name}.kubeconfig")
        user = f"system:serviceaccount:{namespace}:{service_account}"
        return Release(name, namespace, notes, namespaces, trainer_image, user, kubeconfig)

    yield Chart(control_plane_api_client, kube, new_namespace, install)
    for name in installed:
        cluster_helm.run("uninstall", name, "--namespace", namespace, check=False)


def test_cluster_wide_install_runs_a_job_with_the_charts_rbac_only(
    chart: Chart, caplog: pytest.LogCaptureFixture
) -> None:
    admin, kube = chart.admin, chart.kube
    jobs_namespace = chart.new_namespace()
    release = chart.install({"trainer.image.repository": TRAINER_IMAGE, "trainer.image.tag": "test"})
    assert "runs FineTuneJobs in every namespace" in release.notes
    assert f"{TRAINER_IMAGE}:test" in release.notes
    assert release.namespaces == [] and release.trainer_image == f"{TRAINER_IMAGE}:test"
    user = release.user

    with release.operator(caplog):
        run_a_job_through(kube, jobs_namespace, "cluster-wide", release.trainer_image)

    # The operator's identity cannot read Secrets, anywhere.
    for verb in ("get", "list", "watch"):
        assert not can(admin, user, verb, "secrets"), f"{verb} secrets cluster-wide"
        assert not can(admin, user, verb, "secrets", jobs_namespace), f"{verb} secrets in {jobs_namespace}"
    with main.api_client(str(release.kubeconfig)) as as_operator:
        assert not self_can(as_operator, "list", "secrets")
        assert not self_can(as_operator, "get", "secrets", release.namespace)
        with pytest.raises(ApiException) as denied:
            k8s.CoreV1Api(as_operator).list_secret_for_all_namespaces()
        assert denied.value.status == 403
        assert self_can(as_operator, "create", "configmaps", jobs_namespace), "the review itself works"
    # ... and holds nothing beyond its rules.
    assert can(admin, user, "create", "jobs", jobs_namespace, group="batch")
    assert can(admin, user, "watch", api.PLURAL, group=api.GROUP)
    for verb, resource, group in (
        ("delete", "jobs", "batch"),
        ("create", "pods", ""),
        ("update", api.PLURAL, api.GROUP),
        ("delete", api.PLURAL, api.GROUP),
        ("list", "namespaces", ""),
        ("list", "customresourcedefinitions", "apiextensions.k8s.io"),
        ("create", "clusterroles", "rbac.authorization.k8s.io"),
        ("escalate", "roles", "rbac.authorization.k8s.io"),
        ("bind", "roles", "rbac.authorization.k8s.io"),
        ("impersonate", "serviceaccounts", ""),
        ("create", "serviceaccounts/token", ""),
    ):
        assert not can(admin, user, verb, resource, jobs_namespace, group=group), (verb, resource)


def test_watching_some_namespaces_grants_nothing_elsewhere(
    chart: Chart, caplog: pytest.LogCaptureFixture
) -> None:
    admin, kube = chart.admin, chart.kube
    team_a, team_b, elsewhere = chart.new_namespace(), chart.new_namespace(), chart.new_namespace()
    release = chart.install(
        {
            "watchNamespaces": [team_a, team_b],
            "trainer.image.repository": TRAINER_IMAGE,
            "trainer.image.tag": "team",
        }
    )
    assert f"runs FineTuneJobs in {team_a}, {team_b}" in release.notes
    assert release.namespaces == [team_a, team_b]
    user = release.user
    assert kube.request("GET", "/apis/rbac.authorization.k8s.io/v1/clusterroles", query={
        "labelSelector": f"app.kubernetes.io/instance={release.name}"})["items"] == []  # fmt: skip

    kube.create(finetunejob(elsewhere, "unwatched"))
    with release.operator(caplog):
        run_a_job_through(kube, team_b, "in-team-b", release.trainer_image)
    assert phase_of(kube, elsewhere, "unwatched") is None
    assert kube.list("Job", elsewhere) == []

    for namespace in (team_a, team_b):
        assert can(admin, user, "create", "jobs", namespace, group="batch")
        assert not can(admin, user, "get", "secrets", namespace)
        assert not can(admin, user, "list", "secrets", namespace)
    assert not can(admin, user, "create", "jobs", elsewhere, group="batch")
    assert not can(admin, user, "list", api.PLURAL, elsewhere, group=api.GROUP)
    assert not can(admin, user, "list", api.PLURAL, group=api.GROUP), "nothing cluster-wide"
    assert not can(admin, user, "list", "secrets")


def test_helm_installs_the_charts_crd(cluster_helm: Helm, control_plane: ControlPlane, crds: None) -> None:
    """The chart's CRD as the API server would take it on a fresh cluster (dry run: it is shared here)."""
    result = control_plane.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--dry-run=server",
        "--filename",
        str(CHART / "crds" / "finetunejob.yaml"),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (
        "customresourcedefinition.apiextensions.k8s.io/finetunejobs.kubetune.io serverside-applied"
        in result.stdout
    )
