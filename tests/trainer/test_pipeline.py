"""The trainer pipeline end to end on the CPU: real training, real files, real checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from kubetune import api
from kubetune.manifests import load_job
from kubetune.storage import ObjectStore, sha256_file
from kubetune.trainer.pipeline import execute
from kubetune.trainer.reporter import ConsoleReporter, Reporters
from kubetune.trainer.stages import merge

from .conftest import tiny_job

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.training


class Recorder:
    """A reporter that keeps what it was told."""

    def __init__(self) -> None:
        self.stages: list[str] = []
        self.progress_seen: list[api.Progress] = []
        self.results_seen: list[api.Results] = []
        self.artifacts_seen: list[api.Artifacts] = []

    def stage_started(self, stage: api.Stage) -> None:
        self.stages.append(stage.value)

    def stage_finished(self, stage: api.Stage, seconds: float) -> None:
        pass

    def progress(self, progress: api.Progress) -> None:
        self.progress_seen.append(progress)

    def results(self, results: api.Results) -> None:
        self.results_seen.append(results)

    def artifacts(self, artifacts: api.Artifacts) -> None:
        self.artifacts_seen.append(artifacts)

    def log(self, message: str) -> None:
        pass


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("full", {"training": {"maxSteps": 12, "learningRate": 0.001, "batchSize": 8, "maxSeqLength": 32}}),
        ("lora", {}),
        ("qlora", {"quantization": {"bits": 4, "computeDtype": "float32"}}),
    ],
)
def test_each_method_lowers_the_validation_loss(method: str, extra: dict[str, Any], tmp_path: Path) -> None:
    job = tiny_job(method=method, **extra)
    recorder = Recorder()
    ctx = execute(job, recorder, workdir=tmp_path / "work", output=str(tmp_path / "out"))
    assert ctx.after["loss"] < ctx.before["loss"] - 0.5, (ctx.before, ctx.after)
    assert recorder.stages == [s.value for s in api.Stage]
    steps = [p.step or 0 for p in recorder.progress_seen]
    assert steps == sorted(steps) and steps[-1] == 12
    # Once a loss is logged, every later report carries one (eval and summary logs included).
    losses = [p.loss for p in recorder.progress_seen if p.stage == api.Stage.TRAIN]
    first = next(i for i, loss in enumerate(losses) if loss is not None)
    assert None not in losses[first:]
    assert losses[-1] == [h["loss"] for h in ctx.history if "loss" in h][-1]
    assert recorder.results_seen[-1].before == ctx.before
    weights = "merged" if method == "full" else "adapter"
    assert (
        tmp_path
        / "out"
        / weights
        / ("model.safetensors" if method == "full" else "adapter_model.safetensors")
    ).exists()


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """The README's main job, run once for the assertions below."""
    out = tmp_path_factory.mktemp("quickstart")
    job = load_job(ROOT / "examples" / "quickstart.yaml")
    ctx = execute(
        job, Reporters([Recorder(), ConsoleReporter()]), workdir=out / "work", output=str(out / "artifacts")
    )
    return ctx, out / "artifacts"


def test_quickstart_learns_the_task(quickstart: tuple[Any, Path]) -> None:
    ctx, _ = quickstart
    assert ctx.before["exact_match"] <= 0.10
    assert ctx.after["exact_match"] >= 0.90
    assert ctx.after["loss"] < ctx.before["loss"] / 10


def test_manifest_lists_every_artifact_with_its_sha256(quickstart: tuple[Any, Path]) -> None:
    _, out = quickstart
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {f["path"]: f for f in manifest["files"]}
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(listed) == on_disk
    for path, entry in listed.items():
        assert entry["sha256"] == sha256_file(out / path), path
        assert entry["size"] == (out / path).stat().st_size
    for expected in ("adapter/adapter_model.safetensors", "merged/model.safetensors", "metrics.json",
                     "report.png", "README.md", "quantized/bnb-4bit/model.safetensors",
                     "quantized/gguf-q4_k_m/model.gguf", "quantized/gguf-q4_k_m/Modelfile"):  # fmt: skip
        assert expected in listed
    assert not any(p.endswith((".bin", ".pt", ".pth")) for p in listed), "safetensors only"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["before"]) == set(metrics["after"])
    card = (out / "README.md").read_text()
    assert "| exact_match |" in card and "kubetune/tiny-llama" in card


