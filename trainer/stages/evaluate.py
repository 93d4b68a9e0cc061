"""evaluate: the trained model's metrics and harness scores, the regression gate, and a few
held-out predictions for the model card."""

from __future__ import annotations

import json

from kubetune import api, contract
from kubetune.trainer import harness
from kubetune.trainer.context import RunContext
from kubetune.trainer.evaluation import evaluate
from kubetune.trainer.stages.baseline import _format, _timed


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
    if ctx.spec.evaluation.harness is not None:
        ctx.harness_after = _timed(ctx, "harness-after", ctx.model)
        ctx.after = {**ctx.after, **ctx.harness_after.values}
        gate = ctx.spec.evaluation.regression
        if gate is not None and ctx.harness_before is not None:
            ctx.regressions = harness.regressions(ctx.harness_before, ctx.harness_after, gate.max_drop)
            ctx.reporter.log(_verdict(ctx.regressions, gate.max_drop))
    ctx.reporter.log("after: " + _format(ctx.after))
    ctx.reporter.results(api.Results(before=ctx.before, after=ctx.after, regressions=ctx.regressions))
    ctx.staging.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": p, "reference": r, "prediction": g} for p, r, g in samples]
    (ctx.staging / contract.PREDICTIONS).write_text(
        "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8"
    )


def _verdict(drops: list[api.ScoreDrop], max_drop: float) -> str:
    if not drops:
        return f"regression gate: no harness score dropped by more than {max_drop:g}"
    return "regressed: " + "; ".join(d.summary() for d in drops)
