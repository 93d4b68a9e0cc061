"""The shard-by-shard merge gives what peft's merge_and_unload gives, without loading the model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from kubetune.trainer import merging


def random_llama(hidden: int, intermediate: int, layers: int, vocab: int) -> Any:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def reference(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Today's merge: the whole model in memory, peft's merge_and_unload."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def merged_tensors(out_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in merging.shard_files(out_dir):
        with safe_open(str(out_dir / file), framework="pt") as shard:
            out.update({k: shard.get_tensor(k) for k in shard.keys()})  # noqa: SIM118
    return out


def assert_same(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    assert set(found) == set(expected)
    for key, tensor in expected.items():
        assert found[key].dtype == tensor.dtype, key
        torch.testing.assert_close(found[key], tensor, atol=1e-5, rtol=0, msg=key)


def test_a_200m_llama_in_20mb_shards_merges_as_peft_does(tmp_path: Path) -> None:
    model = random_llama(hidden=1024, intermediate=2816, layers=12, vocab=32000)
    assert sum(p.numel() for p in model.parameters()) > 190e6
    model.save_pretrained(tmp_path / "base", max_shard_size="20MB")
    shards = merging.shard_files(tmp_path / "base")
    assert len(shards) > 30
    adapted = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    )
    adapted.save_pretrained(str(tmp_path / "adapter"))
    del model, adapted

    report = merging.merge_shards(
        tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", dtype=torch.float32
    )
    assert report.shards == len(shards) and report.merged == 12 * 7
    assert (
        report.largest_shard_bytes == 4 * 32000 * 1024
    )  # a shard of the embedding alone, the largest tensor
    index = json.loads((tmp_path / "merged" / merging.INDEX).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert_same(reference(tmp_path / "base", tmp_path / "adapter"), merged_tensors(tmp_path / "merged"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert loaded.dtype == torch.float32


def test_embeddings_modules_to_save_rslora_and_rank_patterns(tmp_path: Path) -> None:
    model = random_llama(hidden=128, intermediate=256, layers=2, vocab=512)
    model.save_pretrained(tmp_path / "base")
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "down_proj", "embed_tokens"],
        modules_to_save=["lm_head"], use_rslora=True, rank_pattern={"down_proj": 4},
        alpha_pattern={"q_proj": 64}, init_lora_weights=False,
    )  # fmt: skip
    adapted: Any = get_peft_model(model, config)
    with torch.no_grad():
        adapted.base_model.model.lm_head.modules_to_save["default"].weight.add_(1.0)
    adapted.save_pretrained(str(tmp_path / "adapter"))
    report = merging.merge_shards(
        tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", dtype=torch.float32
    )
    assert report.replaced == 2 and report.merged == 2 * 2 + 1  # lm_head; embed_tokens' own copy
    assert_same(reference(tmp_path / "base", tmp_path / "adapter"), merged_tensors(tmp_path / "merged"))


def test_16_bit_output_and_unsupported_adapters(tmp_path: Path) -> None:
    model = random_llama(hidden=128, intermediate=256, layers=1, vocab=512)
    model.save_pretrained(tmp_path / "base")
    get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", use_dora=True)).save_pretrained(
        str(tmp_path / "dora")
    )
    with pytest.raises(merging.UnsupportedAdapter, match="use_dora"):
        merging.merge_shards(tmp_path / "base", tmp_path / "dora", tmp_path / "out", dtype=torch.bfloat16)
    plain = get_peft_model(
        random_llama(hidden=128, intermediate=256, layers=1, vocab=512),
        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    )
    plain.save_pretrained(str(tmp_path / "adapter"))
    merging.merge_shards(tmp_path / "base", tmp_path / "adapter", tmp_path / "bf16", dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in merged_tensors(tmp_path / "bf16").values())
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
