"""spec.resources.network: RDMA devices, IPC_LOCK, Multus networks and NCCL's environment.

Pure planning and validation first, then the real API server: it keeps the section, refuses a
bad one at its field, admits the planned pod only at the Pod Security level the README names,
and the operator's pod carries it all. No RDMA hardware is involved anywhere: what NCCL then
does with these settings is not tested here.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from kubetune import api
from kubetune.api.rules import extended_resource_name, nccl_env_name
from kubetune.operator import planning
from kubetune.operator.kube import Kube
from kubetune.operator.planning import OperatorConfig, admission, plan
from kubetune.validation import problems_in
from kubetune_testkit import manifests
from kubetune_testkit.operator_runner import OperatorRunner, wait_for

from .test_operator_controlplane import create_with_pod

RDMA: dict[str, Any] = {
    "extendedResources": {"rdma/rdma_shared_device_a": 1, "nvidia.com/hostdev": 2},
    "capabilities": ["IPC_LOCK"],
    "networks": ["ib-a", "ml-net/ib-b@net2"],
    "ncclEnv": {"NCCL_SOCKET_IFNAME": "eth0", "NCCL_IB_HCA": "mlx5_0,mlx5_1"},
}


def job(namespace: str = "ml", **spec: Any) -> api.FineTuneJob:
    body = manifests.finetunejob("llama", namespace, **spec)
    body["metadata"]["uid"] = "u-1"
    return api.FineTuneJob.model_validate(body)


def template(p: planning.Plan) -> dict[str, Any]:
    return p.job["spec"]["template"]  # type: ignore[no-any-return]


def container(p: planning.Plan) -> dict[str, Any]:
    return template(p)["spec"]["containers"][0]  # type: ignore[no-any-return]


def env(p: planning.Plan) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container(p)["env"]}


def nccl(p: planning.Plan) -> dict[str, str]:
    return {k: v for k, v in env(p).items() if k.startswith("NCCL_")}


# --- planning (pure) ---------------------------------------------------------------------


def test_without_a_network_section_the_pod_stays_restricted_and_unannotated() -> None:
    p = plan(job(resources={"gpus": 8, "nodes": 2}))
    assert container(p)["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert planning.NETWORKS_ANNOTATION not in template(p)["metadata"]["annotations"]
    assert set(container(p)["resources"]["limits"]) == {"nvidia.com/gpu"}


def test_rdma_devices_ipc_lock_networks_and_nccl_settings_reach_the_pod() -> None:
    p = plan(job(resources={"gpus": 8, "nodes": 2, "network": RDMA}))
    resources = container(p)["resources"]
    # Extended resources are limits only (the API server copies them into requests), in name order.
    assert resources["limits"] == {
        "nvidia.com/gpu": "8",
        "nvidia.com/hostdev": "2",
        "rdma/rdma_shared_device_a": "1",
    }
    assert list(resources["limits"])[1:] == ["nvidia.com/hostdev", "rdma/rdma_shared_device_a"]
    assert not any("/" in name for name in resources["requests"])
    security = container(p)["securityContext"]
    assert security["capabilities"] == {"add": ["IPC_LOCK"], "drop": ["ALL"]}
    # Everything else of the restricted profile stays.
    assert security["allowPrivilegeEscalation"] is False
    assert security["runAsNonRoot"] is True and security["readOnlyRootFilesystem"] is True
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    pod = template(p)["spec"]
    assert pod.get("hostNetwork") is None and pod.get("hostIPC") is None
    assert template(p)["metadata"]["annotations"][planning.NETWORKS_ANNOTATION] == "ib-a,ml-net/ib-b@net2"
    assert nccl(p) == {
        "NCCL_DEBUG": "INFO",
        "NCCL_DEBUG_SUBSYS": "INIT,NET",
        "NCCL_IB_HCA": "mlx5_0,mlx5_1",
        "NCCL_SOCKET_IFNAME": "eth0",
    }
    # NCCL's shared-memory transport between the GPUs of one pod: a memory-backed /dev/shm.
    volumes = {v["name"]: v for v in pod["volumes"]}
    shm = next(m for m in container(p)["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert volumes[shm["name"]]["emptyDir"] == {"medium": "Memory"}


@pytest.mark.parametrize(
    ("gpus", "nodes", "debug"),
    [(1, 1, False), (0, 1, False), (0, 3, False), (2, 1, True), (1, 2, True), (8, 4, True)],
)
def test_nccl_logs_its_transport_on_pods_with_several_gpus(gpus: int, nodes: int, debug: bool) -> None:
    """Several GPUs in all: NCCL runs and says which transport it chose; on the CPU gloo does."""
    got = nccl(plan(job(resources={"gpus": gpus, "nodes": nodes})))
    assert got == ({"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,NET"} if debug else {})


def test_the_users_nccl_debug_replaces_the_default() -> None:
    def settings(**nccl_env: str) -> dict[str, str]:
        return nccl(plan(job(resources={"gpus": 8, "nodes": 2, "network": {"ncclEnv": nccl_env}})))

    assert settings(NCCL_DEBUG="WARN") == {"NCCL_DEBUG": "WARN"}
    assert settings(NCCL_DEBUG_SUBSYS="INIT,NET,ENV") == {
        "NCCL_DEBUG": "INFO",
        "NCCL_DEBUG_SUBSYS": "INIT,NET,ENV",
    }
    # On one GPU nothing is added, but what the user sets is passed on.
    one = plan(job(resources={"gpus": 1, "network": {"ncclEnv": {"NCCL_P2P_DISABLE": "1"}}}))
    assert nccl(one) == {"NCCL_P2P_DISABLE": "1"}


def test_the_operators_gpu_resource_is_refused_as_an_extended_resource() -> None:
    config = OperatorConfig(gpu_resource="amd.com/gpu")
    refused = admission(job(resources={"network": {"extendedResources": {"amd.com/gpu": 8}}}), config)
    assert refused is not None and refused[0] == "InvalidResources"
    assert "spec.resources.network.extendedResources names amd.com/gpu" in refused[1]
    assert "spec.resources.gpus" in refused[1]
    # Another cluster's GPU resource is just another extended resource here.
    assert admission(job(resources={"network": {"extendedResources": {"nvidia.com/gpu": 1}}}), config) is None
    assert admission(job(resources={"network": RDMA}), OperatorConfig()) is None


# --- validation (pure) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("rdma/rdma_shared_device_a", True),
        ("nvidia.com/hostdev", True),
        ("openshift.io/mlxnics", True),
        ("rdma", False),  # no domain
        ("kubernetes.io/hugepages", False),
        ("example.kubernetes.io/x", False),
        ("requests.rdma/hca", False),
        ("RDMA/hca", False),
        ("rdma/hca/0", False),
        ("rdma/" + "h" * 64, False),
    ],
)
def test_extended_resource_names(name: str, valid: bool) -> None:
    assert extended_resource_name(name) is valid


@pytest.mark.parametrize(
    ("name", "valid"),
    [("NCCL_IB_HCA", True), ("NCCL_DEBUG", True), ("nccl_ib_hca", False), ("LD_PRELOAD", False)],
)
def test_nccl_variable_names(name: str, valid: bool) -> None:
    assert nccl_env_name(name) is valid


def network_manifest(network: Any) -> dict[str, Any]:
    return manifests.finetunejob("llama", resources={"gpus": 8, "nodes": 2, "network": network})


# (network section, the field the error names, words of its message): refused offline here and
# by the API server below.
BAD = [
    ({"extendedResources": {"rdma/hca": 0}}, "spec.resources.network.extendedResources.rdma/hca", "1"),
    ({"extendedResources": {"rdma": 1}}, "spec.resources.network.extendedResources", "domain/name"),
    ({"capabilities": ["NET_ADMIN"]}, "spec.resources.network.capabilities[0]", "IPC_LOCK"),
    ({"capabilities": ["IPC_LOCK", "IPC_LOCK"]}, "spec.resources.network.capabilities", "at most 1"),
    ({"networks": ["ib a"]}, "spec.resources.network.networks[0]", "[namespace/]name[@interface]"),
    ({"networks": ["ib@an-interface-too-long"]}, "spec.resources.network.networks[0]", "@interface"),
    ({"ncclEnv": {"LD_PRELOAD": "/x.so"}}, "spec.resources.network.ncclEnv", "NCCL_"),
    ({"ncclEnv": {"NCCL_DEBUG": 3}}, "spec.resources.network.ncclEnv.NCCL_DEBUG", "string"),
    ({"rdma": True}, "spec.resources.network.rdma", 'unknown field "rdma"'),
]


@pytest.mark.parametrize(("network", "field", "words"), BAD, ids=[c[1] for c in BAD])
def test_a_bad_network_section_is_refused_at_its_field(network: Any, field: str, words: str) -> None:
    problems = problems_in(network_manifest(network))
    matching = [p for p in problems if p.path == field]
    assert matching, problems
    assert any(words in p.message for p in matching), matching


def test_a_full_network_section_is_valid() -> None:
    assert problems_in(network_manifest(RDMA)) == []


# --- the real API server -----------------------------------------------------------------

FINETUNEJOBS = f"/apis/{api.API_VERSION}/namespaces/{{ns}}/finetunejobs"
STRICT = {"fieldValidation": "Strict"}
DRY_RUN = {"dryRun": "All"}


@pytest.mark.controlplane
def test_the_api_server_keeps_the_network_section_and_refuses_a_bad_one(kube: Kube, ns: str) -> None:
    created = kube.request("POST", FINETUNEJOBS.format(ns=ns), body=network_manifest(RDMA), query=STRICT)
    assert created["spec"]["resources"]["network"] == RDMA
    stored = kube.get(api.KIND, ns, "llama")
    assert stored is not None and stored["spec"]["resources"]["network"] == RDMA

    bad = network_manifest({**RDMA, "extendedResources": {"kubernetes.io/rdma": 1}})
    bad["metadata"]["name"] = "bad"
    with pytest.raises(ApiException) as refused:
        kube.request("POST", FINETUNEJOBS.format(ns=ns), body=bad, query=STRICT)
    error = json.loads(refused.value.body or "{}")
    causes = {c.get("field"): c.get("message", "") for c in error["details"]["causes"]}
    assert "spec.resources.network.extendedResources" in causes, error
    assert "extended resource names" in causes["spec.resources.network.extendedResources"]


@pytest.mark.controlplane
@pytest.mark.parametrize(("network", "field", "words"), BAD, ids=[c[1] for c in BAD])
def test_the_api_server_refuses_the_same_network_sections_at_the_same_field(
    kube: Kube, ns: str, network: Any, field: str, words: str
) -> None:
    with pytest.raises(ApiException) as refused:
        kube.request(
            "POST", FINETUNEJOBS.format(ns=ns), body=network_manifest(network), query=STRICT | DRY_RUN
        )
    error = json.loads(refused.value.body or "{}")
    fields = {cause.get("field") for cause in error.get("details", {}).get("causes", [])}
    assert field in fields or f'unknown field "{field}"' in error["message"], error


def as_pod(p: planning.Plan, name: str) -> dict[str, Any]:
    """The trainer pod as the Job controller would create it (the ServiceAccount: the namespace's)."""
    tpl = copy.deepcopy(template(p))
    tpl["spec"]["serviceAccountName"] = "default"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, **tpl["metadata"]},
        "spec": tpl["spec"],
    }


