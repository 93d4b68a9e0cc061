"""Which models GGUF export supports: architectures, tokenizers and rotary scalings llama.cpp knows."""

from __future__ import annotations

import json
from typing import Any

from kubetune import api

# config.json model_type -> GGUF architecture name; the model types the API says GGUF supports.
ARCHITECTURES = api.GGUF_ARCHITECTURES

# A tokenizer's pre-tokenization, as tokenizer.json spells it -> llama.cpp's name for it.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def unsupported(config: dict[str, Any], tokenizer_json: dict[str, Any]) -> list[str]:
    """Why a model of this ``config.json`` and ``tokenizer.json`` cannot be written as GGUF."""
    why = api.ExportFamily.GGUF.refusal(str(config.get("model_type", "")))
    if why is not None:
        return [why]
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = model.get("type") or "not a tokenizers"
        return [
            f"GGUF export supports byte-level BPE tokenizers; this one is {kind} "
            "(SentencePiece-style, as Llama 2 and Mistral v0.x have)"
        ]
    if pre_tokenizer(tokenizer_json) is None:
        return ["GGUF export: the tokenizer's pre-tokenization is not one llama.cpp knows"]
    kind = rope(config)["rope_type"]
    if kind not in ("default", "linear", "llama3"):
        return [f"GGUF export: rope scaling {kind!r} is not supported"]
    return []


def rope(config: dict[str, Any]) -> dict[str, Any]:
    """Rotary settings with rope_theta and rope_type, as transformers 5 writes them
    (rope_parameters) or as older config.json files do (rope_theta, rope_scaling)."""
    found = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    found.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    found["rope_type"] = found.get("rope_type") or found.get("type") or "default"
    return found


def pre_tokenizer(tokenizer_json: dict[str, Any]) -> str | None:
    """llama.cpp's name (tokenizer.ggml.pre) for the pre-tokenization of ``tokenizer_json``."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    regexes = [((s.get("pattern") or {}).get("Regex")) for s in steps if s.get("type") == "Split"]
    if regexes == [LLAMA3_REGEX]:
        return "llama-bpe"
    if regexes == [QWEN2_REGEX]:
        return "qwen2"
    byte_level = next((s for s in steps if s.get("type") == "ByteLevel"), None)
    if byte_level is None or not byte_level.get("use_regex", True):
        return None
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    digits = next((s for s in steps if s.get("type") == "Digits"), None)
    if kinds == ["Digits", "ByteLevel"] and digits and digits.get("individual_digits"):
        return "starcoder"  # \p{N} apart, then GPT-2's expression: what llama.cpp calls starcoder
    return None


def tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else {}
