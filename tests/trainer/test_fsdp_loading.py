"""Loading under FSDP: rank 0's models for evaluation after training, and the other ranks' replica.

Once Trainer has set up FSDP, ``ACCELERATE_USE_FSDP`` and ``FSDP_CPU_RAM_EFFICIENT_LOADING`` stay set
in the process, and with a process group up transformers then believes every load is an FSDP load:
a model spread by a device map gets no dispatch hooks. These tests load in a real gloo group (one
process: the loads under test are rank 0's alone) with both variables set, as after training.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from kubetune.trainer import modeling, presets

from .conftest import free_port, tiny_job

TINY = "kubetune/tiny-llama"


@pytest.fixture
def after_fsdp_training(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A process group, and the environment accelerate and TrainingArguments leave behind."""
    for name, value in {
        "ACCELERATE_USE_FSDP": "true",
        "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "LOCAL_RANK": "0",
    }.items():
        monkeypatch.setenv(name, value)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        result: torch.Tensor = model(torch.arange(3, 40).unsqueeze(0)).logits.float().cpu()
    return result


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_model_split_by_its_device_map_still_computes_after_fsdp_training(
    after_fsdp_training: None, tmp_path: Path
) -> None:
    source = presets.preset_path(TINY)
    spec = tiny_job(training={"precision": "fp32"}).spec
    whole = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    budget = 3 * sum(p.numel() * p.element_size() for p in whole.parameters()) // 4
    # Rank 0 has no room for the whole model: a quarter of it goes to disk, as on a GPU node
    # where a 70B model is spread over the GPUs, host memory and the offload folder.
    split = modeling.load_placed(spec, source, tmp_path, host_budget=budget)
    assert "disk" in set(split.hf_device_map.values())
    assert torch.allclose(logits(split), logits(whole), atol=1e-5)
    assert os.environ["ACCELERATE_USE_FSDP"] == "true", "the training process's settings are left as found"


def test_ranks_after_the_first_read_no_weights_and_hold_no_host_memory_for_them(
    after_fsdp_training: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Rank 1 of an FSDP job: FSDP sends it its shards from rank 0, so it needs the layout only.

    Its model folder here holds a config and no weights, for a 0.7 GB model (fp32, tied embeddings)."""
    tiny = AutoConfig.from_pretrained(presets.preset_path(TINY))
    config = LlamaConfig(
        **{
            **tiny.to_dict(),
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 16,
            "tie_word_embeddings": True,
        }
    )
    config.save_pretrained(tmp_path)
    spec = tiny_job(method="full", training={"precision": "fp32", "strategy": "fsdp"}).spec
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    before = resident_bytes()
    replica = modeling.trainable_model(spec, str(tmp_path))
    grown = resident_bytes() - before
    size = sum(p.numel() * p.element_size() for p in replica.parameters())
    assert size > 600 * 2**20 and grown < size // 10, f"{grown:,} bytes resident for a {size:,}-byte model"
    assert replica.lm_head.weight is replica.model.embed_tokens.weight, "tied as in the model's config"
    # What FSDP does not send is computed here: the rotary frequencies, not random memory.
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    buffers = dict(reference.named_buffers())
    assert buffers
    for name, buffer in replica.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
