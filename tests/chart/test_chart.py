"""The Helm chart rendered by the real helm binary: lint, values schema, and what it installs."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune import api, crd
from kubetune.operator import planning, rbac

from .conftest import (
    CHART,
    ROOT,
    VALUES_ALL,
    Helm,
    HelmError,
    Manifest,
    find,
    kinds,
    one,
    planned_trainer_pod,
)

MONITORING_KINDS = {"ServiceMonitor", "PodMonitor"}


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == "0.1.0"
    assert chart["appVersion"] == planning._version(), "the chart ships the version the package has"


@pytest.mark.parametrize("values", [[], [VALUES_ALL]], ids=["defaults", "every-option"])
def test_lint_passes(helm: Helm, values: list[Path]) -> None:
    args = [arg for path in values for arg in ("--values", str(path))]
    result = helm.run("lint", "--strict", str(CHART), *args, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_the_charts_crd_is_the_generated_one() -> None:
    chart_crd = (CHART / "crds" / "finetunejob.yaml").read_text()
    assert chart_crd == (ROOT / "crds" / "finetunejob.yaml").read_text(), (
        "charts/kubetune/crds/finetunejob.yaml differs from crds/finetunejob.yaml: copy it over"
    )
    assert yaml.safe_load(chart_crd) == crd.custom_resource_definition()


def test_defaults_watch_every_namespace_with_a_cluster_role(helm: Helm) -> None:
    manifests = helm.template(namespace="ml")
    assert kinds(manifests) == sorted(
        [
            "CustomResourceDefinition",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Service",
            "Deployment",
            "ConfigMap",
        ]
    )
    binding = one(manifests, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": one(manifests, "ClusterRole")["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": one(manifests, "ServiceAccount")["metadata"]["name"],
            "namespace": "ml",
        }
    ]
    args = container(manifests)["args"]
    assert "--all-namespaces" in args
    assert not [a for a in args if a.startswith("--namespace")]


def test_watched_namespaces_get_a_role_each_and_nothing_cluster_wide(helm: Helm) -> None:
    manifests = helm.template(namespace="ml", set_json={"watchNamespaces": ["team-a", "team-b"]})
    assert not find(manifests, "ClusterRole") and not find(manifests, "ClusterRoleBinding")
    roles = find(manifests, "Role")
    bindings = find(manifests, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"][0]["namespace"] == "ml"
    args = container(manifests)["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    assert "--all-namespaces" not in args


def normalized(rules: list[dict[str, Any]]) -> list[tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]]:
    return sorted(
        (tuple(sorted(r["apiGroups"])), tuple(sorted(r["resources"])), tuple(sorted(r["verbs"])))
        for r in rules
    )


@pytest.mark.parametrize("watch", [[], ["team-a"]], ids=["cluster", "namespaced"])
def test_rbac_rules_are_exactly_the_operators(helm: Helm, watch: list[str]) -> None:
    manifests = helm.template(set_json={"watchNamespaces": watch})
    [role] = find(manifests, "Role" if watch else "ClusterRole")
    assert normalized(role["rules"]) == normalized(rbac.OPERATOR_RULES)
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}  # fmt: skip
    assert not any(r in ("secrets", "*") or v in ("*", "escalate", "bind", "impersonate", "delete")
                   for _, r, v in granted)  # fmt: skip
    # A Role may grant only what its creator holds: the trainer's per-job Role must be covered.
    for rule in planning.trainer_rules("job"):
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert (group, resource, verb) in granted, (group, resource, verb)


def container(manifests: list[Manifest]) -> dict[str, Any]:
    [operator] = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = operator
    return result


def test_the_operator_deployment(helm: Helm) -> None:
    manifests = helm.template(namespace="ml")
    deployment = one(manifests, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == one(manifests, "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    operator = container(manifests)
    security = operator["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert operator["image"] == "ghcr.io/kubetune/operator:0.1.0"
    assert operator["args"] == [
        "operator",
        "--all-namespaces",
        "--trainer-image=ghcr.io/kubetune/trainer:0.1.0",
        "--metrics-port=8080",
        "--health-port=8081",
    ]
    assert operator["args"][2] == f"--trainer-image={planning.DEFAULT_TRAINER_IMAGE}"
    ports = {p["name"]: p["containerPort"] for p in operator["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert operator[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert operator["resources"]["requests"] and operator["resources"]["limits"]["memory"]
    selector = spec["selector"]["matchLabels"]
    assert selector.items() <= spec["template"]["metadata"]["labels"].items()
    service = one(manifests, "Service")
    assert service["spec"]["selector"] == selector
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    ]


def test_every_option(helm: Helm) -> None:
    manifests = helm.template(namespace="ml", values=[VALUES_ALL])
    assert set(kinds(manifests)) >= MONITORING_KINDS
    operator = container(manifests)
    assert operator["image"] == "registry.example.com/ml/kubetune-operator:0.1.0-rc1"
    assert operator["imagePullPolicy"] == "Always"
    assert "--trainer-image=registry.example.com/ml/kubetune-trainer:0.1.0-rc1-cuda13" in operator["args"]
    assert {"name": "KUBETUNE_GPU_RESOURCE", "value": "amd.com/gpu"} in operator["env"]
    assert {"name": "KUBETUNE_LOG_FORMAT", "value": "json"} in operator["env"]
    assert {p["name"]: p["containerPort"] for p in operator["ports"]} == {"metrics": 9080, "health": 9081}
    pod = one(manifests, "Deployment")["spec"]["template"]
    assert pod["metadata"]["labels"]["team"] == "ml-platform"
    assert pod["spec"]["priorityClassName"] == "system-cluster-critical"
    assert pod["spec"]["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert one(manifests, "ServiceAccount")["metadata"]["name"] == "kubetune-controller"
    assert one(manifests, "Service")["spec"]["ports"][0]["port"] == 9090
    dashboard = one(manifests, "ConfigMap")
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "ML"}

    service_monitor = one(manifests, "ServiceMonitor")
    assert service_monitor["metadata"]["labels"]["release"] == "prometheus"
    assert service_monitor["spec"]["selector"]["matchLabels"] == one(manifests, "Service")["spec"]["selector"]
    [endpoint] = service_monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["interval"], endpoint["scrapeTimeout"]) == ("metrics", "1m", "10s")

    pod_monitor = one(manifests, "PodMonitor")
    assert pod_monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    [endpoint] = pod_monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["honorLabels"]) == ("metrics", "/metrics", True)


def test_monitors_are_off_by_default_and_the_pod_monitor_finds_trainer_pods(helm: Helm) -> None:
    assert not MONITORING_KINDS & set(kinds(helm.template()))
    manifests = helm.template(set_json={"metrics.podMonitor.enabled": True})
    pod_monitor = one(manifests, "PodMonitor")
    assert pod_monitor["spec"]["namespaceSelector"] == {"any": True}
    # The labels the operator really puts on a trainer pod.
    trainer_labels = planned_trainer_pod()["metadata"]["labels"]
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= trainer_labels.items()
    # ... and not on the operator's own pod.
    operator_labels = one(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not pod_monitor["spec"]["selector"]["matchLabels"].items() <= operator_labels.items()


def test_the_dashboard_config_map_holds_the_dashboard(helm: Helm) -> None:
    manifests = helm.template(namespace="ml")
    config_map = one(manifests, "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == "ml"
    [(key, text)] = config_map["data"].items()
    assert key.endswith(".json")
    assert json.loads(text) == json.loads((CHART / "dashboards" / "kubetune.json").read_text())
    off = helm.template(set_json={"grafana.dashboard.enabled": False})
    assert not find(off, "ConfigMap")


@pytest.mark.parametrize(
    ("set_json", "complaint"),
    [
        ({"replicas": 2}, "additional properties 'replicas' not allowed"),
        ({"replicaCount": 2}, "additional properties 'replicaCount' not allowed"),
        ({"image.pullPolicy": "Sometimes"}, "at '/image/pullPolicy'"),
        ({"watchNamespaces": "team-a"}, "at '/watchNamespaces': got string, want array"),
        ({"watchNamespaces": ["Team_A"]}, "at '/watchNamespaces/0'"),
        ({"metrics.port": "8080"}, "at '/metrics/port': got string, want integer"),
        ({"metrics.port": 70000}, "at '/metrics/port'"),
        ({"metrics.serviceMonitor.enabled": "yes"}, "at '/metrics/serviceMonitor/enabled'"),
        ({"metrics.podMonitor.interval": "30 seconds"}, "at '/metrics/podMonitor/interval'"),
        ({"logFormat": "xml"}, "at '/logFormat'"),
        ({"trainer.image.tag": 1}, "at '/trainer/image/tag'"),
        ({"trainer.imag": {"repository": "x"}}, "additional properties 'imag' not allowed"),
        ({"rbac.verbs": ["*"]}, "additional properties 'verbs' not allowed"),
    ],
)
def test_the_values_schema_rejects_bad_values(helm: Helm, set_json: dict[str, Any], complaint: str) -> None:
    with pytest.raises(HelmError) as error:
        helm.template(set_json=set_json)
    message = str(error.value)
    assert "values don't meet the specifications of the schema" in message
    assert complaint in message


def test_the_same_port_twice_is_refused(helm: Helm) -> None:
    with pytest.raises(HelmError, match=r"metrics\.port and health\.port must differ"):
        helm.template(set_json={"metrics.port": 8081})


def test_an_existing_service_account_without_rbac(helm: Helm) -> None:
    manifests = helm.template(
        set_json={"serviceAccount.create": False, "serviceAccount.name": "mine", "rbac.create": False}
    )
    assert not set(kinds(manifests)) & {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role"}
    assert one(manifests, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "mine"
    with pytest.raises(HelmError, match=r"serviceAccount\.name is required"):
        helm.template(set_json={"serviceAccount.create": False})


def test_the_crd_in_the_chart_is_installed_first(helm: Helm) -> None:
    manifests = helm.template()
    assert manifests[0]["kind"] == "CustomResourceDefinition"
    assert manifests[0]["spec"]["names"]["kind"] == api.KIND


def test_the_pod_monitor_port_is_declared_on_trainer_pods(helm: Helm) -> None:
    pod_monitor = one(helm.template(set_json={"metrics.podMonitor.enabled": True}), "PodMonitor")
    [endpoint] = pod_monitor["spec"]["podMetricsEndpoints"]
    [container] = planned_trainer_pod()["spec"]["containers"]
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
    assert ports.get(endpoint["port"]) == 9400


def test_the_chart_packages_with_everything_it_needs(helm: Helm, tmp_path: Path) -> None:
    helm.run("package", str(CHART), "--destination", str(tmp_path))
    [archive] = tmp_path.glob("kubetune-0.1.0.tgz")
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    for path in (
        "Chart.yaml",
        "values.yaml",
        "values.schema.json",
        "crds/finetunejob.yaml",
        "dashboards/kubetune.json",
        "templates/NOTES.txt",
    ):
        assert f"kubetune/{path}" in names
    assert helm.run("template", "t", str(archive)).stdout == helm.run("template", "t", str(CHART)).stdout


def test_clusters_older_than_the_job_features_are_refused(helm: Helm) -> None:
    # Job podReplacementPolicy, which the operator sets, is on by default from 1.29.
    old = helm.run("template", "t", str(CHART), "--kube-version", "1.28.9", check=False)
    assert old.returncode != 0
    assert "kubeVersion" in old.stderr
    helm.run("template", "t", str(CHART), "--kube-version", "1.29.0")
