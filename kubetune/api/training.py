"""How the weights are trained: the adapter, the quantized base, and the optimisation."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from kubetune.api.common import CHECKPOINTING_FROM_PARAMETERS, Model

ModuleName = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class Lora(Model):
    """The LoRA adapter of methods lora and qlora; ignored by full."""

    r: int = Field(16, ge=1, le=1024, description="Adapter rank. Default 16.")
    alpha: int = Field(
        32, ge=1, le=4096, description="Adapter scaling numerator: updates are scaled by alpha/r. Default 32."
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input. Default 0.05.")
    target_modules: list[ModuleName] = Field(
        default_factory=lambda: ["all-linear"],
        max_length=64,
        description="Module names to adapt; all-linear adapts every linear layer.",
    )
    modules_to_save: list[ModuleName] = Field(
        default_factory=list,
        max_length=64,
        description="Modules trained in full beside the adapter (e.g. embed_tokens).",
    )


class Quantization(Model):
    """The bitsandbytes quantization of the frozen base under a QLoRA adapter."""

    bits: Literal[4, 8] = Field(4, description="Weight bits of the frozen base. Default 4.")
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type. Default nf4.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too. Default true.")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Data type the dequantized weights are computed in. Default bfloat16."
    )


class EarlyStopping(Model):
    """Stop when the validation loss stops improving; the best checkpoint is kept. Needs evalEvery."""

    patience: int = Field(
        3, ge=1, le=1000, description="Evaluations without improvement before stopping. Default 3."
    )
    threshold: float = Field(
        0.0, ge=0, description="Smallest decrease of the validation loss that counts as improvement."
    )


class Training(Model):
    """The optimisation: length, optimizer, batch, sequence length, parallelism and kernels."""

    epochs: float | None = Field(
        None,
        gt=0,
        le=1000,
        description="Passes over the data; exclusive of maxSteps. Unset: 1 unless maxSteps.",
    )
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; exclusive of epochs.")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate of AdamW. Default 2e-4.")
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate schedule after warmup. Default cosine."
    )
    warmup_ratio: float = Field(
        0.03, ge=0, lt=1, description="Fraction of all steps the learning rate warms up over. Default 0.03."
    )
    weight_decay: float = Field(0.0, ge=0, lt=1, description="AdamW weight decay. Default 0.")
    max_grad_norm: float = Field(
        1.0, gt=0, description="Gradients are clipped to this global L2 norm. Default 1."
    )
    batch_size: int = Field(8, ge=1, le=4096, description="Examples per device per step.")
    gradient_accumulation: int = Field(
        1,
        ge=1,
        le=4096,
        description="Micro-batches per optimizer step; the effective batch is batchSize x this x processes.",
    )
    max_seq_length: int = Field(
        1024,
        ge=16,
        le=1048576,
        description="Longer rows are truncated; longer text documents are split into pieces of this length.",
    )
    packing: bool = Field(
        False,
        description=(
            "Pack examples into full rows of maxSeqLength (no cross-attention; changes how many "
            "examples make a step). Off: each batch keeps its examples, flattened into one row "
            "without padding where the attention implementation isolates them, else padded."
        ),
    )
    gradient_checkpointing: bool | None = Field(
        None,
        description="Recompute activations in the backward pass. Unset: on from 1B base parameters.",
    )
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="Data parallelism over several processes: ddp replicates the model, fsdp shards "
        "weights, gradients and optimizer states; auto is fsdp for full fine-tuning with more than "
        "one process, else ddp.",
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description=(
            "auto: bf16 on GPUs that have it and as autocast on CPUs with AVX512-BF16 or AMX-BF16, "
            "else fp32. bf16 is honoured on any CPU; fp16 needs a GPU."
        ),
    )
    attention: Literal[
        "auto", "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"
    ] = Field(
        "auto",
        description=(
            "Attention implementation. auto: flash_attention_2 on a GPU where flash-attn is "
            "installed, else the model's default (sdpa where it has it)."
        ),
    )
    liger: bool = Field(
        False,
        description=(
            "Liger kernels (fused linear cross-entropy, RMSNorm, RoPE, SwiGLU): less memory for the "
            "loss at long rows and large vocabularies, slower at 1B on an H200 (bench/RESULTS.md). "
            "Needs a CUDA GPU and a model type liger-kernel supports; refused where they cannot run."
        ),
    )
    seed: int = Field(
        42,
        ge=0,
        le=2**32 - 1,
        description="Seeds shuffling, the validation split and initialisation. Default 42.",
    )
    eval_every: int | None = Field(
        None, ge=1, description="Optimizer steps between validation passes; unset: none during training."
    )
    early_stopping: EarlyStopping | None = Field(
        None, description="Stop when the validation loss stops improving; needs evalEvery. Unset: off."
    )
    checkpoint_every: int | None = Field(
        None,
        ge=1,
        description="Optimizer steps between checkpoints saved to the output for resuming; unset: none.",
    )
    collective_timeout_seconds: int = Field(
        1800,
        ge=60,
        le=604800,
        description=(
            "How long a process waits in a collective (all-reduce, barrier) for the others before "
            "failing, e.g. while rank 0 alone runs the baseline evaluation; the process group's and "
            "the Trainer's timeout. KUBETUNE_COLLECTIVE_TIMEOUT_SECONDS in the trainer's "
            "environment overrides it."
        ),
    )

    def resolved_gradient_checkpointing(self, base_parameters: int) -> bool:
        """Unset means on from CHECKPOINTING_FROM_PARAMETERS: activations then dominate memory."""
        if self.gradient_checkpointing is not None:
            return self.gradient_checkpointing
        return base_parameters >= CHECKPOINTING_FROM_PARAMETERS
