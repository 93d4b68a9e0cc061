"""Loading models and applying the fine-tuning method (full, LoRA, QLoRA)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kubetune import api
from kubetune.trainer import distributed
from kubetune.validation import InvalidJob, Problem

SAFE_LOAD: dict[str, Any] = {"use_safetensors": True}


def device() -> torch.device:
    """This process's device: the GPU of its local rank (torchrun's LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", distributed.local_rank())
    return torch.device("cpu")


# x86 flags of native bf16 matrix instructions: without them CPU bf16 autocast is emulated (slower).
NATIVE_BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
# Overrides the detection of those flags: "native" or "none" (e.g. to run one CPU path on every CPU).
CPU_BF16_VARIABLE = "KUBETUNE_CPU_BF16"
FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3")
# Implementations that isolate examples flattened into one row, given restarting position_ids:
# sdpa, eager and flex through masking_utils' packed-sequence mask, flash attention through varlen.
MASK_ATTENTION = ("sdpa", "eager", "flex_attention")


def refuse(field: str, message: str) -> InvalidJob:
    return InvalidJob("spec", [Problem(field, message)])


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The feature flags of the first CPU in /proc/cpuinfo; empty where it cannot be read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def with_cpu_bf16_override(flags: frozenset[str], override: str) -> frozenset[str]:
    """``flags`` as ``KUBETUNE_CPU_BF16`` says: auto (or unset) as detected, native or none."""
    if override in ("", "auto"):
        return flags
    if override == "native":
        return flags | {"avx512_bf16"}
    if override == "none":
        return flags - NATIVE_BF16_CPU_FLAGS
    raise ValueError(f"{CPU_BF16_VARIABLE} must be auto, native or none, not {override!r}")


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype
    why: str  # for the log


def choose_precision(precision: str, *, cuda: bool, cuda_bf16: bool, flags: frozenset[str]) -> Precision:
    """The compute dtype for ``training.precision`` on this hardware (pure).

    auto: bf16 on GPUs that have it and on CPUs with native bf16 (AVX512-BF16 or AMX-BF16), else
    fp32. bf16 is honoured on any CPU (emulated without those flags); fp16 needs a GPU.
    """
    field = "spec.training.precision"
    if cuda:
        if precision == "fp16":
            return Precision(torch.float16, "fp16 on request")
        if precision == "bf16" and not cuda_bf16:
            raise refuse(field, "bf16, but this GPU has no bf16 support: use fp16, fp32 or auto")
        if precision == "bf16" or (precision == "auto" and cuda_bf16):
            return Precision(torch.bfloat16, "bf16 on the GPU")
        return Precision(torch.float32, "fp32" + (" (this GPU has no bf16)" if precision == "auto" else ""))
    native = sorted(NATIVE_BF16_CPU_FLAGS & flags)
    if precision == "fp16":
        raise refuse(field, "fp16 needs a GPU; on the CPU use auto, bf16 or fp32")
    if precision == "bf16":
        how = (
            f"native: {', '.join(native)}"
            if native
            else "emulated: this CPU has no native bf16, expect it slower"
        )
        return Precision(torch.bfloat16, f"bf16 autocast on the CPU ({how})")
    if precision == "auto" and native:
        return Precision(torch.bfloat16, f"bf16 autocast on the CPU ({', '.join(native)})")
    if precision == "auto":
        return Precision(torch.float32, "fp32 (this CPU has no native bf16)")
    return Precision(torch.float32, "fp32")


def precision_of(precision: str) -> Precision:
    cuda = torch.cuda.is_available()
    return choose_precision(
        precision,
        cuda=cuda,
        cuda_bf16=cuda and torch.cuda.is_bf16_supported(),
        flags=frozenset()
        if cuda
        else with_cpu_bf16_override(cpu_flags(), os.environ.get(CPU_BF16_VARIABLE, "")),
    )


def compute_dtype(precision: str) -> torch.dtype:
    """bf16 where the hardware has it (auto), fp16 only on request and on a GPU, else fp32."""
    return precision_of(precision).dtype


