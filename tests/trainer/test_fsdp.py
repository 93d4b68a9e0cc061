"""FSDP2 on the CPU: sharded training, sharded checkpoints, resuming on another number of processes.

accelerate runs FSDP only on GPU process groups; ``fsdp_on_cpu/sitecustomize.py`` (on these
runs' PYTHONPATH alone) lets its own FSDP2 path run on gloo, since this machine has no GPU. The
trainer, transformers and torch run unchanged.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from kubetune import api, contract
from kubetune.trainer import modeling
from kubetune.trainer.stages import train as train_stage

from .conftest import EVAL, env, free_port, tiny_job

pytestmark = pytest.mark.training
SHIM = Path(__file__).with_name("fsdp_on_cpu")
KUBETUNE = [sys.executable, "-m", "kubetune"]
TRAINING: dict[str, Any] = {
    "maxSteps": 6,
    "learningRate": 0.003,
    "batchSize": 8,
    "maxSeqLength": 32,
    "precision": "fp32",
}


def run(
    tmp_path: Path,
    name: str,
    launch: list[str],
    *,
    method: str = "full",
    environ: dict[str, str] | None = None,
    evaluation: dict[str, Any] = EVAL,
    export: dict[str, Any] | None = None,
    **training: Any,
) -> subprocess.Popen[str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    job = tmp_path / f"{name}.json"
    spec: dict[str, Any] = {"training": TRAINING | training, "evaluation": evaluation, "method": method}
    if export is not None:
        spec["export"] = export
    if method == "qlora":  # fp32 compute, so that FSDP and DDP are compared without bf16 rounding
        spec["quantization"] = {"bits": 4, "computeDtype": "float32"}
    job.write_text(tiny_job(name, **spec).model_dump_json(by_alias=True))
    extra = {"KUBETUNE_WORKDIR": str(tmp_path / "work" / name), "PYTHONPATH": str(SHIM), **(environ or {})}
    return subprocess.Popen(
        [*KUBETUNE, "run", str(job), "--output", str(tmp_path / "out"), *launch],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(tmp_path, **extra),
    )  # fmt: skip


def finished(process: subprocess.Popen[str]) -> str:
    log = process.communicate(timeout=600)[0]
    assert process.returncode == 0, log
    return log


def test_fsdp_is_chosen_for_full_fine_tuning_on_several_processes() -> None:
    full = tiny_job(method="full", training={"maxSteps": 2, "gradientCheckpointing": True}).spec
    lora = tiny_job(training={"maxSteps": 2}).spec

    def arguments(spec: api.FineTuneJobSpec, processes: int) -> Any:
        return train_stage.training_arguments(spec, Path("unused"), has_validation=False, processes=processes)

    args = arguments(full, 2)
    assert args.fsdp and isinstance(args.fsdp_config, dict)
    assert args.fsdp_config["version"] == 2 and args.fsdp_config["state_dict_type"] == "SHARDED_STATE_DICT"
    assert args.fsdp_config["activation_checkpointing"] and not args.activation_checkpointing
    assert not arguments(lora, 2).fsdp  # auto: LoRA's replicated state is small
    assert not arguments(full, 1).fsdp  # one process: nothing to shard over
    assert arguments(full, 1).activation_checkpointing
    assert full.resolved_strategy(8) == "fsdp" and lora.resolved_strategy(8) == "ddp"
    # FSDP-QLoRA: the 4-bit codes travel in the compute dtype's storage, which FSDP can shard.
    quant = api.Quantization()
    assert modeling.quantization_config(quant, sharded=True).bnb_4bit_quant_storage == torch.bfloat16
    assert modeling.quantization_config(quant).bnb_4bit_quant_storage == torch.uint8


@pytest.mark.parametrize(
    ("method", "weights"),
    [
        ("full", "merged/model.safetensors"),
        ("lora", "adapter/adapter_model.safetensors"),
        ("qlora", "adapter/adapter_model.safetensors"),  # 4-bit codes in fp32 storage, sharded
    ],
)
def test_fsdp_trains_the_same_weights_as_ddp_and_checkpoints_one_shard_per_rank(
    tmp_path: Path, method: str, weights: str
) -> None:
    two = ["--nproc-per-node", "2"]
    # QLoRA with checkpointing: FSDP's wrapper alone recomputes (peft turns on the model's own).
    counts = tmp_path / "calls"
    counts.mkdir()
    counting = {"KUBETUNE_TEST_LAYER_CALLS": str(counts)} if method == "qlora" else {}
    checkpointing: dict[str, Any] = {"gradientCheckpointing": True} if method == "qlora" else {}
    fsdp: dict[str, Any] = {"strategy": "fsdp", "checkpointEvery": 3, **checkpointing}
    sharded = finished(run(tmp_path / "fsdp", "fsdp", two, method=method, environ=counting, **fsdp))
    replicated = finished(run(tmp_path / "ddp", "ddp", two, method=method, strategy="ddp", **checkpointing))
    assert "FSDP2 (weights, gradients and optimizer states sharded) over 2 processes" in sharded
    assert "DDP over 2 processes" in replicated
    if method == "qlora":
        assert "gradient checkpointing on" in sharded
        # One forward and one recomputation per layer and micro-batch (three before).
        calls = {p.name: int(p.read_text()) for p in counts.iterdir()}
        steps = TRAINING["maxSteps"]
        assert calls == {"rank-0": 2 * steps, "rank-1": 2 * steps}
    a, b = (load_file(tmp_path / side / "out" / weights) for side in ("fsdp", "ddp"))
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    step = tmp_path / "fsdp" / "out" / "checkpoints" / "step-6"
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (step / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (step / "COMPLETE").exists() and not (step / "model.safetensors").exists()


def test_an_fsdp_job_runs_every_stage_on_two_processes(tmp_path: Path) -> None:
    """Baseline, training, evaluation and merge, as a job on 8 GPUs runs them: rank 0's stages
    after training load their models in a process where FSDP was set up; rank 0's baseline takes
    longer than the collective timeout. Under bf16, a decoder
    block's FSDP unit computes in bf16 and reduces gradients in fp32 (as DDP sums them; summed in
    bf16 over many ranks they round at every step), and rank 0 gathers the adapter alone to save
    it, not the frozen base beside it (140 GB at 70B)."""
    precision, saved = tmp_path / "precision", tmp_path / "saved"
    precision.mkdir()
    saved.mkdir()
    environ = {
        "KUBETUNE_TEST_FSDP_PRECISION": str(precision),
        "KUBETUNE_TEST_SAVED_STATE": str(saved),
        # Rank 0's baseline outlasts the collective timeout (a 70B model's does): the other rank
        # waits for it outside any training collective.
        "KUBETUNE_TEST_SLOW_BASELINE": "20",
        contract.COLLECTIVE_TIMEOUT_ENV: "8",
    }
    evaluation = {"metrics": ["loss"], "baseline": True}
    job = run(
        tmp_path, "all", ["--nproc-per-node", "2"], method="lora", environ=environ, evaluation=evaluation,
        export={"merge": True}, strategy="fsdp", precision="bf16",
    )  # fmt: skip
    log = finished(job)
    assert "FSDP2 (weights, gradients and optimizer states sharded) over 2 processes" in log
    for stage in ("baseline", "train", "evaluate", "merge", "push"):
        assert f"▶ {stage}" in log, stage
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["after"]["loss"] < metrics["before"]["loss"]
    assert (tmp_path / "out" / "merged" / "model.safetensors").exists()
    assert (tmp_path / "out" / "manifest.json").exists()

    policies = {p.name: p.read_text().split() for p in precision.iterdir()}
    assert policies == {rank: ["torch.bfloat16", "torch.float32"] for rank in ("rank-0", "rank-1")}
    names = (saved / "rank-0").read_text().split()
    assert names and all(".lora_A." in name or ".lora_B." in name for name in names), names[:3]
    adapter = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == len(names)


def test_two_nodes_upload_their_own_shards_and_the_run_resumes_on_three_processes(tmp_path: Path) -> None:
    """Each node uploads its shards beside training (the upload of step 3, held 8 s, ends after
    later steps ran, on both nodes), and the run resumes on three processes."""
    events = tmp_path / "events"
    events.mkdir()
    slow = {"KUBETUNE_TEST_SLOW_UPLOADS": str(events)}
    nodes = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    training: dict[str, Any] = {"strategy": "fsdp", "checkpointEvery": 3, "batchSize": 6}
    first = [
        run(tmp_path, f"node{i}", [*nodes, "--rdzv-id", "f"], environ=slow, **training) for i in range(2)
    ]
    for node in first:
        finished(node)
    for rank in ("rank-0", "rank-1"):
        lines = [line.split() for line in (events / rank).read_text().splitlines()]
        uploaded = next(float(t) for kind, what, t in lines if kind == "uploaded" and what == "step-3")
        later = [int(what) for kind, what, t in lines if kind == "step" and float(t) < uploaded]
        assert max(later) > 3, f"{rank}: training waited for the upload of step 3"
    assert (tmp_path / "out" / "checkpoints" / "step-3" / "COMPLETE").exists()
    step = tmp_path / "out" / "checkpoints" / "step-6"
    # Each node's disk held only its own rank's shard: both are in storage, with the marker.
    local = [sorted(p.name for p in (tmp_path / "work" / f"node{i}").rglob("*.distcp")) for i in range(2)]
    assert all(len(set(names)) == 1 for names in local) and local[0] != local[1]
    assert sorted(p.name for p in (step / "pytorch_model_fsdp_0").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    assert (step / "COMPLETE").exists()
    before = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]

    three = ["--nproc-per-node", "3"]
    log = finished(run(tmp_path, "three", three, strategy="fsdp", checkpointEvery=3, maxSteps=9, batchSize=6))
    assert "resuming from checkpoint step 6" in log
    assert "as 3 processes x 4 examples x 1 accumulation: the same 12 examples a step" in log
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    losses = {h["step"]: h["loss"] for h in history if "loss" in h}
    assert sorted(losses) == list(range(1, 10)), "an optimizer step was repeated or lost"
    assert {h["step"]: h["loss"] for h in before if "loss" in h}.items() <= losses.items()
    assert losses[9] < losses[6], "training went on from the restored weights and optimizer"
