"""Merging a LoRA adapter into its base checkpoint on the CPU, one safetensors shard at a time.

The base is never loaded as a model: each shard is opened lazily, each adapted weight gets its
delta ``scale * B @ A`` added in fp32, and the merged shard is written before the next is read.
Peak host memory is about one shard plus the adapter, whatever the model's size; no GPU is used.
The result is what peft's ``merge_and_unload`` gives, in Hugging Face layout with an index.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PREFIX = "base_model.model."


class UnsupportedAdapter(ValueError):
    """An adapter this merge does not handle; the caller falls back to peft's own merge."""


@dataclass(frozen=True)
class Delta:
    a: torch.Tensor  # [r, in] (lora_A), or [r, num_embeddings] (lora_embedding_A)
    b: torch.Tensor  # [out, r] (lora_B), or [embedding_dim, r] (lora_embedding_B)
    scale: float
    embedding: bool = False

    def of(self, weight: torch.Tensor) -> torch.Tensor:
        """The fp32 update for ``weight``, shaped like it."""
        update = self.b.float() @ self.a.float()
        if self.embedding:
            update = update.T
        if update.shape != weight.shape:
            raise UnsupportedAdapter(
                f"adapter update {tuple(update.shape)} for a weight {tuple(weight.shape)}"
            )
        return update * self.scale


@dataclass(frozen=True)
class MergeReport:
    shards: int
    merged: int  # weights that got a delta
    replaced: int  # weights replaced by modules_to_save
    largest_shard_bytes: int


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern: a key matches a module name's tail."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(adapter_dir: Path) -> tuple[dict[str, Delta], dict[str, torch.Tensor]]:
    """Deltas by base weight name, and whole weights saved beside the adapter (modules_to_save)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise UnsupportedAdapter(f"peft_type {config.get('peft_type')!r}")
    for key in ("use_dora", "lora_bias", "fan_in_fan_out", "layer_replication", "trainable_token_indices",
                "target_parameters"):  # fmt: skip
        if config.get(key):
            raise UnsupportedAdapter(f"{key} is set")
    if config.get("bias", "none") != "none":
        raise UnsupportedAdapter(f"bias {config['bias']!r}")
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    whole: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise UnsupportedAdapter(f"unexpected adapter tensor {key}")
        name = key.removeprefix(PREFIX)
        found = re.fullmatch(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight)?", name)
        if found is None:
            # peft saves a targeted embedding's own weight as `base_layer` (resized vocabularies).
            whole[name.replace(".base_layer.weight", ".weight")] = tensor
            continue
        pairs.setdefault(found[1], {})[found[2]] = tensor
    deltas = {}
    for module, parts in pairs.items():
        embedding = "lora_embedding_A" in parts
        a = parts.get("lora_embedding_A" if embedding else "lora_A")
        b = parts.get("lora_embedding_B" if embedding else "lora_B")
        if a is None or b is None:
            raise UnsupportedAdapter(f"{module}: an adapter half is missing")
        r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        deltas[f"{module}.weight"] = Delta(a, b, scale, embedding)
    return deltas, whole


def shard_files(base_dir: Path) -> list[str]:
    """The base's safetensors files, in index order."""
    if (base_dir / INDEX).exists():
        weight_map = json.loads((base_dir / INDEX).read_text(encoding="utf-8"))["weight_map"]
        return list(dict.fromkeys(weight_map.values()))
    if (base_dir / SINGLE).exists():
        return [SINGLE]
    raise FileNotFoundError(f"{base_dir}: no {SINGLE} and no {INDEX} (merging needs safetensors)")


def merge_shards(base_dir: Path, adapter_dir: Path, out_dir: Path, *, dtype: torch.dtype) -> MergeReport:
    """Write base + adapter to ``out_dir``, shard by shard, floating weights in ``dtype``."""
    deltas, whole = read_adapter(adapter_dir)
    files = shard_files(base_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    merged = replaced = largest = total = 0
    for file in files:
        shard: dict[str, torch.Tensor] = {}
        with safe_open(str(base_dir / file), framework="pt") as source:
            for key in source.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = source.get_tensor(key)
                if key in whole:
                    tensor = whole.pop(key)
                    replaced += 1
                if key in deltas:
                    tensor = tensor.float() + deltas.pop(key).of(tensor)
                    merged += 1
                if tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                shard[key] = tensor.contiguous()
                weight_map[key] = file
        size = sum(t.numel() * t.element_size() for t in shard.values())
        largest, total = max(largest, size), total + size
        save_file(shard, str(out_dir / file), metadata={"format": "pt"})
        del shard
    if deltas or whole:
        missing = sorted([*deltas, *whole])[:5]
        raise UnsupportedAdapter(
            f"adapter weights with no match in the base checkpoint: {', '.join(missing)}"
        )
    if len(files) > 1 or (base_dir / INDEX).exists():
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _copy_config(base_dir, out_dir, dtype)
    return MergeReport(shards=len(files), merged=merged, replaced=replaced, largest_shard_bytes=largest)


def _copy_config(base_dir: Path, out_dir: Path, dtype: torch.dtype) -> None:
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = name
    if "dtype" not in config and "torch_dtype" not in config:
        config["dtype"] = name
    (out_dir / "config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    if (base_dir / "generation_config.json").exists():
        shutil.copy2(base_dir / "generation_config.json", out_dir / "generation_config.json")


def cast_shards(folder: Path, dtype: torch.dtype) -> None:
    """The floating weights of a saved checkpoint in ``dtype``, in place, one shard at a time
    (each written beside and renamed over the old), and its config saying so."""
    total = 0
    for file in shard_files(folder):
        shard = {
            key: tensor.to(dtype) if tensor.is_floating_point() else tensor
            for key, tensor in load_file(str(folder / file)).items()
        }
        total += sum(t.numel() * t.element_size() for t in shard.values())
        partial = folder / f".{file}.partial"
        save_file(shard, str(partial), metadata={"format": "pt"})
        partial.replace(folder / file)
        del shard
    if (folder / INDEX).exists():
        index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
        index["metadata"] = {**index.get("metadata", {}), "total_size": total}
        (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
