"""quantize: bitsandbytes exports of the merged model, each reloaded and run before it counts."""

from __future__ import annotations

from typing import Any

import torch

from kubetune import api
from kubetune.trainer import modeling
from kubetune.trainer.context import RunContext


def run(ctx: RunContext) -> None:
    formats = ctx.spec.export.quantize
    if not formats:
        return
    from transformers import AutoModelForCausalLM

    merged = ctx.staging / "merged"
    for name in formats:
        bits = 8 if name == "bnb-8bit" else 4
        quant = ctx.spec.resolved_quantization() or api.Quantization()
        config = modeling.quantization_config(quant.model_copy(update={"bits": bits}))
        model = AutoModelForCausalLM.from_pretrained(
            merged, quantization_config=config, device_map={"": modeling.device()}, use_safetensors=True
        )
        target = ctx.staging / "quantized" / name
        model.save_pretrained(target, safe_serialization=True)
        ctx.tokenizer.save_pretrained(target)
        del model
        reloaded: Any = AutoModelForCausalLM.from_pretrained(target, device_map={"": modeling.device()})
        prompt = torch.tensor(
            [[ctx.tokenizer.bos_token_id or ctx.tokenizer.eos_token_id]], device=modeling.device()
        )
        with torch.no_grad():
            out = reloaded.generate(
                prompt, max_new_tokens=4, do_sample=False, pad_token_id=ctx.tokenizer.pad_token_id
            )
        if out.shape[1] <= 1:
            raise RuntimeError(f"{name}: the reloaded export generated nothing")
        size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
        ctx.reporter.log(f"quantized/{name}: {size / 1e6:,.1f} MB, reloads and generates")
