"""The memory plan against published figures and against real CPU training runs.

    .venv/bin/python -P bench/memory_plan.py                 # published comparisons only (instant)
    .venv/bin/python -P bench/memory_plan.py --measure       # plus CPU runs: tiny and 27M, 1 and 2 processes

Published: torchtune's README table "Memory and training speed" (Llama 3.1, batch size 2,
packed to 2048 tokens, torch.compile on; the configs named below) and the QLoRA paper
(Dettmers et al. 2023: a 65B model fine-tuned on one 48 GB GPU). Each is planned with the
settings of that run as far as a FineTuneJob can express them.

Measured: the tiny preset and a 27M Llama built like it, trained by kubetune's own train stage
for a few steps in fresh processes, one or two (FSDP for full and LoRA, DDP for QLoRA); the
largest per-process peak RSS (VmHWM) at the end of the training loop above the RSS just before
the model was loaded is compared with the plan of the same spec on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also under python -P

from _common import HERE, status_kib, write_json

from kubetune import api, memory

GIB = 1024**3

# torchtune's recipes take the loss over chunks of the output (CEWithChunkedOutputLoss): planned as
# Liger's fused cross-entropy, which likewise never holds the whole batch's logits.
PACKED = {"batchSize": 2, "maxSeqLength": 2048, "packing": True, "liger": True}
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QVO_MLP = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QKV = ["q_proj", "k_proj", "v_proj"]


def lora(r: int, alpha: int, targets: list[str] | None = None, dropout: float = 0.0) -> dict[str, Any]:
    return {"r": r, "alpha": alpha, "dropout": dropout} | ({"targetModules": targets} if targets else {})


def case(
    source: str,
    published_gib: float,
    model: str,
    method: str,
    adapter: dict[str, Any],
    training: dict[str, Any],
    resources: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A published figure and the FineTuneJob spec sections of the run it is about (one GPU unless
    ``resources`` says otherwise)."""
    spec = {
        "model": {"name": model},
        "method": method,
        "lora": adapter,
        "training": training,
        "resources": resources or {"gpus": 1},
    }
    return {"source": source, "published_gib": published_gib, "spec": spec}


PUBLISHED: list[dict[str, Any]] = [
    case(
        "torchtune README, Llama 3.1 8B LoRA, 1x A6000 (llama3_1/8B_lora_single_device: r8 "
        "q/v/o + MLP; the config's default is activation checkpointing on, the README does not say "
        "what the A6000 row changed: its 4090 row is 16.2 GiB)",
        30.3,
        "meta-llama/Llama-3.1-8B", "lora", lora(8, 16, QVO_MLP), {**PACKED, "gradientCheckpointing": True},
    ),
    case(
        "torchtune README, Llama 3.1 8B QLoRA, 1x RTX 4090 (llama3_1/8B_qlora_single_device: "
        "r8 all attention + MLP, activation checkpointing on)",
        7.4,
        "meta-llama/Llama-3.1-8B", "qlora", lora(8, 16, ALL), {**PACKED, "gradientCheckpointing": True},
    ),
    case(
        "torchtune README, Llama 3.1 70B LoRA, 8x A100 (llama3_1/70B_lora: r16 q/k/v, FSDP, "
        "activation checkpointing on)",
        27.6,
        "meta-llama/Llama-3.1-70B", "lora", lora(16, 32, QKV),
        {**PACKED, "gradientCheckpointing": True, "strategy": "fsdp"}, {"gpus": 8},
    ),
    case(
        "QLoRA paper (Dettmers et al. 2023), LLaMA 65B QLoRA on one 48 GB GPU (r64 all linear, "
        "dropout 0.05, batch 1, 512 tokens, gradient checkpointing); an upper bound, 48 GB = 44.7 GiB",
        48e9 / GIB,
        "huggyllama/llama-65b", "qlora", lora(64, 16, dropout=0.05),
        {"batchSize": 1, "maxSeqLength": 512, "gradientCheckpointing": True}, {"gpus": 1, "gpuMemory": "48G"},
    ),
]  # fmt: skip


def job_spec(sections: dict[str, Any]) -> api.FineTuneJobSpec:
    base = {
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/"},
        "export": {"merge": False},
    }
    return api.FineTuneJobSpec.model_validate(base | sections)


def published() -> list[dict[str, Any]]:
    rows = []
    for case in PUBLISHED:
        plan = memory.plan_job(job_spec(case["spec"]))
        planned = plan.training / GIB
        rows.append(
            {
                "source": case["source"],
                "published_gib": round(case["published_gib"], 2),
                "planned_gib": round(planned, 2),
                "difference": round(planned / case["published_gib"] - 1, 3),
                "parts_gib": {p.name: round(p.bytes / GIB, 2) for p in plan.parts},
            }
        )
    return rows


TINY: dict[str, Any] = {
    "model": {"name": "kubetune/tiny-llama"},
    "dataset": {"train": "builtin:dates", "validationSplit": 0.05, "format": "prompt-completion"},
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
    "training": {"maxSteps": 6, "batchSize": 8, "maxSeqLength": 64, "precision": "fp32",
                 "gradientCheckpointing": False, "learningRate": 0.001},
    "evaluation": {"baseline": False, "metrics": ["loss"], "maxSamples": 2, "maxNewTokens": 2},
    "export": {"merge": False},
    "output": {"uri": "unused"},
    "resources": {"gpus": 0},
}  # fmt: skip
# accelerate enables FSDP only on GPUs; the tests' shim lets its FSDP2 path run on gloo here.
FSDP_ON_CPU = HERE.parent / "tests" / "trainer" / "fsdp_on_cpu"


