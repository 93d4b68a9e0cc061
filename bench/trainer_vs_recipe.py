"""kubetune's trainer against the common tutorial recipe: same model, data, hyperparameters, machine.

    .venv/bin/python bench/trainer_vs_recipe.py                          # tiny preset, 3 runs per side
    .venv/bin/python bench/trainer_vs_recipe.py --model small --repeats 3 # a 27M Llama built the same way
    .venv/bin/python bench/trainer_vs_recipe.py --sides recipe,kubetune,kubetune-bf16 --repeats 1

The baseline ("recipe") is what most fine-tuning tutorials do: tokenize prompt + completion + EOS,
``DataCollatorForLanguageModeling(mlm=False)`` (per-batch padding, loss on every token) and
``transformers.Trainer``. kubetune goes through its own code path, ``kubetune.trainer.pipeline.execute``
with a FineTuneJob spec (``method: full``, ``training.packing: true``), exactly as ``kubetune run`` does.
Variants of kubetune's side that need a code change are measured by patching the trainer in the
benchmark's own subprocess (the trainer's files are not changed):

    kubetune-unpacked   the same spec with ``packing: false`` (completion-only loss, per-batch padding)
    kubetune-bf16       packing + bf16 autocast on the CPU (kubetune trains in fp32 on every CPU today)
    kubetune-compile    packing + ``torch.compile`` of the model (TrainingArguments.torch_compile)

Every side runs in its own subprocess, so its peak resident memory (``ru_maxrss``) is its own.
Sides are interleaved (A B C A B C ...) so a change of machine load hits all of them alike.

The data is synthetic and deterministic: each row maps a sequence of words drawn from a Markov
chain (the prompt) to the same words through a fixed substitution (the completion); total lengths
are log-normal, 20 to 400 tokens. The validation loss is the mean cross-entropy over the completion
tokens of the same held-out rows on both sides (``kubetune.trainer.evaluation.validation_loss``).

Results: a table on stdout and raw figures in ``bench/trainer_vs_recipe.<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import _common as common

HERE = Path(__file__).resolve().parent
PRESET = "kubetune/tiny-llama"
SIDES = ("recipe", "kubetune", "kubetune-unpacked", "kubetune-bf16")
ALL_SIDES = (*SIDES, "kubetune-compile")
# The columns of a summary every trainer benchmark prints, after the side's name.
SIDE_COLUMNS: tuple[common.Column, ...] = (
    ("runs", "runs", ">4"),
    ("tokens/s", "tokens_per_second", ">9,.0f"),
    ("x recipe", "speedup", ">8.2f"),
    ("padding", "padding_share", ">8.1%"),
    ("steps", "steps", ">5"),
    ("train s", "train_seconds", ">8.1f"),
    ("peak RSS MB", "peak_rss_mb", ">11.0f"),
)
COLUMNS = (
    ("side", "side", "<18"),
    *SIDE_COLUMNS,
    ("val loss", "validation_loss", ">9.4f"),
    ("loss/recipe", "loss_vs_recipe", ">11.3f"),
)
# A larger Llama built like the preset (same tokenizer, random weights), for compute-bound figures.
SMALL: dict[str, Any] = {
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
}


@dataclass(frozen=True)
class Settings:
    model: str  # "tiny" or "small"
    model_dir: str
    train_file: str
    validation_file: str
    workdir: str
    epochs: float
    batch_size: int  # examples per optimizer step (recipe, unpacked)
    packed_batch_size: int  # packed rows per step: about the same examples per step
    max_seq_length: int
    learning_rate: float
    warmup_ratio: float
    seed: int


@dataclass
class SideResult:
    side: str
    repeat: int
    train_seconds: float
    tokens: int  # real (non-padding) tokens that went through the model
    slots: int  # batch positions, padding included
    steps: int
    tokens_per_second: float
    peak_rss_mb: float
    validation_loss: float  # mean CE over completion tokens of the held-out rows
    pipeline_validation_loss: float | None  # kubetune's own evaluate stage, as a cross-check
    load_before: float


# ----------------------------------------------------------------------------- data


def single_token_words(tokenizer: Any) -> list[str]:
    """Words that are one token each with a leading space: lengths in tokens are then exact."""
    vocab = tokenizer.get_vocab()
    words = sorted(t[1:] for t in vocab if t.startswith("Ġ") and t[1:].isalpha())
    return [w for w in words if tokenizer(" " + w, add_special_tokens=False)["input_ids"] == [vocab["Ġ" + w]]]


def make_rows(
    tokenizer: Any,
    count: int,
    seed: int,
    variant: int | None = None,
    *,
    task: str = "substitute",
    median: int = 110,
    longest: int = 400,
) -> list[dict[str, str]]:
    """Prompt-completion rows with log-normal token lengths (median ``median``, clipped to 20..longest).

    The prompt is a walk of a Markov chain over single-token words. ``task`` says what follows:
    ``substitute`` maps every prompt word through a fixed substitution (the model must look back at
    the aligned prompt word); ``chain`` continues from the last prompt word by applying the
    substitution to the previous completion word (each token follows from the one before, which a
    small model learns in few steps). ``variant``: the same chain and prompts' distribution, mapped
    by another substitution.
    """
    rng = random.Random(seed)
    words = single_token_words(tokenizer)
    substitution = dict(zip(words, rng.sample(words, len(words)), strict=True))
    successors = {w: rng.sample(words, 3) for w in words}  # a Markov chain: prompts have structure
    if variant is not None:
        rng = random.Random(variant)
        substitution = dict(zip(words, rng.sample(words, len(words)), strict=True))
    head, sep = "map:", "\n"
    overhead = len(tokenizer(head + sep, add_special_tokens=False)["input_ids"]) + 1  # + EOS
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < count:
        total = min(longest, max(20, round(rng.lognormvariate(math.log(median), 0.65))))
        n = max(1, (total - overhead) // 2)
        seq = [rng.choice(words)]
        while len(seq) < n:
            prev = seq[-1]
            seq.append(rng.choice(successors[prev]) if rng.random() < 0.7 else rng.choice(words))
        prompt = head + "".join(" " + w for w in seq) + sep
        if prompt in seen:
            continue
        seen.add(prompt)
        if task == "chain":
            out = [substitution[seq[-1]]]
            while len(out) < n:
                out.append(substitution[out[-1]])
        else:
            out = [substitution[w] for w in seq]
        rows.append({"prompt": prompt, "completion": "".join(" " + w for w in out)})
    return rows


def write_jsonl(path: Path, rows: Sequence[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def read_jsonl(path: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


def completion_examples(rows: Sequence[dict[str, str]], tokenizer: Any) -> list[Any]:
    """Held-out rows as the trainer sees them: prompt ids (no loss) + completion ids + EOS (loss)."""
    from kubetune.trainer.data import IGNORE_INDEX, Example

    out = []
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        completion.append(tokenizer.eos_token_id)
        out.append(Example(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion))
    return out


def build_small_model(out: Path) -> None:
    """A larger Llama with the preset's tokenizer, built the way the preset is (random weights)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kubetune.trainer import presets

    source = presets.preset_path(PRESET)
    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **SMALL,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


