"""The API server of the test control plane behaves like a cluster's: real version,
CRDs with status subresources and schema validation, RBAC for service account tokens."""

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from kubetune_testkit.controlplane import (
    ETCD_VERSION,
    KUBERNETES_VERSION,
    ControlPlane,
    ControlPlaneError,
    wait_until,
)

pytestmark = pytest.mark.controlplane

REPO = Path(__file__).resolve().parents[2]
FINETUNEJOB_CRD = REPO / "crds" / "finetunejob.yaml"

GROUP = "controlplane.test.kubetune.io"
WIDGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"widgets.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "properties": {"size": {"type": "integer", "minimum": 1}},
                            },
                            "status": {
                                "type": "object",
                                "properties": {
                                    "phase": {"type": "string"},
                                    "observedGeneration": {"type": "integer"},
                                },
                            },
                        },
                    }
                },
            }
        ],
    },
}


def as_dict(value: object) -> dict[str, Any]:
    """Custom object calls return the decoded JSON, typed as object."""
    assert isinstance(value, dict)
    return cast(dict[str, Any], value)


def merge_patch(
    widgets: k8s.CustomObjectsApi, ns: str, body: dict[str, Any], *, status: bool = False
) -> dict[str, Any]:
    """A merge patch of the Widget ``w``, or of its status subresource."""
    patch = widgets.patch_namespaced_custom_object
    if status:
        patch = widgets.patch_namespaced_custom_object_status
    merge = "application/merge-patch+json"
    return as_dict(patch(GROUP, "v1", ns, "widgets", "w", body, _content_type=merge))


@pytest.fixture
def widgets(
    control_plane: ControlPlane, control_plane_api_client: k8s.ApiClient
) -> Iterator[k8s.CustomObjectsApi]:
    assert control_plane.install_crds(WIDGET_CRD) == [WIDGET_CRD["metadata"]["name"]]
    yield k8s.CustomObjectsApi(control_plane_api_client)
    k8s.ApiextensionsV1Api(control_plane_api_client).delete_custom_resource_definition(
        WIDGET_CRD["metadata"]["name"]
    )


def test_version_endpoint_reports_the_release(control_plane: ControlPlane) -> None:
    with control_plane.admin_api_client() as api:
        info = k8s.VersionApi(api).get_code()
    assert info.git_version == KUBERNETES_VERSION
    assert (info.major, info.minor) == ("1", KUBERNETES_VERSION.split(".")[1])


def test_kubectl_version_reports_client_and_server(control_plane: ControlPlane) -> None:
    result = control_plane.kubectl("version", "--output=json")
    versions = json.loads(result.stdout)
    assert versions["serverVersion"]["gitVersion"] == KUBERNETES_VERSION
    assert versions["clientVersion"]["gitVersion"] == KUBERNETES_VERSION


def test_etcd_version(control_plane: ControlPlane) -> None:
    assert control_plane.etcd_url is not None
    with urllib.request.urlopen(f"{control_plane.etcd_url}/version", timeout=5) as response:
        assert json.load(response)["etcdserver"] == ETCD_VERSION.removeprefix("v")


def test_kubeconfig_is_usable_by_the_client_library(control_plane: ControlPlane) -> None:
    api: k8s.ApiClient = k8s_config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(control_plane.kubeconfig_path)
    )
    with api:
        names = {ns.metadata.name for ns in k8s.CoreV1Api(api).list_namespace().items if ns.metadata}
    assert {"default", "kube-system"} <= names


def test_custom_resource_round_trips_through_status_subresource(
    widgets: k8s.CustomObjectsApi, control_plane_namespace: str
) -> None:
    ns = control_plane_namespace
    created = as_dict(
        widgets.create_namespaced_custom_object(
            GROUP,
            "v1",
            ns,
            "widgets",
            {
                "apiVersion": f"{GROUP}/v1",
                "kind": "Widget",
                "metadata": {"name": "w"},
                "spec": {"size": 3},
                "status": {"phase": "ignored on create"},
            },
        )
    )
    assert "status" not in created
    assert created["metadata"]["generation"] == 1

    ready = {"status": {"phase": "Ready", "observedGeneration": 1}, "spec": {"size": 99}}
    patched = merge_patch(widgets, ns, ready, status=True)
    assert patched["status"] == {"phase": "Ready", "observedGeneration": 1}
    assert patched["spec"] == {"size": 3}, "the status subresource must not change spec"
    assert patched["metadata"]["generation"] == 1

    updated = merge_patch(
        widgets, ns, {"spec": {"size": 4}, "status": {"phase": "ignored on the main resource"}}
    )
    assert updated["spec"] == {"size": 4}
    assert updated["status"]["phase"] == "Ready"
    assert updated["metadata"]["generation"] == 2

    with pytest.raises(k8s.ApiException) as rejected:
        merge_patch(widgets, ns, {"spec": {"size": 0}})
    assert rejected.value.status == 422
    assert "spec.size" in str(rejected.value.body)