def measured_spec(method: str, model_dir: str | None, processes: int) -> dict[str, Any]:
    """The spec of one measured run; several CPU processes are planned as one per node."""
    spec: dict[str, Any] = {**TINY, "method": method}
    if model_dir is not None:
        spec["model"] = {"uri": model_dir}
    if method == "qlora":
        spec["quantization"] = {"bits": 4, "computeDtype": "float32"}
    if processes > 1:
        strategy = "ddp" if method == "qlora" else "fsdp"
        spec["training"] = {**TINY["training"], "strategy": strategy}
        spec["resources"] = {"gpus": 0, "nodes": processes}
    return spec


def child(method: str, workdir: str, model_dir: str, processes: int) -> None:
    """Prepare, then load and train in this process; prints RSS before the model and the peak
    at the end of the training loop (before the trained weights are gathered and saved)."""
    from transformers import Trainer

    from kubetune.trainer import distributed
    from kubetune.trainer.context import RunContext
    from kubetune.trainer.modeling import trainable_model
    from kubetune.trainer.pipeline import artifact_root
    from kubetune.trainer.reporter import SilentReporter
    from kubetune.trainer.run import quiet_libraries
    from kubetune.trainer.stages import fetch, prepare, train

    quiet_libraries()
    distributed.init()
    spec = measured_spec(method, model_dir or None, processes)
    spec["resources"] = TINY["resources"]  # the run itself: CPU processes of this launch
    job = api.FineTuneJob.model_validate(
        {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "m"}, "spec": spec}
    )
    ctx = RunContext(job=job, workdir=Path(workdir) / f"rank{distributed.rank()}",
                     output=artifact_root(job, workdir + "/out"), store=None,  # type: ignore[arg-type]
                     reporter=SilentReporter(), run_id="bench")  # fmt: skip
    fetch.run(ctx)
    prepare.run(ctx)
    before = status_kib("VmRSS") * 1024
    peak = {"bytes": 0}
    plain = Trainer.train

    def measured_train(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = plain(self, *args, **kwargs)
        peak["bytes"] = status_kib("VmHWM") * 1024
        return out

    Trainer.train = measured_train  # type: ignore[method-assign]
    assert ctx.model_source is not None
    ctx.model = trainable_model(job.spec, ctx.model_source)
    train.run(ctx)
    print(json.dumps({"rank": distributed.rank(), "before_bytes": before, "peak_bytes": peak["bytes"]}))
    distributed.shutdown()


def measured() -> list[dict[str, Any]]:
    import tempfile

    from trainer_vs_recipe import build_small_model

    rows = []
    with tempfile.TemporaryDirectory() as models:
        small = Path(models) / "small"
        build_small_model(small)
        for name, model_dir in (("kubetune/tiny-llama", ""), ("small (27M Llama)", str(small))):
            for method in ("full", "lora", "qlora"):
                for processes in (1, 2):
                    rows.append(_measure(name, model_dir, method, processes))
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def _measure(name: str, model_dir: str, method: str, processes: int) -> dict[str, Any]:
    import tempfile

    launch = [sys.executable, "-P"]
    if processes > 1:
        launch = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={processes}",
        ]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(FSDP_ON_CPU)}
    with tempfile.TemporaryDirectory() as scratch:
        result = subprocess.run(
            [*launch, __file__, "--child", method, scratch, model_dir, str(processes)],
            check=True, capture_output=True, text=True, cwd=HERE.parent, env=env,
        )  # fmt: skip
    ranks = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"rank"')]
    used = max(r["peak_bytes"] - r["before_bytes"] for r in ranks)
    spec = measured_spec(method, model_dir or None, processes)
    job = api.FineTuneJob.model_validate(
        {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "m"}, "spec": spec}
    )
    plan = memory.plan_job(job.spec)
    return {
        "model": name,
        "method": method,
        "processes": processes,
        "strategy": plan.strategy,
        "measured_mib": round(used / 2**20, 1),
        "planned_mib": round(plan.training / 2**20, 1),
        "parts_mib": {p.name: round(p.bytes / 2**20, 2) for p in plan.parts},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=4, metavar=("METHOD", "WORKDIR", "MODEL_DIR", "PROCESSES"))
    parser.add_argument("--measure", action="store_true")
    parser.add_argument("--json", type=Path, default=HERE / "memory_plan.json")
    args = parser.parse_args()
    if args.child:
        method, workdir, model_dir, processes = args.child
        child(method, workdir, model_dir, int(processes))
        return
    out: dict[str, Any] = {"published": published()}
    for row in out["published"]:
        print(f"{row['planned_gib']:6.1f} GiB planned, {row['published_gib']:6.1f} published "
              f"({row['difference']:+.0%}): {row['source']}")  # fmt: skip
    if args.measure:
        out["measured"] = measured()
    elif args.json.exists():  # keep the last measured runs beside the new plans
        out["measured"] = json.loads(args.json.read_text(encoding="utf-8")).get("measured", [])
    if args.measure:
        for row in out["measured"]:
            print(f"{row['model']} {row['method']} x{row['processes']} {row['strategy']}: "
                  f"{row['measured_mib']} MiB measured, {row['planned_mib']} planned")  # fmt: skip
    write_json(args.json, out)


if __name__ == "__main__":
    main()