def choose_attention(requested: str, *, cuda: bool, flash_installed: dict[str, bool]) -> str | None:
    """``attn_implementation`` for from_pretrained; None: transformers' default (sdpa if supported)."""
    if requested == "auto":
        return "flash_attention_2" if cuda and flash_installed.get("flash_attention_2") else None
    if requested in FLASH_ATTENTION:
        if not cuda:
            raise refuse("spec.training.attention", f"{requested} needs a CUDA GPU; use auto, sdpa or eager")
        if not flash_installed.get(requested):
            package = "flash-attn" if requested == "flash_attention_2" else "flash-attn-3"
            raise refuse("spec.training.attention", f"{requested}: {package} is not installed in this image")
    return requested


def flash_installed() -> dict[str, bool]:
    from transformers.utils.import_utils import is_flash_attn_2_available, is_flash_attn_3_available

    return {
        "flash_attention_2": is_flash_attn_2_available(),
        "flash_attention_3": is_flash_attn_3_available(),
    }


def attention_of(model: Any) -> str:
    return str(getattr(model.config, "_attn_implementation", None) or "eager")


def padding_free_blocker(model: Any) -> str | None:
    """Why examples flattened into one row would see each other in ``model``; None if they would not.

    Flash attention reads the boundaries from position_ids; sdpa, eager and flex attention get
    them from ``transformers.masking_utils``, but only in models whose code builds its mask there.
    Layers that mix tokens outside attention (recurrent state, causal convolutions, linear
    attention) ignore the boundaries whatever the attention implementation.
    """
    attention = attention_of(model)
    if attention not in FLASH_ATTENTION and attention not in MASK_ATTENTION:
        return f"attention implementation {attention!r} is not known to keep flattened examples apart"
    from transformers import masking_utils

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    if getattr(base, "_is_stateful", False):
        return f"{name} carries recurrent state from one token to the next"
    for module in base.modules():
        kind = type(module).__name__
        if isinstance(module, torch.nn.Conv1d) or kind.endswith(("LinearAttention", "LightningAttention")):
            return f"{name} mixes tokens outside attention ({kind})"
    code = sys.modules.get(type(base).__module__)
    if (
        attention in MASK_ATTENTION
        and getattr(code, "create_causal_mask", None) is not masking_utils.create_causal_mask
    ):
        return f"{name} does not build its attention mask with transformers.masking_utils"
    return None


def choose_liger(
    requested: bool, *, cuda: bool, installed: bool, model_type: str, supported: frozenset[str]
) -> bool:
    """Liger's Triton kernels (fused linear cross-entropy, RMSNorm, RoPE, SwiGLU), where asked for.

    Off unless requested: on one H200 they made a 1B LoRA run 14% slower (bench/RESULTS.md, 1c).
    """
    if not requested:
        return False
    reason = (
        "needs a CUDA GPU (Triton kernels)"
        if not cuda
        else "liger-kernel is not installed in this image"
        if not installed
        else f"liger-kernel has no kernels for model type {model_type!r}"
        if model_type not in supported
        else None
    )
    if reason is not None:
        raise refuse("spec.training.liger", reason)
    return True


def liger_of(requested: bool, model: Any) -> bool:
    if not requested:
        return False
    cuda = torch.cuda.is_available()
    supported: frozenset[str] = frozenset()
    from transformers.utils.import_utils import is_liger_kernel_available

    installed = is_liger_kernel_available()
    if installed:
        from liger_kernel.transformers.monkey_patch import (  # type: ignore[import-untyped]
            MODEL_TYPE_TO_APPLY_LIGER_FN,
        )

        supported = frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)
    model_type = str(getattr(model.config, "model_type", ""))
    return choose_liger(requested, cuda=cuda, installed=installed, model_type=model_type, supported=supported)


def base_parameters(model: Any) -> int:
    """Parameters of the base model: adapters left out, 4-bit weights counted unpacked."""
    total = 0
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        state = getattr(param, "quant_state", None)
        total += state.shape.numel() if state is not None else param.numel()
    return total


