"""The merged model as f16 GGUF, written with the ``gguf`` package one tensor at a time."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kubetune.trainer.context import RunContext
from kubetune.trainer.exports.gguf.support import ARCHITECTURES, pre_tokenizer, rope, unsupported
from kubetune.validation import InvalidJob, Problem

FORMATS_FIELD = "spec.export.formats"


def f16_file(ctx: RunContext, merged: Path) -> Path:
    """The merged model as f16 GGUF, written once per run for all the GGUF formats."""
    path = ctx.workdir / "gguf" / "model-f16.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        write_f16(merged, partial, name=ctx.job.metadata.name)
        partial.replace(path)
    return path


@dataclass(frozen=True)
class Shape:
    """What the writer needs of config.json."""

    arch: str  # GGUF's architecture name
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: dict[str, Any]) -> Shape:
        heads = int(config["num_attention_heads"])
        return cls(
            arch=ARCHITECTURES[config["model_type"]],
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
        )


def write_f16(model_dir: Path, path: Path, *, name: str) -> None:
    """The model in ``model_dir`` (HF layout) as f16 GGUF at ``path``, one tensor in memory at a time."""
    import gguf

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    problems = unsupported(config, tokenizer_json)
    if problems:
        raise InvalidJob("export", [Problem(FORMATS_FIELD, p) for p in problems])
    shape = Shape.of(config)
    writer = gguf.GGUFWriter(path, shape.arch)
    _hyperparameters(writer, config, shape, name)
    _tokenizer(writer, model_dir, tokenizer_json, int(config["vocab_size"]))
    tensors = list(_weights(model_dir, config, shape))
    for gguf_name, numpy_shape, dtype, _ in tensors:
        nbytes = int(np.prod(numpy_shape)) * np.dtype(dtype).itemsize
        writer.add_tensor_info(gguf_name, numpy_shape, np.dtype(dtype), nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, _, _, load in tensors:
        writer.write_tensor_data(load())
    writer.close()


def _hyperparameters(writer: Any, config: dict[str, Any], shape: Shape, name: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(float(rope(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    scaling = rope(config)
    if scaling["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))


def _tokenizer(writer: Any, model_dir: Path, tokenizer_json: dict[str, Any], vocab_size: int) -> None:
    """Tokens, their types, llama.cpp's pre-tokenizer name; merges, special tokens and the chat
    template as gguf's SpecialVocab reads them from the model's folder."""
    import gguf
    from transformers import AutoTokenizer

    tokens, types = vocabulary(AutoTokenizer.from_pretrained(model_dir), vocab_size)
    pre = pre_tokenizer(tokenizer_json)
    assert pre is not None  # unsupported() refused it otherwise
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


Loader = Callable[[], np.ndarray]


def _weights(
    model_dir: Path, config: dict[str, Any], shape: Shape
) -> Iterator[tuple[str, tuple[int, ...], type, Loader]]:
    """(GGUF name, shape, dtype, loader) of every tensor: matrices in f16, vectors in f32."""
    import gguf
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(
        next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == shape.arch), shape.layers
    )
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            keys = list(f.keys())
            dims = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        for key in keys:
            if key.endswith("rotary_emb.inv_freq"):
                continue
            gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ValueError(f"GGUF export: no GGUF name for the tensor {key}")
            dtype = np.float16 if len(dims[key]) == 2 else np.float32
            yield gguf_name, dims[key], dtype, _loader(shard, key, shape, dtype)
    if rope(config)["rope_type"] == "llama3":
        factors = llama3_rope_factors(config, shape.head_dim)
        yield (
            gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
            factors.shape,
            np.float32,
            lambda: factors,
        )


def _loader(shard: Path, key: str, shape: Shape, dtype: type) -> Loader:
    def load() -> np.ndarray:
        from safetensors import safe_open

        with safe_open(str(shard), framework="pt") as f:
            tensor = f.get_tensor(key)
        if shape.arch == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):
            tensor = _unpermute(tensor, shape.heads if "q_proj" in key else shape.kv_heads)
        out: np.ndarray = tensor.float().numpy().astype(dtype)
        return out

    return load


def vocabulary(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their GGUF types: added special tokens are control tokens, other added
    tokens user-defined, ids without a token unused padding."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def llama3_rope_factors(config: dict[str, Any], head_dim: int) -> np.ndarray:
    """Llama 3.1's frequency scaling as the per-dimension factors llama.cpp reads (rope_freqs)."""
    scaling = rope(config)
    base = float(scaling["rope_theta"])
    factor = float(scaling.get("factor", 8.0))
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    context = float(scaling.get("original_max_position_embeddings", 8192))
    out = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * base ** (i / head_dim)
        if wavelength < context / high:
            out.append(1.0)
        elif wavelength > context / low:
            out.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers keeps q and k with rotary halves apart; llama.cpp's rope wants them interleaved."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )
