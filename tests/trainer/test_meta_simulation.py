"""Real sizes, simulated: Llama-3.1-8B and -70B built on the meta device (no weights), sharded
by FSDP2 for 8 ranks, and the memory plan's per-rank figures read off the sharded layout.

One process stands for rank 0 of the group through torch's fake process group: the sharding is
FSDP2's own (``fully_shard`` per decoder block and the root, as the trainer wraps), only the
collectives are not run. The optimizer is a real AdamW stepped on meta tensors, so its states
are the ones it allocates.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore
from transformers import AutoModelForCausalLM, LlamaConfig

from kubetune import api, memory


@pytest.fixture
def fake_group(request: pytest.FixtureRequest) -> Iterator[Any]:
    ranks: int = request.param
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=ranks)
    try:
        yield init_device_mesh("cpu", (ranks,))
    finally:
        dist.destroy_process_group()


def meta_model(arch: memory.Architecture) -> Any:
    config = LlamaConfig(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        tie_word_embeddings=arch.tie_embeddings,
        attention_bias=arch.qkv_bias,
    )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def full_job(name: str, gpus: int) -> api.FineTuneJobSpec:
    return api.FineTuneJobSpec.model_validate(
        {
            "model": {"name": name},
            "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": "s3://out/"},
            "method": "full",
            "resources": {"gpus": gpus},
        }
    )


@pytest.mark.parametrize(
    ("name", "fake_group"),
    [("meta-llama/Llama-3.1-8B", 8), ("meta-llama/Llama-3.1-70B", 8), ("meta-llama/Llama-3.2-1B", 3)],
    indirect=["fake_group"],
)
def test_fsdp_shards_equal_the_plans_figures(name: str, fake_group: Any) -> None:
    arch = memory.family(name)
    assert arch is not None
    model = meta_model(arch)
    # The plan's parameter list is the model's, name by name and shape by shape.
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == dict(arch.shapes())

    for block in model.model.layers:
        fully_shard(block, mesh=fake_group)
    fully_shard(model, mesh=fake_group)
    parameters = list(model.parameters())
    for p in parameters:
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    optimizer.step()
    states = [v for s in optimizer.state.values() for v in s.values() if v.dim() > 0]

    plan = memory.estimate(full_job(name, gpus=fake_group.size()), arch)
    assert plan.strategy == "fsdp" and plan.processes == fake_group.size()
    assert sum(local_bytes(p) for p in parameters) == plan.part("weights")
    assert sum(local_bytes(p.grad) for p in parameters if p.grad is not None) == plan.part("gradients")
    assert sum(local_bytes(s) for s in states) == plan.part("optimizer states")
    if fake_group.size() == 8:
        # Every dimension 0 of these models divides by 8: each rank holds exactly an eighth.
        assert plan.part("weights") == 4 * arch.parameters // 8
