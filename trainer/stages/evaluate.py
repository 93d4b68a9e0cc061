"""evaluate: the trained model's metrics and a few held-out predictions for the model card."""

from __future__ import annotations

import json

from kubetune import api
from kubetune.trainer.context import RunContext
from kubetune.trainer.evaluation import evaluate
from kubetune.trainer.stages.baseline import _format


def run(ctx: RunContext) -> None:
    assert ctx.data is not None
    ctx.after, samples = evaluate(
        ctx.model,
        ctx.tokenizer,
        ctx.data.validation,
        ctx.data.eval_pairs,
        ctx.spec.evaluation,
        batch_size=ctx.spec.training.batch_size,
    )
    ctx.reporter.log("after: " + _format(ctx.after))
    ctx.reporter.results(api.Results(before=ctx.before, after=ctx.after))
    ctx.staging.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": p, "reference": r, "prediction": g} for p, r, g in samples]
    (ctx.staging / "predictions.jsonl").write_text(
        "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8"
    )
