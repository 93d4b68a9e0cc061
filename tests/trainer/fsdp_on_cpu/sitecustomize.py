"""Lets accelerate's own FSDP2 path run on the CPU, for tests on a machine without a GPU.

accelerate turns FSDP on only for GPU-like process groups; on the CPU (gloo) it falls back to
DDP whatever the plugin says. FSDP2 itself runs on the CPU with gloo, so this shim, on the
PYTHONPATH of the test's processes only, keeps the FSDP plugin it was given. Nothing else of
accelerate, transformers or kubetune is changed.
"""

from __future__ import annotations

from typing import Any

import accelerate.state
from accelerate.utils import DistributedType

_init = accelerate.state.AcceleratorState.__init__


def _keep_fsdp(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # Later AcceleratorState() calls copy PartialState's type over this one: set both.
        accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


accelerate.state.AcceleratorState.__init__ = _keep_fsdp


def _count_layer_calls(folder: str) -> None:
    """Counts the forward calls of the first decoder layer in training mode (a recomputation
    by activation checkpointing is one more), written to ``folder/rank-N`` at exit."""
    import atexit
    import os
    from pathlib import Path

    from transformers.models.llama import modeling_llama

    forward = modeling_llama.LlamaDecoderLayer.forward
    calls = [0]

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.training and self.self_attn.layer_idx == 0:
            calls[0] += 1
        return forward(self, *args, **kwargs)

    modeling_llama.LlamaDecoderLayer.forward = counting  # type: ignore[method-assign]
    if "RANK" in os.environ:  # a training process, not the launcher
        atexit.register(lambda: Path(folder, f"rank-{os.environ['RANK']}").write_text(f"{calls[0]}\n"))


if _folder := __import__("os").environ.get("KUBETUNE_TEST_LAYER_CALLS"):
    _count_layer_calls(_folder)
