"""Planning a FineTuneJob's objects: pure, no cluster."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from kubetune import api
from kubetune.contract import CONFIG_ERROR_EXIT_CODE, REGRESSED_EXIT_CODE
from kubetune.operator import planning
from kubetune.operator.planning import OperatorConfig, dns_label, plan, spec_drift, suspend_patch

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
UID = "0b6d2a1e-7f6c-4a8e-9d54-2f1f0c7e9a11"


def spec(**overrides: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": {"name": "Qwen/Qwen2.5-0.5B"},
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://models/out/"},
    }
    out.update(overrides)
    return out


def job(
    name: str = "llama-tune", namespace: str = "ml", generation: int = 1, **overrides: Any
) -> api.FineTuneJob:
    return planning.parse(
        {
            "metadata": {"name": name, "namespace": namespace, "uid": UID, "generation": generation},
            "spec": spec(**overrides),
        }
    )


def trainer(p: planning.Plan) -> dict[str, Any]:
    container: dict[str, Any] = p.job["spec"]["template"]["spec"]["containers"][0]
    return container


def env(p: planning.Plan) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in trainer(p)["env"]}


def walk(node: Any) -> Any:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def test_short_names_are_kept_and_suffixed() -> None:
    names = plan(job("llama-tune")).names
    assert names.job == "llama-tune"
    assert names.config_map == "llama-tune-config-1"
    assert names.service_account == names.role == names.role_binding == "llama-tune-trainer"
    assert plan(job("llama-tune"), attempt=3).names.config_map == "llama-tune-config-3"


@pytest.mark.parametrize(
    "name",
    [
        "a" * 253,
        "x" * 63,
        "a." * 126 + "b",
        "team.project.v2-llama-3-8b-instruct-qlora-" + "z" * 200,
        "a-" * 30 + "b",
    ],
)
def test_every_name_is_a_dns_label_for_any_finetunejob_name(name: str) -> None:
    assert re.match(api.DNS_SUBDOMAIN_PATTERN, name) and len(name) <= 253
    p = plan(job(name))
    for obj in p.objects():
        child = obj["metadata"]["name"]
        assert DNS_LABEL.match(child) and len(child) <= 63, child
        for key, value in obj["metadata"]["labels"].items():
            assert LABEL_VALUE.match(value) and len(value) <= 63, (key, value)
        assert obj["metadata"]["annotations"][planning.ANNOTATION_JOB] == name
    assert len(p.names.job) <= planning.JOB_NAME_MAX
    # Indexed-Job hostnames `<job>-<index>` stay DNS labels too.
    assert len(f"{p.names.job}-1023") <= 63
    assert plan(job(name)).names == p.names, "names must be deterministic"


def test_shortened_names_differ_by_hash() -> None:
    a, b = "x" * 100 + "a", "x" * 100 + "b"
    assert plan(job(a)).names.job != plan(job(b)).names.job
    assert dns_label(a).startswith("x" * 40)
    # A dotted name is no DNS label: it gets a hash, and never collides with its dashed twin.
    assert dns_label("a.b") != dns_label("a-b") == "a-b"
    assert DNS_LABEL.match(dns_label("a.b"))


def test_config_map_records_the_resolved_spec_and_is_immutable() -> None:
    p = plan(job(method="qlora", training={"maxSteps": 10}))
    cm = p.config_map
    assert cm["immutable"] is True
    resolved = yaml.safe_load(cm["data"]["job.yaml"])
    assert resolved["metadata"] == {"name": "llama-tune", "namespace": "ml", "uid": UID, "generation": 1}
    # Defaults are applied: the trainer sees exactly what runs, not what was typed.
    assert resolved["spec"]["training"]["learningRate"] == 2e-4
    assert resolved["spec"]["lora"]["r"] == 16
    assert resolved["spec"]["training"]["maxSteps"] == 10
    assert "status" not in resolved
    again = api.FineTuneJob.model_validate(resolved)
    assert again.spec == job(method="qlora", training={"maxSteps": 10}).spec


def test_role_allows_only_this_job_and_its_status() -> None:
    p = plan(job("llama-tune"))
    rules = p.role["rules"]
    assert {tuple(r["resources"]) for r in rules} == {("finetunejobs",), ("finetunejobs/status",)}
    for rule in rules:
        assert rule["apiGroups"] == ["kubetune.io"]
        assert rule["resourceNames"] == ["llama-tune"]
        assert set(rule["verbs"]) <= {"get", "patch"}
    assert next(r for r in rules if r["resources"] == ["finetunejobs/status"])["verbs"] == ["get", "patch"]
    binding = p.role_binding
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": p.names.role,
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": p.names.service_account, "namespace": "ml"}
    ]
    pod = p.job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == p.names.service_account
    assert pod["automountServiceAccountToken"] is True


def test_every_object_is_owned_by_the_finetunejob_and_labelled() -> None:
    p = plan(job("llama-tune", generation=4))
    assert [o["kind"] for o in p.objects()] == ["ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Job"]
    for obj in p.objects():
        assert obj["metadata"]["namespace"] == "ml"
        assert obj["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneJob",
                "name": "llama-tune",
                "uid": UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "kubetune"
        assert labels["app.kubernetes.io/managed-by"] == "kubetune-operator"
        assert labels["kubetune.io/job-name"] == "llama-tune"
        assert obj["metadata"]["annotations"][planning.ANNOTATION_GENERATION] == "4"
    template = p.job["spec"]["template"]["metadata"]
    assert template["labels"]["kubetune.io/job-name"] == "llama-tune"
    assert template["annotations"][planning.ANNOTATION_JOB] == "llama-tune"


def test_trainer_command_image_and_environment() -> None:
    default = plan(job(), OperatorConfig(trainer_image="registry.local/trainer:1"))
    assert trainer(default)["image"] == "registry.local/trainer:1"
    assert trainer(default)["command"] == ["kubetune", "trainer", "--config", "/etc/kubetune/job.yaml"]
    values = env(default)
    assert values["KUBETUNE_JOB_NAMESPACE"] == "ml"
    assert values["KUBETUNE_JOB_NAME"] == "llama-tune"
    assert "KUBETUNE_CONFIG" not in values, "the command line names the config, nothing else"
    assert values["HF_HOME"].startswith("/var/cache/kubetune/")
    assert "AWS_ENDPOINT_URL_S3" not in values and "AWS_REGION" not in values

    custom = plan(
        job(image="my.registry/kubetune:dev", storage={"endpoint": "http://minio:9000", "region": "eu-1"}),
        OperatorConfig(trainer_image="registry.local/trainer:1"),
    )
    assert trainer(custom)["image"] == "my.registry/kubetune:dev"
    assert env(custom)["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    assert env(custom)["AWS_REGION"] == env(custom)["AWS_DEFAULT_REGION"] == "eu-1"
    mounts = {m["mountPath"]: m for m in trainer(custom)["volumeMounts"]}
    assert mounts["/etc/kubetune"]["readOnly"] is True
    volumes = {v["name"]: v for v in custom.job["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"] == {"medium": "Memory"}
    assert "emptyDir" in volumes[mounts["/var/cache/kubetune"]["name"]]
    assert volumes[mounts["/etc/kubetune"]["name"]]["configMap"]["name"] == custom.names.config_map


@pytest.mark.parametrize(
    ("gpus", "resource", "expected"),
    [
        (1, "nvidia.com/gpu", {"nvidia.com/gpu": "1"}),
        (8, "amd.com/gpu", {"amd.com/gpu": "8"}),
        (2, "nvidia.com/mig-3g.20gb", {"nvidia.com/mig-3g.20gb": "2"}),
        (0, "nvidia.com/gpu", {}),
    ],
)
def test_gpu_limits_use_the_configured_resource_name(
    gpus: int, resource: str, expected: dict[str, str]
) -> None:
    p = plan(
        job(resources={"gpus": gpus, "cpu": "8", "memory": "64Gi"}), OperatorConfig(gpu_resource=resource)
    )
    resources = trainer(p)["resources"]
    assert resources["limits"] == {"cpu": "8", "memory": "64Gi", **expected}
    assert resources["requests"] == {"cpu": "8", "memory": "64Gi", "ephemeral-storage": "10Gi"}
    assert not any("gpu" in key for key in resources["requests"])


def test_no_cpu_or_memory_means_default_requests_and_no_limits() -> None:
    assert trainer(plan(job(resources={"gpus": 1})))["resources"] == {
        "requests": {"cpu": "1", "memory": "4Gi", "ephemeral-storage": "10Gi"},
        "limits": {"nvidia.com/gpu": "1"},
    }


def test_secrets_are_referenced_by_name_only() -> None:
    p = plan(job(credentials={"storageSecret": "s3-creds", "huggingFaceSecret": "hf-token"}))
    assert trainer(p)["envFrom"] == [{"secretRef": {"name": "s3-creds"}}, {"secretRef": {"name": "hf-token"}}]
    nodes = list(walk([*p.objects()]))
    assert not any(isinstance(n, dict) and n.get("kind") == "Secret" for n in nodes)
    assert not any(isinstance(n, dict) and ({"stringData", "secretKeyRef"} & set(n)) for n in nodes)
    # The names appear where they are referenced and in the recorded spec; nowhere else.
    text = yaml.safe_dump(p.job)
    assert text.count("s3-creds") == 1 and text.count("hf-token") == 1
    assert not any(e["name"].startswith(("AWS_ACCESS", "AWS_SECRET", "HF_TOKEN")) for e in trainer(p)["env"])
    assert "envFrom" not in trainer(plan(job()))


def test_restricted_pod_security() -> None:
    pod = plan(job()).job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    ctx = pod["containers"][0]["securityContext"]
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["runAsNonRoot"] is True
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    writable = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if not m.get("readOnly")}
    assert {"/tmp", "/var/cache/kubetune", "/dev/shm"} <= writable
    assert not any("hostPath" in v for v in pod["volumes"])
    assert pod.get("hostNetwork") is None and pod.get("hostPID") is None


def test_pod_failure_policy_and_retry_settings() -> None:
    spec_ = plan(job(backoffLimit=4, activeDeadlineSeconds=3600, ttlSecondsAfterFinished=600)).job["spec"]
    assert spec_["backoffLimit"] == 4
    assert spec_["activeDeadlineSeconds"] == 3600
    assert spec_["ttlSecondsAfterFinished"] == 600
    assert spec_["template"]["spec"]["restartPolicy"] == "Never"
    assert spec_["podReplacementPolicy"] == "Failed"
    ignore, fail, _peer_lost = spec_["podFailurePolicy"]["rules"]
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert fail == {
        "action": "FailJob",
        "onExitCodes": {
            "containerName": "trainer",
            "operator": "In",
            "values": [CONFIG_ERROR_EXIT_CODE, REGRESSED_EXIT_CODE],
        },
    }
    assert (CONFIG_ERROR_EXIT_CODE, REGRESSED_EXIT_CODE) == (3, 5)
    plain = plan(job()).job["spec"]
    assert "activeDeadlineSeconds" not in plain and "ttlSecondsAfterFinished" not in plain
    assert plain["suspend"] is False
    assert plan(job(suspend=True)).job["spec"]["suspend"] is True


def test_scheduling_is_passed_to_the_pod() -> None:
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}
                ]
            }
        }
    }
    p = plan(
        job(
            scheduling={
                "nodeSelector": {"pool": "gpu"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "affinity": affinity,
                "priorityClassName": "training",
            }
        )
    )
    pod = p.job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["affinity"] == affinity
    assert pod["priorityClassName"] == "training"
    assert planning.LABEL_KUEUE_QUEUE not in p.job["metadata"]["labels"]


def test_kueue_queue_label_and_suspended_creation() -> None:
    p = plan(job(scheduling={"queueName": "team-a"}))
    assert p.job["metadata"]["labels"][planning.LABEL_KUEUE_QUEUE] == "team-a"
    # Kueue admits a Job by unsuspending it.
    assert p.job["spec"]["suspend"] is True


def test_several_nodes_get_an_indexed_job_and_a_headless_service() -> None:
    p = plan(job("big", resources={"nodes": 4, "gpus": 8}))
    assert p.service is not None
    assert p.service["spec"]["clusterIP"] == "None"
    assert p.job["spec"]["completionMode"] == "Indexed"
    assert p.job["spec"]["completions"] == p.job["spec"]["parallelism"] == 4
    assert p.job["spec"]["template"]["spec"]["subdomain"] == p.names.service
    values = env(p)
    assert values["KUBETUNE_NUM_NODES"] == "4"
    assert values["MASTER_ADDR"] == f"big-0.{p.names.service}"
    assert "job-completion-index" in values["KUBETUNE_NODE_RANK"]["fieldRef"]["fieldPath"]
    selector = p.service["spec"]["selector"]
    pod_labels = p.job["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels[k] == v for k, v in selector.items())
    assert plan(job()).service is None
    assert "completionMode" not in plan(job()).job["spec"]


@pytest.mark.parametrize(
    ("queue", "want", "job_suspended", "annotated", "patch"),
    [
        (None, False, False, False, None),
        (None, True, False, False, {"spec": {"suspend": True}}),
        (None, False, True, False, {"spec": {"suspend": False}}),
        (None, True, True, False, None),
        # In a Kueue queue, the operator only undoes its own suspension.
        ("q", False, True, False, None),
        (
            "q",
            True,
            False,
            False,
            {
                "metadata": {"annotations": {planning.ANNOTATION_SUSPENDED_BY_SPEC: "true"}},
                "spec": {"suspend": True},
            },
        ),
        ("q", True, True, True, None),
        (
            "q",
            False,
            True,
            True,
            {
                "metadata": {"annotations": {planning.ANNOTATION_SUSPENDED_BY_SPEC: None}},
                "spec": {"suspend": False},
            },
        ),
    ],
)
def test_suspend_follows_the_spec(
    queue: str | None, want: bool, job_suspended: bool, annotated: bool, patch: dict[str, Any] | None
) -> None:
    scheduling = {"queueName": queue} if queue else {}
    observed = {
        "metadata": {"annotations": {planning.ANNOTATION_SUSPENDED_BY_SPEC: "true"} if annotated else {}},
        "spec": {"suspend": job_suspended},
    }
    assert suspend_patch(job(suspend=want, scheduling=scheduling).spec, observed) == patch


def test_spec_drift_names_changed_fields_but_not_suspend() -> None:
    cm = plan(job()).config_map
    assert spec_drift(cm, job()) == []
    assert spec_drift(cm, job(suspend=True)) == []
    assert spec_drift(cm, job(training={"maxSteps": 5}, backoffLimit=7)) == ["backoffLimit", "training"]
    assert spec_drift({}, job(backoffLimit=7)) == []


def test_owner_needs_uid_and_namespace() -> None:
    bare = planning.parse({"metadata": {"name": "x"}, "spec": spec()})
    with pytest.raises(ValueError, match="uid"):
        plan(bare)
