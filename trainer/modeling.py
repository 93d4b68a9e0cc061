"""Loading models and applying the fine-tuning method (full, LoRA, QLoRA)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from kubetune import api
from kubetune.trainer import distributed

SAFE_LOAD: dict[str, Any] = {"use_safetensors": True}


def device() -> torch.device:
    """This process's device: the GPU of its local rank (torchrun's LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", distributed.local_rank())
    return torch.device("cpu")


def compute_dtype(precision: str) -> torch.dtype:
    """bf16 where the GPU has it (auto), fp16 only on request; the CPU trains in fp32."""
    if not torch.cuda.is_available():
        return torch.float32
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def hub_options(spec: api.FineTuneJobSpec, source: str) -> dict[str, Any]:
    options: dict[str, Any] = {"trust_remote_code": spec.model.trust_remote_code}
    if not Path(source).is_dir():
        options["revision"] = spec.model.revision
        options["token"] = os.environ.get("HF_TOKEN") or None
    return options


def load_tokenizer(spec: api.FineTuneJobSpec, source: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, **hub_options(spec, source))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(quant: api.Quantization) -> Any:
    from transformers import BitsAndBytesConfig

    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, quant.compute_dtype),
    )


def load_base(spec: api.FineTuneJobSpec, source: str, *, quantized: bool) -> Any:
    """The base model: full precision for full/LoRA (and for merging), k-bit for QLoRA."""
    from transformers import AutoModelForCausalLM

    options = hub_options(spec, source) | SAFE_LOAD
    quant = spec.resolved_quantization() if quantized else None
    if quant is not None:
        options["quantization_config"] = quantization_config(quant)
        options["device_map"] = {"": device()}
        options["dtype"] = getattr(torch, quant.compute_dtype) if device().type == "cuda" else torch.float32
    else:
        # Full fine-tuning keeps fp32 master weights (mixed precision via autocast).
        frozen = spec.method != api.Method.FULL
        options["dtype"] = compute_dtype(spec.training.precision) if frozen else torch.float32
    model = AutoModelForCausalLM.from_pretrained(source, **options)
    model.config.use_cache = False
    return model


def lora_config(spec: api.FineTuneJobSpec) -> Any:
    from peft import LoraConfig

    targets = spec.lora.target_modules
    return LoraConfig(
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        modules_to_save=spec.lora.modules_to_save or None,
        task_type="CAUSAL_LM",
    )


def trainable_model(spec: api.FineTuneJobSpec, source: str) -> Any:
    """The model the trainer optimizes: the base itself (full) or the base with an adapter."""
    quantized = spec.method == api.Method.QLORA
    model = load_base(spec, source, quantized=quantized)
    if not quantized:  # k-bit weights are placed as they load (device_map) and cannot move
        # On this process's device now: the baseline evaluation runs before Trainer would move it.
        model = model.to(device())
    if spec.method == api.Method.FULL:
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if spec.method == api.Method.QLORA:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=spec.training.gradient_checkpointing
        )
        keep_cpu_weights_trainable(model)
    return get_peft_model(model, lora_config(spec))


def keep_cpu_weights_trainable(model: Any) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, a Linear4bit forward pass in eval mode without gradients
    rewrites its weight into an inference-only layout; every later forward then bypasses
    autograd through the base weights, so LoRA gradients of all earlier layers come out wrong
    with no error. A baseline evaluation is exactly such a pass.
    """
    from bitsandbytes.nn.modules import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def parameter_counts(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
