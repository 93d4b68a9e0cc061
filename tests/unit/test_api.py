"""The FineTuneJob API: offline validation, the generated CRD, and the examples."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune import api, crd
from kubetune.manifests import validate_files
from kubetune.validation import problems_in

ROOT = Path(__file__).resolve().parents[2]


def valid_manifest() -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo"},
        "spec": {
            "model": {"name": "meta-llama/Llama-3.1-8B-Instruct"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": "s3://out/"},
        },
    }


def mutate(path: str, value: Any) -> dict[str, Any]:
    """The valid manifest with `value` at dotted `path` (a missing sentinel deletes)."""
    doc = copy.deepcopy(valid_manifest())
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


DELETE = object()


# (mutation path, value, expected error field path, words the message must contain)
INVALID = [
    ("apiVersion", "kubetune.io/v1", "apiVersion", "kubetune.io/v1alpha1"),
    ("kind", "TrainJob", "kind", "FineTuneJob"),
    ("metadata.name", "Bad_Name", "metadata.name", "DNS subdomain"),
    ("spec.trainig", {"epochs": 1}, "spec.trainig", 'unknown field "trainig"'),
    ("spec.training.learningRate", 0, "spec.training.learningRate", "greater than 0"),
    ("spec.training.learningRate", "fast", "spec.training.learningRate", "must be a number"),
    ("spec.training", {"epochs": 1, "maxSteps": 10}, "spec.training.maxSteps", "at most one"),
    ("spec.training.batchSize", 0, "spec.training.batchSize", "greater than or equal to 1"),
    ("spec.method", "dpo", "spec.method", "one of"),
    ("spec.quantization", {"bits": 4}, "spec.quantization", "only to method qlora"),
    ("spec.quantization", {"bits": 3}, "spec.quantization.bits", "one of"),
    ("spec.model.name", "run this model please", "spec.model.name", "model id"),
    ("spec.model", {"revision": "main"}, "spec.model.name", "set name"),
    ("spec.dataset.train", DELETE, "spec.dataset.train", "required"),
    ("spec.dataset.validationSplit", 1.5, "spec.dataset.validationSplit", "less than 1"),
    ("spec.dataset.format", "csv", "spec.dataset.format", "one of"),
    ("spec.output.uri", "s3://out/../other", "spec.output.uri", "'..'"),
    ("spec.output.uri", "gs://bucket/out", "spec.output.uri", "s3://bucket/prefix"),
    ("spec.output", DELETE, "spec.output", "required"),
    ("spec.resources.gpus", -1, "spec.resources.gpus", "greater than or equal to 0"),
    ("spec.resources.nodes", 0, "spec.resources.nodes", "greater than or equal to 1"),
    ("spec.resources.memory", "lots", "spec.resources.memory", "quantity"),
    ("spec.credentials.storageSecret", "My Secret", "spec.credentials.storageSecret", "DNS"),
    ("spec.lora.r", 0, "spec.lora.r", "greater than or equal to 1"),
    (
        "spec.scheduling.tolerations",
        [{"effect": "Sometimes"}],
        "spec.scheduling.tolerations[0].effect",
        "one of",
    ),
    ("spec.export", {"merge": False, "formats": ["bnb-4bit"]}, "spec.export.formats", "export.merge"),
    # The deprecated name is read as formats, and judged by the same rule.
    ("spec.export", {"merge": False, "quantize": ["bnb-4bit"]}, "spec.export.formats", "export.merge"),
    (
        "spec.export",
        {"formats": ["bnb-4bit"], "quantize": ["gguf-f16"]},
        "spec.export.quantize",
        "set formats or its deprecated name quantize, not both",
    ),
    ("spec.training.earlyStopping", {"patience": 2}, "spec.training.earlyStopping", "evalEvery"),
    (
        "spec.resources.network",
        {"extendedResources": {"kubernetes.io/rdma": 1}},
        "spec.resources.network.extendedResources",
        "extended resource names",
    ),
    (
        "spec.resources.network",
        {"ncclEnv": {"LD_PRELOAD": "/x.so"}},
        "spec.resources.network.ncclEnv",
        "NCCL_",
    ),
    (
        "spec.resources.network",
        {"capabilities": ["SYS_ADMIN"]},
        "spec.resources.network.capabilities[0]",
        "one of",
    ),
    (
        "spec.resources.network",
        {"networks": ["ib a"]},
        "spec.resources.network.networks[0]",
        "network attachment",
    ),
]


@pytest.mark.parametrize(
    ("path", "value", "field", "words"), INVALID, ids=[f"{c[0]}={c[1]}" for c in INVALID]
)
def test_invalid_manifest_is_rejected_with_its_field_path(
    path: str, value: Any, field: str, words: str
) -> None:
    problems = problems_in(mutate(path, value))
    assert problems, "accepted an invalid manifest"
    matching = [p for p in problems if p.path == field]
    assert matching, f"no error at {field}: {problems}"
    assert any(words in p.message for p in matching), matching


def test_valid_manifest_gets_defaults() -> None:
    assert problems_in(valid_manifest()) == []
    job = api.FineTuneJob.model_validate(valid_manifest())
    assert job.spec.method == "lora"
    assert job.spec.lora.target_modules == ["all-linear"]
    assert job.spec.model.trust_remote_code is False
    assert job.spec.resolved_quantization() is None
    wire = job.spec.to_wire()
    assert wire["training"]["learningRate"] == pytest.approx(2e-4)
    assert "learning_rate" not in wire["training"]


def test_qlora_resolves_to_nf4_double_quant() -> None:
    job = api.FineTuneJob.model_validate(mutate("spec.method", "qlora"))
    quant = job.spec.resolved_quantization()
    assert quant is not None
    assert (quant.bits, quant.type, quant.double_quant) == (4, "nf4", True)


def test_validate_cli_names_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    docs = [valid_manifest(), mutate("spec.training.learningRate", -1)]
    bad.write_text(yaml.safe_dump_all(docs))
    good = ROOT / "examples" / "quickstart.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "kubetune", "validate", str(good), str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert f"{bad}[doc 2]: spec.training.learningRate: must be greater than 0" in result.stderr
    assert "doc 1" not in result.stderr
    ok = subprocess.run(
        [sys.executable, "-m", "kubetune", "validate", str(good)], capture_output=True, check=False
    )
    assert ok.returncode == 0


def test_a_regression_gate_needs_the_harness_it_gates() -> None:
    gate_alone = mutate("spec.evaluation", {"regression": {"maxDrop": 0.02}})
    assert [str(p) for p in problems_in(gate_alone)] == [
        "spec.evaluation.regression: regression gates the harness scores: set harness"
    ]
    both = mutate("spec.evaluation", {"harness": {"tasks": ["mmlu"]}, "regression": {"maxDrop": 0.02}})
    assert problems_in(both) == []
    escaping = mutate("spec.evaluation", {"harness": {"tasks": ["mmlu"], "include": "tasks/../../etc"}})
    assert [str(p) for p in problems_in(escaping)] == [
        "spec.evaluation.harness.include: must not contain a '..' segment"
    ]


def test_the_deprecated_export_quantize_is_read_as_formats_with_a_warning(tmp_path: Path) -> None:
    old = mutate("spec.export", {"merge": True, "quantize": ["bnb-4bit", "gguf-f16"]})
    assert problems_in(old) == []
    spec = api.FineTuneJob.model_validate(old).spec
    assert (spec.export.formats, spec.export.quantize) == (["bnb-4bit", "gguf-f16"], None)
    assert spec.deprecations() == ["spec.export.quantize is deprecated: rename it to spec.export.formats"]
    # What the operator hands the trainer (the ConfigMap) has the new name only, and no warning.
    assert spec.to_wire()["export"] == {"merge": True, "formats": ["bnb-4bit", "gguf-f16"]}
    assert api.FineTuneJobSpec.model_validate(spec.to_wire()).deprecations() == []
    new = api.FineTuneJob.model_validate(mutate("spec.export", {"formats": ["bnb-4bit"]})).spec
    assert (new.export.formats, new.deprecations()) == (["bnb-4bit"], [])

    manifest = tmp_path / "old.yaml"
    manifest.write_text(yaml.safe_dump(old))
    result = subprocess.run(
        [sys.executable, "-m", "kubetune", "validate", str(manifest)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"warning: {manifest}: spec.export.quantize is deprecated: rename it to spec.export.formats" in (
        result.stderr
    )


def test_both_export_names_are_refused_by_their_names() -> None:
    both = mutate("spec.export", {"formats": ["bnb-4bit"], "quantize": ["bnb-4bit"]})
    assert [str(p) for p in problems_in(both)] == [
        "spec.export.quantize: set formats or its deprecated name quantize, not both"
    ]


def test_the_crd_keeps_the_deprecated_name_and_refuses_both() -> None:
    schema = crd.custom_resource_definition()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    export = schema["properties"]["spec"]["properties"]["export"]
    assert export["properties"]["quantize"]["description"].startswith("Deprecated: ")
    assert (
        export["properties"]["quantize"]["items"]["enum"] == export["properties"]["formats"]["items"]["enum"]
    )
    assert {"rule": "!(has(self.formats) && has(self.quantize))", "fieldPath": ".quantize"}.items() <= (
        export["x-kubernetes-validations"][0].items()
    )


def test_every_export_format_has_one_row_of_traits() -> None:
    assert set(api.EXPORTS) == set(api.ExportFormat)
    for name, traits in api.EXPORTS.items():
        assert name.startswith(f"{traits.family}-"), name  # the names follow the table, not the reverse
    assert api.formats_of(api.ExportFamily.BNB) == ["bnb-4bit", "bnb-8bit"]
    assert api.GGUF_MODEL_TYPES == set(api.GGUF_ARCHITECTURES) == {"llama", "mistral", "qwen2"}
    assert api.EXPORTS[api.ExportFormat.BNB_8BIT].refusal("gpt2") is None
    assert api.EXPORTS["gguf-q8_0"].refusal("gpt2") == (  # type: ignore[index]  # a spec holds plain strings
        "GGUF export supports models of type llama, mistral, qwen2; this one is 'gpt2'"
    )
    described = api.Export.model_fields["formats"].description or ""
    assert "gguf-f16, gguf-q8_0, gguf-q4_k_m" in described and "llama, mistral, qwen2" in described


def test_validate_reports_yaml_syntax_with_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("apiVersion: kubetune.io/v1alpha1\nspec:\n  model: [unclosed\n")
    [line] = validate_files([broken])
    assert line.startswith(f"{broken}: line ")


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_is_valid(example: Path) -> None:
    assert validate_files([example]) == []


def test_checked_in_crd_matches_the_models() -> None:
    checked_in = (ROOT / "crds" / "finetunejob.yaml").read_text()
    assert checked_in == crd.render(), "crds/finetunejob.yaml is stale: run `make crd`"


def walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(node, dict):
        return []
    found = [(path, node)]
    for key, sub in node.get("properties", {}).items():
        found += walk(sub, f"{path}.{key}")
    if "items" in node:
        found += walk(node["items"], path + "[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += walk(node["additionalProperties"], path + "{}")
    return found


def test_crd_schema_is_structural() -> None:
    schema = crd.custom_resource_definition()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    text = yaml.safe_dump(schema)
    for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "$defs", "title", "nullable", "exclusiveMinimum: 0"):
        assert forbidden not in text, forbidden
    free_form = []
    for path, node in walk(schema):
        assert node.get("type") or node.get("x-kubernetes-preserve-unknown-fields"), f"{path} has no type"
        if node.get("x-kubernetes-preserve-unknown-fields"):
            free_form.append(path)
        if node.get("type") == "object" and "properties" in node and "additionalProperties" in node:
            pytest.fail(f"{path}: properties and additionalProperties together")
        if "default" in node and "properties" in node:
            assert node["default"] == {}, path
    assert free_form == [".spec.scheduling.affinity"]


def test_every_crd_property_has_a_description_for_kubectl_explain() -> None:
    schema = crd.custom_resource_definition()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    # The API server refuses anything on metadata but name and generateName, and explains it itself.
    properties = [
        (p, n) for p, n in walk(schema) if p not in ("", ".metadata") and p[-2:] not in ("[]", "{}")
    ]
    assert len(properties) > 100
    undescribed = next((p for p, n in properties if not str(n.get("description", "")).strip()), None)
    assert undescribed is None, f"{undescribed} has no description: give its field one in kubetune/api/"


def test_crd_rules_and_columns() -> None:
    definition = crd.custom_resource_definition()
    version = definition["spec"]["versions"][0]
    assert definition["metadata"]["name"] == "finetunejobs.kubetune.io"
    assert definition["spec"]["names"]["shortNames"] == ["ftj"]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Phase", "Stage", "Progress", "Loss", "Model", "Method", "Age"]
    schema = version["schema"]["openAPIV3Schema"]
    frozen = {r["fieldPath"] for r in schema["x-kubernetes-validations"]}
    assert ".spec.model" in frozen and ".spec.training" in frozen
    assert ".spec.suspend" not in frozen
    assert ".spec.scheduling.affinity" not in frozen and ".spec.scheduling.nodeSelector" in frozen
    training = schema["properties"]["spec"]["properties"]["training"]
    assert training["default"] == {}
    learning_rate = training["properties"]["learningRate"]
    assert learning_rate.pop("description")
    assert learning_rate == {
        "type": "number",
        "minimum": 0,
        "exclusiveMinimum": True,
        "maximum": 1,
        "exclusiveMaximum": True,
        "default": 0.0002,
    }
    assert {"rule": "!(has(self.epochs) && has(self.maxSteps))"}.items() <= training[
        "x-kubernetes-validations"
    ][0].items()


def test_crd_command_prints_the_crd() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kubetune", "crd"], capture_output=True, text=True, check=True
    )
    assert result.stdout == crd.render()


def test_api_and_cli_do_not_import_torch() -> None:
    modules = "kubetune.api, kubetune.crd, kubetune.validation, kubetune.manifests, kubetune.cli"
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_no_top_level_operator_package_shadows_the_standard_library() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import operator; print(operator.__file__)"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    assert "site-packages" not in out.stdout and str(ROOT / "operator") not in out.stdout


# The API server routes by apiVersion and kind, so those two cases cannot reach the schema.
SERVER_CASES = [c for c in INVALID if c[0] not in ("apiVersion", "kind")]


@pytest.fixture(scope="module")
def finetunejob_api(control_plane: Any) -> Any:
    control_plane.install_crds(ROOT / "crds" / "finetunejob.yaml")
    return control_plane


@pytest.mark.controlplane
@pytest.mark.parametrize(
    ("path", "value", "field", "words"), SERVER_CASES, ids=[f"{c[0]}={c[1]}" for c in SERVER_CASES]
)
def test_api_server_rejects_the_same_manifests_at_the_same_field(
    finetunejob_api: Any, control_plane_api_client: Any, path: str, value: Any, field: str, words: str
) -> None:
    from kubernetes.client.exceptions import ApiException

    from kubetune.operator.kube import Kube

    body = mutate(path, value)
    with pytest.raises(ApiException) as rejected:
        Kube(control_plane_api_client).request(
            "POST",
            "/apis/kubetune.io/v1alpha1/namespaces/default/finetunejobs?fieldValidation=Strict&dryRun=All",
            body=body,
        )
    error = json.loads(rejected.value.body or "{}")
    fields = {cause.get("field") for cause in error.get("details", {}).get("causes", [])}
    assert field in fields or f'unknown field "{field}"' in error["message"], error


@pytest.mark.controlplane
def test_api_server_accepts_every_example_and_fills_defaults(
    finetunejob_api: Any, control_plane_api_client: Any
) -> None:
    from kubetune.operator.kube import Kube

    kube = Kube(control_plane_api_client)
    for example in sorted((ROOT / "examples").glob("*.yaml")):
        body = yaml.safe_load(example.read_text())
        body["metadata"].pop("namespace", None)
        created = kube.request(
            "POST",
            "/apis/kubetune.io/v1alpha1/namespaces/default/finetunejobs?fieldValidation=Strict&dryRun=All",
            body=body,
        )
        local = api.FineTuneJob.model_validate(body).spec.to_wire()
        assert created["spec"]["training"]["learningRate"] == local["training"]["learningRate"], example.name
        assert created["spec"]["lora"] == {k: v for k, v in local["lora"].items() if v != []}, example.name
        assert created["spec"]["method"] == local["method"], example.name
