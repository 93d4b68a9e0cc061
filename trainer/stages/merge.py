"""merge: fold the adapter into full-precision base weights and check the result agrees.

The merge runs on the CPU, one safetensors shard of the base at a time (``merging``): host
memory stays near one shard whatever the model's size, and no GPU is needed. For QLoRA the
adapter goes into the original 16-bit weights, not the 4-bit copy that was trained on:
merging into quantized weights would round the adapter's update away.

The check compares the merged model's next-token distributions with base + adapter's on a
few validation rows, in fp32: mean KL divergence and top-1 agreement. A bound on the largest
logit difference cannot work for 16-bit weights: bf16's spacing is 0.125 for logits of 16-32,
so an exact merge differs by that much from the unmerged sum in places.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kubetune import api, contract
from kubetune.trainer import merging, modeling
from kubetune.trainer.context import RunContext
from kubetune.trainer.data import PaddingCollator

# (largest mean KL in nats, smallest top-1 agreement) by the dtype the merged weights are in.
AGREEMENT: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 0.99),
    torch.bfloat16: (1e-2, 0.9),
    torch.float16: (1e-2, 0.9),
}


@dataclass(frozen=True)
class Agreement:
    """How close two models' outputs are at the same positions."""

    max_abs: float  # the largest logit difference
    kl: float  # mean KL(reference || candidate) of the next-token distributions, in nats
    top1: float  # fraction of positions where both predict the same next token

    def problem(self, dtype: torch.dtype) -> str | None:
        """Why the candidate does not agree with the reference, or None when it does."""
        max_kl, min_top1 = AGREEMENT.get(dtype, AGREEMENT[torch.bfloat16])
        if self.kl <= max_kl and self.top1 >= min_top1:
            return None
        return (
            f"merged model disagrees with base + adapter: mean KL {self.kl:.3g} (at most {max_kl:g}), "
            f"top-1 agreement {self.top1:.1%} (at least {min_top1:.0%}), "
            f"max logit difference {self.max_abs:.3g}"
        )


def agreement(reference: torch.Tensor, candidate: torch.Tensor) -> Agreement:
    """Compare logits of shape [positions, vocabulary], in fp32 whatever their dtype."""
    ref, cand = reference.float(), candidate.float()
    log_p, log_q = ref.log_softmax(-1), cand.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    top1 = (ref.argmax(-1) == cand.argmax(-1)).float().mean()
    return Agreement(max_abs=(ref - cand).abs().max().item(), kl=max(kl.item(), 0.0), top1=top1.item())


def run(ctx: RunContext) -> None:
    assert ctx.model_source is not None and ctx.data is not None
    spec, target, adapter = ctx.spec, ctx.staging / contract.MERGED, ctx.staging / contract.ADAPTER
    dtype = modeling.compute_dtype(spec.training.precision)
    base_dir = checkpoint_dir(spec, ctx.model_source)
    try:
        report = merging.merge_shards(base_dir, adapter, target, dtype=dtype)
        ctx.reporter.log(
            f"merged the adapter on the CPU, {report.shards} shard(s) one at a time "
            f"({report.merged} weights updated, {report.replaced} replaced)"
        )
    except merging.UnsupportedAdapter as why:
        ctx.reporter.log(
            f"merging the whole model in memory: the shard merge does not handle this adapter ({why})"
        )
        _merge_in_memory(ctx, adapter, target)
    probe = PaddingCollator(ctx.tokenizer.pad_token_id)((ctx.data.validation or ctx.data.train)[:8])
    found = check(ctx, probe, target)
    ctx.checks["merge_max_abs_logit_diff"] = found.max_abs
    ctx.checks["merge_kl"] = found.kl
    ctx.checks["merge_top1_agreement"] = found.top1
    if (problem := found.problem(dtype)) is not None:
        raise RuntimeError(problem)
    ctx.reporter.log(
        f"merged model ({dtype}) agrees with base + adapter: mean KL {found.kl:.2g}, "
        f"top-1 agreement {found.top1:.1%}"
    )
    ctx.tokenizer.save_pretrained(target)


def checkpoint_dir(spec: api.FineTuneJobSpec, source: str) -> Path:
    """The base's files on local disk: the fetched directory, or the hub's cached snapshot."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    options = modeling.hub_options(spec, source)
    return Path(
        snapshot_download(
            source,
            revision=options.get("revision"),
            token=options.get("token"),
            allow_patterns=["*.safetensors", "*.json"],
        )
    )


def check(ctx: RunContext, probe: dict[str, torch.Tensor], merged_dir: Path) -> Agreement:
    """Base + adapter against the written merge, one model in memory at a time. On a GPU the
    models are dispatched by accelerate (what does not fit goes to host memory, then disk)."""
    from peft import PeftModel

    assert ctx.model_source is not None
    base = modeling.load_placed(ctx.spec, ctx.model_source, ctx.workdir)
    reference = _logits(PeftModel.from_pretrained(base, ctx.staging / contract.ADAPTER), probe)
    del base
    gc.collect()
    merged = modeling.load_placed(ctx.spec, merged_dir, ctx.workdir)
    candidate = _logits(merged, probe)
    del merged
    gc.collect()
    return agreement(reference, candidate)


def _merge_in_memory(ctx: RunContext, adapter: Path, target: Path) -> None:
    """peft's own merge of the whole model, on the CPU."""
    from peft import PeftModel

    assert ctx.model_source is not None
    base = modeling.load_base(ctx.spec, ctx.model_source, quantized=False)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.save_pretrained(target, safe_serialization=True)


@torch.no_grad()
def _logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    dev = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev))
    mask = batch["attention_mask"].to(dev).bool()
    logits: torch.Tensor = out.logits.float()
    return logits[mask]