def test_service_account_token_is_subject_to_rbac(
    control_plane: ControlPlane, control_plane_api_client: k8s.ApiClient, control_plane_namespace: str
) -> None:
    ns = control_plane_namespace
    core = k8s.CoreV1Api(control_plane_api_client)
    core.create_namespaced_service_account(ns, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="robot")))
    token = control_plane.service_account_token("robot", ns)

    with control_plane.token_api_client(token) as robot_api:
        review = k8s.AuthenticationV1Api(robot_api).create_self_subject_review(k8s.V1SelfSubjectReview())
        assert review.status and review.status.user_info
        assert review.status.user_info.username == f"system:serviceaccount:{ns}:robot"

        robot = k8s.CoreV1Api(robot_api)
        with pytest.raises(k8s.ApiException) as refused:
            robot.list_namespaced_config_map(ns)
        assert refused.value.status == 403
        assert f"system:serviceaccount:{ns}:robot" in str(refused.value.body)

        rbac = k8s.RbacAuthorizationV1Api(control_plane_api_client)
        rbac.create_namespaced_role(
            ns,
            k8s.V1Role(
                metadata=k8s.V1ObjectMeta(name="read-configmaps"),
                rules=[k8s.V1PolicyRule(api_groups=[""], resources=["configmaps"], verbs=["get", "list"])],
            ),
        )
        rbac.create_namespaced_role_binding(
            ns,
            k8s.V1RoleBinding(
                metadata=k8s.V1ObjectMeta(name="robot-reads-configmaps"),
                role_ref=k8s.V1RoleRef(
                    api_group="rbac.authorization.k8s.io", kind="Role", name="read-configmaps"
                ),
                subjects=[k8s.RbacV1Subject(kind="ServiceAccount", name="robot", namespace=ns)],
            ),
        )

        def can_list_config_maps() -> bool:
            try:
                robot.list_namespaced_config_map(ns)
            except k8s.ApiException as error:
                if error.status != 403:
                    raise
                return False
            return True

        wait_until(can_list_config_maps, timeout=10, what="the RoleBinding to take effect")
        with pytest.raises(k8s.ApiException) as still_refused:
            robot.list_namespaced_secret(ns)
        assert still_refused.value.status == 403

    with control_plane.token_api_client(token + "tampered") as forged_api:
        with pytest.raises(k8s.ApiException) as unauthenticated:
            k8s.CoreV1Api(forged_api).list_namespaced_config_map(ns)
        assert unauthenticated.value.status == 401


def test_install_crds_names_the_bad_file(control_plane: ControlPlane, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**WIDGET_CRD, "spec": {**WIDGET_CRD["spec"], "scope": "Galactic"}}))
    with pytest.raises(ControlPlaneError, match=r"bad\.yaml: installing CRD widgets\..*spec\.scope"):
        control_plane.install_crds(tmp_path)
    not_a_crd = tmp_path / "configmap.yaml"
    bad.unlink()
    not_a_crd.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    with pytest.raises(ControlPlaneError, match=r"configmap\.yaml: expected a CustomResourceDefinition"):
        control_plane.install_crds(not_a_crd)


@pytest.mark.skipif(not FINETUNEJOB_CRD.is_file(), reason="crds/finetunejob.yaml is not there")
def test_finetunejob_crd_installs_and_rejects_invalid_specs(
    control_plane: ControlPlane, control_plane_api_client: k8s.ApiClient, control_plane_namespace: str
) -> None:
    crd = yaml.safe_load(FINETUNEJOB_CRD.read_text())
    # Replaced in place (the fixture installed it already) and left for the other tests.
    assert control_plane.install_crds(FINETUNEJOB_CRD) == [crd["metadata"]["name"]]
    group = crd["spec"]["group"]
    version = next(v["name"] for v in crd["spec"]["versions"] if v.get("storage"))
    plural = crd["spec"]["names"]["plural"]
    objects = k8s.CustomObjectsApi(control_plane_api_client)

    def job(name: str, training: dict[str, Any]) -> dict[str, Any]:
        return {
            "apiVersion": f"{group}/{version}",
            "kind": crd["spec"]["names"]["kind"],
            "metadata": {"name": name},
            "spec": {
                "model": {"name": "sshleifer/tiny-gpt2"},
                "dataset": {"train": "s3://datasets/train.jsonl"},
                "output": {"uri": "s3://models/out"},
                "training": training,
            },
        }

    valid = as_dict(
        objects.create_namespaced_custom_object(
            group, version, control_plane_namespace, plural, job("valid", {"learningRate": 0.0001})
        )
    )
    assert valid["spec"]["training"]["learningRate"] == 0.0001

    with pytest.raises(k8s.ApiException) as rejected:
        objects.create_namespaced_custom_object(
            group, version, control_plane_namespace, plural, job("invalid", {"learningRate": 0})
        )
    assert rejected.value.status == 422
    assert "spec.training.learningRate" in str(rejected.value.body)
