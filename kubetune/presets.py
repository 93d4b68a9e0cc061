"""The built-in model presets: their names and shapes, so kubetune runs offline.

The table is shared: the memory plan (the operator, ``kubetune plan``) sizes a preset from it
without building it; ``kubetune.trainer.presets`` builds the model and tokenizer from it.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # A ~3M-parameter Llama; every layer size is a multiple of 32 so that the 4-bit paths of
    # bitsandbytes work on the CPU too.
    "kubetune/tiny-llama": {
        "vocab_size": 1024,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 512,
    },
}

MODEL_TYPE = "llama"  # every preset is a LlamaForCausalLM
TIE_WORD_EMBEDDINGS = False


def is_preset(name: str | None) -> bool:
    return name in PRESETS


def config(name: str) -> dict[str, Any]:
    """The architecture part of the preset's config.json, as the trainer builds it."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return {**PRESETS[name], "model_type": MODEL_TYPE, "tie_word_embeddings": TIE_WORD_EMBEDDINGS}
