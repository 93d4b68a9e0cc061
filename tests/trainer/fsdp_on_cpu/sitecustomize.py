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
