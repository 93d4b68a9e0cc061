"""Resuming a checkpoint on another layout: another number of processes, with FSDP or without.

A step is defined by the examples it trains, not by the processes that train them: every
checkpoint records its layout (processes, examples per process, accumulation), and a run resumed
on another number of processes trains the same global batch per step, split another way. The
optimizer steps, the learning-rate schedule and the data position (transformers' sampler gives the
same order on any number of processes) are then those of the run that stopped; only the
floating-point summation order differs.

FSDP checkpoints (one shard per rank, torch.distributed.checkpoint) and whole ones (a single
process, or DDP) load into either kind of run through torch's state-dict API, which gathers or
scatters as needed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from transformers import Trainer

from kubetune import api
from kubetune.trainer import distributed
from kubetune.validation import InvalidJob, Problem

LAYOUT = "kubetune-layout.json"
SHARDED_MODEL = "pytorch_model_fsdp_0"  # accelerate's names for FSDP's sharded checkpoint
SHARDED_OPTIMIZER = "optimizer_0"
CHECKPOINT_WRAPPER = "_checkpoint_wrapped_module."  # in parameter names under FSDP's checkpointing


@dataclass(frozen=True)
class Layout:
    processes: int
    batch_size: int  # examples per process per micro-batch
    gradient_accumulation: int

    @property
    def global_batch(self) -> int:
        """Examples per optimizer step, over all processes."""
        return self.processes * self.batch_size * self.gradient_accumulation

    def describe(self) -> str:
        return (
            f"{self.processes} process{'es' if self.processes > 1 else ''} x {self.batch_size} examples"
            f" x {self.gradient_accumulation} accumulation"
        )


def write_layout(checkpoint: Path, layout: Layout) -> None:
    (checkpoint / LAYOUT).write_text(json.dumps(asdict(layout)) + "\n")


def read_layout(checkpoint: Path) -> Layout | None:
    """The layout a checkpoint was trained with; None for one saved before layouts were recorded."""
    path = checkpoint / LAYOUT
    return Layout(**json.loads(path.read_text())) if path.exists() else None


def resumed_layout(saved: Layout, processes: int, max_batch_size: int, *, step: int) -> Layout:
    """How ``processes`` train ``saved``'s global batch: the most examples per process up to
    ``max_batch_size`` (the spec's: what fits a device), the rest by accumulation (pure)."""
    total = saved.global_batch
    if total % processes:
        divisors = ", ".join(str(n) for n in range(1, total + 1) if total % n == 0)
        raise InvalidJob(
            "checkpoint",
            [
                Problem(
                    "spec.resources.gpus",
                    f"the checkpoint of step {step} trained {total} examples a step ({saved.describe()}), "
                    f"which {processes} processes cannot share evenly: resume on {divisors} processes, "
                    "or start over under another output (or delete its checkpoints/)",
                )
            ],
        )
    share = total // processes
    batch = max(size for size in range(1, min(max_batch_size, share) + 1) if share % size == 0)
    return Layout(processes, batch, share // batch)


def with_layout(spec: api.FineTuneJobSpec, layout: Layout) -> api.FineTuneJobSpec:
    training = spec.training.model_copy(
        update={"batch_size": layout.batch_size, "gradient_accumulation": layout.gradient_accumulation}
    )
    return spec.model_copy(update={"training": training})


def spec_for(spec: api.FineTuneJobSpec, checkpoint: Path, processes: int) -> tuple[api.FineTuneJobSpec, str]:
    """``spec`` with the batch layout that resumes ``checkpoint`` on ``processes``, and what
    changed in words (empty where nothing did)."""
    saved = read_layout(checkpoint)
    if saved is None or saved.processes == processes:
        return spec, ""
    step = int(json.loads((checkpoint / "trainer_state.json").read_text())["global_step"])
    layout = resumed_layout(saved, processes, spec.training.batch_size, step=step)
    words = (
        f"resuming {saved.describe()} as {layout.describe()}: the same {layout.global_batch} examples a step"
    )
    return with_layout(spec, layout), words


def is_sharded(checkpoint: Path) -> bool:
    return (checkpoint / SHARDED_MODEL).is_dir()


def read_sharded(folder: Path) -> dict[str, Any]:
    """A torch.distributed.checkpoint folder, whole, in this process's memory."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    _load_state_dict(
        state, storage_reader=FileSystemReader(folder), planner=_EmptyStateDictLoadPlanner(), no_dist=True
    )
    return state


class ResumingTrainer(Trainer):
    """transformers' Trainer that also resumes a checkpoint of the other kind: an FSDP checkpoint
    without FSDP (one process), a whole one with FSDP."""

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        checkpoint = Path(resume_from_checkpoint)
        if is_sharded(checkpoint) == self.is_fsdp_enabled:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        model = model if model is not None else self.model
        assert model is not None
        if is_sharded(checkpoint):
            weights = read_sharded(checkpoint / SHARDED_MODEL)["model"]
        else:
            weights = whole_weights(checkpoint, model) if distributed.is_main() else {}
        options = StateDictOptions(
            full_state_dict=True, strict=False, broadcast_from_rank0=self.is_fsdp_enabled
        )
        set_model_state_dict(model, weights, options=options)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or is_sharded(Path(checkpoint)) == self.is_fsdp_enabled:
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        folder = Path(checkpoint)
        assert self.optimizer is not None and self.lr_scheduler is not None
        if is_sharded(folder):
            state = read_sharded(folder / SHARDED_OPTIMIZER)["optimizer"]
        elif distributed.is_main():
            state = by_name(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True), self)
        else:
            state = {}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=self.is_fsdp_enabled)
        set_optimizer_state_dict(self.model_wrapped, self.optimizer, state, options=options)
        self.lr_scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))


def whole_weights(checkpoint: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights of a whole checkpoint by the model's parameter names: every ``model*.safetensors``
    (full fine-tuning), else the adapter, whose file leaves the adapter's name out of its keys."""
    from safetensors.torch import load_file

    files = sorted(checkpoint.glob("model*.safetensors"))
    if files:
        return {name: tensor for file in files for name, tensor in load_file(file).items()}
    adapter = load_file(checkpoint / "adapter_model.safetensors")
    names = {name.replace(".default", ""): name for name in _names(model)}
    return {names[key]: tensor for key, tensor in adapter.items()}


def by_name(state: dict[str, Any], trainer: Trainer) -> dict[str, Any]:
    """A whole optimizer state (parameters numbered in the order of its groups) keyed by parameter
    name instead. Trainer builds the groups in the same order on every layout."""
    assert trainer.optimizer is not None
    named = {id(param): name for name, param in _named_parameters(trainer.model_wrapped)}
    order = [named[id(param)] for group in trainer.optimizer.param_groups for param in group["params"]]
    return {
        "state": {order[index]: value for index, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [order[i] for i in group["params"]]} for group in state["param_groups"]
        ],
    }


def _named_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name.replace(CHECKPOINT_WRAPPER, ""), param) for name, param in model.named_parameters()]


def _names(model: torch.nn.Module) -> list[str]:
    return [name for name, _ in _named_parameters(model)]