def pod_security(kube: Kube, ns: str, level: str) -> None:
    labels = {"pod-security.kubernetes.io/enforce": level}
    kube.request(
        "PATCH",
        f"/api/v1/namespaces/{ns}",
        body={"metadata": {"labels": labels}},
        content_type="application/merge-patch+json",
    )


def admitted(kube: Kube, ns: str, pod: dict[str, Any]) -> str | None:
    """None if the API server admits ``pod`` (dry run), else its message."""
    try:
        kube.request("POST", f"/api/v1/namespaces/{ns}/pods", body=pod, query=DRY_RUN)
    except ApiException as error:
        return str(json.loads(error.body or "{}").get("message", error))
    return None


@pytest.mark.controlplane
def test_ipc_lock_needs_the_privileged_pod_security_level(kube: Kube, ns: str) -> None:
    """The plain trainer pod passes restricted; with IPC_LOCK, only privileged admits it.

    The namespace's labels reach Pod Security admission through an informer, so each level
    is waited for with a pod that tells it from the one before.
    """
    plain = as_pod(plan(job(ns, resources={"gpus": 8, "nodes": 2})), "plain")
    rdma = as_pod(plan(job(ns, resources={"gpus": 8, "nodes": 2, "network": RDMA})), "rdma")
    # Baseline admits a container with no security context; restricted does not.
    loose = {**plain, "metadata": {"name": "loose"}, "spec": copy.deepcopy(plain["spec"])}
    for section in (loose["spec"], *loose["spec"]["containers"]):
        section.pop("securityContext")

    pod_security(kube, ns, "restricted")
    wait_for(lambda: admitted(kube, ns, loose), timeout=30, what="restricted to be enforced")
    assert admitted(kube, ns, plain) is None, "the trainer pod is restricted"
    refused = admitted(kube, ns, rdma)
    assert refused is not None and 'must not include "IPC_LOCK"' in refused, refused

    pod_security(kube, ns, "baseline")
    wait_for(lambda: admitted(kube, ns, loose) is None, timeout=30, what="baseline to be enforced")
    refused = admitted(kube, ns, rdma)
    assert refused is not None and 'must not include "IPC_LOCK"' in refused, refused

    pod_security(kube, ns, "privileged")
    wait_for(lambda: admitted(kube, ns, rdma) is None, timeout=30, what="privileged to admit IPC_LOCK")


@pytest.mark.controlplane
def test_the_operators_trainer_pod_carries_the_network_section(
    kube: Kube, ns: str, operator: OperatorRunner
) -> None:
    """Created by the real Job controller from the operator's Job (no kubelet runs it)."""
    _, pod = create_with_pod(kube, ns, "rdma", resources={"gpus": 8, "nodes": 2, "network": RDMA})
    assert pod["metadata"]["annotations"][planning.NETWORKS_ANNOTATION] == "ib-a,ml-net/ib-b@net2"
    trainer = pod["spec"]["containers"][0]
    assert trainer["securityContext"]["capabilities"] == {"add": ["IPC_LOCK"], "drop": ["ALL"]}
    # The API server filled the requests of the extended resources from their limits.
    assert trainer["resources"]["requests"]["rdma/rdma_shared_device_a"] == "1"
    assert trainer["resources"]["requests"]["nvidia.com/hostdev"] == "2"
    values = {e["name"]: e.get("value") for e in trainer["env"]}
    assert values["NCCL_IB_HCA"] == "mlx5_0,mlx5_1" and values["NCCL_DEBUG"] == "INFO"
