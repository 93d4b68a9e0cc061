"""The memory plan against published figures and against real CPU training runs.

    .venv/bin/python -P bench/memory_plan.py                 # published comparisons only (instant)
    .venv/bin/python -P bench/memory_plan.py --measure       # plus CPU runs of the tiny preset

Published: torchtune's README table "Memory and training speed" (Llama 3.1, batch size 2,
packed to 2048 tokens, torch.compile on; the configs named below) and the QLoRA paper
(Dettmers et al. 2023: a 65B model fine-tuned on one 48 GB GPU). Each is planned with the
settings of that run as far as a FineTuneJob can express them.

Measured: the tiny preset trained by kubetune's own train stage for a few steps in a fresh
process per method; the peak RSS (VmHWM) above the RSS just before the model was loaded is
compared with the plan of the same spec on the CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from kubetune import api, memory

HERE = Path(__file__).resolve().parent
GIB = 1024**3

# torchtune's recipes take the loss over chunks of the output (CEWithChunkedOutputLoss): planned as
# Liger's fused cross-entropy, which likewise never holds the whole batch's logits.
PACKED = {"batchSize": 2, "maxSeqLength": 2048, "packing": True, "liger": True}
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QVO_MLP = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QKV = ["q_proj", "k_proj", "v_proj"]
PUBLISHED: list[dict[str, Any]] = [
    {
        "source": "torchtune README, Llama 3.1 8B LoRA, 1x A6000 (llama3_1/8B_lora_single_device: r8 "
        "q/v/o + MLP; the config's default is activation checkpointing on, the README does not say "
        "what the A6000 row changed: its 4090 row is 16.2 GiB)",
        "published_gib": 30.3,
        "spec": {"model": {"name": "meta-llama/Llama-3.1-8B"}, "method": "lora",
                 "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": QVO_MLP},
                 "training": {**PACKED, "gradientCheckpointing": True}, "resources": {"gpus": 1}},
    },
    {
        "source": "torchtune README, Llama 3.1 8B QLoRA, 1x RTX 4090 (llama3_1/8B_qlora_single_device: "
        "r8 all attention + MLP, activation checkpointing on)",
        "published_gib": 7.4,
        "spec": {"model": {"name": "meta-llama/Llama-3.1-8B"}, "method": "qlora",
                 "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ALL},
                 "training": {**PACKED, "gradientCheckpointing": True}, "resources": {"gpus": 1}},
    },
    {
        "source": "torchtune README, Llama 3.1 70B LoRA, 8x A100 (llama3_1/70B_lora: r16 q/k/v, FSDP, "
        "activation checkpointing on)",
        "published_gib": 27.6,
        "spec": {"model": {"name": "meta-llama/Llama-3.1-70B"}, "method": "lora",
                 "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": QKV},
                 "training": {**PACKED, "gradientCheckpointing": True, "strategy": "fsdp"},
                 "resources": {"gpus": 8}},
    },
    {
        "source": "QLoRA paper (Dettmers et al. 2023), LLaMA 65B QLoRA on one 48 GB GPU (r64 all linear, "
        "dropout 0.05, batch 1, 512 tokens, gradient checkpointing); an upper bound, 48 GB = 44.7 GiB",
        "published_gib": 48e9 / GIB,
        "spec": {"model": {"name": "huggyllama/llama-65b"}, "method": "qlora",
                 "lora": {"r": 64, "alpha": 16, "dropout": 0.05},
                 "training": {"batchSize": 1, "maxSeqLength": 512, "gradientCheckpointing": True},
                 "resources": {"gpus": 1, "gpuMemory": "48G"}},
    },
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


def child(method: str, workdir: str) -> None:
    """Prepare, then load and train in this process; prints RSS before the model and the peak."""
    from kubetune.trainer.context import RunContext
    from kubetune.trainer.modeling import trainable_model
    from kubetune.trainer.pipeline import artifact_root
    from kubetune.trainer.reporter import SilentReporter
    from kubetune.trainer.run import quiet_libraries
    from kubetune.trainer.stages import fetch, prepare, train

    quiet_libraries()
    spec = {**TINY, "method": method}
    if method == "qlora":
        spec["quantization"] = {"bits": 4, "computeDtype": "float32"}
    job = api.FineTuneJob.model_validate(
        {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "m"}, "spec": spec}
    )
    ctx = RunContext(job=job, workdir=Path(workdir), output=artifact_root(job, workdir + "/out"),
                     store=None, reporter=SilentReporter(), run_id="bench")  # type: ignore[arg-type]  # fmt: skip
    fetch.run(ctx)
    prepare.run(ctx)
    before = _status("VmRSS")
    assert ctx.model_source is not None
    ctx.model = trainable_model(job.spec, ctx.model_source)
    train.run(ctx)
    print(json.dumps({"before_bytes": before, "peak_bytes": _status("VmHWM")}))


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measured() -> list[dict[str, Any]]:
    import tempfile

    rows = []
    for method in ("full", "lora", "qlora"):
        with tempfile.TemporaryDirectory() as scratch:
            result = subprocess.run(
                [sys.executable, "-P", __file__, "--child", method, scratch],
                check=True, capture_output=True, text=True, cwd=HERE.parent,
            )  # fmt: skip
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        spec = {**TINY, "method": method}
        if method == "qlora":
            spec["quantization"] = {"bits": 4, "computeDtype": "float32"}
        plan = memory.plan_job(api.FineTuneJobSpec.model_validate(spec))
        used = figures["peak_bytes"] - figures["before_bytes"]
        rows.append(
            {
                "model": "kubetune/tiny-llama",
                "method": method,
                "measured_mib": round(used / 2**20, 1),
                "planned_mib": round(plan.training / 2**20, 1),
                "parts_mib": {p.name: round(p.bytes / 2**20, 2) for p in plan.parts},
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "WORKDIR"))
    parser.add_argument("--measure", action="store_true")
    parser.add_argument("--json", type=Path, default=HERE / "memory_plan.json")
    args = parser.parse_args()
    if args.child:
        child(*args.child)
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
            print(f"{row['model']} {row['method']}: {row['measured_mib']} MiB measured, "
                  f"{row['planned_mib']} planned")  # fmt: skip
    args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