def hub_options(spec: api.FineTuneJobSpec, source: str) -> dict[str, Any]:
    options: dict[str, Any] = {"trust_remote_code": spec.model.trust_remote_code}
    if not Path(source).is_dir():
        options["revision"] = spec.model.revision
        options["token"] = os.environ.get("HF_TOKEN") or None
    return options


def load_config(spec: api.FineTuneJobSpec, source: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source, **hub_options(spec, source))


def load_tokenizer(spec: api.FineTuneJobSpec, source: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, **hub_options(spec, source))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(quant: api.Quantization, *, sharded: bool = False) -> Any:
    """bitsandbytes settings; ``sharded``: 4-bit codes packed into the compute dtype's storage,
    which FSDP can split into shards like any floating-point weight (FSDP-QLoRA)."""
    from transformers import BitsAndBytesConfig

    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = getattr(torch, quant.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute if sharded else torch.uint8,
    )


def base_options(spec: api.FineTuneJobSpec, *, quantized: bool) -> dict[str, Any]:
    """from_pretrained's dtype, placement, quantization and attention for the base model."""
    options: dict[str, Any] = {}
    quant = spec.resolved_quantization() if quantized else None
    if quant is not None:
        options["quantization_config"] = quantization_config(quant, sharded=sharded(spec))
        options["device_map"] = {"": device()}
        options["dtype"] = getattr(torch, quant.compute_dtype) if device().type == "cuda" else torch.float32
    else:
        # Full fine-tuning keeps fp32 master weights (mixed precision via autocast).
        frozen = spec.method != api.Method.FULL
        options["dtype"] = compute_dtype(spec.training.precision) if frozen else torch.float32
    attention = choose_attention(
        spec.training.attention, cuda=torch.cuda.is_available(), flash_installed=flash_installed()
    )
    if attention is not None:
        options["attn_implementation"] = attention
    return options


def load_base(spec: api.FineTuneJobSpec, source: str, *, quantized: bool) -> Any:
    """The base model: full precision for full/LoRA (and for merging), k-bit for QLoRA."""
    from transformers import AutoModelForCausalLM

    options = base_options(spec, quantized=quantized)
    model = _with_attention_fallback(
        spec,
        options,
        lambda o: AutoModelForCausalLM.from_pretrained(source, **hub_options(spec, source), **SAFE_LOAD, **o),
    )
    model.config.use_cache = False
    return model


def empty_replica(spec: api.FineTuneJobSpec, source: str) -> Any:
    """The base model's layout in uninitialized host memory, for a rank that FSDP fills from
    rank 0: no weight is read, and pages never written cost no resident memory. (Not the meta
    device: accelerate tells parameters apart by their storage address to rebind the optimizer.)
    The buffers FSDP does not send, the non-persistent ones such as the rotary frequencies, are
    computed here as transformers initializes them."""
    from transformers import AutoModelForCausalLM

    config = load_config(spec, source)
    options = base_options(spec, quantized=False)
    with torch.device("meta"):
        model = _with_attention_fallback(
            spec,
            options,
            lambda o: AutoModelForCausalLM.from_config(
                config, trust_remote_code=spec.model.trust_remote_code, **o
            ),
        )
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives each use of a shared parameter a tensor of its own
    for module in model.modules():
        # initialize_weights below runs on these modules alone: all others are marked done
        module._is_hf_initialized = not module._non_persistent_buffers_set
    model.initialize_weights()
    model.config.use_cache = False
    return model


def _with_attention_fallback(spec: api.FineTuneJobSpec, options: dict[str, Any], load: Any) -> Any:
    try:
        return load(options)
    except (ValueError, ImportError) as exc:
        if (
            spec.training.attention != "auto"
            or "attn_implementation" not in options
            or "flash attention" not in str(exc).lower()
        ):
            raise
        # auto chose flash attention for a model that does not support it: the default instead.
        return load({k: v for k, v in options.items() if k != "attn_implementation"})


