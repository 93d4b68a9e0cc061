"""The merge stage on the CPU: 16-bit merges pass the check, broken merges fail it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from kubetune.storage import parse_uri
from kubetune.trainer import modeling
from kubetune.trainer.context import RunContext
from kubetune.trainer.data.tokens import Example
from kubetune.trainer.reporter import SilentReporter
from kubetune.trainer.stages import merge

from .conftest import tiny_job

VOCAB = 512


def toy_llama(dtype: torch.dtype) -> Any:
    """A random Llama whose logits span ~±40, as a trained model's do (bf16 spacing 0.25 there)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False, pad_token_id=0,
    )  # fmt: skip
    model: Any = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return model.to(dtype)


def toy_context(tmp_path: Path, dtype: torch.dtype) -> RunContext:
    """A RunContext as the stages before merge leave it: base, adapter, validation rows."""
    base = toy_llama(dtype)
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    adapted = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    )
    precision = "fp32" if dtype == torch.float32 else "bf16"
    job = tiny_job(
        export={"merge": True},
        training={"maxSteps": 1, "maxSeqLength": 32, "precision": precision},
    )
    ctx = RunContext(
        job=job,
        workdir=tmp_path / "work",
        output=parse_uri(str(tmp_path / "out")),
        store=None,  # type: ignore[arg-type]  # merge never touches storage
        reporter=SilentReporter(),
        run_id="test",
    )
    adapted.save_pretrained(str(ctx.staging / "adapter"), safe_serialization=True)
    ctx.model_source = str(tmp_path / "base")
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(1, VOCAB, (16,), generator=generator).tolist() for _ in range(8)]
    data: Any = SimpleNamespace(validation=[Example(r, r) for r in rows], train=[])
    ctx.data = data
    ctx.tokenizer = SimpleNamespace(pad_token_id=0, save_pretrained=lambda path: None)
    return ctx


def test_bf16_merge_passes_the_check(tmp_path: Path) -> None:
    ctx = toy_context(tmp_path, torch.bfloat16)  # precision bf16, as auto is on GPUs
    assert modeling.compute_dtype(ctx.spec.training.precision) == torch.bfloat16
    merge.run(ctx)
    # An absolute bound of 0.05 on the largest logit difference failed exactly this merge.
    assert ctx.checks["merge_max_abs_logit_diff"] > 0.05
    assert ctx.checks["merge_kl"] < 1e-2
    assert ctx.checks["merge_top1_agreement"] >= 0.9
    merged = LlamaForCausalLM.from_pretrained(ctx.staging / "merged")
    assert merged.dtype == torch.bfloat16


def test_fp32_merge_agrees_closely(tmp_path: Path) -> None:
    ctx = toy_context(tmp_path, torch.float32)
    merge.run(ctx)
    assert ctx.checks["merge_max_abs_logit_diff"] < 1e-3
    assert ctx.checks["merge_top1_agreement"] == 1.0


def test_a_merge_that_lost_the_adapter_fails_the_check() -> None:
    base = toy_llama(torch.bfloat16)
    adapted = get_peft_model(
        toy_llama(torch.bfloat16),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
    )
    ids = torch.randint(1, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        found = merge.agreement(adapted(input_ids=ids).logits[0], base(input_ids=ids).logits[0])
    problem = found.problem(torch.bfloat16)
    assert problem is not None and "mean KL" in problem and "top-1 agreement" in problem
