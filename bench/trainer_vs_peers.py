"""kubetune's defaults against the tutorial recipe and TRL's SFTTrainer: LoRA on one base, same data.

    .venv/bin/python bench/trainer_vs_peers.py                  # every side, 3 interleaved rounds
    .venv/bin/python bench/trainer_vs_peers.py --repeats 1 --sides recipe,kubetune
    python3 bench/trainer_vs_peers.py --model llama-1b --repeats 1 --examples 1000 \
        --median-tokens 440 --longest 1600 --max-seq-length 2048     # on a GPU, LoRA and QLoRA sides

Every side fine-tunes the same base with the same LoRA (r 16, alpha 32, no dropout, all linear
layers), on the same rows, 1 epoch, 16 examples per batch (where a side keeps batches of examples),
the same optimizer settings and seed:

    recipe              the tutorial recipe: prompt + completion + EOS, DataCollatorForLanguageModeling
                        (per-batch padding, loss on every token), peft + transformers.Trainer, fp32
    trl                 TRL SFTTrainer with its defaults (completion-only loss, padded batches,
                        bf16, gradient checkpointing)
    trl-padding-free    TRL with padding_free=True (the same batches, flattened)
    trl-packed          TRL with packing=True (best-fit decreasing into rows of max_length, padding-free)
    kubetune            kubetune.trainer.pipeline.execute on a FineTuneJob spec with the defaults
                        (packing off: padding-free batches; precision auto: bf16 autocast on CPUs with
                        native bf16)
    kubetune-fp32       the same with precision: fp32
    kubetune-bf16       the same with precision: bf16 (optional: bf16 on a CPU without native bf16 is
                        emulated, slow, but its memory is the same)
    kubetune-padded     kubetune fp32 with padded batches (the layout before padding-free batches,
                        forced by the benchmark's own subprocess; optional)
    kubetune-no-liger   kubetune's defaults with training.liger false (GPU)
    recipe-qlora        the recipe on a 4-bit NF4 base (bitsandbytes, double quantization, bf16 compute,
                        prepare_model_for_kbit_training), the QLoRA tutorial (GPU)
    trl-qlora           TRL padding-free on the same 4-bit base (GPU)
    kubetune-qlora      kubetune with method: qlora (its defaults: NF4, double quantization) (GPU)

``--model tiny`` (the default) pretrains the built-in tiny Llama first (below) and compares
validation losses. ``--model llama-1b`` builds a Llama with Llama-3.2-1B's shape (16 layers, hidden
2048, vocabulary 128,256; random weights, the preset's tokenizer) for throughput on a GPU: its
losses say nothing and are not measured. MFU = tokens/s x model FLOPs per token / the GPU's dense
bf16 peak (989 TFLOP/s for an H100/H200 SXM), with 6 x (parameters less the input embedding) +
6 x layers x hidden x mean example length (causal attention, forward and backward) FLOPs per
token, the usual convention; LoRA skips the frozen weights' gradients, so its real work is about
two thirds of that.

The base can learn: the built-in tiny Llama is first pretrained in full (once per invocation, by
kubetune with packing) on rows of the same task with another substitution, so it knows the format
and the LoRA fine-tuning has to learn the new mapping. The task is ``chain`` (each completion word
follows from the one before through the substitution): with ``substitute`` (each completion word
the image of the aligned prompt word) every side stalled at the same loss, that of predicting the
words' marginal distribution, and the comparison said nothing. The validation loss is
the mean cross-entropy over the completion tokens of the same held-out rows for every side, in
fp32 (``kubetune.trainer.evaluation.validation_loss``). Tokens per second = real tokens through the
model / Trainer's ``train_runtime``. Peak memory = ``ru_maxrss`` of each side's own subprocess.
Sides are interleaved round by round; the figures are medians.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # also under python -P

import _common as common  # noqa: E402
from trainer_vs_recipe import (  # noqa: E402
    PRESET,
    SIDE_COLUMNS,
    Counting,
    _Silent,
    common_arguments,
    completion_examples,
    count_slots,
    finetune_job,
    make_rows,
    pipeline_figures,
    prompt_completion,
    read_jsonl,
    trainer_figures,
    write_jsonl,
)

SIDES = ("recipe", "trl", "trl-padding-free", "trl-packed", "kubetune-fp32", "kubetune")
GPU_SIDES = (
    "kubetune",
    "trl",
    "trl-padding-free",
    "recipe",
    "kubetune-qlora",
    "trl-qlora",
    "recipe-qlora",
    "kubetune-no-liger",
    "trl-packed",
)
ALL_SIDES = (
    *SIDES,
    "kubetune-bf16",
    "kubetune-padded",
    "kubetune-no-liger",
    "recipe-qlora",
    "trl-qlora",
    "kubetune-qlora",
)
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
# Llama-3.2-1B's shape; the tokenizer is the preset's (its ids are a subset of the vocabulary).
LLAMA_1B: dict[str, Any] = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
}
PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16, the vendor's datasheet
COLUMNS = (
    ("side", "side", "<17"),
    *SIDE_COLUMNS,
    ("GPU MB", "peak_gpu_mb", ">7.0f"),
    ("MFU", "mfu", ">6.1%"),
    ("val loss", "validation_loss", ">9.4f"),
)


@dataclass(frozen=True)
class Settings:
    base_dir: str
    train_file: str
    validation_file: str
    workdir: str
    batch_size: int
    max_seq_length: int
    learning_rate: float
    warmup_ratio: float
    seed: int
    cuda: bool = False
    measure_loss: bool = True


@dataclass
class SideResult:
    side: str
    repeat: int
    train_seconds: float
    tokens: int
    slots: int
    steps: int
    tokens_per_second: float
    peak_rss_mb: float
    validation_loss: float | None
    precision: str
    load_before: float
    peak_gpu_mb: float | None = None


# ----------------------------------------------------------------------------- shared pieces


def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def fp32_validation_loss(model: Any, settings: Settings, tokenizer: Any) -> float | None:
    """The same held-out completion loss for every side, in fp32 whatever the side trained in."""
    import torch

    from kubetune.trainer.evaluation import validation_loss

    if not settings.measure_loss:
        return None
    if not getattr(model, "is_loaded_in_4bit", False):
        model = model.to(torch.float32)
    model.eval()
    examples = completion_examples(read_jsonl(settings.validation_file), tokenizer)
    with torch.autocast("cpu", enabled=False):
        return validation_loss(model, examples, tokenizer.pad_token_id, batch_size=16)


def load_4bit(base_dir: str) -> Any:
    """The QLoRA tutorial's base: NF4 with double quantization and bf16 compute, ready for k-bit training."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=quantization, dtype=torch.bfloat16, device_map={"": 0}
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)


