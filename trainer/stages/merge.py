"""merge: fold the adapter into full-precision base weights and check the result agrees.

For QLoRA the base is loaded again in 16/32-bit, not the 4-bit copy that was trained on:
merging into quantized weights would round the adapter's update away.
"""

from __future__ import annotations

from typing import Any

import torch

from kubetune import api
from kubetune.trainer import modeling
from kubetune.trainer.context import RunContext
from kubetune.trainer.data import PaddingCollator

AGREEMENT = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}


def run(ctx: RunContext) -> None:
    if ctx.spec.method == api.Method.FULL or not ctx.spec.export.merge:
        return
    from peft import PeftModel

    assert ctx.model_source is not None and ctx.data is not None
    base = modeling.load_base(ctx.spec, ctx.model_source, quantized=False).to(modeling.device())
    adapted = PeftModel.from_pretrained(base, ctx.staging / "adapter")
    probe = PaddingCollator(ctx.tokenizer.pad_token_id)((ctx.data.validation or ctx.data.train)[:8])
    before = _logits(adapted, probe)
    merged = adapted.merge_and_unload()
    difference = (before - _logits(merged, probe)).abs().max().item()
    ctx.checks["merge_max_abs_logit_diff"] = difference
    dtype = next(merged.parameters()).dtype
    if difference > AGREEMENT.get(dtype, 5e-2):
        raise RuntimeError(
            f"merged model disagrees with base + adapter: max logit difference {difference:.3g}"
        )
    ctx.reporter.log(f"merged adapter into the {dtype} base (max logit difference {difference:.2g})")
    merged.save_pretrained(ctx.staging / "merged", safe_serialization=True)
    ctx.tokenizer.save_pretrained(ctx.staging / "merged")


@torch.no_grad()
def _logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    dev = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev))
    mask = batch["attention_mask"].to(dev).bool()
    logits: torch.Tensor = out.logits.float()
    return logits[mask]
