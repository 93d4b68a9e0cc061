"""bitsandbytes exports (bnb-4bit, bnb-8bit): the merged model quantized as transformers loads it,
reloaded and run before it counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kubetune import api
from kubetune.trainer import modeling
from kubetune.trainer.context import RunContext


class Bitsandbytes:
    def unsupported(self, config: dict[str, Any], tokenizer: Any) -> list[str]:
        return []  # whatever transformers loads, bitsandbytes quantizes

    def export(self, ctx: RunContext, name: api.ExportFormat, merged: Path, target: Path) -> dict[str, float]:
        from transformers import AutoModelForCausalLM

        quant = ctx.spec.resolved_quantization() or api.Quantization()
        config = modeling.quantization_config(quant.model_copy(update={"bits": api.EXPORTS[name].bits}))
        model = AutoModelForCausalLM.from_pretrained(
            merged, quantization_config=config, device_map={"": modeling.device()}, use_safetensors=True
        )
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
        return {}


BITSANDBYTES = Bitsandbytes()
