"""A model's shapes: from its config.json, a built-in preset, or a table of the common families."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kubetune import api, presets


@dataclass(frozen=True)
class Architecture:
    """A decoder-only transformer of the Llama family (Llama, Mistral, Qwen2)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_embeddings: bool = False
    qkv_bias: bool = False
    model_type: str = "llama"  # config.json's model_type
    source: str = ""  # where the figures came from

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str) -> Architecture:
        """From a Hugging Face ``config.json``; a missing field is named in the error."""
        text = config.get("text_config") or config

        def need(key: str) -> int:
            if key not in text:
                raise ValueError(f"{source}: config.json has no {key!r}; the memory plan needs it")
            return int(text[key])

        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(text.get("head_dim") or hidden // heads),
            tie_embeddings=bool(text.get("tie_word_embeddings", False)),
            qkv_bias=bool(text.get("attention_bias", False)) or text.get("model_type") == "qwen2",
            model_type=str(text.get("model_type") or config.get("model_type") or "unknown"),
            source=source,
        )

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def block_linears(self) -> dict[str, tuple[int, int]]:
        """Each linear layer of one decoder block: (in_features, out_features)."""
        h, q, kv, i = self.hidden_size, self.num_heads * self.head_dim, self.kv_dim, self.intermediate_size
        return {
            "self_attn.q_proj": (h, q),
            "self_attn.k_proj": (h, kv),
            "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (q, h),
            "mlp.gate_proj": (h, i),
            "mlp.up_proj": (h, i),
            "mlp.down_proj": (i, h),
        }

    def block_shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """The parameters of one decoder block, named as transformers names them."""
        for name, (fan_in, fan_out) in self.block_linears().items():
            yield f"{name}.weight", (fan_out, fan_in)
            if self.qkv_bias and name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                yield f"{name}.bias", (fan_out,)
        yield "input_layernorm.weight", (self.hidden_size,)
        yield "post_attention_layernorm.weight", (self.hidden_size,)

    def shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """Every parameter of the causal LM, in transformers' names (``model.layers.N...``)."""
        yield "model.embed_tokens.weight", (self.vocab_size, self.hidden_size)
        for layer in range(self.num_layers):
            for name, shape in self.block_shapes():
                yield f"model.layers.{layer}.{name}", shape
        yield "model.norm.weight", (self.hidden_size,)
        if not self.tie_embeddings:
            yield "lm_head.weight", (self.vocab_size, self.hidden_size)

    @property
    def parameters(self) -> int:
        return sum(math.prod(shape) for _, shape in self.shapes())

    @property
    def block_parameters(self) -> int:
        return sum(math.prod(shape) for _, shape in self.block_shapes())

    @property
    def linear_parameters(self) -> int:
        """Parameters in the decoder blocks' linear weights: what bitsandbytes quantizes."""
        return self.num_layers * sum(a * b for a, b in self.block_linears().values())


