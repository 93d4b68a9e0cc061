"""The memory plan: what one GPU needs to run a FineTuneJob, before any GPU is held.

Pure arithmetic over the model's architecture (its ``config.json``, or a built-in table of the
common families when offline) and the spec. The figures follow what the trainer does:

- full fine-tuning keeps fp32 master weights, fp32 gradients and AdamW's two fp32 moments
  (16 bytes a parameter); under autocast each weight also gets a 16-bit copy for the forward;
- LoRA keeps the frozen base in the compute dtype; peft keeps adapters in fp32;
- QLoRA stores linear layers in 4 bits (NF4 with double quantization: 4.127 bits a parameter);
  peft's k-bit preparation casts the rest (embeddings, head, norms) to fp32;
- FSDP shards parameters, gradients and optimizer states over every process, dimension 0 of
  each tensor cut as FSDP2 cuts it (the first rank holds the ceiling), and gathers one
  transformer block (plus one prefetched) at a time in the compute dtype;
- activations: each decoder layer keeps its inputs, the attention and MLP intermediates; with
  gradient checkpointing only each layer's input plus one layer recomputed; the loss upcasts
  logits to fp32 (transformers' cross entropy), the largest single term for big vocabularies.

No torch import here: the operator and ``kubetune validate`` use this module. The plans of the
jobs in manifest files are ``kubetune.manifests.plan_files``.
"""

from kubetune.memory.architecture import FAMILIES, Architecture, architecture, family, model_type
from kubetune.memory.plan import (
    CUDA_OVERHEAD,
    DEFAULT_GPU_MEMORY,
    INT8_BYTES,
    NF4_BYTES,
    NF4_DOUBLE_QUANT_BYTES,
    Part,
    Plan,
    Strategy,
    adapter_parameters,
    estimate,
    plan_job,
    processes,
    resolve_strategy,
    sharded,
)
from kubetune.memory.quantities import GIB, gib, parse_quantity

__all__ = [
    "CUDA_OVERHEAD",
    "DEFAULT_GPU_MEMORY",
    "FAMILIES",
    "GIB",
    "INT8_BYTES",
    "NF4_BYTES",
    "NF4_DOUBLE_QUANT_BYTES",
    "Architecture",
    "Part",
    "Plan",
    "Strategy",
    "adapter_parameters",
    "architecture",
    "estimate",
    "family",
    "gib",
    "model_type",
    "parse_quantity",
    "plan_job",
    "processes",
    "resolve_strategy",
    "sharded",
]