# ----------------------------------------------------------------------------- the two sides


def held_out_loss(model: Any, settings: Settings, tokenizer: Any) -> float:
    from kubetune.trainer.evaluation import validation_loss

    examples = completion_examples(read_jsonl(settings.validation_file), tokenizer)
    model.eval()
    return validation_loss(model, examples, tokenizer.pad_token_id, batch_size=16)


class Counting:
    """Wraps a collator: real tokens (attention mask, or every position without one) and slots."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.tokens = 0
        self.slots = 0

    def __call__(self, batch: Any) -> Any:
        out = self.inner(batch)
        mask = out.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else out["input_ids"].numel()
        self.slots += out["input_ids"].numel()
        return out


def common_arguments(
    settings: Any, output_dir: str, *, epochs: float = 1.0, cpu: bool = True
) -> dict[str, Any]:
    """transformers.TrainingArguments every Trainer-based side shares (``settings``: either
    benchmark's Settings)."""
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": settings.batch_size,
        "num_train_epochs": epochs,
        "learning_rate": settings.learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_steps": settings.warmup_ratio,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "seed": settings.seed,
        "data_seed": settings.seed,
        "logging_steps": 10,
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "use_cpu": cpu,
    }


def run_recipe(settings: Settings) -> dict[str, Any]:
    """The tutorial recipe, as written in most fine-tuning guides."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(settings.model_dir)
    model = AutoModelForCausalLM.from_pretrained(settings.model_dir, dtype=torch.float32)
    rows = read_jsonl(settings.train_file)
    texts = [r["prompt"] + r["completion"] + tokenizer.eos_token for r in rows]
    train = [
        {"input_ids": ids}
        for ids in tokenizer(texts, truncation=True, max_length=settings.max_seq_length)["input_ids"]
    ]
    collator = Counting(DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False))
    args = TrainingArguments(
        **common_arguments(settings, str(Path(settings.workdir) / "recipe"), epochs=settings.epochs)
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator)
    result = trainer.train()
    return {
        **trainer_figures(trainer, result, collator),
        "validation_loss": held_out_loss(trainer.model, settings, tokenizer),
        "pipeline_validation_loss": None,
    }


def finetune_job(name: str, output: Path, spec: dict[str, Any], *, baseline: bool = False) -> Any:
    """A FineTuneJob as the benchmarks run it: loss-only evaluation, no merged export."""
    from kubetune import api

    return api.FineTuneJob.model_validate(
        {
            "metadata": {"name": name, "namespace": "bench"},
            "spec": {
                **spec,
                "evaluation": {"metrics": ["loss"], "baseline": baseline},
                "export": {"merge": False},
                "output": {"uri": str(output)},
            },
        }
    )


def prompt_completion(train_file: str, validation_file: str) -> dict[str, str]:
    return {"train": train_file, "validation": validation_file, "format": "prompt-completion"}


def pipeline_figures(ctx: Any, slots: int) -> dict[str, Any]:
    """What a side reports of kubetune's pipeline run (``ctx``), and the slots counted on the way."""
    return {
        "train_seconds": ctx.checks["train_runtime_seconds"],
        "tokens": ctx.trained_tokens,
        "slots": slots,
        "steps": int(ctx.checks["global_step"]),
    }