def placement(workdir: Path, host_budget: int | None = None) -> dict[str, Any]:
    """from_pretrained options for a model rank 0 loads alone after training: on GPUs spread by
    accelerate over the node's devices (then host memory, then disk), else on the CPU, where
    ``host_budget`` bytes of host memory, if given, bound it and the rest goes to disk."""
    if torch.cuda.is_available():
        return {"device_map": "auto", "offload_folder": str(workdir / "offload")}
    if host_budget is not None:
        return {
            "device_map": "auto",
            "max_memory": {"cpu": host_budget},
            "offload_folder": str(workdir / "offload"),
        }
    return {}


def load_placed(
    spec: api.FineTuneJobSpec, weights: str | Path, workdir: Path, *, host_budget: int | None = None
) -> Any:
    """A model to evaluate on rank 0 alone, in the compute dtype, placed as ``placement`` says."""
    from transformers import AutoModelForCausalLM

    dtype = compute_dtype(spec.training.precision)
    options = hub_options(spec, str(weights)) | SAFE_LOAD | placement(workdir, host_budget)
    with not_an_fsdp_load():
        return AutoModelForCausalLM.from_pretrained(weights, dtype=dtype, **options)


# Left set in the process by accelerate and TrainingArguments once FSDP is on. With a process
# group up, transformers then treats every load as an FSDP load and places a model split by a
# device map without accelerate's hooks: its first forward fails across devices.
FSDP_LOADING_VARIABLES = ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING")


@contextmanager
def not_an_fsdp_load() -> Iterator[None]:
    """For a model that is not FSDP's to shard, whatever FSDP set up in this process before."""
    saved = {name: os.environ.pop(name) for name in FSDP_LOADING_VARIABLES if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def load_trained(spec: api.FineTuneJobSpec, source: str, staged: Path, workdir: Path) -> Any:
    """The trained model from its staged files: merged weights (full) or base + adapter."""
    if spec.method == api.Method.FULL:
        return load_placed(spec, staged, workdir)
    from peft import PeftModel

    return PeftModel.from_pretrained(load_placed(spec, source, workdir), staged)


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


def sharded(spec: api.FineTuneJobSpec, processes: int | None = None) -> bool:
    """Whether training shards with FSDP: several processes (default: this launch's) and strategy
    fsdp (or auto, for full fine-tuning)."""
    processes = distributed.world_size() if processes is None else processes
    return processes > 1 and spec.resolved_strategy(processes) == "fsdp"


def trainable_model(spec: api.FineTuneJobSpec, source: str) -> Any:
    """The model the trainer optimizes: the base itself (full) or the base with an adapter.

    Under FSDP (full and LoRA) only global rank 0 reads the weights, into host memory; the
    others build an empty replica (``empty_replica``), and FSDP hands every rank its shards from rank 0
    when it wraps the model (accelerate's ``cpu_ram_efficient_loading``). Each GPU then only ever
    holds its shards. FSDP-QLoRA loads on every rank: each quantizes its own copy on its GPU.
    """
    quantized = spec.method == api.Method.QLORA
    fsdp = sharded(spec)
    if fsdp and not quantized and not distributed.is_main():
        model = empty_replica(spec, source)
    else:
        model = load_base(spec, source, quantized=quantized)
    if not quantized and not fsdp:  # k-bit weights are placed as they load (device_map)
        # On this process's device now: the baseline evaluation runs before Trainer would move it.
        model = model.to(device())
    if spec.method == api.Method.FULL:
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if spec.method == api.Method.QLORA:
        checkpointing = spec.training.resolved_gradient_checkpointing(base_parameters(model))
        model = prepare_model_for_kbit_training(
            model,
            # Under FSDP, FSDP's own activation checkpointing wraps the decoder layers (see
            # train.fsdp_config): the model's own would recompute each layer a second time.
            use_gradient_checkpointing=checkpointing and not fsdp,
            gradient_checkpointing_kwargs={"use_reentrant": False},
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
