"""baseline: the untrained model's metrics, with the same keys as after training, and its
harness scores (kept per base model and task set beside the runs, so a sweep scores it once)."""

from __future__ import annotations

import time
from typing import Any

from kubetune.storage import ObjectNotFoundError, StorageError
from kubetune.trainer import harness, modeling
from kubetune.trainer.context import RunContext
from kubetune.trainer.evaluation import evaluate
from kubetune.validation import InvalidJob, Problem


def run(ctx: RunContext) -> None:
    assert ctx.data is not None and ctx.model_source is not None
    # Under FSDP the model to train is whole on no GPU (and an empty replica but on rank 0):
    # the base is evaluated from its files, placed on this node's GPUs.
    # An adapter not yet trained changes nothing (LoRA's B starts at zero), so base it is.
    model = (
        modeling.load_placed(ctx.spec, ctx.model_source, ctx.workdir)
        if modeling.sharded(ctx.spec)
        else ctx.model
    )
    if ctx.spec.evaluation.harness is not None:
        _harness(ctx, model)
    if ctx.spec.evaluation.baseline:
        ctx.before, _ = evaluate(
            model,
            ctx.tokenizer,
            ctx.data.validation,
            ctx.data.eval_pairs,
            ctx.spec.evaluation,
            batch_size=ctx.spec.training.batch_size,
        )
    if ctx.harness_before is not None:
        ctx.before = {**ctx.before, **ctx.harness_before.values}
    ctx.reporter.log("before: " + _format(ctx.before))


def _harness(ctx: RunContext, model: Any) -> None:
    """Checks the task names first: a typo fails here, before any training."""
    spec = ctx.spec.evaluation.harness
    assert spec is not None and ctx.harness_cache is not None
    include = ctx.harness_include
    if include is not None and not include.is_dir():
        raise InvalidJob(
            "harness", [Problem("spec.evaluation.harness.include", f"{include} is not a folder")]
        )
    ctx.harness_tasks = harness.task_manager(include)
    harness.check_tasks(ctx.harness_tasks, spec, include)
    cached = ctx.harness_cache.join(f"{harness.baseline_key(ctx.spec, include)}.json")
    try:
        ctx.harness_before = harness.Scores.from_json(ctx.store.read_json(cached))
        ctx.reporter.log(f"harness-before: the base model's scores from {cached}")
        return
    except ObjectNotFoundError:
        pass
    except (StorageError, KeyError, TypeError) as exc:
        ctx.reporter.log(f"harness-before: ignoring the unreadable {cached}: {exc}")
    ctx.harness_before = _timed(ctx, "harness-before", model)
    ctx.store.write_json(cached, ctx.harness_before.to_json())


def _timed(ctx: RunContext, name: str, model: Any) -> harness.Scores:
    spec = ctx.spec.evaluation.harness
    assert spec is not None
    ctx.reporter.log(f"{name}: lm-evaluation-harness on {', '.join(spec.tasks)}")
    started = time.monotonic()
    scores = harness.evaluate(
        model, ctx.tokenizer, ctx.harness_tasks, spec, ctx.harness_include, ctx.spec.training.seed
    )
    ctx.timings[name] = round(time.monotonic() - started, 2)
    ctx.reporter.log(f"{name}: {_format(scores.values)} ({ctx.timings[name]:.1f}s)")
    return scores


def _format(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()) or "no validation data"