def trainer_figures(trainer: Any, result: Any, collator: Any) -> dict[str, Any]:
    """What a side reports of a ``transformers.Trainer`` run, its tokens and slots from ``collator``."""
    return {
        "train_seconds": float(result.metrics["train_runtime"]),
        "tokens": collator.tokens,
        "slots": collator.slots,
        "steps": int(trainer.state.global_step),
    }


def count_slots() -> dict[str, int]:
    """Makes kubetune's train stage count batch positions, padding included, in ``["slots"]``."""
    from kubetune.trainer.stages import train as train_stage

    counts = {"slots": 0}
    counting = train_stage.CountingCollator

    class SlotCounting(counting):  # type: ignore[valid-type,misc]
        def __call__(self, batch: Sequence[Any]) -> Any:
            out = super().__call__(batch)
            counts["slots"] += out["input_ids"].numel()
            return out

    train_stage.CountingCollator = SlotCounting  # type: ignore[misc]
    return counts


def run_kubetune(settings: Settings, variant: str) -> dict[str, Any]:
    """kubetune's own pipeline (fetch, prepare, train, evaluate, push) on a FineTuneJob spec."""
    import torch

    from kubetune.trainer import modeling
    from kubetune.trainer.pipeline import execute
    from kubetune.trainer.run import quiet_libraries
    from kubetune.trainer.stages import train as train_stage

    quiet_libraries()
    packing = variant != "kubetune-unpacked"
    counts = count_slots()
    if variant == "kubetune-bf16":
        # Proposed: precision auto/bf16 means bf16 autocast on CPUs with AVX512-BF16 / AMX too.
        modeling.compute_dtype = lambda precision: torch.bfloat16
    if variant == "kubetune-compile":
        plain: Callable[..., Any] = train_stage.training_arguments

        def compiled(*args: Any, **kwargs: Any) -> Any:
            out = plain(*args, **kwargs)
            out.torch_compile = True
            out.torch_compile_backend = "inductor"
            return out

        train_stage.training_arguments = compiled

    job = finetune_job(
        "bench",
        Path(settings.workdir) / variant / "out",
        {
            "model": {"uri": settings.model_dir},
            "dataset": prompt_completion(settings.train_file, settings.validation_file),
            "method": "full",
            "training": {
                "epochs": settings.epochs,
                "learningRate": settings.learning_rate,
                "scheduler": "cosine",
                "warmupRatio": settings.warmup_ratio,
                "batchSize": settings.packed_batch_size if packing else settings.batch_size,
                "maxSeqLength": settings.max_seq_length,
                "packing": packing,
                "seed": settings.seed,
            },
            "resources": {"gpus": 0},
        },
    )
    ctx = execute(job, _Silent(), workdir=Path(settings.workdir) / variant / "work")
    return {
        **pipeline_figures(ctx, counts["slots"]),
        "validation_loss": held_out_loss(ctx.model, settings, ctx.tokenizer),
        "pipeline_validation_loss": ctx.after.get("loss"),
    }


class _Silent:
    """A Reporter that keeps quiet: the benchmark prints its own table."""

    def stage_started(self, stage: Any) -> None:
        pass

    def stage_finished(self, stage: Any, seconds: float) -> None:
        pass

    def progress(self, progress: Any) -> None:
        pass

    def results(self, results: Any) -> None:
        pass

    def artifacts(self, artifacts: Any) -> None:
        pass

    def log(self, message: str) -> None:
        pass


def child(side: str, settings_file: Path, result_file: Path) -> None:
    settings = Settings(**json.loads(settings_file.read_text()))
    out = run_recipe(settings) if side == "recipe" else run_kubetune(settings, side)
    out["peak_rss_mb"] = common.peak_rss_mb()
    result_file.write_text(json.dumps(out))


# ----------------------------------------------------------------------------- orchestration


def prepare(args: argparse.Namespace, workdir: Path) -> Settings:
    from transformers import AutoTokenizer

    from kubetune.trainer import presets
    from kubetune.trainer.data import pack

    if args.model == "tiny":
        model_dir = presets.preset_path(PRESET)
    else:
        model_dir = workdir / "model-small"
        build_small_model(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = make_rows(tokenizer, args.examples + args.validation, seed=1234)
    train, validation = rows[: args.examples], rows[args.examples :]
    write_jsonl(workdir / "train.jsonl", train)
    write_jsonl(workdir / "validation.jsonl", validation)
    examples = completion_examples(train, tokenizer)
    lengths = sorted(len(e) for e in examples)
    packed = pack(examples, args.max_seq_length)
    # About as many examples per optimizer step as the recipe, hence about as many steps.
    packed_batch = max(1, round(args.batch_size * len(packed) / len(examples)))
    print(
        f"data: {len(train)} train rows, {len(validation)} held out; tokens per row min {lengths[0]} "
        f"median {lengths[len(lengths) // 2]} p95 {lengths[int(len(lengths) * 0.95)]} max {lengths[-1]}, "
        f"{sum(lengths):,} in all; packed into {len(packed)} rows of {args.max_seq_length} -> "
        f"{packed_batch} rows per step (~{args.batch_size} examples)",
        flush=True,
    )
    return Settings(
        model=args.model,
        model_dir=str(model_dir),
        train_file=str(workdir / "train.jsonl"),
        validation_file=str(workdir / "validation.jsonl"),
        workdir=str(workdir),
        epochs=args.epochs,
        batch_size=args.batch_size,
        packed_batch_size=packed_batch,
        max_seq_length=args.max_seq_length,
        learning_rate=args.learning_rate,
        warmup_ratio=0.05,
        seed=42,
    )


def summarize(results: Sequence[SideResult], sides: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    base = [r for r in results if r.side == "recipe"]
    base_tps = statistics.median(r.tokens_per_second for r in base) if base else None
    base_rss = statistics.median(r.peak_rss_mb for r in base) if base else None
    base_loss = statistics.median(r.validation_loss for r in base) if base else None
    for side in sides:
        mine = [r for r in results if r.side == side]
        tps = statistics.median(r.tokens_per_second for r in mine)
        rss = statistics.median(r.peak_rss_mb for r in mine)
        loss = statistics.median(r.validation_loss for r in mine)
        rows.append(
            {
                "side": side,
                "runs": len(mine),
                "tokens_per_second": tps,
                "tokens_per_second_runs": [round(r.tokens_per_second) for r in mine],
                "speedup": tps / base_tps if base_tps else None,
                "padding_share": 1 - statistics.median(r.tokens / r.slots for r in mine),
                "steps": mine[0].steps,
                "train_seconds": statistics.median(r.train_seconds for r in mine),
                "peak_rss_mb": rss,
                "rss_vs_recipe": rss / base_rss if base_rss else None,
                "validation_loss": loss,
                "loss_vs_recipe": loss / base_loss if base_loss else None,
            }
        )
    return rows


def main() -> int:
    parser = common.parser_for(__doc__)
    parser.add_argument("--model", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--sides", default=",".join(SIDES), help=f"comma-separated, from {', '.join(ALL_SIDES)}"
    )
    parser.add_argument("--examples", type=int, default=4000, help="training rows")
    parser.add_argument("--validation", type=int, default=400, help="held-out rows")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step")
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--output", type=Path, help="raw JSON (default: bench/trainer_vs_recipe.<model>.json)"
    )
    common.add_child(parser)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return 0
    sides = common.sides_of(parser, args.sides, ALL_SIDES)
    started = common.now()
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as scratch:
        workdir = Path(scratch)
        settings = prepare(args, workdir)
        settings_file = workdir / "settings.json"
        settings_file.write_text(json.dumps(asdict(settings)))
        results: list[SideResult] = []
        for repeat in range(args.repeats):
            for side in sides:
                result = common.run_side(__file__, SideResult, side, repeat, settings_file, workdir)
                results.append(result)
                print(
                    f"run {repeat + 1}/{args.repeats} {side:<18} {result.tokens_per_second:>9,.0f} tokens/s "
                    f"{result.train_seconds:>7.1f}s RSS {result.peak_rss_mb:>6.0f} MB "
                    f"val loss {result.validation_loss:.4f} (load {result.load_before:.2f})",
                    flush=True,
                )
    rows = summarize(results, sides)
    print()
    common.print_columns(rows, COLUMNS)
    output = args.output or HERE / f"trainer_vs_recipe.{args.model}.json"
    figures = {
        "machine": common.machine(),
        "settings": {k: v for k, v in asdict(settings).items() if "file" not in k and k != "workdir"},
        "summary": rows,
        "runs": [asdict(r) for r in results],
    }
    common.write_results(output, __file__, started, figures)
    print(f"\nraw figures: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
