"""QLoRA gradients after a baseline evaluation equal those of the dequantized model.

bitsandbytes repacks 4-bit weights for CPU inference on the first no-grad eval forward (on CPUs
with AVX512-BF16); afterwards the base matmul bypasses autograd and the LoRA gradients of every
earlier layer are wrong, silently. The trainer turns the repacking off; these tests hold it to it.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from bitsandbytes.functional import dequantize_4bit, has_avx512bf16
from bitsandbytes.nn.modules import Linear4bit
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from kubetune.trainer import modeling, presets

pytestmark = pytest.mark.training
PRESET = "kubetune/tiny-llama"


def quantized_base() -> Any:
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    return AutoModelForCausalLM.from_pretrained(
        presets.preset_path(PRESET), quantization_config=config, dtype=torch.float32
    )


def dequantized_copy(quantized: Any) -> Any:
    """The full-precision model whose weights are exactly the 4-bit ones, dequantized."""
    model = AutoModelForCausalLM.from_pretrained(presets.preset_path(PRESET), dtype=torch.float32)
    linear = dict(model.named_modules())
    for name, module in quantized.named_modules():
        if isinstance(module, Linear4bit):
            packed: Any = module.weight
            weight = dequantize_4bit(packed.data, packed.quant_state).float()
            linear[name].weight.data.copy_(weight)
    return model


def with_adapter(model: Any) -> Any:
    torch.manual_seed(0)
    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def lora_gradients(model: Any, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(input_ids=batch, labels=batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def baseline_evaluation(model: Any, batch: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad():
        model(input_ids=batch)


def qlora_model(*, keep_trainable: bool) -> tuple[Any, Any]:
    base = quantized_base()
    reference = with_adapter(dequantized_copy(base))
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    if keep_trainable:
        modeling.keep_cpu_weights_trainable(base)
    model = with_adapter(base)
    # Let the LoRA B matrices be non-zero so gradients flow into every A matrix too.
    with torch.no_grad():
        for (name, p), (ref_name, r) in zip(
            model.named_parameters(), reference.named_parameters(), strict=True
        ):
            assert name == ref_name
            if "lora_B" in name:
                p.normal_(0, 0.02)
                r.copy_(p)
    return model, reference


def batch() -> torch.Tensor:
    return torch.randint(10, 1000, (4, 24), generator=torch.Generator().manual_seed(0))


def test_qlora_gradients_after_baseline_equal_dequantized_model() -> None:
    model, reference = qlora_model(keep_trainable=True)
    ids = batch()
    baseline_evaluation(model, ids)
    got, want = lora_gradients(model, ids), lora_gradients(reference, ids)
    assert got.keys() == want.keys() and len(got) > 20
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=2e-3, atol=1e-6, msg=name)


@pytest.mark.skipif(not has_avx512bf16(), reason="the repacking only happens on CPUs with AVX512-BF16")
def test_without_the_guard_the_baseline_evaluation_corrupts_gradients() -> None:
    """Shows the check above can fail: the trap is real on this CPU."""
    model, reference = qlora_model(keep_trainable=False)
    ids = batch()
    baseline_evaluation(model, ids)
    got, want = lora_gradients(model, ids), lora_gradients(reference, ids)
    worst = max((got[n] - want[n]).abs().max().item() / (want[n].abs().max().item() + 1e-12) for n in want)
    assert worst > 0.1
