"""baseline: the untrained model's metrics, with the same keys as after training."""

from __future__ import annotations

from kubetune.trainer import modeling
from kubetune.trainer.context import RunContext
from kubetune.trainer.evaluation import evaluate


def run(ctx: RunContext) -> None:
    assert ctx.data is not None and ctx.model_source is not None
    # Under FSDP the model to train is whole on no GPU (and on the meta device but on each
    # node's first process): the base is evaluated from its files, placed on this node's GPUs.
    # An adapter not yet trained changes nothing (LoRA's B starts at zero), so base it is.
    model = (
        modeling.load_placed(ctx.spec, ctx.model_source, ctx.workdir)
        if modeling.sharded(ctx.spec)
        else ctx.model
    )
    ctx.before, _ = evaluate(
        model,
        ctx.tokenizer,
        ctx.data.validation,
        ctx.data.eval_pairs,
        ctx.spec.evaluation,
        batch_size=ctx.spec.training.batch_size,
    )
    ctx.reporter.log("before: " + _format(ctx.before))


def _format(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()) or "no validation data"