def _llama(v: int, h: int, i: int, layers: int, heads: int, kv: int, **kw: Any) -> Architecture:
    return Architecture(v, h, i, layers, heads, kv, kw.pop("head_dim", h // heads), **kw)


# From each model's config.json on the Hugging Face hub; instruct variants share the base's.
FAMILIES: dict[str, Architecture] = {
    "meta-llama/Llama-3.1-8B": _llama(128256, 4096, 14336, 32, 32, 8),
    "meta-llama/Llama-3.1-70B": _llama(128256, 8192, 28672, 80, 64, 8),
    "meta-llama/Llama-3.1-405B": _llama(128256, 16384, 53248, 126, 128, 8),
    "meta-llama/Llama-3.2-1B": _llama(128256, 2048, 8192, 16, 32, 8, head_dim=64, tie_embeddings=True),
    "meta-llama/Llama-3.2-3B": _llama(128256, 3072, 8192, 28, 24, 8, head_dim=128, tie_embeddings=True),
    "meta-llama/Llama-2-7b-hf": _llama(32000, 4096, 11008, 32, 32, 32),
    "meta-llama/Llama-2-13b-hf": _llama(32000, 5120, 13824, 40, 40, 40),
    "meta-llama/Llama-2-70b-hf": _llama(32000, 8192, 28672, 80, 64, 8),
    "huggyllama/llama-65b": _llama(32000, 8192, 22016, 80, 64, 64),
    "mistralai/Mistral-7B-v0.1": _llama(32000, 4096, 14336, 32, 32, 8, model_type="mistral"),
    "mistralai/Mistral-7B-v0.3": _llama(32768, 4096, 14336, 32, 32, 8, model_type="mistral"),
    "Qwen/Qwen2.5-0.5B": _llama(
        151936, 896, 4864, 24, 14, 2, tie_embeddings=True, qkv_bias=True, model_type="qwen2"
    ),
    "Qwen/Qwen2.5-1.5B": _llama(
        151936, 1536, 8960, 28, 12, 2, tie_embeddings=True, qkv_bias=True, model_type="qwen2"
    ),
    "Qwen/Qwen2.5-3B": _llama(
        151936, 2048, 11008, 36, 16, 2, tie_embeddings=True, qkv_bias=True, model_type="qwen2"
    ),
    "Qwen/Qwen2.5-7B": _llama(152064, 3584, 18944, 28, 28, 4, qkv_bias=True, model_type="qwen2"),
    "Qwen/Qwen2.5-14B": _llama(152064, 5120, 13824, 48, 40, 8, qkv_bias=True, model_type="qwen2"),
    "Qwen/Qwen2.5-32B": _llama(152064, 5120, 27648, 64, 40, 8, qkv_bias=True, model_type="qwen2"),
    "Qwen/Qwen2.5-72B": _llama(152064, 8192, 29568, 80, 64, 8, qkv_bias=True, model_type="qwen2"),
}
_ALIASES = {"meta-llama/Meta-Llama-3.1-8B": "meta-llama/Llama-3.1-8B",
            "meta-llama/Meta-Llama-3.1-70B": "meta-llama/Llama-3.1-70B"}  # fmt: skip


def family(name: str) -> Architecture | None:
    """The built-in architecture of a hub id (instruct and chat variants included)."""
    base = re.sub(r"-(Instruct|instruct|chat|Chat|it)(-[0-9]+)?$", "", name)
    base = _ALIASES.get(base, base)
    found = FAMILIES.get(base) or next((a for k, a in FAMILIES.items() if k.lower() == base.lower()), None)
    return replace(found, source=f"built-in table ({base})") if found else None


def architecture(
    spec: api.FineTuneJobSpec, *, config_path: Path | None = None, store: Any = None
) -> Architecture:
    """The model's architecture: an explicit config.json, the model's own, a preset or the table."""
    if config_path is not None:
        return _from_file(config_path)
    model = spec.model
    if model.uri is not None and not model.uri.startswith("s3://"):
        path = Path(model.uri.removeprefix("file://")) / "config.json"
        if path.exists():
            return _from_file(path)
    if model.uri is not None and model.uri.startswith("s3://") and store is not None:
        uri = model.uri.rstrip("/") + "/config.json"
        try:
            return Architecture.from_config(store.read_json(uri), uri)
        except Exception as error:  # unreachable storage: fall back to the table, and say so
            if model.name is None or family(model.name) is None:
                raise ValueError(f"spec.model.uri: cannot read {uri}: {error}") from error
    if model.name is not None:
        if presets.is_preset(model.name):
            return Architecture.from_config(presets.config(model.name), f"preset {model.name}")
        found = family(model.name)
        if found is not None:
            return found
    where = model.name or model.uri
    raise ValueError(
        f"spec.model: no architecture for {where}: not in the built-in table "
        f"({', '.join(FAMILIES)}); give its config.json with --config or a local spec.model.uri"
    )


def model_type(spec: api.FineTuneJobSpec, *, config_path: Path | None = None) -> str:
    """config.json's model_type, offline: an explicit or local config.json, else the table's; a
    ValueError when neither knows the model."""
    path = config_path
    if path is None and spec.model.uri is not None and not spec.model.uri.startswith("s3://"):
        path = Path(spec.model.uri.removeprefix("file://")) / "config.json"
    if path is not None and path.exists():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: {error}") from error
        return str(
            (config.get("text_config") or {}).get("model_type") or config.get("model_type") or "unknown"
        )
    return architecture(spec, config_path=config_path).model_type


def _from_file(path: Path) -> Architecture:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: {error}") from error
    return Architecture.from_config(config, str(path))
