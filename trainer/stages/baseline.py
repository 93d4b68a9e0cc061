"""baseline: the untrained model's metrics, with the same keys as after training."""

from __future__ import annotations

from kubetune.trainer.context import RunContext
from kubetune.trainer.evaluation import evaluate


def run(ctx: RunContext) -> None:
    assert ctx.data is not None
    ctx.before, _ = evaluate(
        ctx.model,
        ctx.tokenizer,
        ctx.data.validation,
        ctx.data.eval_pairs,
        ctx.spec.evaluation,
        batch_size=ctx.spec.training.batch_size,
    )
    ctx.reporter.log("before: " + _format(ctx.before))


def _format(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()) or "no validation data"