def test_merged_model_agrees_with_base_plus_adapter(quickstart: tuple[Any, Path]) -> None:
    ctx, out = quickstart
    from peft import PeftModel

    # The merged weights are in the compute dtype (bf16 where the CPU has it): compared in fp32
    # by the merge stage's own criterion, not by an absolute logit bound.
    assert ctx.checks["merge_kl"] < 1e-2 and ctx.checks["merge_top1_agreement"] >= 0.9
    ids = torch.tensor([ctx.data.validation[0].input_ids])
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(ctx.model_source)
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        found = merge.agreement(adapted(ids).logits[0], merged(ids).logits[0])
        untrained = (
            (AutoModelForCausalLM.from_pretrained(ctx.model_source)(ids).logits - merged(ids).logits)
            .abs()
            .max()
        )
    assert found.problem(merged.dtype) is None
    assert untrained > 1.0, "the merge must carry the adapter's update"


def test_quantized_export_reloads_and_answers(quickstart: tuple[Any, Path]) -> None:
    ctx, out = quickstart
    model = AutoModelForCausalLM.from_pretrained(out / "quantized" / "bnb-4bit")
    assert "Linear4bit" in {type(m).__name__ for m in model.modules()}
    from kubetune.trainer.evaluation import generate

    pairs = ctx.data.eval_pairs[:8]
    answers = generate(model, ctx.tokenizer, [p.prompt for p in pairs], 16, batch_size=8)
    correct = sum(a.strip() == p.reference.strip() for a, p in zip(answers, pairs, strict=True))
    assert correct >= 6, answers


def test_loss_curve_report_is_a_png(quickstart: tuple[Any, Path]) -> None:
    _, out = quickstart
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert any("eval_loss" in h for h in history) and any("loss" in h for h in history)


class Boom(RuntimeError):
    pass


class FailingUpload(ObjectStore):
    """Object storage that breaks after the first file of an upload, like a lost connection."""

    def upload_prefix(
        self, src_dir: Any, uri: Any, *, skip_unchanged: bool = True, progress: Any = None
    ) -> Any:
        first = next(p for p in Path(src_dir).rglob("*") if p.is_file())
        self.upload_file(first, parse(uri).join(first.relative_to(src_dir).as_posix()))
        raise Boom("connection lost")


def parse(uri: Any) -> Any:
    from kubetune.storage import parse_uri

    return parse_uri(uri)


def test_interrupted_runs_leave_no_manifest(tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = tiny_job(training={"maxSteps": 4, "batchSize": 8, "maxSeqLength": 32})

    class StopInTraining(Recorder):
        def progress(self, progress: api.Progress) -> None:
            raise Boom("killed mid-training")

    with pytest.raises(Boom):
        execute(job, StopInTraining(), workdir=tmp_path / "w1", output=str(out))
    assert not (out / "manifest.json").exists()

    execute(job, Recorder(), workdir=tmp_path / "w2", output=str(out))
    first = json.loads((out / "manifest.json").read_text())
    with pytest.raises(Boom):
        execute(job, Recorder(), workdir=tmp_path / "w3", output=str(out), store=FailingUpload())
    assert not (out / "manifest.json").exists(), "a manifest must never vouch for a half-published run"

    execute(job, Recorder(), workdir=tmp_path / "w4", output=str(out))
    second = json.loads((out / "manifest.json").read_text())
    assert second["runId"] != first["runId"]
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert {f["path"] for f in second["files"]} == on_disk


def test_kubetune_run_reports_bad_input_and_exits_1(tmp_path: Path) -> None:
    bad_data = tmp_path / "train.jsonl"
    bad_data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    job = tiny_job(dataset={"train": str(bad_data), "format": "prompt-completion"}).to_wire()
    manifest = tmp_path / "job.yaml"
    manifest.write_text(json.dumps(job))
    result = subprocess.run(
        [sys.executable, "-m", "kubetune", "run", str(manifest), "--output", str(tmp_path / "out")],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert 'train.jsonl:2: missing "completion"' in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()

    job["spec"]["training"]["learningRate"] = 0
    manifest.write_text(json.dumps(job))
    result = subprocess.run(
        [sys.executable, "-m", "kubetune", "run", str(manifest)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    assert "spec.training.learningRate: must be greater than 0" in result.stdout