# ----------------------------------------------------------------------------- the sides


def run_recipe(settings: Settings, side: str) -> dict[str, Any]:
    import torch
    from peft import get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(settings.base_dir)
    if side == "recipe-qlora":
        model = load_4bit(settings.base_dir)
    else:  # on a GPU the tutorial loads and trains in bf16
        dtype = torch.bfloat16 if settings.cuda else torch.float32
        model = AutoModelForCausalLM.from_pretrained(settings.base_dir, dtype=dtype)
    model = get_peft_model(model, lora_config())
    rows = read_jsonl(settings.train_file)
    texts = [r["prompt"] + r["completion"] + tokenizer.eos_token for r in rows]
    ids = tokenizer(texts, truncation=True, max_length=settings.max_seq_length)["input_ids"]
    collator = Counting(DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False))
    args = TrainingArguments(
        **common_arguments(settings, str(Path(settings.workdir) / side), cpu=not settings.cuda),
        bf16=settings.cuda,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=[{"input_ids": x} for x in ids], data_collator=collator
    )
    result = trainer.train()
    return {
        **trainer_figures(trainer, result, collator),
        "precision": "bf16" if settings.cuda else "fp32",
        "validation_loss": fp32_validation_loss(trainer.model, settings, tokenizer),
    }


def run_trl(settings: Settings, side: str) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(settings.base_dir)
    train = Dataset.from_list(read_jsonl(settings.train_file))
    config = SFTConfig(
        **common_arguments(settings, str(Path(settings.workdir) / side), cpu=not settings.cuda),
        # TRL refuses max_length without packing when padding-free; no row here is longer anyway.
        max_length=None if side in ("trl-padding-free", "trl-qlora") else settings.max_seq_length,
        packing=side == "trl-packed",
        padding_free=side in ("trl-padding-free", "trl-qlora"),
    )
    trainer = SFTTrainer(
        model=load_4bit(settings.base_dir) if side == "trl-qlora" else settings.base_dir,
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    collator = Counting(trainer.data_collator)
    trainer.data_collator = collator
    result = trainer.train()
    return {
        **trainer_figures(trainer, result, collator),
        "precision": "bf16" if config.bf16 else "fp32",
        "validation_loss": fp32_validation_loss(trainer.model, settings, tokenizer),
    }


def run_kubetune(settings: Settings, side: str) -> dict[str, Any]:
    from kubetune.trainer import modeling
    from kubetune.trainer.pipeline import execute
    from kubetune.trainer.run import quiet_libraries

    quiet_libraries()
    counts = count_slots()
    if side == "kubetune-padded":
        modeling.padding_free_blocker = lambda model: "forced by the benchmark"
    training: dict[str, Any] = {
        "epochs": 1,
        "learningRate": settings.learning_rate,
        "scheduler": "cosine",
        "warmupRatio": settings.warmup_ratio,
        "batchSize": settings.batch_size,
        "maxSeqLength": settings.max_seq_length,
        "seed": settings.seed,
    }
    if side in ("kubetune-fp32", "kubetune-padded"):
        training["precision"] = "fp32"
    if side == "kubetune-bf16":
        training["precision"] = "bf16"
    if side == "kubetune-no-liger":
        training["liger"] = False
    job = finetune_job(
        "bench",
        Path(settings.workdir) / side / "out",
        {
            "model": {"uri": settings.base_dir},
            "dataset": prompt_completion(settings.train_file, settings.validation_file),
            "method": "qlora" if side == "kubetune-qlora" else "lora",
            "lora": LORA,
            "training": training,
            "resources": {"gpus": 1 if settings.cuda else 0},
        },
    )
    ctx = execute(job, _Silent(), workdir=Path(settings.workdir) / side / "work")
    return {
        **pipeline_figures(ctx, counts["slots"]),
        "precision": modeling.precision_of(job.spec.training.precision).why,
        "validation_loss": fp32_validation_loss(ctx.model, settings, ctx.tokenizer),
    }


def child(side: str, settings_file: Path, result_file: Path) -> None:
    import torch

    settings = Settings(**json.loads(settings_file.read_text()))
    if side.startswith("recipe"):
        out = run_recipe(settings, side)
    elif side.startswith("trl"):
        out = run_trl(settings, side)
    else:
        out = run_kubetune(settings, side)
    out["peak_rss_mb"] = common.peak_rss_mb()
    out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20 if settings.cuda else None
    result_file.write_text(json.dumps(out))


# ----------------------------------------------------------------------------- the base


def pretrain_base(out: Path, rows_file: Path, workdir: Path, max_seq_length: int) -> dict[str, Any]:
    """The tiny preset trained in full on the other mapping: a base that knows the format."""
    from kubetune.trainer import presets
    from kubetune.trainer.pipeline import execute
    from kubetune.trainer.run import quiet_libraries

    quiet_libraries()
    job = finetune_job(
        "base",
        workdir / "out",
        {
            "model": {"uri": str(presets.preset_path(PRESET))},
            "dataset": {"train": str(rows_file), "validationSplit": 0.05, "format": "prompt-completion"},
            "method": "full",
            "training": {
                "epochs": 1,
                "learningRate": 2e-3,
                "warmupRatio": 0.05,
                "batchSize": 4,
                "maxSeqLength": max_seq_length,
                "packing": True,
            },
            "resources": {"gpus": 0},
        },
        baseline=True,
    )
    started = time.monotonic()
    ctx = execute(job, _Silent(), workdir=workdir / "work")
    ctx.model.save_pretrained(out, safe_serialization=True)
    ctx.tokenizer.save_pretrained(out)
    return {
        "seconds": round(time.monotonic() - started, 1),
        "loss_before": ctx.before.get("loss"),
        "loss_after": ctx.after.get("loss"),
        "steps": int(ctx.checks["global_step"]),
    }


def build_llama_1b(out: Path) -> None:
    """Llama-3.2-1B's shape with random weights in bf16 and the preset's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kubetune.trainer import presets

    tokenizer = AutoTokenizer.from_pretrained(presets.preset_path(PRESET))
    config = LlamaConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **LLAMA_1B,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def flops_per_token(base_dir: str, mean_length: float) -> float:
    """Model FLOPs per trained token (forward and backward): 6N plus causal attention."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir)
    d, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_layer = d * (2 * d + 2 * kv) + 3 * d * config.intermediate_size
    head = d * vocab
    parameters = layers * per_layer + head
    return 6 * parameters + 6 * layers * d * mean_length


# ----------------------------------------------------------------------------- orchestration


def summarize(
    results: Sequence[SideResult], sides: Sequence[str], flops: float | None = None
) -> list[dict[str, Any]]:
    def median(side: str, key: str) -> Any:
        values = [getattr(r, key) for r in results if r.side == side and getattr(r, key) is not None]
        return statistics.median(values) if values else None

    base_tps = median("recipe", "tokens_per_second")
    rows = []
    for side in sides:
        mine = [r for r in results if r.side == side]
        if not mine:
            continue
        tps = statistics.median(r.tokens_per_second for r in mine)
        rows.append(
            {
                "side": side,
                "runs": len(mine),
                "precision": mine[0].precision,
                "tokens_per_second": tps,
                "tokens_per_second_runs": [round(r.tokens_per_second) for r in mine],
                "speedup": tps / base_tps if base_tps else None,
                "padding_share": 1 - statistics.median(r.tokens / r.slots for r in mine),
                "tokens": mine[0].tokens,
                "steps": mine[0].steps,
                "train_seconds": statistics.median(r.train_seconds for r in mine),
                "peak_rss_mb": statistics.median(r.peak_rss_mb for r in mine),
                "peak_gpu_mb": median(side, "peak_gpu_mb"),
                "mfu": tps * flops / PEAK_BF16_FLOPS if flops else None,
                "validation_loss": median(side, "validation_loss"),
                "loads": [round(r.load_before, 2) for r in mine],
            }
        )
    return rows


def main() -> int:  # noqa: PLR0915
    parser = common.parser_for(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", choices=("tiny", "llama-1b"), default="tiny")
    parser.add_argument(
        "--sides", help=f"comma-separated, from {', '.join(ALL_SIDES)} (default: the model's usual set)"
    )
    parser.add_argument("--examples", type=int, default=800, help="fine-tuning rows")
    parser.add_argument("--validation", type=int, default=200, help="held-out rows")
    parser.add_argument("--pretrain-examples", type=int, default=3000, help="rows that pretrain the base")
    parser.add_argument("--median-tokens", type=int, default=110, help="median row length in tokens")
    parser.add_argument("--longest", type=int, default=400, help="longest row in tokens")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--side-timeout", type=float, default=None, help="seconds before a side is given up")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per side: on a shared machine, more threads than free cores spin and stall",
    )
    parser.add_argument("--output", type=Path, help="raw JSON (default: bench/trainer_vs_peers.json)")
    common.add_child(parser)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return 0
    gpu = args.model == "llama-1b"
    sides = common.sides_of(parser, args.sides or ",".join(GPU_SIDES if gpu else SIDES), ALL_SIDES)
    started = common.now()
    import torch
    from transformers import AutoTokenizer

    from kubetune.trainer import presets

    output = args.output or HERE / "trainer_vs_peers.json"
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as scratch:
        workdir = Path(scratch)
        torch.set_num_threads(args.threads)
        tokenizer = AutoTokenizer.from_pretrained(presets.preset_path(PRESET))
        shape = {"task": "chain", "median": args.median_tokens, "longest": args.longest}
        rows = make_rows(tokenizer, args.examples + args.validation, seed=1234, **shape)
        write_jsonl(workdir / "train.jsonl", rows[: args.examples])
        write_jsonl(workdir / "validation.jsonl", rows[args.examples :])
        lengths = sorted(len(e) for e in completion_examples(rows[: args.examples], tokenizer))
        print(
            f"data: {args.examples} rows, {args.validation} held out; tokens per row min {lengths[0]} "
            f"median {lengths[len(lengths) // 2]} max {lengths[-1]}, {sum(lengths):,} in all",
            flush=True,
        )
        base: dict[str, Any]
        if gpu:
            build_started = time.monotonic()
            build_llama_1b(workdir / "base")
            seconds = round(time.monotonic() - build_started, 1)
            base = {"model": "llama-1b (random weights)", "seconds": seconds}
        else:
            write_jsonl(
                workdir / "pretrain.jsonl",
                make_rows(tokenizer, args.pretrain_examples, 1234, variant=99, **shape),
            )
            base = pretrain_base(
                workdir / "base", workdir / "pretrain.jsonl", workdir / "pretrain", args.max_seq_length
            )
        print(f"base: {base}", flush=True)
        flops = flops_per_token(str(workdir / "base"), sum(lengths) / len(lengths)) if cuda else None
        settings = Settings(
            base_dir=str(workdir / "base"),
            train_file=str(workdir / "train.jsonl"),
            validation_file=str(workdir / "validation.jsonl"),
            workdir=str(workdir),
            batch_size=args.batch_size,
            max_seq_length=args.max_seq_length,
            learning_rate=args.learning_rate,
            warmup_ratio=0.05,
            seed=42,
            cuda=cuda,
            measure_loss=not gpu,
        )
        settings_file = workdir / "settings.json"
        settings_file.write_text(json.dumps(asdict(settings)))
        results: list[SideResult] = []
        failures: list[dict[str, Any]] = []

        def record() -> list[dict[str, Any]]:
            rows_out = summarize(results, sides, flops)
            settings_out = {
                "model": args.model,
                "examples": args.examples,
                "validation": args.validation,
                "lora": LORA,
                "threads": args.threads,
                "median_tokens": args.median_tokens,
                "longest": args.longest,
                "flops_per_token": flops,
                **{
                    k: v
                    for k, v in asdict(settings).items()
                    if "file" not in k and k not in ("workdir", "base_dir")
                },
            }
            figures = {
                "machine": common.machine(),
                "gpu": torch.cuda.get_device_name(0) if cuda else None,
                "base": base,
                "settings": settings_out,
                "summary": rows_out,
                "failures": failures,
                "runs": [asdict(r) for r in results],
            }
            common.write_results(output, __file__, started, figures)
            return rows_out

        for repeat in range(args.repeats):
            for side in sides:
                try:
                    result = common.run_side(
                        __file__,
                        SideResult,
                        side,
                        repeat,
                        settings_file,
                        workdir,
                        env={"OMP_NUM_THREADS": str(args.threads)},
                        timeout=args.side_timeout,
                    )
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    failures.append({"side": side, "repeat": repeat, "error": str(exc)[-3000:]})
                    print(f"run {repeat + 1}/{args.repeats} {side} FAILED: {str(exc)[-1500:]}", flush=True)
                    record()
                    continue
                results.append(result)
                print(
                    f"run {repeat + 1}/{args.repeats} {side:<17} {result.tokens_per_second:>9,.0f} tokens/s "
                    f"{result.train_seconds:>7.1f}s RSS {result.peak_rss_mb:>6.0f} MB "
                    f"GPU {result.peak_gpu_mb or 0:>6.0f} MB val loss {result.validation_loss} "
                    f"(load {result.load_before:.2f})",
                    flush=True,
                )
                record()
        rows_out = record()
    print()
    common.print_columns(rows_out, COLUMNS)
    print(f"\nraw figures: {output}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
